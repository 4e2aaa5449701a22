"""The plan: tile, chunk and imagery counts for a region, its printout, and the `python -m pipeline` CLI."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import mercantile
import pytest

from pipeline import plan as plan_module
from pipeline.__main__ import main
from pipeline.errors import TilingError, TooManyTilesError
from pipeline.geometry import Bounds
from pipeline.imagery.cache import TileCache
from pipeline.plan import format_bytes, format_plan, make_plan, parse_size
from pipeline.regions import Region, parse_region

TYPICAL_TILE_BYTES = 20_000
# Nothing listens on port 9 (discard); offline runs never connect anyway.
OFFLINE_TEMPLATE = "xyz:http://127.0.0.1:9/{z}/{x}/{y}.png"


class TileServerStandIn:
    """The XYZ reader's planning surface, answering from mercantile alone (no network, no cache)."""

    source_id = "stand-in-imagery"
    attribution = "Stand-in imagery for tests"
    typical_tile_bytes = TYPICAL_TILE_BYTES

    def __init__(self, max_zoom: int = 19, cached: frozenset[mercantile.Tile] = frozenset()) -> None:
        self.max_zoom = max_zoom
        self.cached = cached

    def source_tiles(self, bounds: Bounds, zoom: int) -> list[mercantile.Tile]:
        west, south = mercantile.lnglat(bounds.left, bounds.bottom)
        east, north = mercantile.lnglat(bounds.right, bounds.top)
        return list(mercantile.tiles(west, south, east, north, zooms=zoom))

    def is_cached(self, tile: mercantile.Tile) -> bool:
        return tile in self.cached


class RasterStandIn:
    """A reader without a tile pyramid (like a local GeoTIFF)."""

    source_id = "local-raster"
    attribution = "Local scene"


def _st_louis() -> Region:
    return parse_region("St. Louis")


def _expected_source_tiles(region: Region, output_zoom: int, imagery_zoom: int) -> set[mercantile.Tile]:
    """Source tiles under 180 m squares centred on every output tile, derived with mercantile only."""
    west, south, east, north = region.geometry.bounds
    needed = set()
    for tile in mercantile.tiles(west, south, east, north, zooms=output_zoom):
        left, bottom, right, top = mercantile.xy_bounds(tile)
        centre_x, centre_y = (left + right) / 2, (bottom + top) / 2
        half = 90.0 / math.cos(math.radians(mercantile.lnglat(centre_x, centre_y).lat))
        lon0, lat0 = mercantile.lnglat(centre_x - half, centre_y - half)
        lon1, lat1 = mercantile.lnglat(centre_x + half, centre_y + half)
        needed.update(mercantile.tiles(lon0, lat0, lon1, lat1, zooms=imagery_zoom))
    return needed


def test_plan_counts_tiles_chunks_and_imagery_for_a_city() -> None:
    region = _st_louis()
    result = make_plan(region, TileServerStandIn())
    # 180 m squares at 38.6°N: z17 tiles are 239 m on the ground, z18 imagery 0.47 m/px <= 0.80 m/px.
    assert result.tile_cover.zoom == 17
    west, south, east, north = region.geometry.bounds
    bbox_tiles = list(mercantile.tiles(west, south, east, north, zooms=17))
    assert len(result.tile_cover) == len(bbox_tiles)
    assert result.chunk_zoom == 11
    assert set(result.chunks) == {mercantile.parent(tile, zoom=11) for tile in bbox_tiles}
    imagery = result.imagery
    assert imagery is not None
    assert (imagery.min_zoom, imagery.max_zoom) == (18, 18)
    assert imagery.tiles == len(_expected_source_tiles(region, 17, 18))
    assert imagery.cached == 0
    assert imagery.bytes_to_fetch == imagery.tiles * TYPICAL_TILE_BYTES
    assert not imagery.extrapolated
    assert (result.grid.width, result.grid.height) == (
        max(tile.x for tile in bbox_tiles) - min(tile.x for tile in bbox_tiles) + 1,
        max(tile.y for tile in bbox_tiles) - min(tile.y for tile in bbox_tiles) + 1,
    )


def test_plan_counts_cached_tiles() -> None:
    region = _st_louis()
    needed = sorted(_expected_source_tiles(region, 17, 18))
    cached = frozenset(needed[::3]) | {mercantile.Tile(0, 0, 18)}
    imagery = make_plan(region, TileServerStandIn(cached=cached)).imagery
    assert imagery is not None
    assert imagery.cached == len(needed[::3])
    assert imagery.bytes_to_fetch == (len(needed) - len(needed[::3])) * TYPICAL_TILE_BYTES


def test_plan_caps_imagery_at_the_source_max_zoom() -> None:
    result = make_plan(_st_louis(), TileServerStandIn(max_zoom=16))
    assert result.imagery is not None
    assert (result.imagery.min_zoom, result.imagery.max_zoom) == (16, 16)
    assert "source stops at zoom 16: coarser than the model's 0.80 m/px" in format_plan(result)


def test_plan_follows_sat_type_zoom_level_and_chunk_zoom() -> None:
    result = make_plan(_st_louis(), TileServerStandIn(), sat_type="sentinel", zoom_level=1, chunk_zoom=9)
    # 2,560 m squares at 38.6°N: z14 tiles are 1.9 km, z13 3.8 km on the ground.
    assert result.tile_cover.zoom == 14
    assert result.chunk_zoom == 9
    assert all(chunk.z == 9 for chunk in result.chunks)
    with pytest.raises(TilingError, match=r"chunk zoom 18 is outside 0\.\.17"):
        make_plan(_st_louis(), TileServerStandIn(), chunk_zoom=18)


def test_plan_refuses_large_regions_unless_allowed() -> None:
    region = _st_louis()
    with pytest.raises(TooManyTilesError, match=r"more than 100 tiles at zoom 17.*--allow-large"):
        make_plan(region, TileServerStandIn(), max_tiles=100)
    assert len(make_plan(region, TileServerStandIn(), max_tiles=None).tile_cover) > 100


def test_plan_without_tile_pyramid_has_no_download_estimate() -> None:
    result = make_plan(_st_louis(), RasterStandIn())
    assert result.imagery is None
    assert "local-raster: read on demand" in format_plan(result)


def test_large_plans_extrapolate_imagery_from_sampled_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    region = parse_region("38.627,-90.199,6km")
    exact = make_plan(region, TileServerStandIn(), chunk_zoom=13).imagery
    monkeypatch.setattr(plan_module, "EXACT_IMAGERY_FOOTPRINTS", 400)
    sampled = make_plan(region, TileServerStandIn(), chunk_zoom=13).imagery
    assert exact is not None and sampled is not None
    assert sampled.extrapolated and not exact.extrapolated
    assert sampled.sampled_chunks < sampled.chunks == exact.chunks
    assert sampled.tiles == pytest.approx(exact.tiles, rel=0.15)


def test_printout_is_short_and_has_units() -> None:
    result = make_plan(_st_louis(), TileServerStandIn())
    text = format_plan(result)
    lines = text.splitlines()
    assert len(lines) <= 8
    # The St. Louis square is 0.035° x 0.030°: about 3.05 km x 3.33 km at 38.6°N.
    area = re.match(r"Region         St\. Louis: (\d+\.\d) km² around latitude 38\.6250°N$", lines[0])
    assert area is not None
    assert float(area.group(1)) == pytest.approx(10.15, abs=0.1)
    assert f"Output tiles   {len(result.tile_cover)} at zoom 17" in text
    assert f"Output raster  {result.grid.width} x {result.grid.height} px in EPSG:3857, 239 m/px true GSD" in text
    assert "180 m squares, 0.80 m/px at 224 px" in text
    assert "at zoom 18 (0.47 m/px true GSD at 38.62" in text
    assert f"{result.imagery.tiles:,} tiles, 0 cached" in text
    assert "Attribution    Stand-in imagery for tests" in text
    assert "missing (offline" in format_plan(result, offline=True)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2GB", 2_000_000_000), ("500 MB", 500_000_000), ("1.5GiB", 1_610_612_736), ("1000", 1000), ("3kb", 3000)],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_parse_size_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="2GB"):
        parse_size("lots")


@pytest.mark.parametrize(
    ("count", "expected"), [(0, "0 B"), (999, "999 B"), (25_300_000, "25.3 MB"), (2_000_000_000, "2.0 GB")]
)
def test_format_bytes(count: int, expected: str) -> None:
    assert format_bytes(count) == expected


def _run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize(
    ("region", "message"),
    [
        ("Frnace", "error: unknown region 'Frnace'; did you mean 'France'?"),
        ("-90.1,38.7,-90.2,38.6", "error: inverted bbox: south 38.7 is not below north 38.6;"),
        ("38.6,-91.2,38.7,-91.1", "error: bbox south latitude -91.2 is out of range -90..90;"),
    ],
)
def test_cli_bad_region_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, region: str, message: str
) -> None:
    status, out, err = _run_cli(capsys, "plan", f"--region={region}", "--cache-dir", str(tmp_path))
    assert status == 2
    assert out == ""
    assert err.startswith(message)
    assert err.count("\n") == 1


def test_cli_plans_a_city_offline(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, out, err = _run_cli(
        capsys,
        "plan",
        "--region",
        "St. Louis",
        "--imagery",
        OFFLINE_TEMPLATE,
        "--offline",
        "--cache-dir",
        str(tmp_path),
    )
    assert (status, err) == (0, "")
    west, south, east, north = parse_region("St. Louis").geometry.bounds
    assert f"Output tiles   {len(list(mercantile.tiles(west, south, east, north, zooms=17)))} at zoom 17" in out
    assert "0 cached" in out and "missing (offline: read as no imagery)" in out


def test_cli_refuses_a_large_region_unless_allowed(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    common = ("plan", "--region", "Belgium", "--imagery", OFFLINE_TEMPLATE, "--offline", "--cache-dir", str(tmp_path))
    status, out, err = _run_cli(capsys, *common)
    assert (status, out) == (2, "")
    assert err.startswith("error: region 'Belgium' needs more than 250,000 tiles at zoom 17;")
    assert "--allow-large" in err
    status, out, err = _run_cli(capsys, *common, "--sat-type", "sentinel", "--zoom-level", "5", "--max-tiles", "10")
    assert (status, out) == (2, "")
    assert "more than 10 tiles at zoom 11" in err


def test_cli_prints_region_warnings_as_single_lines(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, out, err = _run_cli(
        capsys,
        "plan",
        "--region",
        "178,-18,-179,-16",
        "--sat-type",
        "sentinel",
        "--zoom-level",
        "5",
        "--imagery",
        OFFLINE_TEMPLATE,
        "--offline",
        "--cache-dir",
        str(tmp_path),
    )
    assert status == 0
    assert err == "warning: bbox west 178 > east -179: reading it as crossing the antimeridian (RFC 7946)\n"
    assert "Output raster" in out


def test_cli_cache_info_and_prune(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cache = TileCache(tmp_path)
    for x in range(4):
        cache.put(f"stand-in/17/{x}/0.jpg", bytes(1000))
    status, out, _ = _run_cli(capsys, "cache", "info", "--cache-dir", str(tmp_path))
    assert status == 0
    assert out == f"{tmp_path}: 4 tiles, 4.0 kB\n"
    status, out, _ = _run_cli(capsys, "cache", "prune", "--max-size", "2.5kB", "--cache-dir", str(tmp_path))
    after = cache.stats()
    assert status == 0
    assert after.bytes <= 2500
    assert out == f"{tmp_path}: removed {4 - after.files} tiles, {format_bytes(4000 - after.bytes)}\n"


def test_cli_cache_prune_needs_a_limit(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["cache", "prune", "--cache-dir", str(tmp_path)])
    assert exited.value.code == 2
    assert "needs --max-size and/or --older-than-days" in capsys.readouterr().err


def test_module_entry_point_exits_2_without_traceback(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "pipeline", "plan", "--region", "Atlantis", "--cache-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 2
    assert completed.stdout == ""
    assert completed.stderr.startswith("error: unknown region 'Atlantis';")
    assert completed.stderr.count("\n") == 1


def test_plan_and_build_tile_a_region_alike() -> None:
    from pipeline.build_plan import make_build_plan
    from pipeline.config import TilingSettings
    from pipeline.gsd import ImageryFit

    region = _st_louis()
    fit = ImageryFit("stand-in", "stand-in", "", 0.5, 0.8)
    for offset in (0, 2):
        planned = make_plan(region, TileServerStandIn(), sat_type="bingmap", zoom_level=1, zoom_offset=offset)
        built = make_build_plan(region, "bingmap", 1, TilingSettings(offset, None, 250_000), fit)
        assert (planned.tile_cover.zoom, len(planned.tile_cover), planned.grid) == (
            built.tile_zoom,
            built.tile_count,
            built.grid,
        )
        assert len(planned.chunks) == len(built.chunks)

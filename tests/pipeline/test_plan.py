"""The plan: tiles, chunks, grid and imagery of a region, its file, its printout, and the `python -m pipeline` CLI."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import mercantile
import numpy as np
import pytest
import torch
import yaml
from support.hf_stub import HubStub, cached_blobs, hub_environment
from support.paths import LANDSAT, REPO
from support.upstream_ckpt import hparams_checkpoint_bytes

from model import MODEL_INPUT_PX
from pipeline import build as build_module
from pipeline import plan as plan_module
from pipeline.__main__ import main, parse_size
from pipeline.build import (
    BUILD_LIMIT_HINT,
    PlannedBuild,
    Workload,
    describe,
    format_bytes,
    plan_build,
    start_build,
)
from pipeline.config import (
    DEFAULT_CONFIG_PATH,
    ImagerySettings,
    TilingSettings,
    load_build_config,
    load_plan_inputs,
)
from pipeline.errors import BuildConfigError, ImageryMismatchError, TilingError, TooManyTilesError
from pipeline.geometry import ChunkBlocks
from pipeline.imagery import LocalRasterReader, XYZReader
from pipeline.imagery.cache import TileCache
from pipeline.plan import (
    MAX_CHUNKS,
    ImageryFit,
    ModelView,
    Plan,
    all_chunks,
    check_imagery,
    estimate_downloads,
    fitting_zoom_level,
    make_plan,
    read_chunks,
    read_plan,
    write_plan,
)
from pipeline.rates import RATES_FORMAT, read_rates
from pipeline.regions import Region, parse_region

WORLD_M = 2 * math.pi * 6378137.0
TYPICAL_TILE_BYTES = 20_000
# Nothing listens on port 9 (discard); offline runs and estimates never connect anyway.
OFFLINE_URL = "http://127.0.0.1:9/{z}/{x}/{y}.png"
OFFLINE_TEMPLATE = f"xyz:{OFFLINE_URL}"
FIT = ImageryFit("test", "test-source", "test attribution", 0.5, True)
LIMIT_HINT = "the way out"


def _st_louis() -> Region:
    return parse_region("St. Louis")


def plan_of(region: Region, *args: Any, **options: Any) -> tuple[Plan, list[plan_module.ChunkTiles]]:
    """The plan and every one of its chunks, listed from its blocks (`made_plan`'s arguments)."""
    plan, blocks, _ = made_plan(region, *args, **options)
    return plan, all_chunks(plan, blocks)


def made_plan(
    region: Region,
    sat_type: str = "bingmap",
    zoom_level: int = 1,
    *,
    offset: int = 0,
    chunk_zoom: int | None = None,
    max_tiles: int | None = 250_000,
) -> tuple[Plan, ChunkBlocks, list[plan_module.ChunkTiles]]:
    tiling = TilingSettings(offset, chunk_zoom, max_tiles)
    return make_plan(region, ModelView.of(sat_type, zoom_level), tiling, FIT, limit_hint=LIMIT_HINT)


def offline_server(cache_dir: Path, max_zoom: int = 19) -> XYZReader:
    return XYZReader(
        OFFLINE_URL,
        cache=TileCache(cache_dir),
        offline=True,
        max_zoom=max_zoom,
        source_id="stand-in",
        attribution="Stand-in imagery for tests",
        typical_tile_bytes=TYPICAL_TILE_BYTES,
    )


def planned_with(reader: XYZReader | LocalRasterReader, region: Region, **options: object) -> PlannedBuild:
    plan, blocks, chunks = made_plan(region, **options)  # type: ignore[arg-type]
    plan = plan._replace(imagery=plan.imagery._replace(source_id=reader.source_id, attribution=reader.attribution))
    downloads, share = estimate_downloads(reader, plan, chunks)
    return PlannedBuild(plan, blocks, chunks, downloads, share)


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


# --- tiles, chunks, grid ---------------------------------------------------------------------------------


def test_plan_tiles_chunks_and_grid_of_a_city() -> None:
    region = _st_louis()
    plan, chunks = plan_of(region)
    # 180 m squares at 38.6°N: z17 tiles are 239 m on the ground.
    assert plan.zoom == plan.auto_zoom == 17
    west, south, east, north = region.geometry.bounds
    bbox_tiles = list(mercantile.tiles(west, south, east, north, zooms=17))
    assert plan.tile_count == len(bbox_tiles) == sum(chunk.tile_count for chunk in chunks)
    assert chunks[0]._replace(id="renamed").tile_count == chunks[0].tile_count  # a plain NamedTuple
    assert plan.chunk_zoom == 11
    assert set(plan.chunk_ids) == {plan_module.chunk_id(mercantile.parent(tile, zoom=11)) for tile in bbox_tiles}
    assert (plan.grid.width, plan.grid.height) == (
        max(tile.x for tile in bbox_tiles) - min(tile.x for tile in bbox_tiles) + 1,
        max(tile.y for tile in bbox_tiles) - min(tile.y for tile in bbox_tiles) + 1,
    )


def test_each_chunk_lists_its_tiles_views_cells_and_centres() -> None:
    region = parse_region("-72.2245,18.5035,-72.2015,18.5245")
    plan, chunks = plan_of(region, zoom_level=5, offset=2, chunk_zoom=15)
    assert len(chunks) >= 2
    seen = set()
    for chunk in chunks:
        z, x, y = (int(part) for part in chunk.id.split("_"))
        for index in range(chunk.tile_count):
            tile = mercantile.Tile(int(chunk.x[index]), int(chunk.y[index]), plan.zoom)
            assert mercantile.parent(tile, zoom=z) == mercantile.Tile(x, y, z)
            left, bottom, right, top = mercantile.xy_bounds(tile)
            centre = mercantile.lnglat((left + right) / 2, (bottom + top) / 2)
            assert (chunk.lon[index], chunk.lat[index]) == pytest.approx((centre.lng, centre.lat), abs=1e-9)
            half = 900.0 / 2 / math.cos(math.radians(centre.lat))
            view_left, view_bottom, view_right, view_top = chunk.views[index]
            # Centred on the tile to within half of one of the view's pixels (its row's pixel lattice).
            assert abs(view_left - ((left + right) / 2 - half)) <= half / MODEL_INPUT_PX
            assert view_right - view_left == pytest.approx(2 * half, abs=1e-6)
            assert (view_bottom, view_top) == pytest.approx(((bottom + top) / 2 - half, (bottom + top) / 2 + half))
            assert (chunk.row[index], chunk.col[index]) == (tile.y - plan.grid.top_row, tile.x - plan.grid.first_column)
            seen.add(tile)
    assert len(seen) == plan.tile_count


@pytest.mark.parametrize("region_spec", ["-72.2245,18.5035,-72.2015,18.5245", "-54.664,-25.489,-54.354,-25.208"])
def test_the_views_extent_is_the_box_of_every_view(region_spec: str) -> None:
    plan, chunks = plan_of(parse_region(region_spec), sat_type="sentinel", zoom_level=3, offset=2)
    views = np.vstack([chunk.views for chunk in chunks])
    left, bottom, right, top = plan.views_extent()
    # Every view inside; each side at most two view pixels (the rows' lattices) beyond the views' own box.
    pixel = float((views[:, 2] - views[:, 0]).max()) / MODEL_INPUT_PX
    assert 0 <= views[:, 0].min() - left <= 2 * pixel and 0 <= right - views[:, 2].max() <= 2 * pixel
    assert 0 <= views[:, 1].min() - bottom <= 1e-6 and 0 <= top - views[:, 3].max() <= 1e-6


def test_tile_zoom_offset_refines_the_automatic_zoom() -> None:
    region = parse_region("-54.664,-25.489,-54.354,-25.208")
    auto, _ = plan_of(region, "sentinel", 3)
    finer, _ = plan_of(region, "sentinel", 3, offset=2)
    assert finer.zoom == auto.zoom + 2 == auto.auto_zoom + 2
    assert finer.grid.pixel_m == pytest.approx(WORLD_M / 2**finer.zoom)
    assert finer.tile_count > 10 * auto.tile_count


@pytest.mark.filterwarnings("ignore::pipeline.errors.RegionWarning")  # the second bbox crosses ±180°
@pytest.mark.parametrize("region_spec", ["-72.2245,18.5035,-72.2015,18.5245", "179.99,-0.01,-179.99,0.01"])
def test_grid_cells_put_each_tile_on_its_own_pixel(region_spec: str) -> None:
    plan, chunks = plan_of(parse_region(region_spec), zoom_level=5, offset=2)
    size = plan.grid.pixel_m
    cells = set()
    for chunk in chunks:
        for x, y, row, col in zip(chunk.x, chunk.y, chunk.row, chunk.col, strict=True):
            left, _, _, top = mercantile.xy_bounds(mercantile.Tile(int(x), int(y), plan.zoom))
            # Past the antimeridian the grid continues east of +180°: the pixel is one world east of the tile.
            worlds = (plan.grid.bounds.left + col * size - left) / WORLD_M
            assert worlds == pytest.approx(round(worlds), abs=1e-9)
            assert plan.grid.bounds.top - row * size == pytest.approx(top, abs=1e-3)
            assert 0 <= row < plan.grid.height and 0 <= col < plan.grid.width
            cells.add((int(row), int(col)))
    assert len(cells) == plan.tile_count


def test_plan_follows_sat_type_zoom_level_and_chunk_zoom() -> None:
    plan, chunks = plan_of(_st_louis(), "sentinel", 1, chunk_zoom=9)
    # 2,560 m squares at 38.6°N: z14 tiles are 1.9 km, z13 3.8 km on the ground.
    assert (plan.zoom, plan.chunk_zoom) == (14, 9)
    assert all(chunk.id.startswith("9_") for chunk in chunks)
    with pytest.raises(TilingError, match=r"chunk zoom 18 is outside 0\.\.17"):
        plan_of(_st_louis(), chunk_zoom=18)


def test_plan_refuses_large_regions_with_the_callers_hint() -> None:
    region = _st_louis()
    with pytest.raises(
        TooManyTilesError, match=r"region 'St. Louis' needs more than 100 tiles at zoom 17; the way out"
    ):
        plan_of(region, max_tiles=100)
    assert plan_of(region, max_tiles=None)[0].tile_count > 100


@pytest.mark.parametrize(("spec", "west", "east"), [("-100,0,100,10", -100, 100), ("-180,-60,180,60", -180, 180)])
def test_a_bbox_wider_than_180_degrees_plans_the_band_it_names(
    tmp_path: Path, spec: str, west: float, east: float
) -> None:
    imagery = {"source": OFFLINE_TEMPLATE, "offline": True, "cache_dir": str(tmp_path)}
    # zoom level 200: 512 km views, zoom-6 output tiles, a few thousand at most (every chunk kept by the survey).
    inputs = load_plan_inputs({"region": spec, "imagery": imagery, "model": {"zoom_level": 200}})
    planned = plan_build(inputs, survey=True)
    plan = planned.plan
    tile_deg = 360 / 2**plan.zoom
    lons = np.concatenate([chunk.lon for chunk in planned.chunks])
    assert west < lons.min() < west + tile_deg and east - tile_deg < lons.max() < east
    columns = set(np.concatenate([chunk.x for chunk in planned.chunks]).tolist())
    assert columns == {tile.x for tile in mercantile.tiles(west, 0, east, 10, zooms=plan.zoom)}
    assert plan.grid.width == len(columns) == (2**plan.zoom if east - west == 360 else max(columns) - min(columns) + 1)
    assert plan.grid.first_column == min(columns)
    first, last = (mercantile.bounds(mercantile.Tile(x, 0, plan.zoom)) for x in (min(columns), max(columns)))
    text = "\n".join(describe(planned))
    assert f"extent {-first.west:.4f}°W" in text and f"to {last.east:.4f}°E" in text


# --- the plan file ---------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::pipeline.errors.RegionWarning")
def test_the_plan_file_round_trips_and_is_rewritten_only_when_the_plan_changes(tmp_path: Path) -> None:
    path = tmp_path / "plan.npz"
    region = parse_region("179.99,-0.01,-179.99,0.01")
    plan, blocks, _ = made_plan(region, zoom_level=5, offset=2)
    assert write_plan(path, plan, blocks)
    stamp = path.stat().st_mtime_ns
    assert read_plan(path) == plan
    _, chunks = plan_of(region, zoom_level=5, offset=2)
    assert len(chunks) > 1
    stored = read_chunks(path, read_plan(path), [chunk.id for chunk in reversed(chunks)])
    for chunk, again in zip(reversed(chunks), stored, strict=True):
        assert again.id == chunk.id
        for name in chunk._fields[1:]:
            np.testing.assert_array_equal(getattr(again, name), getattr(chunk, name))
    assert not write_plan(path, *made_plan(region, zoom_level=5, offset=2)[:2])
    assert path.stat().st_mtime_ns == stamp
    finer, finer_blocks, _ = made_plan(region, zoom_level=5, offset=3)
    assert write_plan(path, finer, finer_blocks)
    assert read_plan(path).zoom == plan.zoom + 1


# --- imagery: fit and downloads --------------------------------------------------------------------------


def test_fitting_zoom_level_is_the_finest_trained_level_that_takes_the_imagery() -> None:
    # sentinel: 256 px x 10 m per zoom level over 224 px = 11.43 m/px per level, 1.5x coarser imagery taken:
    # level 1 takes up to 17.1 m/px, level 3 51.4 m/px, level 5 85.7 m/px.
    assert fitting_zoom_level(11.0, "sentinel") == 1
    assert fitting_zoom_level(30.0, "sentinel") == fitting_zoom_level(51.0, "sentinel") == 3
    assert fitting_zoom_level(52.0, "sentinel") == 5
    assert fitting_zoom_level(86.0, "sentinel") is None
    assert fitting_zoom_level(0.3, "bingmap") == 1


def test_imagery_up_to_one_and_a_half_times_coarser_fits(tmp_path: Path) -> None:
    view = ModelView.of("bingmap", 5)
    model_m = 5 * 300 * 0.6 / 224
    assert view.gsd_m == pytest.approx(model_m)
    with offline_server(tmp_path) as reader:
        settings = ImagerySettings("xyz", {}, str(tmp_path), True, 1.5 * model_m, 0.5)
        fit = check_imagery(reader, settings, view, 40.0)
        assert (fit.native_gsd_m, fit.fetches_ahead, fit.source_id) == (1.5 * model_m, True, "stand-in")
        with pytest.raises(ImageryMismatchError) as raised:
            check_imagery(reader, ImagerySettings("xyz", {}, str(tmp_path), True, 1.51 * model_m, 0.5), view, 40.0)
    assert str(raised.value).endswith(
        f"expects {model_m:.3g} m/px (at most 1.5x coarser); the imagery is too coarse for this model, even at its"
        f" coarsest trained zoom_level 5 (at most {1.5 * model_m:.3g} m/px); use finer imagery"
    )


def test_a_local_raster_is_read_on_demand_and_checked_at_its_own_resolution() -> None:
    with LocalRasterReader(LANDSAT) as landsat:
        settings = ImagerySettings(str(LANDSAT), {}, "tiles_cache", False, None, 0.5)
        fit = check_imagery(landsat, settings, ModelView.of("sentinel", 3), -25.3)
        assert fit.native_gsd_m == pytest.approx(30.0, rel=0.01) and not fit.fetches_ahead
        with pytest.raises(ImageryMismatchError, match=r"set model\.zoom_level: 3"):
            check_imagery(landsat, settings, ModelView.of("sentinel", 1), -25.3)
        planned = planned_with(landsat, _st_louis())
    assert planned.downloads is None
    assert "read on demand, nothing to download up front" in "\n".join(describe(planned))


def test_plan_counts_imagery_downloads_and_cached_tiles(tmp_path: Path) -> None:
    region = _st_louis()
    needed = sorted(_expected_source_tiles(region, 17, 18))
    with offline_server(tmp_path) as reader:
        for tile in needed[::3]:
            reader.cache.put(reader.cache_key(tile), b"cached")
        downloads = planned_with(reader, region).downloads
    # 180 m squares seen at 0.80 m/px: z18 imagery is 0.47 m/px at 38.6°N.
    assert downloads is not None
    assert (downloads.min_zoom, downloads.max_zoom) == (18, 18)
    assert downloads.tiles == len(needed)
    assert downloads.cached == len(needed[::3])
    assert downloads.bytes_to_fetch == (len(needed) - len(needed[::3])) * TYPICAL_TILE_BYTES


def test_plan_caps_imagery_at_the_source_max_zoom(tmp_path: Path) -> None:
    with offline_server(tmp_path, max_zoom=16) as reader:
        planned = planned_with(reader, _st_louis())
    assert planned.downloads is not None
    assert (planned.downloads.min_zoom, planned.downloads.max_zoom) == (16, 16)
    assert "source stops at zoom 16: coarser than the model's 0.80 m/px" in "\n".join(describe(planned))


def test_large_plans_extrapolate_downloads_from_sampled_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    region = parse_region("38.627,-90.199,6km")
    with offline_server(tmp_path) as reader:
        exact = planned_with(reader, region, chunk_zoom=13)
        monkeypatch.setattr(plan_module, "EXACT_ESTIMATE_TILES", 400)
        sampled = planned_with(reader, region, chunk_zoom=13)
    assert exact.downloads is not None and sampled.downloads is not None
    assert exact.counted_share == 1.0 and 0 < sampled.counted_share < 1
    assert sampled.downloads.tiles == pytest.approx(exact.downloads.tiles, rel=0.15)
    assert "(counted on" in "\n".join(describe(sampled))


def test_printout_is_short_and_has_units(tmp_path: Path) -> None:
    with offline_server(tmp_path) as reader:
        planned = planned_with(reader, _st_louis())
    plan = planned.plan
    lines = describe(planned)
    text = "\n".join(lines)
    assert len(lines) <= 12 and all(len(line) <= 160 for line in lines)
    # The St. Louis square is 0.035° x 0.030°: about 3.05 km x 3.33 km at 38.6°N.
    area = re.match(r"Region         St\. Louis: (\d+\.\d) km² around latitude 38\.6250°N$", lines[0])
    assert area is not None
    assert float(area.group(1)) == pytest.approx(10.15, abs=0.1)
    assert f"Output tiles   {plan.tile_count} at zoom 17" in text
    assert f"Output raster  {plan.grid.width} x {plan.grid.height} px in EPSG:3857, 239 m/px true GSD" in text
    assert "180 m squares, 0.80 m/px at 224 px" in text
    assert "at zoom 18 (0.47 m/px true GSD at 38.62" in text
    assert planned.downloads is not None and f"{planned.downloads.tiles:,} tiles, 0 cached" in text
    assert "Attribution    Stand-in imagery for tests" in text
    assert "missing (offline" in "\n".join(describe(planned, offline=True))


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
        "--sat-type",
        "bingmap",
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


def test_cli_plans_a_country_and_says_the_build_would_refuse_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    common = ("plan", "--region", "Belgium", "--imagery", OFFLINE_TEMPLATE, "--offline", "--cache-dir", str(tmp_path))
    status, out, err = _run_cli(capsys, *common, "--sat-type", "bingmap")
    assert (status, err) == (0, "")
    count = int(re.search(r"Output tiles   ([\d,]+) at zoom 17", out).group(1).replace(",", ""))  # type: ignore[union-attr]
    assert count > 250_000
    assert f"Tile limit     {count:,} > tiling.max_tiles 250,000: the build refuses it;" in out
    small = ("--sat-type", "sentinel", "--zoom-level", "5")
    status, out, err = _run_cli(capsys, *common, *small, "--max-tiles", "10", "--allow-large")  # still accepted

    assert (status, err) == (0, "")
    assert "> tiling.max_tiles 10: the build refuses it" in out
    status, out, err = _run_cli(capsys, *common, *small)
    assert (status, err) == (0, "") and "Tile limit" not in out


def test_cli_plans_the_whole_world_from_the_covers_blocks(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The world band at sentinel zoom level 1 holds ~268 M output tiles: listing them would take ~20 GB. The plan
    counts tiles and chunks from the cover's blocks and lists the sampled chunks' tiles alone (~170 MB, ~4 s)."""
    common = ("plan", "--region=-180,-85,180,85", "--imagery", OFFLINE_TEMPLATE, "--cache-dir", str(tmp_path))
    status, out, err = _run_cli(capsys, *common)
    top, bottom = mercantile.tile(0.0, 85.0, 14), mercantile.tile(0.0, -85.0, 14)
    assert (status, err) == (0, "")
    assert f"Output tiles   {(bottom.y - top.y + 1) * 2**14:,} at zoom 14\n" in out
    assert f"Chunks         {((bottom.y >> 6) - (top.y >> 6) + 1) * 2**8:,} at zoom 8 " in out
    assert "(counted on 0.038% of the chunks and scaled up)" in out
    # Finer views: ~17 G tiles in millions of chunks, more than a plan lists.
    status, out, err = _run_cli(capsys, *common, "--tile-zoom-offset", "3")
    assert (status, out) == (2, "")
    assert re.fullmatch(
        r"error: region '-180,-85,180,85' needs 17,123,770,368 tiles at zoom 17 in up to [\d,]+ chunks of zoom 11,"
        rf" more than the {MAX_CHUNKS:,} a plan holds; plan a part of it, a coarser view \(a larger"
        r" --zoom-level or a smaller --tile-zoom-offset\) or larger chunks \(a smaller --chunk-zoom\)\n",
        err,
    )


def test_the_build_still_refuses_a_country_over_its_limit(tmp_path: Path) -> None:
    config = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    config["output_dir"] = str(tmp_path)
    config["region"] = "Belgium"
    config["imagery"] = {"source": OFFLINE_TEMPLATE, "offline": True, "cache_dir": str(tmp_path / "tiles")}
    config["model"] = {"checkpoint": "untrained", "sat_type": "bingmap", "zoom_level": 1}
    config["tiling"] = {}
    build = load_build_config(config)
    message = f"region 'Belgium' needs more than 250,000 tiles at zoom 17; {BUILD_LIMIT_HINT}"
    with pytest.raises(TooManyTilesError, match=f"^{re.escape(message)}$"):
        plan_build(build.plan_inputs)
    with pytest.raises(TooManyTilesError, match=f"^{re.escape(message)}$"):
        start_build(build)
    assert not (tmp_path / build.name / "plan.npz").exists()


def test_a_large_plan_lists_only_the_sampled_chunks_and_estimates_as_from_every_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    region = parse_region("38.627,-90.199,6km")
    tiling = TilingSettings(0, 13, None)
    view = ModelView.of("bingmap", 1)
    full_plan, _, every_chunk = make_plan(region, view, tiling, FIT, limit_hint=LIMIT_HINT)
    assert [chunk.id for chunk in every_chunk] == list(full_plan.chunk_ids)
    monkeypatch.setattr(plan_module, "EXACT_ESTIMATE_TILES", 400)
    plan, _, sampled = make_plan(region, view, tiling, FIT, limit_hint=LIMIT_HINT)
    assert plan == full_plan
    step = plan_module.sample_step(plan.tile_count)
    assert step > 1 and [chunk.id for chunk in sampled] == list(plan.chunk_ids[::step])
    with offline_server(tmp_path) as reader:
        exact, share = estimate_downloads(reader, full_plan, every_chunk)
        assert exact is not None and share == 1.0
        estimate, share = estimate_downloads(reader, plan, sampled)
    assert estimate is not None and share == len(sampled) / len(plan.chunk_ids) < 1.0
    assert estimate.tiles == pytest.approx(exact.tiles, rel=0.1)


# --- time and size estimates -----------------------------------------------------------------------------


def _rates_file(path: Path) -> Path:
    common = {"measure": "end-to-end", "hardware": "Test GPU", "source": "test", "date": "2026-01-01"}
    rates = [
        {**common, "device": "cpu", "model": "small", "tiles_per_s": 10.0, "cores": 2, "hardware": "test CPU"},
        {**common, "device": "gpu", "model": "full", "tiles_per_s": 100.0, "cores": None, "start_s": 60.0},
    ]
    path.write_text(json.dumps({"format": RATES_FORMAT, "rates": rates}))
    return path


def test_time_and_size_lines_follow_the_rates_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build_module, "usable_cores", lambda: 4)
    with offline_server(tmp_path) as reader:
        planned = planned_with(reader, _st_louis())
    assert planned.downloads is not None
    workload = Workload("small", 64, 2, 3, read_rates(_rates_file(tmp_path / "rates.json")))
    planned = planned._replace(plan=planned.plan._replace(tile_count=36_000), workload=workload)
    text = "\n".join(describe(planned))
    # 36,000 tiles at 10 tiles/s on 2 cores, scaled to 4 cores: 20 tiles/s, 1,800 s.
    assert (
        "CPU time       ~30 min on this machine's 4 cores (small model, 20.0 tiles/s end-to-end, scaled from 2" in text
    )
    # No small-model GPU rate: the full model's 100 tiles/s, 360 s, plus 60 s start-up = 420 s, 0.12 GPU-hours.
    assert "GPU time       ~7 min on one Test GPU: 0.12 GPU-hours (full model, 100 tiles/s end-to-end + 60 s" in text
    # A rate without start_s says its time leaves out what it did not measure.
    unmeasured = Workload("full", 64, 2, 3, [read_rates(tmp_path / "rates.json")[1]._replace(start_s=None)])
    assert "(full model, 100 tiles/s end-to-end; a build's start-up not measured there)" in "\n".join(
        describe(planned._replace(workload=unmeasured))
    )
    # Per tile: Zarr 3 kinds x 2 queries x 4 B + 64 x 2 B + 3 x 8 B + 1 B = 177 B;
    # COGs (raw and percentile: 2 x 2 x 4 B, concepts 2 B, dominant 2 x 1 B) x 4/3 = 27 B.
    assert "Outputs        ~7.3 MB on disk: Zarr 6.4 MB, COGs 972.0 kB (2 queries, 64-d embedding;" in text
    cache_bytes = format_bytes(planned.downloads.tiles * TYPICAL_TILE_BYTES)
    assert (
        f"Tile cache     ~{cache_bytes} on disk for {planned.downloads.tiles:,} imagery tiles (~20.0 kB each)" in text
    )
    assert "Tile limit" not in text
    start_up = Workload("small", 64, 2, 3, [read_rates(tmp_path / "rates.json")[0]._replace(start_s=14.0)])
    # 1,800 s of tiles + 14 s start-up = 1,814 s, shown in minutes.
    assert "~30 min on this machine's 4 cores (small model, 20.0 tiles/s end-to-end, scaled from 2 cores + 14 s" in (
        "\n".join(describe(planned._replace(workload=start_up)))
    )
    assert "5 queries assumed" in "\n".join(describe(planned._replace(workload=workload._replace(query_count=None))))
    # Four times: Zarr 4 x 176 B + 1 B = 705 B, COGs (4 x 16 B + 4 B) x 4/3 = 91 B per tile.
    timed = "\n".join(describe(planned._replace(workload=workload._replace(times=4))))
    assert "Outputs        ~28.7 MB on disk: Zarr 25.4 MB, COGs 3.3 MB (2 queries at 4 times, 64-d" in timed
    assert "Times          4 (model.month x model.hour): the times above are of one" in timed
    assert "Tile limit     36,000 > tiling.max_tiles 1,000: the build refuses it" in "\n".join(
        describe(planned._replace(max_tiles=1000))
    )


def test_plan_build_reads_queries_embedding_dim_and_rates(tmp_path: Path) -> None:
    config = load_build_config(yaml.safe_load(DEFAULT_CONFIG_PATH.read_text()))
    planned = plan_build(config.plan_inputs, rates_path=_rates_file(tmp_path / "rates.json"))
    assert planned.workload is not None
    assert planned.workload[:4] == ("small", 64, len(config.queries), config.outputs.concepts_top_k)
    assert [rate.tiles_per_s for rate in planned.workload.rates] == [10.0, 100.0]
    assert planned.max_tiles == 250_000


def test_the_committed_rates_file_reads() -> None:
    rates = read_rates()
    assert {(rate.device, rate.model) for rate in rates} >= {("cpu", "small"), ("cpu", "full"), ("gpu", "full")}
    assert all(rate.tiles_per_s > 0 and rate.source and rate.date and rate.hardware for rate in rates)


def test_a_model_view_wider_than_the_world_is_refused() -> None:
    assert ModelView.of("sentinel", 200).size_m == pytest.approx(512_000)
    with pytest.raises(TilingError, match="makes sentinel views 256,000 km wide, more than the world; use a trained"):
        ModelView.of("sentinel", 100_000)


def test_bench_build_writes_a_valid_rates_file(tmp_path: Path) -> None:
    from benchmarks.bench_build import write_rates

    path = _rates_file(tmp_path / "rates.json")
    # Builds of 100 and 10,000 tiles taking 17 s and 60.1 s: 230 tiles/s after 16.6 s of fixed start-up.
    builds = [(100, 17.0), (1_000, 20.0), (10_000, 60.1)]
    written = write_rates(path, builds, 630.0, device=torch.device("cpu"), model_size="small", cores=2)
    rates = read_rates(path)
    assert written in rates and len(rates) == 2  # the cpu/small entry replaced, the gpu one kept
    assert (written.device, written.model, written.measure) == ("cpu", "small", "end-to-end")
    assert (written.tiles_per_s, written.start_s) == (229.7, 16.6)
    assert written.seconds(10_000) == pytest.approx(60.1, abs=0.1)
    assert json.loads(path.read_text())["rates"][0]["model_only_tiles_per_s"] == 630.0
    fresh = tmp_path / "fresh.json"
    write_rates(fresh, [(100, 20.0)], 6.0, device=torch.device("cpu"), model_size="full", cores=2)
    assert [(rate.device, rate.model) for rate in read_rates(fresh)] == [("cpu", "full")]


def test_bench_build_adds_up_the_cpu_time_each_job_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.bench_build import jobs_cpu
    from pipeline.config import write_settings
    from pipeline.steps import main as run_step

    config = load_build_config({"name": "t", "region": "1,1,1.1,1.1", "queries": [{"id": "birds", "text": "birds"}]})
    settings = tmp_path / "settings.json"
    write_settings(config, settings)
    assert run_step(["model", "--settings", str(settings), "--out", str(tmp_path / "model.json")]) == 0
    logs = tmp_path / "build" / "logs"
    (logs / "embed").mkdir(parents=True)
    (logs / "model.log").write_text(capsys.readouterr().out)
    for job, cpu in enumerate((2.5, 4.0)):
        (logs / "embed" / f"{job}.log").write_text(f"embed: 4 chunks\nembed: 9 tiles (1.5 s, job CPU {cpu} s)\n")
    (logs / "underlay.log").write_text("error: the imagery is gone\n")
    found = jobs_cpu(tmp_path / "build")
    assert found.keys() == {"model", "embed"} and found["embed"] == 6.5 and found["model"] > 0


@pytest.mark.parametrize("audio_queries_only", [False, True])
def test_bench_build_configs_name_files_that_exist_from_any_folder(tmp_path: Path, audio_queries_only: bool) -> None:
    from argparse import Namespace

    from benchmarks.bench_build import build_config

    args = Namespace(
        checkpoint="untrained", device="cpu", batch_size=64, tile_zoom_offset=5, audio_queries_only=audio_queries_only
    )
    config = load_build_config(build_config("bench", "-54.52,-25.36,-54.5,-25.34", args, tmp_path))
    files = [Path(query.audio) for query in config.queries if query.audio is not None]
    files += [Path(config.imagery.source), Path(config.outputs.zones)]
    assert files and all(path.is_absolute() and path.is_file() for path in files)
    assert all(query.text is None for query in config.queries) == audio_queries_only
    assert (config.outputs.gallery is None) == audio_queries_only
    assert audio_queries_only or Path(config.outputs.gallery).is_dir()


def test_a_broken_rates_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "rates.json"
    path.write_text("{}")
    with pytest.raises(BuildConfigError, match="cannot read the rates file"):
        read_rates(path)


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
    status, out, err = _run_cli(capsys, "cache", "prune", "--cache-dir", str(tmp_path))
    assert (status, out) == (2, "")
    assert err == "error: cache prune needs --max-size and/or --older-than-days, e.g. --max-size 2GB\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["cache", "prune", "--max-size", "-5GB"], "--max-size: expected one argument (write a value that starts"),
        (["plan", "--sat-type", "landsat"], "argument --sat-type: invalid choice: 'landsat'"),
        (["query", "build", "--top-k", "abc"], "argument --top-k: invalid int value: 'abc'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_a_bad_command_line_is_refused_in_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: ") and message in err and err.endswith(" --help\n")


@pytest.mark.parametrize("action", [["info"], ["prune", "--max-size", "1GB"]])
def test_cli_cache_refuses_a_folder_that_is_not_there(
    action: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    status, out, err = _run_cli(capsys, "cache", *action, "--cache-dir", str(tmp_path / "tiles_cahce"))
    assert status == 2 and out == ""
    missing = tmp_path / "tiles_cahce"
    assert err == f"error: --cache-dir {missing} is no folder; give the tile cache folder (imagery.cache_dir)\n"


@pytest.mark.parametrize("under", [False, True])
def test_cli_plan_refuses_a_cache_dir_that_cannot_be_a_folder(
    under: bool, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cache_dir = a_file / "tiles" if under else a_file
    common = ("--region", "St. Louis", "--sat-type", "bingmap", "--imagery", OFFLINE_TEMPLATE, "--offline")
    status, out, err = _run_cli(capsys, "plan", *common, "--cache-dir", str(cache_dir))
    assert (status, out) == (2, "")
    problem = f" (it lies under {a_file}, a file)" if under else ""
    fix = "set --cache-dir to a folder (one not there yet is made)"
    assert err == f"error: --cache-dir {cache_dir} is no folder{problem}; {fix}\n"
    assert sorted(tmp_path.iterdir()) == [a_file]


def test_cli_plan_refuses_a_config_folder(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, out, err = _run_cli(capsys, "plan", "--config", str(tmp_path))
    assert (status, out) == (2, "")
    assert err == f"error: the config {tmp_path} is a folder; give the YAML file itself, not its folder\n"


@pytest.mark.parametrize("days", ["nan", "inf", "-1"])
def test_cli_cache_prune_takes_a_finite_age(days: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["cache", "prune", "--older-than-days", days, "--cache-dir", str(tmp_path)])
    assert exited.value.code == 2
    assert "is not a finite number from 0" in capsys.readouterr().err


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


def test_cli_refuses_imagery_too_coarse_for_the_model_as_the_build_does(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    status, out, err = _run_cli(
        capsys, "plan", "--region=-54.6,-25.4,-54.5,-25.3", "--imagery", str(LANDSAT), "--sat-type", "bingmap"
    )
    assert (status, out) == (2, "")
    assert err.count("\n") == 1
    assert err.startswith(
        f"error: imagery {LANDSAT} has 30 m/px but a bingmap model at zoom_level 1 expects 0.804 m/px (at most 1.5x"
        " coarser); the imagery is too coarse for this model, even at its coarsest trained zoom_level 5 (at most"
        " 6.03 m/px); use finer imagery"
    )
    status, out, err = _run_cli(capsys, "plan", "--region=-54.6,-25.4,-54.5,-25.3", "--imagery", str(LANDSAT))
    assert (status, out, err.count("\n")) == (2, "", 1)
    assert "has 30 m/px but a sentinel model at zoom_level 1 expects 11.4 m/px" in err
    assert err.endswith("; set --zoom-level 3 or use finer imagery\n")


def test_cli_plans_exactly_the_build_of_a_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, out, err = _run_cli(capsys, "plan", "--config", str(DEFAULT_CONFIG_PATH))
    assert (status, err) == (0, "")
    config = load_build_config(yaml.safe_load(DEFAULT_CONFIG_PATH.read_text()))
    planned = plan_build(config.plan_inputs)
    assert out.splitlines() == describe(planned)
    status, out, err = _run_cli(capsys, "plan", "--config", str(DEFAULT_CONFIG_PATH), "--tile-zoom-offset", "-3")
    assert (status, out) == (2, "")
    assert err == "error: --tile-zoom-offset -3 is less than the minimum of 0; see config/schema.json\n"


CHUNK_ZOOM_RANGE = "a chunk zoom must be between 0 and the output zoom; leave it out for output zoom - 6"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--chunk-zoom", "-1"), f"--chunk-zoom -1 is below 0: {CHUNK_ZOOM_RANGE}"),
        (
            ("--chunk-zoom", "18"),
            "chunk zoom 18 is outside 0..17: --chunk-zoom must be between 0 and the output zoom (17); set it in that"
            " range or leave it out (zoom 11)",
        ),
        (("--tile-zoom-offset", "-3"), "--tile-zoom-offset -3 is less than the minimum of 0; see config/schema.json"),
        (("--tile-zoom-offset", "7"), "--tile-zoom-offset 7 is greater than the maximum of 6; see config/schema.json"),
        (("--zoom-level", "0"), "--zoom-level 0 is less than the minimum of 1; see config/schema.json"),
        (("--max-tiles", "0"), "--max-tiles 0 is less than the minimum of 1; see config/schema.json"),
    ],
)
def test_cli_flags_out_of_range_are_refused_by_their_flag_names(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, flags: tuple[str, str], message: str
) -> None:
    common = ("--region", "St. Louis", "--sat-type", "bingmap", "--imagery", OFFLINE_TEMPLATE, "--offline")
    status, out, err = _run_cli(capsys, "plan", *common, "--cache-dir", str(tmp_path), *flags)
    assert (status, out, err) == (2, "", f"error: {message}\n")


@pytest.mark.parametrize(
    ("chunk_zoom", "message"),
    [
        (-1, f"config.tiling.chunk_zoom: -1 is below 0: {CHUNK_ZOOM_RANGE}"),
        (
            18,
            "chunk zoom 18 is outside 0..17: tiling.chunk_zoom must be between 0 and the output zoom (17); set it in"
            " that range or leave it out (zoom 11)",
        ),
    ],
)
def test_a_chunk_zoom_out_of_range_in_a_config_is_named_by_its_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, chunk_zoom: int, message: str
) -> None:
    config = {
        "region": "St. Louis",
        "imagery": {"source": OFFLINE_TEMPLATE, "offline": True, "cache_dir": str(tmp_path)},
        "model": {"sat_type": "bingmap"},
        "tiling": {"chunk_zoom": chunk_zoom},
    }
    path = tmp_path / "build.yaml"
    path.write_text(yaml.safe_dump(config))
    status, out, err = _run_cli(capsys, "plan", "--config", str(path))
    assert (status, out, err) == (2, "", f"error: {message}\n")
    with pytest.raises(BuildConfigError if chunk_zoom < 0 else TilingError, match=f"^{re.escape(message)}$"):
        plan_build(load_build_config({**config, "name": "test", "queries": [{"id": "a", "text": "a"}]}).plan_inputs)


def test_summary_gives_the_fetch_time_at_the_sources_cap_and_its_terms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.imagery import xyz

    monkeypatch.setattr(xyz, "ESRI_BULK_TILE_LIMIT", 100)
    with XYZReader.esri(cache=TileCache(tmp_path), offline=True) as reader:
        planned = planned_with(reader, _st_louis())
    assert planned.downloads is not None
    fetch_s = planned.downloads.tiles_to_fetch / 20.0
    text = "\n".join(describe(planned))
    assert f"to fetch, ~{format_bytes(planned.downloads.bytes_to_fetch)}, ~{round(fetch_s)} s at 20 req/s" in text
    assert "Terms          Esri World Imagery's terms" in text and "stac:URL" in text
    assert "Terms" not in "\n".join(describe(planned, offline=True))


def test_planning_with_an_official_checkpoint_downloads_none_of_its_weights(manifest: dict, tmp_path: Path) -> None:
    """The README's city build planned before anything is downloaded: the checkpoint's hyper-parameters are read
    where it lies, in a few range requests, and no weights land in the Hugging Face cache."""
    config = REPO / "config" / "city.yaml"
    uri = yaml.safe_load(config.read_text())["model"]["checkpoint"]
    owner, name, filename = uri.removeprefix("hf://").split("/", 2)
    content = hparams_checkpoint_bytes("bingmap_withmeta", 16, manifest)
    with HubStub({(f"{owner}/{name}", filename): content}) as hub:
        completed = subprocess.run(
            [sys.executable, "-m", "pipeline", "plan", "--config", str(config), "--offline", "--cache-dir", tmp_path],
            env=hub_environment(hub.url, tmp_path / "hf"),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert completed.returncode == 0, completed.stderr
    assert "Model view     bingmap zoom level 1: 180 m squares" in completed.stdout
    file_gets = [path for method, path in hub.requests if method == "GET" and "/resolve/" in path]
    assert len(hub.ranges) == len(file_gets) >= 1
    assert sum(last - first + 1 for first, last in hub.ranges) < len(content) / 4
    assert cached_blobs(tmp_path / "hf") == []

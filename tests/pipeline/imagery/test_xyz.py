"""XYZ tile-server reader against the loopback tile server: georeferencing, faults, API keys, cache."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mercantile
import numpy as np
import pytest
from support.imagery_servers import SCENE_PATH, Fault, SceneTiles, TileServer, footprint, mask_errors, overlap_fraction

from pipeline.config import ImagerySettings
from pipeline.errors import FetchError, ImageryError, ImageryWarning
from pipeline.geometry import Bounds, imagery_zoom
from pipeline.imagery import LocalRasterReader, PrefetchReport, TileCache, XYZReader, open_reader, reader_class, xyz
from pipeline.imagery.codec import TileImage
from pipeline.imagery.http import RetryPolicy
from pipeline.imagery.xyz import ESRI_ATTRIBUTION, ESRI_WORLD_IMAGERY_URL, TileTemplate

FAST_RETRY = RetryPolicy(
    attempts=4, backoff_s=0.01, max_backoff_s=0.05, connect_timeout_s=1.0, read_timeout_s=0.4, max_retry_after_s=5.0
)
# A point inside the scene (Haiti, 18.51°N), in EPSG:3857 metres.
SCENE_CENTRE = mercantile.xy(-72.2128, 18.5143)
ZOOM = 16
API_KEY = "s3cr3t-K3Y-value"


@pytest.fixture(scope="module")
def scene_tiles() -> SceneTiles:
    return SceneTiles.from_raster(SCENE_PATH, zooms=(15, ZOOM, 17))


@pytest.fixture(scope="module")
def server(scene_tiles: SceneTiles) -> Iterator[TileServer]:
    with TileServer(scene_tiles) as running:
        yield running


@pytest.fixture(autouse=True)
def _fresh_server(server: TileServer) -> None:
    server.clear()


MakeReader = Callable[..., XYZReader]


@pytest.fixture
def make_reader(server: TileServer, tmp_path: Path) -> Iterator[MakeReader]:
    readers: list[XYZReader] = []

    def make(path: str = "/png/{z}/{x}/{y}.png", **options: object) -> XYZReader:
        options = {"cache": TileCache(tmp_path / "cache"), "retry": FAST_RETRY, **options}
        reader = XYZReader(server.url + path, **options)  # type: ignore[arg-type]
        readers.append(reader)
        return reader

    yield make
    for reader in readers:
        reader.close()


def _full_tiles(scene_tiles: SceneTiles, zoom: int) -> list[mercantile.Tile]:
    return sorted(tile for tile, rgba in scene_tiles.rgba.items() if tile.z == zoom and rgba[3].all())


def _square(centre: tuple[float, float], size_m: float) -> Bounds:
    x, y = centre
    return Bounds(x - size_m / 2, y - size_m / 2, x + size_m / 2, y + size_m / 2)


def _mean_difference(a: np.ma.MaskedArray, b: np.ma.MaskedArray) -> float:
    both = ~(np.ma.getmaskarray(a) | np.ma.getmaskarray(b))
    assert both.mean() > 0.9
    return float(np.abs(a.data.astype(int) - b.data.astype(int))[both].mean())


# --- templates and tile math -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("https://host/{x}/{y}.png", "lacks {z}"),
        ("https://host/{z}/{x}.png", "lacks {x} or {y}"),
        ("https://host/{z}/{x}/{y}/{s}.png", "unknown placeholder {s}"),
        ("ftp://host/{z}/{x}/{y}.png", "not http"),
        ("https:///{z}/{x}/{y}.png", "not http\\(s\\) with a valid host"),
        ("http://[::1/{z}/{x}/{y}", "not http\\(s\\) with a valid host and port"),
        ("http://127.0.0.1:99999/{z}/{x}/{y}", "not http\\(s\\) with a valid host and port"),
        ("https://host/{z}/{x}/{y.png", "unbalanced braces"),
    ],
)
def test_bad_templates_are_refused_with_one_line(template: str, message: str) -> None:
    with pytest.raises(ImageryError, match=message) as caught:
        TileTemplate.parse(template)
    assert "\n" not in str(caught.value)


def test_template_fills_xyz_tms_and_quadkey() -> None:
    tile = mercantile.Tile(3, 5, 4)
    assert TileTemplate.parse("https://h/{z}/{x}/{y}.png").url_for(tile) == "https://h/4/3/5.png"
    assert TileTemplate.parse("https://h/{z}/{x}/{-y}.png").url_for(tile) == "https://h/4/3/10.png"
    assert TileTemplate.parse("https://h/a{q}.jpeg").url_for(tile) == f"https://h/a{mercantile.quadkey(tile)}.jpeg"
    assert TileTemplate.parse("https://h/a{q}.jpeg").tile_format == "jpg"


def test_esri_is_the_default_source(tmp_path: Path) -> None:
    with open_reader("esri", cache_dir=tmp_path) as reader:
        assert isinstance(reader, XYZReader)
        assert reader.template.url == ESRI_WORLD_IMAGERY_URL
        assert reader.attribution == ESRI_ATTRIBUTION
        assert reader.cache_key(mercantile.Tile(38000, 49000, 17)) == "esri-world-imagery/17/38000/49000.jpg"


def test_tile_bounds_are_exact_and_pull_in_no_neighbours(make_reader: MakeReader, scene_tiles: SceneTiles) -> None:
    reader = make_reader()
    tile = _full_tiles(scene_tiles, ZOOM)[0]
    image = reader.tile(*tile)
    assert image.bounds == pytest.approx(tuple(mercantile.xy_bounds(tile)), abs=1e-6)
    assert image.crs == "EPSG:3857"
    assert reader.source_tiles(image.bounds, ZOOM) == [tile]
    assert sorted(reader.source_tiles(image.bounds, ZOOM + 1)) == sorted(mercantile.children(tile))
    # True GSD: the tile's metres per pixel times the Mercator scale factor at its centre latitude.
    lat = mercantile.lnglat(
        (image.bounds.left + image.bounds.right) / 2, (image.bounds.bottom + image.bounds.top) / 2
    ).lat
    expected = 2 * np.pi * 6378137.0 / 2**ZOOM / 256 * np.cos(np.radians(lat))
    assert image.gsd_m == pytest.approx(expected, rel=5e-3)


def test_zoom_choice_matches_the_tiling_rule(make_reader: MakeReader) -> None:
    reader = make_reader(max_zoom=22)
    lat = 18.5143
    for footprint_m in (40.0, 134.4, 600.0, 3000.0):
        centre_x, centre_y = mercantile.xy(-72.2128, lat)
        size_3857 = footprint_m / np.cos(np.radians(lat))
        bounds = _square((centre_x, centre_y), size_3857)
        assert reader.zoom_for(bounds, 224) == imagery_zoom(size_3857 / 224, 256)
        # The chosen zoom's pixels are at most the read's, and the next coarser zoom's are larger.
        zoom = reader.zoom_for(bounds, 224)
        assert 2 * np.pi * 6378137.0 / 2**zoom / 256 <= size_3857 / 224 * (1 + 1e-9)
        assert 2 * np.pi * 6378137.0 / 2 ** (zoom - 1) / 256 > size_3857 / 224


def test_reads_finer_than_max_zoom_warn_once_and_upsample(make_reader: MakeReader) -> None:
    reader = make_reader(max_zoom=15)
    with pytest.warns(ImageryWarning, match="stops at zoom 15"):
        image = reader.part(_square(SCENE_CENTRE, 100.0), 224, 224)
    assert image.coverage == 1.0


# --- georeferencing: XYZ against the local raster of the same scene ----------------------------------------


def test_xyz_tiles_are_the_server_tiles_pixel_for_pixel(make_reader: MakeReader, scene_tiles: SceneTiles) -> None:
    reader = make_reader()
    for tile in [tile for tile in scene_tiles.rgba if tile.z == ZOOM][:6]:
        image = reader.tile(*tile)
        expected = scene_tiles.rgba[tile]
        np.testing.assert_array_equal(np.ma.getmaskarray(image.array)[0], expected[3] == 0)
        np.testing.assert_array_equal(image.array.filled(0), np.where(expected[3] > 0, expected[:3], 0))


@pytest.mark.parametrize(("size_m", "offset"), [(300.0, (37.0, -55.0)), (640.0, (-120.0, 80.0)), (1200.0, (0.0, 0.0))])
def test_xyz_and_local_reads_of_one_footprint_agree(
    make_reader: MakeReader, size_m: float, offset: tuple[float, float]
) -> None:
    centre = (SCENE_CENTRE[0] + offset[0], SCENE_CENTRE[1] + offset[1])
    bounds = _square(centre, size_m)
    with LocalRasterReader(SCENE_PATH) as local:
        from_local = local.part(bounds, 224, 224)
        pixel_m = size_m / 224
        shifted = local.part(
            Bounds(bounds.left + 2 * pixel_m, bounds.bottom, bounds.right + 2 * pixel_m, bounds.top), 224, 224
        )
    from_tiles = make_reader().part(bounds, 224, 224)
    assert from_tiles.bounds == bounds
    assert from_tiles.gsd_m == pytest.approx(from_local.gsd_m)
    aligned = _mean_difference(from_tiles.array, from_local.array)
    assert aligned < 4.0
    # Two pixels of misregistration must show: the comparison can tell good georeferencing from bad.
    assert _mean_difference(from_tiles.array, shifted.array) > 3 * aligned


@pytest.mark.parametrize(
    "path", ["/tms/{z}/{x}/{-y}.png", "/q/{q}.png", "/jpg/{z}/{x}/{y}.jpg", "/webp/{z}/{x}/{y}.webp"]
)
def test_tms_quadkey_jpeg_and_webp_servers_give_the_same_picture(make_reader: MakeReader, path: str) -> None:
    bounds = _square(SCENE_CENTRE, 500.0)
    reference = make_reader().part(bounds, 224, 224)
    image = make_reader(path, source_id="other").part(bounds, 224, 224)
    lossless = path.startswith(("/tms", "/q"))
    assert _mean_difference(image.array, reference.array) <= (0.0 if lossless else 4.0)


def test_reads_in_another_crs(make_reader: MakeReader) -> None:
    with LocalRasterReader(SCENE_PATH) as local:
        utm_bounds = Bounds(793800.0, 2049000.0, 794400.0, 2049600.0)
        expected = local.part(utm_bounds, 120, 120, dst_crs="EPSG:32618")
    image = make_reader().part(utm_bounds, 120, 120, dst_crs="EPSG:32618")
    assert image.crs == "EPSG:32618"
    assert image.gsd_m == pytest.approx(5.0, rel=0.01)
    assert _mean_difference(image.array, expected.array) < 4.0


def test_outside_the_scene_is_no_imagery(make_reader: MakeReader, server: TileServer) -> None:
    reader = make_reader()
    far_away = _square(mercantile.xy(10.0, 45.0), 600.0)
    assert reader.part(far_away, 64, 64).coverage == 0.0
    requests_made = len(server.requests)
    assert requests_made > 0
    assert reader.part(far_away, 64, 64).coverage == 0.0
    assert len(server.requests) == requests_made  # 404s are remembered in the cache
    assert all(reader.cached(reader.source_tiles(far_away, reader.zoom_for(far_away, 64))))


def test_coverage_at_the_scene_edge_is_the_true_overlap(make_reader: MakeReader) -> None:
    outline = footprint(SCENE_PATH)
    west, south, _, _ = outline.bounds
    reader = make_reader()
    for x, y in (outline.exterior.coords[0], (west, (south + outline.bounds[3]) / 2)):
        view = _square((x, y), 600.0)
        image = reader.part(view, 150, 150)
        expected = overlap_fraction(outline, view)
        assert 0.1 < expected < 0.9
        assert image.coverage == pytest.approx(expected, abs=0.015)
        errors = mask_errors(outline, view, np.ma.getmaskarray(image.array)[0])
        assert (errors <= 1.5 * 600.0 / 150).all()


# --- faults ------------------------------------------------------------------------------------------------


def _one_tile(scene_tiles: SceneTiles) -> tuple[mercantile.Tile, str]:
    tile = _full_tiles(scene_tiles, ZOOM)[0]
    return tile, f"/{tile.z}/{tile.x}/{tile.y}."


@pytest.mark.parametrize(
    "fault",
    [
        Fault("status", status=500, times=2),
        Fault("status", status=503, times=1),
        Fault("slow", delay_s=1.0, times=1),
        Fault("truncate", times=2),
        Fault("short_body", times=1),
    ],
    ids=["500", "503", "timeout", "truncated-connection", "truncated-image"],
)
def test_transient_faults_are_retried(
    make_reader: MakeReader, server: TileServer, scene_tiles: SceneTiles, fault: Fault
) -> None:
    tile, path = _one_tile(scene_tiles)
    fault.path = path
    retries = fault.times or 0
    server.add_fault(fault)
    reader = make_reader()
    image = reader.tile(*tile)
    np.testing.assert_array_equal(image.array.filled(0), scene_tiles.rgba[tile][:3])
    assert len(server.requests_to(path)) == retries + 1
    assert reader.cache.get(reader.cache_key(tile)) == scene_tiles.encoded(tile, "PNG")


def test_429_retry_after_is_honoured(make_reader: MakeReader, server: TileServer, scene_tiles: SceneTiles) -> None:
    tile, path = _one_tile(scene_tiles)
    server.add_fault(Fault("status", path=path, status=429, retry_after=1, times=1))
    assert make_reader().tile(*tile).coverage == 1.0
    first, second = server.requests_to(path)
    assert second.time - first.time >= 0.95  # the backoff alone would be 0.05 s at most


def test_404_and_blank_tiles_are_masked_not_errors(
    make_reader: MakeReader, server: TileServer, scene_tiles: SceneTiles
) -> None:
    tiles = _full_tiles(scene_tiles, ZOOM)[:2]
    server.add_fault(Fault("status", path=f"/{ZOOM}/{tiles[0].x}/{tiles[0].y}.", status=404))
    server.add_fault(Fault("blank", path=f"/{ZOOM}/{tiles[1].x}/{tiles[1].y}."))
    reader = make_reader()
    assert reader.tile(*tiles[0]).coverage == 0.0
    assert reader.tile(*tiles[1]).coverage == 0.0
    # A footprint straddling a missing tile and good ones is masked only where the tile is missing.
    west, north = mercantile.xy(*mercantile.ul(*tiles[0]))
    straddling = Bounds(west - 200.0, north - 200.0, west + 200.0, north + 200.0)
    image = reader.part(straddling, 100, 100)
    assert 0.0 < image.coverage < 1.0
    assert np.ma.getmaskarray(image.array)[:, 60:, 60:].all()


def test_exhausted_retries_raise_fetch_error_with_redacted_url(
    make_reader: MakeReader, server: TileServer, scene_tiles: SceneTiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TILE_KEY", API_KEY)
    tile, path = _one_tile(scene_tiles)
    server.add_fault(Fault("status", path=path, status=503))
    reader = make_reader("/png/{z}/{x}/{y}.png?key={api_key}", api_key_env="TILE_KEY")
    with pytest.raises(FetchError) as caught:
        reader.tile(*tile)
    message = str(caught.value)
    assert "\n" not in message
    assert "after 4 tries (last: HTTP 503)" in message
    assert f"{path}png?key=***" in message
    assert API_KEY not in message
    assert len(server.requests_to(path)) == FAST_RETRY.attempts


def test_unreachable_server_raises_fetch_error(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with (
        XYZReader(
            f"http://127.0.0.1:{port}/{{z}}/{{x}}/{{y}}.png", cache=TileCache(tmp_path), retry=FAST_RETRY
        ) as reader,
        pytest.raises(FetchError, match="ConnectionError"),
    ):
        reader.tile(0, 0, 1)


def test_api_key_is_sent_but_never_logged_cached_or_shown(
    scene_tiles: SceneTiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TILE_KEY", API_KEY)
    tile, path = _one_tile(scene_tiles)
    with TileServer(scene_tiles, api_key=API_KEY) as keyed:
        keyed.add_fault(Fault("status", path=path, status=500, times=2))
        template = keyed.url + "/png/{z}/{x}/{y}.png?key={api_key}"
        caplog.set_level(logging.DEBUG)
        with XYZReader(template, cache=TileCache(tmp_path), retry=FAST_RETRY, api_key_env="TILE_KEY") as reader:
            assert reader.tile(*tile).coverage == 1.0
            assert API_KEY not in reader.source_id
        assert "retrying" in caplog.text
        assert API_KEY not in caplog.text
        assert not any(API_KEY in str(path) for path in tmp_path.rglob("*"))
        monkeypatch.setenv("TILE_KEY", "wrong-key")
        with XYZReader(template, cache=TileCache(tmp_path / "b"), retry=FAST_RETRY, api_key_env="TILE_KEY") as reader:
            with pytest.raises(FetchError, match=r"HTTP 403 .*check the API key") as caught:
                reader.tile(*tile)
            assert "wrong-key" not in str(caught.value)


def test_api_key_settings_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UNSET_TILE_KEY", raising=False)
    cache = TileCache(tmp_path)
    with pytest.raises(ImageryError, match="UNSET_TILE_KEY is empty or unset"):
        XYZReader("https://h/{z}/{x}/{y}?k={api_key}", cache=cache, api_key_env="UNSET_TILE_KEY")
    with pytest.raises(ImageryError, match="no api_key_env"):
        XYZReader("https://h/{z}/{x}/{y}?k={api_key}", cache=cache)
    with pytest.raises(ImageryError, match=r"has no \{api_key\}"):
        XYZReader("https://h/{z}/{x}/{y}", cache=cache, api_key_env="UNSET_TILE_KEY")


# --- cache -------------------------------------------------------------------------------------------------


def test_cache_hits_skip_the_server_and_corrupt_files_are_fetched_again(
    make_reader: MakeReader, server: TileServer, scene_tiles: SceneTiles
) -> None:
    tile, path = _one_tile(scene_tiles)
    reader = make_reader()
    assert reader.cached([tile]) == [False]
    first = reader.tile(*tile)
    assert reader.cached([tile]) == [True]
    assert len(server.requests_to(path)) == 1
    np.testing.assert_array_equal(reader.tile(*tile).array, first.array)
    assert len(server.requests_to(path)) == 1
    cached_file = reader.cache.path_of(reader.cache_key(tile))
    cached_file.write_bytes(cached_file.read_bytes()[:1000])  # a crash mid-copy, disk corruption...
    np.testing.assert_array_equal(reader.tile(*tile).array, first.array)
    assert len(server.requests_to(path)) == 2
    assert cached_file.read_bytes() == scene_tiles.encoded(tile, "PNG")


def test_offline_reads_only_the_cache(make_reader: MakeReader, server: TileServer) -> None:
    bounds = _square(SCENE_CENTRE, 500.0)
    offline = make_reader(offline=True)
    assert offline.part(bounds, 224, 224).coverage == 0.0
    assert server.requests == []
    online = make_reader().part(bounds, 224, 224)
    served = len(server.requests)
    again = offline.part(bounds, 224, 224)
    np.testing.assert_array_equal(again.array, online.array)
    assert len(server.requests) == served


def test_prefetch_fills_the_cache_in_parallel(
    make_reader: MakeReader, server: TileServer, scene_tiles: SceneTiles
) -> None:
    tiles = [tile for tile in scene_tiles.rgba if tile.z == 17]
    reader = make_reader(concurrency=8)
    assert reader.fetch_tiles(tiles) == len(tiles)
    assert all(reader.cached(tiles))
    assert len(server.requests) == len(tiles)


class _AtOnce:
    """Wraps a function to count how many calls run at once, each held a little so that overlaps show."""

    def __init__(self) -> None:
        self.running = self.most = 0
        self._lock = threading.Lock()

    def wrap(self, function: Callable[[bytes], TileImage]) -> Callable[[bytes], TileImage]:
        def counted(body: bytes) -> TileImage:
            with self._lock:
                self.running += 1
                self.most = max(self.most, self.running)
            time.sleep(0.02)
            try:
                return function(body)
            finally:
                with self._lock:
                    self.running -= 1

        return counted


def test_cached_tiles_decode_on_the_cores_while_fetches_wait_side_by_side(
    make_reader: MakeReader, server: TileServer, scene_tiles: SceneTiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(xyz, "usable_cores", lambda: 1)
    decodes = _AtOnce()
    monkeypatch.setattr(xyz, "decode_tile", decodes.wrap(xyz.decode_tile))
    monkeypatch.setattr(server, "latency_s", 0.05)
    tiles = _full_tiles(scene_tiles, ZOOM)[:8]
    assert make_reader(concurrency=4).fetch_tiles(tiles) == len(tiles)
    fetching, decodes.most = decodes.most, 0
    assert make_reader(concurrency=4).fetch_tiles(tiles) == len(tiles)
    assert len(server.requests) == len(tiles), "the second reader found every tile in the cache"
    assert fetching > 1, "tiles to fetch are fetched, and decoded, side by side"
    assert decodes.most == 1, "cached tiles are decoded on no more threads than the process has cores"


# --- the reader API: resolution, fetching ahead, estimates --------------------------------------------------


def _views(count: int, seed: int = 7) -> list[Bounds]:
    """Model views of 100 m to 1.5 km around the scene, some straddling its edge, some outside it."""
    rng = np.random.default_rng(seed)
    views = []
    for _ in range(count):
        centre = (SCENE_CENTRE[0] + rng.uniform(-1200.0, 1200.0), SCENE_CENTRE[1] + rng.uniform(-1000.0, 1000.0))
        views.append(_square(centre, float(rng.uniform(100.0, 1500.0))))
    return views


def _brute_force_tiles(views: list[Bounds], width: int, min_zoom: int, max_zoom: int) -> set[mercantile.Tile]:
    """Source tiles under `views`: the coarsest zoom whose pixels are no larger than the view's, by trying every
    zoom, and the tiles mercantile says the view's corners span."""
    tiles: set[mercantile.Tile] = set()
    for view in views:
        pixel_m = (view.right - view.left) / width
        zoom = next(z for z in range(31) if 2 * np.pi * 6378137.0 / 2**z / 256 <= pixel_m)
        zoom = min(max(zoom, min_zoom), max_zoom)
        west, south = mercantile.lnglat(view.left, view.bottom)
        east, north = mercantile.lnglat(view.right, view.top)
        tiles.update(mercantile.tiles(west, south, east, north, zoom))
    return tiles


def test_xyz_resolution_and_fetching_ahead(make_reader: MakeReader) -> None:
    reader = make_reader(max_zoom=17, tile_size=512)
    assert reader.fetches_ahead and XYZReader.fetches_ahead
    for latitude in (0.0, 18.5, -60.0):
        expected = 2 * np.pi * 6378137.0 / 2**17 / 512 * np.cos(np.radians(latitude))
        assert reader.native_gsd_m(latitude) == pytest.approx(expected, rel=1e-9)


def test_estimate_counts_the_tiles_a_read_would_fetch(make_reader: MakeReader, server: TileServer) -> None:
    views = _views(40)
    reader = make_reader(min_zoom=15, max_zoom=17)
    expected = _brute_force_tiles(views, 224, 15, 17)
    estimate = reader.estimate(views, 224)
    assert estimate is not None
    assert (estimate.tiles, estimate.cached) == (len(expected), 0)
    assert estimate.bytes_to_fetch == len(expected) * reader.typical_tile_bytes
    assert (estimate.min_zoom, estimate.max_zoom, estimate.source_max_zoom) == (
        min(tile.z for tile in expected),
        max(tile.z for tile in expected),
        17,
    )
    assert estimate.min_zoom < estimate.max_zoom
    assert server.requests == []  # estimating downloads nothing
    half = views[: len(views) // 2]
    reader.prefetch(half, 224)
    cached = _brute_force_tiles(half, 224, 15, 17)
    again = reader.estimate(views, 224)
    assert again is not None
    assert (again.tiles, again.cached) == (len(expected), len(cached))
    assert again.bytes_to_fetch == (len(expected) - len(cached)) * reader.typical_tile_bytes
    assert reader.estimate([], 224)[:6] == (15, 17, 17, 0, 0, 0)


def test_prefetch_reports_and_fills_the_cache_for_the_views(
    make_reader: MakeReader, server: TileServer, scene_tiles: SceneTiles
) -> None:
    views = _views(30, seed=11)
    reader = make_reader(max_zoom=17)
    expected = _brute_force_tiles(views, 224, 0, 17)
    report = reader.prefetch(views, 224)
    assert report == PrefetchReport(
        "server tiles into the tile cache", 30, len(expected), len(expected & set(scene_tiles.rgba))
    )
    assert 0 < report.with_imagery < report.source_items  # some views lie outside the scene
    assert sorted(record.path for record in server.requests) == sorted(
        f"/png/{tile.z}/{tile.x}/{tile.y}.png" for tile in expected
    )
    offline = make_reader(max_zoom=17, offline=True)
    for view in views:  # the cache holds everything the model's reads need
        np.testing.assert_array_equal(offline.part(view, 224, 224).array, reader.part(view, 224, 224).array)
    assert len(server.requests) == len(expected)


def test_specs_tell_their_reader_class_without_opening_it(tmp_path: Path) -> None:
    assert reader_class("esri") is XYZReader
    assert reader_class("xyz:https://h/{z}/{x}/{y}.png") is XYZReader
    assert reader_class("stac:https://earth-search.aws.element84.com/v1").fetches_ahead
    assert reader_class(str(tmp_path / "missing.tif")) is LocalRasterReader
    assert not reader_class(f"file:{tmp_path}/scene").fetches_ahead
    with pytest.raises(ImageryError, match="unknown imagery source"):
        reader_class("ftp-ish")


# --- tiles that cannot be had (imagery.on_missing) -------------------------------------------------------


def _views_around(tile: mercantile.Tile) -> np.ndarray:
    """A 3 x 3 block of model views of the tile's size centred on `tile`: the centre one lies on it."""
    left, bottom, right, top = mercantile.xy_bounds(tile)
    size = right - left
    return np.array(
        [
            [left + dx * size, bottom + dy * size, right + dx * size, top + dy * size]
            for dy in (1, 0, -1)
            for dx in (-1, 0, 1)
        ]
    )


def _inner_tile(scene_tiles: SceneTiles) -> tuple[mercantile.Tile, str]:
    """A full zoom-17 tile whose eight neighbours are full too, and its path on the server."""
    zoom = ZOOM + 1
    full = set(_full_tiles(scene_tiles, zoom))
    tile = next(
        tile
        for tile in sorted(full)
        if all(mercantile.Tile(tile.x + dx, tile.y + dy, zoom) in full for dx in (-1, 0, 1) for dy in (-1, 0, 1))
    )
    return tile, f"/{zoom}/{tile.x}/{tile.y}."


def _unavailable_mask(reader: XYZReader, views: np.ndarray, tile: mercantile.Tile) -> np.ndarray:
    pixels = reader.source_pixels(views, 256)
    assert pixels.unavailable is not None and pixels.unavailable_tiles == (tuple(tile),)
    column, row = ~pixels.transform @ mercantile.xy(*mercantile.ul(tile))
    expected = np.zeros_like(pixels.unavailable)
    expected[round(row) : round(row) + 256, round(column) : round(column) + 256] = True
    np.testing.assert_array_equal(pixels.unavailable, expected)
    assert not pixels.valid[expected].any()
    return pixels.unavailable


def test_a_tile_failing_every_retry_fails_the_read_with_the_count_and_the_rerun_hint(
    make_reader: MakeReader, server: TileServer, scene_tiles: SceneTiles
) -> None:
    tile, path = _inner_tile(scene_tiles)
    server.add_fault(Fault("status", path=path, status=503))
    with pytest.raises(FetchError) as caught:
        make_reader().source_pixels(_views_around(tile), 256)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("1 tile(s) of xyz-127.0.0.1-") and "after 4 tries (last: HTTP 503)" in message
    assert "rerun to retry, or set imagery.on_missing: leave_empty" in message
    assert len(server.requests_to(path)) == FAST_RETRY.attempts


def test_with_leave_empty_a_tile_failing_every_retry_is_unavailable_and_nothing_else_changes(
    make_reader: MakeReader, server: TileServer, scene_tiles: SceneTiles, tmp_path: Path
) -> None:
    tile, path = _inner_tile(scene_tiles)
    views = _views_around(tile)
    clean = make_reader(cache=TileCache(tmp_path / "clean")).source_pixels(views, 256)
    assert clean.unavailable is None and clean.unavailable_tiles == ()
    server.add_fault(Fault("status", path=path, status=500))
    reader = make_reader(on_missing="leave_empty")
    report = reader.prefetch(views, 256)
    assert report.unavailable == (tuple(tile),) and report.with_imagery == report.source_items - 1
    assert reader.cached([tile]) == [False], "a tile that could not be had is not remembered: a rerun retries it"
    mask = _unavailable_mask(reader, views, tile)
    np.testing.assert_array_equal(reader.source_pixels(views, 256).values[:, ~mask], clean.values[:, ~mask])
    np.testing.assert_array_equal(reader.source_pixels(views, 256).valid[~mask], clean.valid[~mask])
    assert reader.unavailable == {tile}
    server.clear()
    assert reader.source_pixels(views, 256).unavailable is None, "once the server answers, the tile is read"


def test_a_stall_longer_than_the_read_timeout_is_retried_then_counted(
    make_reader: MakeReader, server: TileServer, scene_tiles: SceneTiles
) -> None:
    tile, path = _inner_tile(scene_tiles)
    server.add_fault(Fault("slow", path=path, delay_s=FAST_RETRY.read_timeout_s * 2))
    views = _views_around(tile)
    with pytest.raises(FetchError, match=r"^1 tile\(s\) .* \(last: (ReadTimeout|ConnectionError)\)\); rerun to retry"):
        make_reader().source_pixels(views, 256)
    assert len(server.requests_to(path)) == FAST_RETRY.attempts
    _unavailable_mask(make_reader(on_missing="leave_empty"), views, tile)


def test_a_corrupt_cached_tile_read_offline_is_unavailable_not_no_imagery(
    make_reader: MakeReader, server: TileServer, scene_tiles: SceneTiles
) -> None:
    tile, _ = _inner_tile(scene_tiles)
    views = _views_around(tile)
    make_reader().prefetch(views, 256)
    cached_file = make_reader().cache.path_of(make_reader().cache_key(tile))
    cached_file.write_bytes(cached_file.read_bytes()[:1000])
    served = len(server.requests)
    with pytest.raises(FetchError, match=r"^1 tile\(s\) .* is corrupt and imagery.offline is set\); turn imagery"):
        make_reader(offline=True).source_pixels(views, 256)
    _unavailable_mask(make_reader(offline=True, on_missing="leave_empty"), views, tile)
    assert len(server.requests) == served
    assert cached_file.exists(), "kept: a read online fetches it again"
    assert make_reader().source_pixels(views, 256).unavailable is None


def test_on_missing_is_checked_and_reaches_tile_server_readers_only(tmp_path: Path, server: TileServer) -> None:
    with pytest.raises(ImageryError, match="on_missing 'skip' is unknown; use fail or leave_empty"):
        XYZReader(server.url + "/png/{z}/{x}/{y}.png", cache=TileCache(tmp_path), on_missing="skip")  # type: ignore[arg-type]
    spec = f"xyz:{server.url}/png/{{z}}/{{x}}/{{y}}.png"
    with open_reader(spec, cache_dir=tmp_path, on_missing="leave_empty") as reader:
        assert isinstance(reader, XYZReader) and reader.on_missing == "leave_empty"
    in_options = ImagerySettings(spec, {"on_missing": "leave_empty"}, str(tmp_path), False, None, 0.5)
    with pytest.raises(ImageryError, match=r"imagery\.options\.on_missing is an imagery key of its own"):
        in_options.open_reader()
    settings = ImagerySettings(spec, {}, str(tmp_path), False, None, 0.5, on_missing="leave_empty")
    with settings.open_reader() as reader:
        assert isinstance(reader, XYZReader) and reader.on_missing == "leave_empty"
    with open_reader(str(SCENE_PATH), cache_dir=tmp_path, on_missing="leave_empty") as local:
        assert isinstance(local, LocalRasterReader)

"""STAC reader against the loopback static STAC API: filters, least-cloudy mosaic, band assets, cache."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.warp import transform_bounds
from support.imagery_servers import SCENE_PATH, Fault, StacServer, footprint, mask_errors, overlap_fraction, stac_item

from pipeline.errors import FetchError, ImageryError, ImageryWarning
from pipeline.geometry import Bounds
from pipeline.imagery import LocalRasterReader, PrefetchReport, StacReader, TileCache, open_reader
from pipeline.imagery.http import RetryPolicy
from pipeline.imagery.local import COG_HTTP_ENV

FAST_RETRY = RetryPolicy(attempts=2, backoff_s=0.01, connect_timeout_s=1.0, read_timeout_s=2.0)
SUMMER_2023 = "2023-01-01/2023-12-31"
BANDS_COLLECTION = "sentinel-2-l2a-bands"
REFLECTANCE_SCALE, REFLECTANCE_OFFSET = 0.0001, -0.1

with rasterio.open(SCENE_PATH) as _scene:
    SCENE_RGB = _scene.read()
    SCENE_PROFILE = _scene.profile
    SCENE_CRS = _scene.crs
    SCENE_LNGLAT = transform_bounds(_scene.crs, "EPSG:4326", *_scene.bounds)
    SCENE_3857 = Bounds(*transform_bounds(_scene.crs, "EPSG:3857", *_scene.bounds))
HALF_WIDTH = SCENE_PROFILE["width"] // 2


def _cog(path: Path, data: np.ndarray) -> str:
    profile = {
        "driver": "COG",
        "crs": SCENE_CRS,
        "transform": SCENE_PROFILE["transform"],
        "width": data.shape[2],
        "height": data.shape[1],
        "count": data.shape[0],
        "dtype": str(data.dtype),
        "compress": "deflate",
    }
    with rasterio.open(path, "w", **profile) as dataset:
        dataset.write(data)
    return "{server}/assets/" + path.name


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("stac_assets")
    _cog(folder / "west-half.tif", SCENE_RGB[:, :, :HALF_WIDTH])
    _cog(folder / "inverted.tif", 255 - SCENE_RGB)
    _cog(folder / "grey.tif", np.full_like(SCENE_RGB, 90))
    digital_numbers = ((SCENE_RGB / 255.0 * 0.3 - REFLECTANCE_OFFSET) / REFLECTANCE_SCALE).round().astype(np.uint16)
    for band, name in enumerate(("red", "green", "blue")):
        _cog(folder / f"{name}.tif", digital_numbers[band : band + 1])
    return folder


def _items() -> list[dict[str, object]]:
    def visual(item_id: str, when: str, cloud: float, asset: str) -> dict[str, object]:
        return stac_item(item_id, SCENE_LNGLAT, when, cloud, {"visual": "{server}/assets/" + asset})

    band_item = stac_item(
        "per-band",
        SCENE_LNGLAT,
        "2023-05-05T15:00:00Z",
        3.0,
        {name: f"{{server}}/assets/{name}.tif" for name in ("red", "green", "blue")},
        collection=BANDS_COLLECTION,
    )
    for asset in band_item["assets"].values():
        asset["raster:bands"] = [{"scale": REFLECTANCE_SCALE, "offset": REFLECTANCE_OFFSET}]
    far_away = stac_item("elsewhere", (10.0, 45.0, 10.1, 45.1), "2023-06-01T10:00:00Z", 0.0, {"visual": "x"})
    return [
        visual("cloudy", "2023-07-03T15:00:00Z", 80.0, "grey.tif"),
        visual("hazy-full", "2023-07-02T15:00:00Z", 30.0, "inverted.tif"),
        visual("clear-west", "2023-06-02T15:00:00Z", 5.0, "west-half.tif"),
        visual("clear-but-2020", "2020-07-03T15:00:00Z", 1.0, "grey.tif"),
        far_away,
        band_item,
    ]


@pytest.fixture(scope="module")
def server(assets: Path) -> Iterator[StacServer]:
    with StacServer(_items(), assets) as running:
        yield running


@pytest.fixture(autouse=True)
def _fresh_server(server: StacServer) -> None:
    server.clear()


def _reader(server: StacServer, cache_dir: Path, **options: object) -> StacReader:
    settings = {"datetime": SUMMER_2023, "max_cloud_cover": 50.0, "retry": FAST_RETRY, **options}
    return StacReader(server.url, cache=TileCache(cache_dir), **settings)  # type: ignore[arg-type]


def test_search_filters_dates_and_clouds_least_cloudy_first(server: StacServer, tmp_path: Path) -> None:
    with _reader(server, tmp_path) as reader:
        assert [item.id for item in reader.search(SCENE_LNGLAT)] == ["clear-west", "hazy-full"]
        searches = len(server.requests_to("/search"))
        reader.search(SCENE_LNGLAT)
        assert len(server.requests_to("/search")) == searches  # one search per cell, remembered
    with _reader(server, tmp_path, max_cloud_cover=90.0) as reader:
        assert [item.id for item in reader.search(SCENE_LNGLAT)] == ["clear-west", "hazy-full", "cloudy"]


def test_mosaic_fills_from_the_least_cloudy_item_first(server: StacServer, assets: Path, tmp_path: Path) -> None:
    with _reader(server, tmp_path) as reader:
        image = reader.part(SCENE_3857, 200, 180)
    with LocalRasterReader(assets / "west-half.tif") as west, LocalRasterReader(assets / "inverted.tif") as hazy:
        west_image = west.part(SCENE_3857, 200, 180)
        from_west, from_hazy = west_image.array, hazy.part(SCENE_3857, 200, 180).array
    west_valid = ~np.ma.getmaskarray(from_west)
    rest = ~west_valid & ~np.ma.getmaskarray(from_hazy)
    assert 0.3 < west_valid[0].mean() < 0.7
    np.testing.assert_array_equal(image.array.data[west_valid], from_west.data[west_valid])
    np.testing.assert_array_equal(image.array.data[rest], from_hazy.data[rest])
    np.testing.assert_array_equal(np.ma.getmaskarray(image.array), ~(west_valid | rest))
    assert image.gsd_m == west_image.gsd_m


def test_an_unreadable_asset_is_skipped_with_a_warning(assets: Path, tmp_path: Path) -> None:
    with StacServer(_items(), assets) as fresh, _reader(fresh, tmp_path) as reader:
        fresh.add_fault(Fault("status", path="/assets/west-half.tif", status=404))
        with pytest.warns(ImageryWarning, match="skipping STAC item clear-west"):
            image = reader.part(SCENE_3857, 64, 64)
    with LocalRasterReader(assets / "inverted.tif") as hazy:
        np.testing.assert_array_equal(image.array, hazy.part(SCENE_3857, 64, 64).array)


def test_per_band_assets_are_scaled_to_reflectance_and_stretched(server: StacServer, tmp_path: Path) -> None:
    utm = SCENE_CRS.to_string()
    scene_bounds = Bounds(*rasterio.open(SCENE_PATH).bounds)
    with _reader(server, tmp_path, collection=BANDS_COLLECTION) as reader:
        image = reader.part(scene_bounds, SCENE_PROFILE["width"], SCENE_PROFILE["height"], dst_crs=utm)
    assert image.coverage == 1.0
    assert np.abs(image.array.data.astype(int) - SCENE_RGB).max() <= 1


def test_parts_are_cached_and_offline_reads_only_the_cache(server: StacServer, tmp_path: Path) -> None:
    with _reader(server, tmp_path) as reader:
        first = reader.part(SCENE_3857, 64, 64)
        served = len(server.requests)
        np.testing.assert_array_equal(reader.part(SCENE_3857, 64, 64).array, first.array)
        assert len(server.requests) == served
    with _reader(server, tmp_path, offline=True) as offline:
        np.testing.assert_array_equal(offline.part(SCENE_3857, 64, 64).array, first.array)
        assert offline.part(SCENE_3857, 32, 32).coverage == 0.0
    assert len(server.requests) == served


def test_cogs_are_read_by_range_without_sidecar_probes(assets: Path, tmp_path: Path) -> None:
    # A server of its own: GDAL keeps what it read from URLs it has seen in an in-process cache.
    with StacServer(_items(), assets) as fresh, _reader(fresh, tmp_path) as reader:
        reader.part(SCENE_3857, 64, 64)
        asset_requests = [record.path for record in fresh.requests_to("/assets/")]
    assert asset_requests
    assert all(path.endswith(".tif") for path in asset_requests), asset_requests


def test_search_failures_raise_fetch_error(server: StacServer, tmp_path: Path) -> None:
    server.add_fault(Fault("status", path="/search", status=503))
    with _reader(server, tmp_path) as reader, pytest.raises(FetchError, match=r"STAC search at .* failed"):
        reader.part(SCENE_3857, 32, 32)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    unreachable = StacReader(f"http://127.0.0.1:{port}", cache=TileCache(tmp_path), retry=FAST_RETRY)
    with unreachable, pytest.raises(FetchError, match="cannot open the STAC API"):
        unreachable.part(SCENE_3857, 32, 32)


def test_stac_spec_and_options(server: StacServer, tmp_path: Path) -> None:
    with open_reader(f"stac:{server.url}", cache_dir=tmp_path, datetime=SUMMER_2023, max_cloud_cover=10) as reader:
        assert isinstance(reader, StacReader)
        assert reader.attribution == "Contains modified Copernicus Sentinel data"
        assert [item.id for item in reader.search(SCENE_LNGLAT)] == ["clear-west"]
    with pytest.raises(ImageryError, match="max_cloud_cover: 150 is greater than the maximum of 100"):
        open_reader(f"stac:{server.url}", cache_dir=tmp_path, max_cloud_cover=150)
    for url in ("", "ftp://host/v1", "earth-search/v1"):
        with pytest.raises(ImageryError, match=f"STAC API URL '{url}' is not http"):
            open_reader(f"stac:{url}", cache_dir=tmp_path)


@pytest.mark.parametrize("collection", ["sentinel-2-l2a", BANDS_COLLECTION])
def test_coverage_at_the_scene_edge_is_the_true_overlap(server: StacServer, tmp_path: Path, collection: str) -> None:
    outline = footprint(SCENE_PATH)
    east, middle = SCENE_3857.right, (SCENE_3857.bottom + SCENE_3857.top) / 2
    view = Bounds(east - 500.0, middle - 300.0, east + 300.0, middle + 500.0)  # across the east edge
    expected = overlap_fraction(outline, view)
    assert 0.3 < expected < 0.8
    with _reader(server, tmp_path, collection=collection) as reader:
        image = reader.part(view, 160, 160)
        cached = reader.part(view, 160, 160)
    for read in (image, cached):
        assert read.coverage == pytest.approx(expected, abs=0.015)
        errors = mask_errors(outline, view, np.ma.getmaskarray(read.array)[0])
        assert (errors <= 1.5 * 800.0 / 160).all()


def test_stac_resolution_fetching_ahead_and_prefetch(server: StacServer, tmp_path: Path) -> None:
    assert StacReader.fetches_ahead
    with _reader(server, tmp_path) as reader:
        assert reader.native_gsd_m(18.5) == 10.0  # Sentinel-2 true colour
        outside = Bounds(
            SCENE_3857.right + 5000.0, SCENE_3857.bottom, SCENE_3857.right + 7000.0, SCENE_3857.bottom + 2000.0
        )
        inside = Bounds(
            SCENE_3857.left + 100.0, SCENE_3857.bottom + 100.0, SCENE_3857.left + 600.0, SCENE_3857.bottom + 600.0
        )
        # Views of different sizes are read as strips of their own: three strips, two with imagery.
        report = reader.prefetch([inside, outside, SCENE_3857], 64)
        assert report == PrefetchReport("view strips into the tile cache", 3, 3, 2)
        assert reader.estimate([inside], 64) is None
        online = reader.source_pixels(np.array([inside]), 64)
    with _reader(server, tmp_path, offline=True) as offline:  # what the embed job reads: the prefetched strip
        cached = offline.source_pixels(np.array([inside]), 64)
        np.testing.assert_array_equal(cached.values, online.values)
        np.testing.assert_array_equal(cached.valid, online.valid)
        assert cached.valid.any()
    with _reader(server, tmp_path, collection=BANDS_COLLECTION) as other, pytest.raises(ImageryError) as raised:
        other.native_gsd_m(18.5)
    assert "set imagery.native_gsd_m" in str(raised.value)


def _strip_views() -> np.ndarray:
    """Four overlapping views inside the scene: one strip."""
    size = (SCENE_3857.right - SCENE_3857.left) / 3
    left, bottom = SCENE_3857.left + size / 4, SCENE_3857.bottom + size / 4
    return np.array([[left + dx, bottom, left + dx + size, bottom + size] for dx in (0.0, size / 4, size / 2, size)])


def test_a_corrupt_cached_strip_read_offline_stops_the_read_or_is_left_unavailable(
    server: StacServer, tmp_path: Path
) -> None:
    views = _strip_views()
    with _reader(server, tmp_path) as online:
        assert online.prefetch(views, 64) == PrefetchReport("view strips into the tile cache", 4, 1, 1)
    [cached] = [path for path in tmp_path.rglob("*.png")]
    cached.write_bytes(cached.read_bytes()[:100])
    with _reader(server, tmp_path, offline=True) as offline, pytest.raises(FetchError) as raised:
        offline.source_pixels(views, 64)
    assert str(raised.value).startswith("1 view strip(s) of stac-") and "is corrupt" in str(raised.value)
    assert "turn imagery.offline off and rerun" in str(raised.value) and "\n" not in str(raised.value)
    with _reader(server, tmp_path, offline=True, on_missing="leave_empty") as offline:
        pixels = offline.source_pixels(views, 64)
        report = offline.prefetch(views, 64)
    assert pixels.unavailable is not None and pixels.unavailable.all() and not pixels.valid.any()
    assert len(pixels.unavailable_tiles) == 1 and report.unavailable == pixels.unavailable_tiles
    assert cached.exists()  # kept: a run online fetches it again


def test_an_asset_failing_every_retry_is_unavailable_not_replaced_by_a_cloudier_scene(
    assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(COG_HTTP_ENV, "GDAL_HTTP_MAX_RETRY", 1)
    monkeypatch.setitem(COG_HTTP_ENV, "GDAL_HTTP_RETRY_DELAY", 0.1)
    views = _strip_views()
    with StacServer(_items(), assets) as fresh:
        fresh.add_fault(Fault("status", path="/assets/west-half.tif", status=503, times=1000))
        with _reader(fresh, tmp_path) as reader, pytest.raises(FetchError, match=r"STAC item clear-west could not"):
            reader.source_pixels(views, 64)
        with _reader(fresh, tmp_path / "again", on_missing="leave_empty") as reader:
            pixels = reader.source_pixels(views, 64)
    assert pixels.unavailable is not None and pixels.unavailable.all()
    assert not list((tmp_path / "again").rglob("*.png"))  # nothing cached: a rerun tries again


def test_on_missing_reaches_stac_readers(server: StacServer, tmp_path: Path) -> None:
    with open_reader(f"stac:{server.url}", cache_dir=tmp_path, on_missing="leave_empty") as reader:
        assert isinstance(reader, StacReader) and reader.on_missing == "leave_empty"
    with pytest.raises(ImageryError, match="on_missing 'skip' is unknown"):
        _reader(server, tmp_path, on_missing="skip")

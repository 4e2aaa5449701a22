"""Local raster reader: band selection, any CRS, nodata, 16-bit stretch computed once per dataset."""

from __future__ import annotations

from pathlib import Path

import mercantile
import numpy as np
import pytest
import rasterio
from pyproj import Geod
from rasterio.transform import Affine
from rasterio.warp import calculate_default_transform, reproject, transform_bounds
from support.imagery_servers import SCENE_PATH, footprint, mask_errors, overlap_fraction, served_raster

from pipeline.errors import ImageryError
from pipeline.geometry import Bounds
from pipeline.imagery import LocalRasterReader, PrefetchReport, Stretch, open_reader, reader_class
from pipeline.imagery.local import percentile_stretch

with rasterio.open(SCENE_PATH) as _scene:
    SCENE_RGB = _scene.read()
    SCENE_PROFILE = _scene.profile
    SCENE_BOUNDS = Bounds(*_scene.bounds)
SCENE_BOUNDS_3857 = Bounds(*transform_bounds(SCENE_PROFILE["crs"], "EPSG:3857", *SCENE_BOUNDS))
# A Web Mercator square well inside the scene.
INNER = Bounds(*transform_bounds(SCENE_PROFILE["crs"], "EPSG:3857", 793900.0, 2049200.0, 794500.0, 2049800.0))


def _write(path: Path, data: np.ndarray, **profile: object) -> Path:
    options = {**SCENE_PROFILE, "count": data.shape[0], "dtype": str(data.dtype), **profile}
    with rasterio.open(path, "w", **options) as dataset:
        dataset.write(data)
    return path


def _mean_difference(a: np.ma.MaskedArray, b: np.ma.MaskedArray) -> float:
    both = ~(np.ma.getmaskarray(a) | np.ma.getmaskarray(b))
    return float(np.abs(a.data.astype(int) - b.data.astype(int))[both].mean())


def test_reading_the_scene_on_its_own_grid_returns_its_pixels() -> None:
    with LocalRasterReader(SCENE_PATH) as reader:
        assert reader.bands == (1, 2, 3)  # from the red/green/blue colour interpretation
        image = reader.part(SCENE_BOUNDS, 320, 288, dst_crs=SCENE_PROFILE["crs"].to_string())
    assert image.coverage == 1.0
    np.testing.assert_array_equal(image.array.data, SCENE_RGB)
    assert image.gsd_m == pytest.approx(5.0 / 0.9996, rel=2e-3)  # UTM grid metres are 0.9996 ground metres here


def test_band_selection_reorders_bands() -> None:
    with LocalRasterReader(SCENE_PATH) as rgb, LocalRasterReader(SCENE_PATH, bands=(3, 2, 1)) as bgr:
        np.testing.assert_array_equal(bgr.part(INNER, 64, 64).array, rgb.part(INNER, 64, 64).array[::-1])
    with LocalRasterReader(SCENE_PATH, bands=(2,)) as grey:
        image = grey.part(INNER, 64, 64)
    assert image.array.shape == (3, 64, 64)
    np.testing.assert_array_equal(image.array[0], image.array[2])


def test_a_raster_in_another_crs_gives_the_same_picture(tmp_path: Path) -> None:
    crs = "EPSG:4326"
    transform, width, height = calculate_default_transform(
        SCENE_PROFILE["crs"], crs, SCENE_PROFILE["width"], SCENE_PROFILE["height"], *SCENE_BOUNDS
    )
    lnglat = np.zeros((3, height, width), np.uint8)
    reproject(SCENE_RGB, lnglat, src_transform=SCENE_PROFILE["transform"], src_crs=SCENE_PROFILE["crs"],
              dst_transform=transform, dst_crs=crs, dst_nodata=0)  # fmt: skip
    path = _write(tmp_path / "lnglat.tif", lnglat, crs=crs, transform=transform, width=width, height=height, nodata=0)
    shifted = Bounds(INNER.left + 10.0, INNER.bottom, INNER.right + 10.0, INNER.top)  # two 5 m pixels east
    with LocalRasterReader(SCENE_PATH) as utm, LocalRasterReader(path) as geographic:
        reference = utm.part(INNER, 128, 128).array
        aligned = _mean_difference(geographic.part(INNER, 128, 128).array, reference)
        misaligned = _mean_difference(geographic.part(shifted, 128, 128).array, reference)
    assert aligned < 8.0  # two bilinear resamplings of noisy 5 m imagery
    assert misaligned > 2 * aligned


def test_outside_the_raster_is_masked() -> None:
    with LocalRasterReader(SCENE_PATH) as reader:
        assert reader.part(Bounds(*mercantile.xy_bounds(mercantile.Tile(0, 0, 3))), 32, 32).coverage == 0.0
        west_edge = Bounds(
            *transform_bounds(SCENE_PROFILE["crs"], "EPSG:3857", 793068.0, 2049200.0, 793868.0, 2049800.0)
        )
        image = reader.part(west_edge, 80, 60)
    mask = np.ma.getmaskarray(image.array)
    assert mask[:, :, :30].all() and not mask[:, :, 50:].any()


def test_sixteen_bit_stretch_is_one_range_per_dataset(tmp_path: Path) -> None:
    data = SCENE_RGB.astype(np.uint16) * 40 + 500
    data[:, :40, :40] = 0  # nodata corner
    path = _write(tmp_path / "u16.tif", data, nodata=0)
    valid = data[:, np.any(data > 0, axis=0)]
    low, high = np.percentile(valid, (2, 98))
    with LocalRasterReader(path) as reader:
        small = reader.part(INNER, 64, 64)
        assert reader.stretch == pytest.approx(Stretch(low, high))
        whole = reader.part(SCENE_BOUNDS, 320, 288, dst_crs=SCENE_PROFILE["crs"].to_string())
        small_values = reader.read_values(INNER, 64, 64)
    expected = np.clip(np.rint((data.astype(np.float64) - low) * 255 / (high - low)), 0, 255)
    np.testing.assert_array_equal(whole.array.data[:, 40:, 40:], expected[:, 40:, 40:])
    assert np.ma.getmaskarray(whole.array)[:, :40, :40].all()
    # The small read used the dataset's range, not its own percentiles (which differ).
    assert percentile_stretch(small_values) != pytest.approx(Stretch(low, high), rel=0.01)
    small_expected = np.clip(np.rint((small_values.data.astype(np.float64) - low) * 255 / (high - low)), 0, 255)
    np.testing.assert_array_equal(small.array.data, small_expected)
    with LocalRasterReader(path, stretch=(500, 500 + 40 * 255)) as fixed:
        image = fixed.part(SCENE_BOUNDS, 320, 288, dst_crs=SCENE_PROFILE["crs"].to_string())
    np.testing.assert_array_equal(image.array.data[:, 40:, 40:], SCENE_RGB[:, 40:, 40:])


def test_float_nan_and_nodata_override_are_masked(tmp_path: Path) -> None:
    data = SCENE_RGB.astype(np.float32)
    data[0, :10, :] = np.nan
    data[:, 10:20, :] = -1.0
    path = _write(tmp_path / "float.tif", data)
    with LocalRasterReader(path, nodata=-1.0, stretch=(0, 255)) as reader:
        image = reader.part(SCENE_BOUNDS, 320, 288, dst_crs=SCENE_PROFILE["crs"].to_string())
    mask = np.ma.getmaskarray(image.array)
    assert mask[:, :20].all() and not mask[:, 20:].any()
    np.testing.assert_array_equal(image.array.data[:, 20:], SCENE_RGB[:, 20:])


def test_a_raster_of_nodata_alone_holds_no_imagery_and_has_no_stretch(tmp_path: Path) -> None:
    blank = _write(tmp_path / "blank.tif", np.zeros_like(SCENE_RGB), nodata=0)
    refused = r"blank.tif has no valid pixel .*nodata \(0.0\).*stretch: \[min, max\]"
    with LocalRasterReader(blank, stretch="percentile") as reader, pytest.raises(ImageryError, match=refused):
        _ = reader.stretch
    with LocalRasterReader(blank, stretch=(0, 255)) as reader:
        assert reader.holds_imagery(INNER) is False


def _pixel_box(column: int, row: int, width: int, height: int) -> Bounds:
    """The EPSG:3857 box around a block of the scene's pixels."""
    transform = SCENE_PROFILE["transform"]
    (left, right), (top, bottom) = zip(
        transform @ (column, row), transform @ (column + width, row + height), strict=True
    )
    return Bounds(*transform_bounds(SCENE_PROFILE["crs"], "EPSG:3857", left, bottom, right, top))


def test_holds_imagery_looks_at_every_raster_pixel_under_the_bounds(tmp_path: Path) -> None:
    data = np.zeros_like(SCENE_RGB)
    data[:, 100, 200] = SCENE_RGB[:, 100, 200]  # one valid pixel
    path = _write(tmp_path / "speck.tif", data, nodata=0)
    speck, elsewhere = _pixel_box(195, 95, 10, 10), _pixel_box(0, 0, 50, 50)
    with LocalRasterReader(path, stretch=(0, 255)) as reader:
        assert reader.holds_imagery(speck) is True
        assert reader.holds_imagery(elsewhere) is False
        assert reader.holds_imagery(SCENE_BOUNDS_3857) is True
        # A region far larger than the raster is read only where the raster is.
        assert reader.holds_imagery(Bounds(-2e7, -2e7, 2e7, 2e7)) is True
        outside = Bounds(0.0, 0.0, 1000.0, 1000.0)
        assert reader.holds_imagery(outside) is False
    with LocalRasterReader(SCENE_PATH) as reader:
        assert reader.holds_imagery(INNER) is True


def test_a_raster_at_a_url_reads_as_the_file_does(tmp_path: Path) -> None:
    with served_raster(SCENE_PATH, tmp_path / "served") as served:
        url, absent = f"{served}?sig=s3cret", served.rsplit("/", 1)[0] + "/absent.tif"
        assert reader_class(url) is LocalRasterReader
        with open_reader(url, cache_dir=tmp_path / "cache") as remote, LocalRasterReader(SCENE_PATH) as local:
            assert remote.footprint_lnglat() == local.footprint_lnglat()
            remote_image, local_image = remote.part(INNER, 64, 64), local.part(INNER, 64, 64)
            np.testing.assert_array_equal(remote_image.array.filled(0), local_image.array.filled(0))
            assert remote.holds_imagery(INNER) is None  # it would mean reading the raster over the network
        with pytest.raises(ImageryError) as refused:
            open_reader(f"{absent}?sig=s3cret", cache_dir=tmp_path / "cache")
    message = str(refused.value)
    assert message.startswith(f"cannot open raster {absent}?sig=***") and "s3cret" not in message


def test_bad_local_inputs_say_what_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ImageryError, match="bands"):
        LocalRasterReader(SCENE_PATH, bands=(1, 2, 5))
    with pytest.raises(ImageryError, match="does not exist"):
        open_reader(str(tmp_path / "missing.tif"), cache_dir=tmp_path)
    with pytest.raises(ImageryError, match="unknown stretch"):
        LocalRasterReader(SCENE_PATH, stretch="magic")
    with pytest.raises(ImageryError, match=r"raster URL https://\[::1/m.tif is not http\(s\) with a valid host"):
        LocalRasterReader("https://[::1/m.tif")
    no_crs = tmp_path / "plain.tif"
    with rasterio.open(no_crs, "w", driver="GTiff", width=4, height=4, count=3, dtype="uint8") as dataset:
        dataset.write(np.zeros((3, 4, 4), np.uint8))
    with pytest.raises(ImageryError, match="has no CRS"):
        LocalRasterReader(no_crs)
    with pytest.raises(ImageryError, match="does not apply"):
        open_reader(str(SCENE_PATH), cache_dir=tmp_path, max_zoom=3)


@pytest.mark.parametrize(
    "transform",
    [
        SCENE_PROFILE["transform"] @ Affine.translation(0, SCENE_PROFILE["height"]) @ Affine.scale(1, -1),
        SCENE_PROFILE["transform"] @ Affine.rotation(120.0),
    ],
    ids=["south-up", "turned-120"],
)
def test_a_raster_not_stored_north_up_is_refused_at_open(tmp_path: Path, transform: Affine) -> None:
    path = _write(tmp_path / "flipped.tif", SCENE_RGB, transform=transform)
    with pytest.raises(ImageryError, match=r"flipped.tif is stored south-up.*; warp it north-up, e.g. gdalwarp"):
        LocalRasterReader(path)


@pytest.mark.parametrize("bands", [None, (1,)])
def test_a_palette_raster_is_refused_not_read_as_grey(tmp_path: Path, bands: tuple[int, ...] | None) -> None:
    path = _write(tmp_path / "palette.tif", SCENE_RGB[:1], photometric="palette")
    with rasterio.open(path, "r+") as dataset:
        dataset.write_colormap(1, {index: (index, 255 - index, 0, 255) for index in range(256)})
    with pytest.raises(
        ImageryError, match="palette indexes, not colours; expand it to RGB: gdal_translate -expand rgb"
    ):
        LocalRasterReader(path, bands=bands)


def test_two_bands_are_grey_and_alpha_or_are_named(tmp_path: Path) -> None:
    valid = np.full(SCENE_RGB.shape[1:], 255, np.uint8)
    valid[:, : SCENE_RGB.shape[2] // 2] = 0  # the west half is transparent
    grey_alpha = _write(
        tmp_path / "grey_alpha.tif", np.stack([SCENE_RGB[0], valid]), photometric="minisblack", alpha="YES"
    )
    with LocalRasterReader(grey_alpha) as reader:
        assert reader.bands == (1,)
        image = reader.part(SCENE_BOUNDS, 320, 288, dst_crs=SCENE_PROFILE["crs"].to_string())
    assert image.coverage == pytest.approx(0.5)
    np.testing.assert_array_equal(image.array.data[:, :, 160:], np.repeat(SCENE_RGB[:1, :, 160:], 3, axis=0))
    two = _write(tmp_path / "two.tif", SCENE_RGB[:2])
    with pytest.raises(ImageryError, match=r"two.tif has 2 bands not tagged alpha.*name the bands to use in imagery"):
        LocalRasterReader(two)
    with LocalRasterReader(two, bands=(2,)) as reader:
        assert reader.bands == (2,)


# --- coverage from the real data mask ----------------------------------------------------------------------


def _rotated_transform(degrees: float) -> Affine:
    """The scene's pixel grid turned by `degrees` about its top-left corner (a rotated geotransform)."""
    return SCENE_PROFILE["transform"] @ Affine.rotation(degrees)


@pytest.mark.parametrize("dst_crs", ["EPSG:3857", "EPSG:32618", "EPSG:4326"])
@pytest.mark.parametrize(
    ("dtype", "degrees"),
    [("uint8", 0.0), ("float32", 0.0), ("uint16", 0.0), ("uint8", 30.0), ("float32", -20.0)],
    ids=["utm-uint8", "utm-float32", "utm-uint16", "rotated-uint8", "rotated-float32"],
)
def test_coverage_and_mask_follow_the_footprint_of_a_raster_without_nodata(
    tmp_path: Path, dtype: str, degrees: float, dst_crs: str
) -> None:
    data = np.maximum(SCENE_RGB, 1).astype(dtype)  # no pixel is 0 either: nothing but the footprint can mask
    path = _write(tmp_path / "scene.tif", data, transform=_rotated_transform(degrees), nodata=None)
    outline = footprint(path, dst_crs)
    # Views half the footprint's size, centred on a corner and on the middle of an edge: both straddle it.
    minx, miny, maxx, maxy = outline.bounds
    half_x, half_y = (maxx - minx) / 4, (maxy - miny) / 4
    edge = outline.exterior.interpolate(0.375, normalized=True)
    width, height = 160, 120
    with LocalRasterReader(path, stretch=(0, 255)) as reader:
        assert reader.nodata is None
        for x, y in (outline.exterior.coords[0], (edge.x, edge.y)):
            view = Bounds(x - half_x, y - half_y, x + half_x, y + half_y)
            image = reader.part(view, width, height, dst_crs=dst_crs)
            expected = overlap_fraction(outline, view)
            assert 0.1 < expected < 0.9
            assert image.coverage == pytest.approx(expected, abs=0.015)
            # Masked pixels are exactly those outside the footprint, but for resampled pixels on its edge.
            mask = np.ma.getmaskarray(image.array)
            assert (mask == mask[0]).all()
            errors = mask_errors(outline, view, mask[0])
            assert (errors <= 1.5 * max(2 * half_x / width, 2 * half_y / height)).all()
            assert errors.size < 0.01 * width * height


@pytest.mark.parametrize("kind", ["alpha-band", "internal-mask"])
def test_a_raster_alpha_band_or_mask_masks_its_transparent_pixels(tmp_path: Path, kind: str) -> None:
    valid = np.full(SCENE_RGB.shape[1:], 255, np.uint8)
    valid[:, : SCENE_RGB.shape[2] // 2] = 0  # the west half is transparent
    path = tmp_path / f"{kind}.tif"
    if kind == "alpha-band":
        _write(path, np.concatenate([SCENE_RGB, valid[np.newaxis]]), photometric="RGB", alpha="YES")
    else:
        with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **SCENE_PROFILE) as dataset:
            dataset.write(SCENE_RGB)
            dataset.write_mask(valid)
    with LocalRasterReader(path) as reader:
        assert reader.bands == (1, 2, 3)
        image = reader.part(SCENE_BOUNDS, 320, 288, dst_crs=SCENE_PROFILE["crs"].to_string())
        in_mercator = reader.part(Bounds(*transform_bounds(SCENE_PROFILE["crs"], "EPSG:3857", *SCENE_BOUNDS)), 64, 64)
    mask = np.ma.getmaskarray(image.array)
    assert mask[:, :, :160].all() and not mask[:, :, 160:].any()
    assert image.coverage == pytest.approx(0.5)
    assert in_mercator.coverage == pytest.approx(0.5, abs=0.05)


# --- the reader API ------------------------------------------------------------------------------------------


def test_native_gsd_is_the_raster_pixel_on_the_ground(tmp_path: Path) -> None:
    utm = SCENE_PROFILE["crs"].to_string()
    with LocalRasterReader(SCENE_PATH) as reader:
        own_grid = reader.part(SCENE_BOUNDS, 320, 288, dst_crs=utm)
        assert reader.native_gsd_m(18.5) == pytest.approx(own_grid.gsd_m, rel=1e-3)
        assert reader.native_gsd_m(18.5) == pytest.approx(5.0, rel=2e-3)
    rotated = _write(tmp_path / "rotated.tif", SCENE_RGB, transform=_rotated_transform(30.0))
    with LocalRasterReader(rotated) as reader:
        assert reader.native_gsd_m(18.5) == pytest.approx(5.0, rel=2e-3)
    # A geographic grid's pixels are taller than wide on the ground: the longer side counts.
    degrees = 5.0 / 111_000
    lnglat_transform = Affine(degrees, 0.0, -72.22, 0.0, -degrees, 18.52)
    geographic = _write(tmp_path / "lnglat.tif", SCENE_RGB, crs="EPSG:4326", transform=lnglat_transform)
    geod = Geod(ellps="WGS84")
    centre_lon, centre_lat = lnglat_transform @ (160, 144)
    tall = geod.inv(centre_lon, centre_lat, centre_lon, centre_lat - degrees)[2]
    wide = geod.inv(centre_lon, centre_lat, centre_lon + degrees, centre_lat)[2]
    assert tall > wide
    with LocalRasterReader(geographic) as reader:
        assert reader.native_gsd_m(18.5) == pytest.approx(tall, rel=1e-6)


def test_local_rasters_are_read_on_demand() -> None:
    assert not LocalRasterReader.fetches_ahead
    with LocalRasterReader(SCENE_PATH) as reader:
        assert not reader.fetches_ahead
        assert reader.prefetch([INNER, SCENE_BOUNDS], 224) == PrefetchReport("read on demand", 2, 0, 0)
        assert reader.estimate([INNER], 224) is None

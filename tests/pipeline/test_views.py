"""Views cut from strips of source pixels (pipeline.views) against per-view GDAL warps (ImageryReader.part).

The strip path reads each source pixel once and resamples every view with GDAL's warp kernel, so the views
must match per-view reads: masks exactly, values to within rounding (1 grey level) on grids that are Web
Mercator already (tile caches, EPSG:3857 rasters). Rasters in another CRS match as closely as GDAL's own
coordinate approximation allows, and a model sees the same thing either way (embeddings within 1e-3).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import rasterio
import torch
from rasterio.enums import Resampling
from rasterio.transform import Affine
from rasterio.warp import transform_bounds
from rasterio.windows import Window
from shapely.geometry import box
from support.imagery_servers import SCENE_PATH, SceneTiles, TileServer, warp_to_web_mercator
from support.paths import LANDSAT

from model import Sat2Sound, Sat2SoundConfig, Sat2SoundEncoder
from pipeline.errors import ImageryError
from pipeline.geometry import (
    WEB_MERCATOR,
    WGS84,
    Bounds,
    cover_blocks,
    lattice_blocks,
    lnglat_of_mercator,
    output_zoom,
    tile_ground_size_m,
    view_bounds,
    view_rows,
)
from pipeline.imagery import ImageryReader, LocalRasterReader, TileCache, XYZReader
from pipeline.imagery.base import RESAMPLINGS, RGB_BANDS, SourcePixels, read_strips
from pipeline.views import KERNELS, cut_views

SIZE = 224


class Comparison(NamedTuple):
    """Per view: largest grey-level difference, share of values more than 1 apart, coverage both ways; and
    the views themselves both ways."""

    max_diff: np.ndarray
    share_over_one: np.ndarray
    coverage: np.ndarray
    reference_coverage: np.ndarray
    strip_views: np.ndarray
    part_views: np.ndarray


def views_over(footprint: Bounds, view_m: float, offset: int, inset: float = 0.0) -> np.ndarray:
    """Views of output tiles `offset` zooms finer than `view_m` views, over a raster's EPSG:4326 `footprint`
    in EPSG:3857, shrunk by `inset` of its size on each side (negative: grown, so that views run off it)."""
    left, bottom, right, top = transform_bounds(WGS84, WEB_MERCATOR, *footprint)
    dx, dy = (right - left) * inset, (top - bottom) * inset
    lon, lat = lnglat_of_mercator([left + dx, right - dx], [bottom + dy, top - dy])
    zoom = output_zoom(view_m, float(np.mean(lat))) + offset
    tiles = cover_blocks(box(lon[0], lat[0], lon[1], lat[1]), zoom).tiles()
    return view_bounds(tiles.x, tiles.y, zoom, view_m, SIZE)


def compare(reader: ImageryReader, views: np.ndarray) -> Comparison:
    strip_views, part_views, coverage = [], [], []
    for strip in read_strips(views, SIZE):
        group = views[strip.start : strip.stop]
        batch = cut_views(reader.source_pixels(group, SIZE), group, SIZE)
        strip_views.extend(batch.pixels.numpy())
        coverage.extend(batch.coverage.tolist())
    for view in views:
        part_views.append(reader.part(Bounds(*view), SIZE, SIZE).array)
    strip_array = np.stack(strip_views)
    max_diff, share, reference = [], [], []
    for mine, theirs in zip(strip_array, part_views, strict=True):
        diff = np.abs(mine.astype(int) - np.ma.filled(theirs, 0).astype(int))
        max_diff.append(int(diff.max()))
        share.append(float((diff > 1).mean()))
        reference.append(float((~np.ma.getmaskarray(theirs)[0]).mean()))
    return Comparison(
        np.array(max_diff),
        np.array(share),
        np.array(coverage),
        np.array(reference),
        strip_array,
        np.stack([np.ma.filled(view, 0) for view in part_views]),
    )


@pytest.fixture(scope="module")
def mercator_scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled Landsat scene warped to EPSG:3857 (a nodata collar where the UTM footprint ends)."""
    return warp_to_web_mercator(LANDSAT, tmp_path_factory.mktemp("mercator") / "landsat_3857.tif")


@pytest.fixture(scope="module")
def tile_server() -> Iterator[TileServer]:
    with TileServer(SceneTiles.from_raster(SCENE_PATH, zooms=(16, 17), formats=("PNG",))) as running:
        yield running


def scene_footprint() -> Bounds:
    """The 5 m RGB scene's EPSG:4326 box (the tile server's tiles are cut from it)."""
    with LocalRasterReader(SCENE_PATH) as scene:
        return scene.footprint_lnglat()


def landsat(path: Path = LANDSAT) -> LocalRasterReader:
    return LocalRasterReader(path, bands=(3, 2, 1))


def test_views_from_a_tile_cache_match_per_view_reads(tile_server: TileServer, tmp_path: Path) -> None:
    with XYZReader(tile_server.url + "/png/{z}/{x}/{y}.png", cache=TileCache(tmp_path), max_zoom=17) as reader:
        views = views_over(scene_footprint(), 600.0, 1, inset=-0.05)
        reader.prefetch(views, SIZE)
        result = compare(reader, views)
    inside = result.reference_coverage == 1.0
    edge = (result.reference_coverage > 0) & ~inside
    assert inside.sum() >= 4 and edge.sum() >= 4, "views both inside the scene and across its edge"
    assert result.max_diff.max() <= 1
    np.testing.assert_allclose(result.coverage, result.reference_coverage, atol=1e-6)


def test_views_from_a_web_mercator_raster_match_per_view_reads(mercator_scene: Path) -> None:
    with landsat(mercator_scene) as reader:
        footprint = reader.footprint_lnglat()
        inner = compare(reader, views_over(footprint, 7680.0, 2, inset=0.15))
        edges = compare(reader, views_over(footprint, 7680.0, 1, inset=-0.05))
    assert len(inner.max_diff) >= 16 and inner.max_diff.max() <= 1
    assert (edges.reference_coverage < 0.5).sum() >= 4
    np.testing.assert_allclose(edges.coverage, edges.reference_coverage, atol=1e-6)
    # Where a view's kernel meets the nodata collar, or the raster's edge, GDAL clips its source window and
    # weighs the pixels left a little differently.
    assert np.median(edges.share_over_one) < 0.01 and edges.share_over_one.max() < 0.2


@pytest.mark.parametrize(
    ("scene", "view_m", "interior_max"),
    [("landsat", 7680.0, 5), ("rgb_5m", 600.0, 1)],
    ids=["bundled Landsat (UTM 21S, shrunk)", "5 m RGB (UTM 18N, enlarged)"],
)
def test_views_from_a_projected_raster_match_per_view_reads(scene: str, view_m: float, interior_max: int) -> None:
    reader = landsat() if scene == "landsat" else LocalRasterReader(SCENE_PATH)
    with reader:
        footprint = reader.footprint_lnglat()
        inner = compare(reader, views_over(footprint, view_m, 2, inset=0.3))
        edges = compare(reader, views_over(footprint, view_m, 1, inset=-0.05))
    # GDAL maps pixels through the projection approximately (linear pieces, error below 0.001 px here) and
    # shrinking weighs them by its own estimate of the scale: a few pixels at sharp edges land a few grey
    # levels off. On the raster's edge one pixel centre in 50,000 may land on the other side.
    full = inner.reference_coverage == 1.0
    assert full.sum() >= 16
    assert inner.max_diff[full].max() <= interior_max and inner.share_over_one[full].max() < 5e-3
    np.testing.assert_allclose(inner.coverage, inner.reference_coverage, atol=2.0 / SIZE**2)
    assert (edges.reference_coverage < 0.5).sum() >= 4
    np.testing.assert_allclose(edges.coverage, edges.reference_coverage, atol=2.0 / SIZE**2)
    assert np.median(edges.share_over_one) < 0.01 and edges.share_over_one.max() < 0.2


def test_views_of_a_raster_many_times_finer_are_cut_from_a_decimated_read(tmp_path: Path) -> None:
    # The bundled scene resampled to 5 m: the 7,680 m views' pixels are ~7 of its own, so the reader averages
    # it down (GDAL's average) before cutting, where a per-view warp stretches the kernel over every pixel.
    with rasterio.open(LANDSAT) as scene:
        window = Window(200, 200, 512, 512)
        fine = scene.read(window=window, out_shape=(3, 3072, 3072), resampling=Resampling.bilinear)
        transform = scene.window_transform(window) @ Affine.scale(512 / 3072)
        profile = {"count": 3, "dtype": "uint16", "crs": scene.crs, "nodata": 0, "tiled": True}
    path = tmp_path / "landsat_5m.tif"
    with rasterio.open(path, "w", driver="GTiff", width=3072, height=3072, transform=transform, **profile) as out:
        out.write(fine)
    with landsat(path) as reader:
        views = views_over(reader.footprint_lnglat(), 7680.0, 2, inset=0.3)
        source = reader.source_pixels(views, SIZE)
        result = compare(reader, views)
    assert len(views) >= 4 and source.values.shape[1] < 3072 / 3, "read at a third of the raster's resolution or less"
    assert result.share_over_one.max() < 0.01 and result.max_diff.max() <= 12
    np.testing.assert_allclose(result.coverage, result.reference_coverage, atol=2.0 / SIZE**2)


def test_a_model_sees_the_same_views_either_way() -> None:
    torch.manual_seed(0)
    encoder = Sat2SoundEncoder(Sat2Sound(Sat2SoundConfig.small("none")).eval(), device="cpu")
    with landsat() as reader:
        views = views_over(reader.footprint_lnglat(), 7680.0, 2, inset=0.1)
        result = compare(reader, views)
    strip = encoder.embed_images(result.strip_views, zoom_level=3).embedding
    part = encoder.embed_images(result.part_views, zoom_level=3).embedding
    assert len(views) >= 16
    # Scores are cosines with unit query vectors: they differ by at most the distance between embeddings. On
    # this UTM scene GDAL estimates the shrink its own way (a scale per axis from the warped window's extent),
    # so views differ by a few grey levels at sharp edges (above): this random model's embeddings by ~1e-3.
    assert float((strip - part).norm(dim=1).max()) < 1.5e-3


def assert_within_a_grey_level(pixels: torch.Tensor, expected: torch.Tensor) -> None:
    """uint8 views alike but for rounding: at most one grey level apart, in fewer than one value in a thousand."""
    difference = (pixels.int() - expected.int()).abs()
    assert int(difference.max()) <= 1 and float((difference > 0).float().mean()) < 1e-3


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled kernels", "sparse products"])
@pytest.mark.parametrize("grid", ["projected", "web mercator"])
def test_overlapping_views_sliced_from_shared_blocks_match_views_cut_alone(
    grid: str, compiled: bool, mercator_scene: Path
) -> None:
    with landsat(mercator_scene if grid == "web mercator" else LANDSAT) as reader:
        views = views_over(reader.footprint_lnglat(), 7680.0, 3, inset=0.1)
        row = view_rows(views)[len(view_rows(views)) // 2]
        views = views[row]
        source = reader.source_pixels(views, SIZE)
    blocks = lattice_blocks(views, SIZE)
    assert len(blocks.bounds) <= len(views) / 4, "a row of views 8 tiles wide is cut from ~1/8 of the pixels"
    shared = cut_views(source, views, SIZE, compiled=compiled)
    alone = [cut_views(source, view[None], SIZE, compiled=compiled) for view in views]
    assert_within_a_grey_level(shared.pixels, torch.cat([view.pixels for view in alone]))
    np.testing.assert_allclose(shared.coverage, torch.cat([view.coverage for view in alone]), atol=2.0 / SIZE**2)
    # More bands than RGB (land-cover planes: `pipeline.demo_data`) are cut and sliced band for band alike: the
    # compiled kernels exactly (a group of three bands at a time); sparse products up to rounding, as the order of
    # their sums may change with the number of bands (MKL chooses its kernel by the CPU and the matrix's width).
    planes = cut_views(
        replace(source, values=np.concatenate([source.values, source.values[:1]])), views, SIZE, compiled=compiled
    )
    for cut, expected in [(planes.pixels[:, :RGB_BANDS], shared.pixels), (planes.pixels[:, 3], shared.pixels[:, 0])]:
        if compiled:
            assert torch.equal(cut, expected)
        else:
            assert_within_a_grey_level(cut, expected)


def test_views_off_one_pixel_lattice_are_cut_alone() -> None:
    lattice = view_bounds(np.arange(100, 108), np.full(8, 200), 10, 4 * tile_ground_size_m(10, 60.0), SIZE)
    assert len(lattice_blocks(lattice, SIZE).bounds) < len(lattice)
    nudged = lattice.copy()
    nudged[3, [0, 2]] += 0.3 * (lattice[0, 2] - lattice[0, 0]) / SIZE
    assert len(lattice_blocks(nudged, SIZE).bounds) == len(nudged)


def test_cubic_views_match_gdal_on_a_tile_grid(tile_server: TileServer, tmp_path: Path) -> None:
    options = {"cache": TileCache(tmp_path), "max_zoom": 17, "resampling": "cubic"}
    with XYZReader(tile_server.url + "/png/{z}/{x}/{y}.png", **options) as reader:  # type: ignore[arg-type]
        views = views_over(scene_footprint(), 600.0, 0, inset=0.2)
        result = compare(reader, views)
    assert len(views) >= 4 and result.max_diff.max() <= 1


def test_a_strip_holds_each_source_pixel_once_and_memory_stays_bounded() -> None:
    with landsat() as reader:
        views = views_over(reader.footprint_lnglat(), 7680.0, 3)
        strips = read_strips(views, SIZE)
        pixels = [reader.source_pixels(views[strip.start : strip.stop], SIZE) for strip in strips]
    assert sum(strip.stop - strip.start for strip in strips) == len(views)
    # Overlapping views share one read: far fewer source pixels than the views hold between them.
    read = sum(source.valid.size for source in pixels)
    assert read < len(views) * SIZE * SIZE / 8
    assert max(strip.pixels for strip in strips) <= 2048 * 2048 * 1.05


def test_views_off_the_source_are_empty() -> None:
    empty = SourcePixels.empty()
    batch = cut_views(empty, np.array([[0.0, 0.0, 1000.0, 1000.0]]), 16)
    assert batch.pixels.shape == (1, 3, 16, 16) and not batch.pixels.any() and float(batch.coverage[0]) == 0.0
    assert cut_views(empty, np.zeros((0, 4)), 16).pixels.shape == (0, 3, 16, 16)


def test_readers_resample_only_with_kernels_views_can_be_cut_with(tmp_path: Path) -> None:
    assert set(KERNELS) == set(RESAMPLINGS)
    with pytest.raises(ImageryError, match="unknown resampling 'lanczos'; use bilinear or cubic"):
        LocalRasterReader(LANDSAT, resampling="lanczos")
    with pytest.raises(ImageryError, match="unknown resampling 'average'; use bilinear or cubic"):
        XYZReader("https://tiles.invalid/{z}/{x}/{y}.png", cache=TileCache(tmp_path), resampling="average")
    with landsat() as reader:
        assert reader.source_pixels(views_over(reader.footprint_lnglat(), 7680.0, 0), SIZE).resampling == "bilinear"
    with LocalRasterReader(LANDSAT, bands=(3, 2, 1), resampling="cubic") as reader:
        views = views_over(reader.footprint_lnglat(), 7680.0, 0)
        assert reader.source_pixels(views, SIZE).resampling == "cubic"


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("resampling", ["bilinear", "cubic"])
@pytest.mark.parametrize("grid", ["projected", "web mercator"])
def test_the_compiled_cpu_kernels_and_the_sparse_products_cut_the_same_views(
    resampling: str, grid: str, device: str, mercator_scene: Path
) -> None:
    with landsat(mercator_scene if grid == "web mercator" else LANDSAT) as reader:
        views = views_over(reader.footprint_lnglat(), 7680.0, 2, inset=-0.05)[::5]
        source = reader.source_pixels(views, SIZE)
    source = replace(source, resampling=resampling)
    grey = replace(source, values=source.values[1:2])
    # Sources of more bands than RGB (land-cover planes: `pipeline.demo_data`) go through in groups of three.
    planes = replace(source, values=np.concatenate([source.values, source.values[::-1]]))
    for pixels in (source, planes, grey):
        compiled = cut_views(pixels, views, SIZE, compiled=True)
        sparse = cut_views(pixels, views, SIZE, device=device, compiled=False)
        sparse = sparse._replace(pixels=sparse.pixels.cpu())
        np.testing.assert_array_equal(compiled.coverage, sparse.coverage)
        assert compiled.coverage.min() < 1.0 and compiled.coverage.max() == 1.0, "views inside and across the edge"
        assert_within_a_grey_level(sparse.pixels, compiled.pixels)
        assert compiled.pixels.shape[1] == max(RGB_BANDS, len(pixels.values))
    assert torch.equal(compiled.pixels[:, 0], compiled.pixels[:, 2]), "a grey source's views are grey"

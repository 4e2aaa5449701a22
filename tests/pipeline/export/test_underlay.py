"""`imagery.tif`, the build's imagery at preview resolution, read back with rasterio: georeferenced on the grid,
the colours the build reads (bands and all), empty where there is no imagery, from a raster or a tile server."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
from support.imagery_servers import Fault, SceneTiles, TileServer
from support.synthetic_store import (
    CHECKER_TILES,
    IMAGERY_TILE_PX,
    SyntheticStore,
    checker_colour,
    write_synthetic_imagery,
    write_synthetic_store,
)

from pipeline.config import ImagerySettings
from pipeline.export.underlay import UNDERLAY_MAX_PX, Underlay, read_underlay, underlay_size, write_underlay
from pipeline.geometry import Bounds

JPEG_TOLERANCE = 10
SERVER_ZOOMS = (8, 9, 10)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStore:
    return write_synthetic_store(tmp_path_factory.mktemp("store") / "soundscape.zarr")


@pytest.fixture(scope="module")
def server(store: SyntheticStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TileServer]:
    scene = write_synthetic_imagery(store, tmp_path_factory.mktemp("served") / "scene.tif", bgr=False)
    with TileServer(SceneTiles.from_raster(scene, zooms=SERVER_ZOOMS, formats=("PNG",))) as running:
        yield running


def settings(source: str, cache: Path, **options: object) -> ImagerySettings:
    return ImagerySettings(source, options, str(cache), False, None, 0.5)


def underlay(store: SyntheticStore, imagery: ImagerySettings, out: Path) -> Underlay:
    latitude = store.plan.latitude
    native_gsd_m = store.plan.grid.pixel_m / IMAGERY_TILE_PX * math.cos(math.radians(latitude))
    return write_underlay(imagery, store.plan.grid.bounds, native_gsd_m, latitude, out)


def block_centres(store: SyntheticStore) -> list[tuple[float, float]]:
    """The centres of the checkerboard's blocks that lie on the grid, as (row, col)."""
    half = CHECKER_TILES / 2
    return [
        (row + half, col + half)
        for row in range(0, store.height - CHECKER_TILES + 1, CHECKER_TILES)
        for col in range(0, store.width - CHECKER_TILES + 1, CHECKER_TILES)
    ]


def at(image: np.ndarray, store: SyntheticStore, row: float, col: float) -> np.ndarray:
    """The underlay's pixel at a (fractional) grid position: it spans the grid exactly."""
    return image[:, int(row / store.height * image.shape[1]), int(col / store.width * image.shape[2])].astype(int)


def test_the_underlay_is_modest_and_no_finer_than_its_source() -> None:
    wide = Bounds(0.0, 0.0, 2_000_000.0, 1_000_000.0)
    assert underlay_size(wide, 0.3, 0.0) == (UNDERLAY_MAX_PX, UNDERLAY_MAX_PX // 2)
    # 30 m pixels at 60° span 60 Web Mercator metres: 10 km x 5 km is 167 x 83 of them.
    assert underlay_size(Bounds(0.0, 0.0, 10_000.0, 5_000.0), 30.0, 60.0) == (167, 83)


def test_a_local_raster_is_read_with_the_builds_bands_and_is_empty_beyond_it(
    store: SyntheticStore, tmp_path: Path
) -> None:
    scene = write_synthetic_imagery(store, tmp_path / "scene.tif", cover=0.5)
    written = underlay(store, settings(str(scene), tmp_path / "tiles", bands=[3, 2, 1]), tmp_path / "imagery.tif")
    assert (written.width, written.height) == (store.width * IMAGERY_TILE_PX, store.height * IMAGERY_TILE_PX)
    assert written.coverage == pytest.approx(0.5, abs=0.01)
    with rasterio.open(tmp_path / "imagery.tif") as dataset:
        assert dataset.crs.to_epsg() == 3857 and dataset.count == 3 and dataset.dtypes[0] == "uint8"
        np.testing.assert_allclose(dataset.bounds, store.plan.grid.bounds, rtol=0, atol=1e-6)
        assert dataset.tags()["IMAGERY_SOURCE"].startswith("file-scene-")
    rgb, valid, bounds = read_underlay(tmp_path / "imagery.tif")
    assert bounds == pytest.approx(store.plan.grid.bounds)
    assert valid[:, : valid.shape[1] // 2 - 2].all() and not valid[:, valid.shape[1] // 2 + 2 :].any()
    for row, col in block_centres(store):
        if col < store.width / 2:
            assert np.abs(at(rgb, store, row, col) - checker_colour(row, col)).max() <= JPEG_TOLERANCE


def test_a_tile_server_is_read_at_the_zoom_that_fits(store: SyntheticStore, server: TileServer, tmp_path: Path) -> None:
    imagery = settings(f"xyz:{server.url}/png/{{z}}/{{x}}/{{y}}.png", tmp_path / "tiles", max_zoom=SERVER_ZOOMS[-1])
    written = underlay(store, imagery, tmp_path / "imagery.tif")
    assert written.coverage == 1.0
    rgb, _, _ = read_underlay(tmp_path / "imagery.tif")
    for row, col in block_centres(store):
        assert np.abs(at(rgb, store, row, col) - checker_colour(row, col)).max() <= JPEG_TOLERANCE
    assert len(server.requests_to("/png/")) < 64, "a few coarse tiles, not the build's own"


def test_tiles_that_cannot_be_had_leave_the_underlay_empty_not_the_build_stopped(
    store: SyntheticStore, server: TileServer, tmp_path: Path
) -> None:
    server.add_fault(Fault("status", path="/png/", status=500))
    try:
        imagery = settings(
            f"xyz:{server.url}/png/{{z}}/{{x}}/{{y}}.png",
            tmp_path / "tiles",
            max_zoom=SERVER_ZOOMS[-1],
            retry={"attempts": 1},
        )
        assert imagery.on_missing == "fail"
        written = underlay(store, imagery, tmp_path / "imagery.tif")
    finally:
        server.clear()
    assert written.coverage == 0.0
    _, valid, _ = read_underlay(tmp_path / "imagery.tif")
    assert not valid.any()

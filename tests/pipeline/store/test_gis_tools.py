"""Debian 12's GDAL 3.6 and QGIS 3.22 open every gridded variable of the store georeferenced and the right way round.

GDAL before 3.9 reads neither CF grid mappings nor 3-D arrays as bands: each 2-D layer is `ZARR:"store":/var:i`,
its CRS comes from the `_CRS` attribute and its geotransform from the x/y arrays.
"""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from support.synthetic_store import (
    SyntheticStore,
    gdalinfo,
    location_value,
    needs_debian_gdal,
    needs_debian_qgis,
    qgis_layers,
    run_gdalinfo,
    write_synthetic_store,
)

from pipeline.store.layout import gdal_path

LAYERS = [
    ("score", 0),
    ("score", 2),
    ("score_percentile", 1),
    ("score_softmax", 1),
    ("embedding", 3),
    ("concept_index", 0),
    ("concept_weight", 2),
    ("valid", None),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStore:
    return write_synthetic_store(tmp_path_factory.mktemp("store") / "soundscape.zarr", 40, 24, dim=4, chunk=16)


def _expected(store: SyntheticStore, name: str, index: int | None) -> np.ndarray:
    with xr.open_zarr(store.path) as dataset:
        values = dataset[name].to_numpy()
    return values if index is None else values[index]


@needs_debian_gdal
@pytest.mark.parametrize(("name", "index"), LAYERS)
def test_gdal_3_6_reads_each_layer_with_crs_geotransform_and_values(
    store: SyntheticStore, name: str, index: int | None
) -> None:
    path = gdal_path(store.path, name, *(() if index is None else (index,)))
    info = gdalinfo(path)
    assert 'ID["EPSG",3857]]' in info["coordinateSystem"]["wkt"].replace("\n", "").replace(" ", "")
    np.testing.assert_allclose(info["geoTransform"], store.plan.grid.transform.to_gdal(), rtol=0, atol=1e-6)
    assert info["size"] == [store.width, store.height]
    expected = _expected(store, name, index)
    row, col = (int(value) for value in np.argwhere(store.valid)[7])
    x, y = store.plan.grid.transform @ (col + 0.5, row + 0.5)
    assert location_value(path, x, y) == pytest.approx(float(expected[row, col]), rel=1e-3)
    # Not transposed: a tile near the top-right corner is where the store has it.
    x, y = store.plan.grid.transform @ (store.width - 0.5, 0.5)
    corner = float(expected[0, store.width - 1])
    value = location_value(path, x, y)
    assert value == pytest.approx(corner, rel=1e-3) or (np.isnan(corner) and (np.isnan(value) or value == -1))


@needs_debian_gdal
def test_gdal_3_6_asks_for_the_index_of_a_3d_layer(store: SyntheticStore) -> None:
    """The bare 3-D path fails on GDAL < 3.9 ("Indices of extra dimensions must be specified"): docs use `:i`."""
    result = run_gdalinfo(gdal_path(store.path, "score"))
    if result.returncode == 0:
        pytest.skip("this GDAL opens 3-D Zarr arrays without indices (>= 3.9)")
    assert "Indices of extra dimensions must be specified" in result.stderr


@needs_debian_qgis
def test_qgis_3_22_loads_zarr_layers_with_crs_and_extent(store: SyntheticStore) -> None:
    left, bottom, right, top = store.plan.grid.bounds
    layers = qgis_layers(gdal_path(store.path, "score", 1), gdal_path(store.path, "valid"))
    for layer in layers:
        assert layer["valid"] and layer["crs"] == "EPSG:3857"
        np.testing.assert_allclose(layer["extent"], [left, bottom, right, top], rtol=0, atol=1e-3)
        assert layer["size"] == [store.width, store.height]

"""Debian 12's GDAL 3.6 and QGIS 3.22 read the COGs: georeferencing, values, band units, colour table, categories."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support.synthetic_store import (
    SyntheticStore,
    gdalinfo,
    gdalinfo_text,
    location_value,
    needs_debian_gdal,
    needs_debian_qgis,
    qgis_layers,
    write_synthetic_store,
)

from pipeline.export.cog import write_concept_cog, write_query_cogs


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStore:
    return write_synthetic_store(tmp_path_factory.mktemp("store") / "soundscape.zarr")


@pytest.fixture(scope="module")
def cogs(store: SyntheticStore, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("cog")
    return [*write_query_cogs(store.path, out), write_concept_cog(store.path, out)]


@needs_debian_gdal
def test_gdal_3_6_reads_the_score_cog_with_crs_geotransform_value_and_unit(
    store: SyntheticStore, cogs: list[Path]
) -> None:
    info = gdalinfo(str(cogs[1]))
    assert 'ID["EPSG",3857]]' in info["coordinateSystem"]["wkt"].replace("\n", "").replace(" ", "")
    np.testing.assert_allclose(info["geoTransform"], store.plan.grid.transform.to_gdal(), rtol=0, atol=1e-6)
    (band,) = info["bands"]
    assert band["unit"] == "cosine"
    assert band["description"] == "rain_on_roof.flac"
    assert band["metadata"][""]["VARIABLE"] == "score"
    row, col = (int(value) for value in np.argwhere(store.valid)[11])
    x, y = store.plan.grid.transform @ (col + 0.5, row + 0.5)
    assert location_value(str(cogs[1]), x, y) == pytest.approx(float(store.score[1, row, col]), rel=1e-6)
    assert "Unit Type: cosine" in gdalinfo_text(str(cogs[1]))


@needs_debian_gdal
def test_gdal_3_6_shows_the_concept_colour_table_and_category_names(store: SyntheticStore, cogs: list[Path]) -> None:
    concepts = cogs[-1]
    assert not concepts.with_suffix(".tif.aux.xml").exists(), "everything is inside the file"
    info = gdalinfo(str(concepts))
    (band,) = info["bands"]
    assert (band["type"], band["colorInterpretation"], band["noDataValue"]) == ("Byte", "Palette", 255)
    entries = band["colorTable"]["entries"]
    present = np.unique(store.concept_index[..., 0][store.valid])
    assert all(entries[value][3] == 255 for value in present) and entries[255][3] == 0
    names = band["metadata"][""]
    assert {f"CATEGORY_{value}" for value in present.tolist()} <= set(names)
    text = gdalinfo_text(str(concepts))
    assert "Color Table (RGB with 256 entries)" in text
    assert f"CATEGORY_{present[0]}=concept {present[0]} (" in text
    assert "Unit Type: codebook concept" in text
    row, col = (int(value) for value in np.argwhere(store.valid)[5])
    x, y = store.plan.grid.transform @ (col + 0.5, row + 0.5)
    assert location_value(str(concepts), x, y) == store.concept_index[row, col, 0]


@needs_debian_qgis
def test_qgis_3_22_loads_the_cogs_with_crs_and_extent(store: SyntheticStore, cogs: list[Path]) -> None:
    left, bottom, right, top = store.plan.grid.bounds
    for layer in qgis_layers(str(cogs[0]), str(cogs[-1])):
        assert layer["valid"] and layer["crs"] == "EPSG:3857"
        np.testing.assert_allclose(layer["extent"], [left, bottom, right, top], rtol=0, atol=1e-3)
        assert layer["size"] == [store.width, store.height]

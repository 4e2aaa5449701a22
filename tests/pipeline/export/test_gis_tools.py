"""Debian 12's GDAL 3.6 and QGIS 3.22 read the COGs: georeferencing, values, band units, colour table, categories,
and QGIS shows the percentile and dominant-query maps with their styles."""

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
    qgis_styles,
    write_synthetic_store,
)

from pipeline.export.cog import write_concept_cog, write_dominant_cog, write_query_cogs


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStore:
    return write_synthetic_store(tmp_path_factory.mktemp("store") / "soundscape.zarr")


@pytest.fixture(scope="module")
def cogs(store: SyntheticStore, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("cog")
    return [*write_query_cogs(store.path, out), write_concept_cog(store.path, out)]


@pytest.fixture(scope="module")
def answers(store: SyntheticStore, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path]:
    """The percentile COGs and the dominant-query COG."""
    out = tmp_path_factory.mktemp("answers")
    return write_query_cogs(store.path, out, variable="score_percentile"), write_dominant_cog(store.path, out)


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


@needs_debian_gdal
def test_gdal_3_6_reads_the_percentile_cog(store: SyntheticStore, answers: tuple[list[Path], Path]) -> None:
    percentile = str(answers[0][0])
    (band,) = gdalinfo(percentile)["bands"]
    assert (band["unit"], band["description"]) == ("%", "birds chirping in a park")
    assert band["metadata"][""]["VARIABLE"] == "score_percentile"
    row, col = (int(value) for value in np.argwhere(store.valid)[17])
    x, y = store.plan.grid.transform @ (col + 0.5, row + 0.5)
    valid_scores = store.score[0][store.valid]
    score = store.score[0, row, col]
    expected = 100 * ((valid_scores < score).sum() + (valid_scores == score).sum() / 2) / len(valid_scores)
    assert location_value(percentile, x, y) == pytest.approx(expected, abs=1e-4)


@needs_debian_gdal
def test_gdal_3_6_reads_the_dominant_cog_with_palette_names_and_a_plain_margin_band(
    store: SyntheticStore, answers: tuple[list[Path], Path]
) -> None:
    dominant = str(answers[1])
    category, margin = gdalinfo(dominant)["bands"]
    assert (category["type"], category["colorInterpretation"], category["noDataValue"]) == ("Byte", "Palette", 255)
    assert (margin["type"], margin["colorInterpretation"], margin["noDataValue"]) == ("Byte", "Undefined", 255)
    assert (category["unit"], margin["unit"]) == ("query", "percentage points")
    entries = category["colorTable"]["entries"]
    assert all(entries[value][3] == 255 for value in range(3)) and entries[255][3] == 0
    text = gdalinfo_text(dominant)
    assert "CATEGORY_0=birds: birds chirping in a park (" in text
    assert "CATEGORY_2=harbour: harbour.wav + with seagulls (" in text
    assert "ColorInterp=Alpha" not in text
    row, col = (int(value) for value in np.argwhere(store.valid)[5])
    x, y = store.plan.grid.transform @ (col + 0.5, row + 0.5)
    # Every query has the same logit scale here: the best cosine wins.
    assert location_value(dominant, x, y) == np.argmax(store.score[:, row, col])


@needs_debian_qgis
def test_qgis_3_22_shows_percentile_classes_and_dominant_queries_with_their_styles(
    answers: tuple[list[Path], Path],
) -> None:
    percentiles, dominant = answers
    classed, paletted = qgis_styles(str(percentiles[0]), str(dominant), shade=(10.0, 92.0, 99.5))
    assert classed["style_loaded"] and classed["renderer"] == "singlebandpseudocolor"
    labels = [label for label, _ in classed["legend"]]
    assert "top 10 % of this region for 'birds chirping in a park'" in labels
    colours = dict(classed["legend"])
    assert classed["shades"] == [
        colours["bottom half of this region for 'birds chirping in a park'"],
        colours["top 10 % of this region for 'birds chirping in a park'"],
        colours["top 1 % of this region for 'birds chirping in a park'"],
    ]
    assert paletted["style_loaded"] and paletted["renderer"] == "paletted"
    assert [label.split(" (")[0] for label, _ in paletted["legend"]] == [
        "birds: birds chirping in a park",
        "rain: rain_on_roof.flac",
        "harbour: harbour.wav + with seagulls",
    ]
    assert (paletted["alpha_band"], paletted["alpha_bands"]) == (-1, []), "the margin band is data, not alpha"

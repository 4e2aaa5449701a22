"""`cog/dominant.tif`: each tile's best-fitting query (softmax across the query set with each query's logit scale,
computed here with numpy from the raw cosines) and the margin over the runner-up, with category names, colours
and a palette style."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.enums import ColorInterp
from rio_cogeo.cogeo import cog_validate
from support.synthetic_store import DEFAULT_QUERIES, SyntheticStore, write_synthetic_store

from pipeline.config import Query
from pipeline.export.cog import write_dominant_cog, write_query_cogs
from pipeline.store.scores import dominant_query

# Distinct scales per query (as text, audio and composed queries have), so that using the wrong one shows.
LOGIT_SCALES = np.log(np.array([1 / 0.07, 1 / 0.2, 1 / 0.03]))


def expected_dominant(store: SyntheticStore) -> tuple[np.ndarray, np.ndarray]:
    """(index, margin in percentage points) of every valid tile, from the raw cosines."""
    logits = np.exp(LOGIT_SCALES)[:, None] * store.score[:, store.valid].astype(np.float64)
    probabilities = np.exp(logits - logits.max(axis=0))
    probabilities /= probabilities.sum(axis=0)
    ordered = np.sort(probabilities, axis=0)
    return probabilities.argmax(axis=0), 100 * (ordered[-1] - ordered[-2])


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStore:
    return write_synthetic_store(tmp_path_factory.mktemp("store") / "soundscape.zarr", logit_scale=LOGIT_SCALES)


@pytest.fixture(scope="module")
def dominant(store: SyntheticStore, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dominant_cog(store.path, tmp_path_factory.mktemp("cog"))


def test_dominant_query_and_margin_match_a_softmax_of_the_raw_cosines(store: SyntheticStore, dominant: Path) -> None:
    assert cog_validate(dominant, quiet=True) == (True, [], [])
    with rasterio.open(dominant) as cog_file:
        assert (cog_file.count, cog_file.dtypes, cog_file.nodata) == (2, ("uint8", "uint8"), 255)
        index, margin = cog_file.read()
        masks = cog_file.read_masks()
    expected_index, expected_margin = expected_dominant(store)
    assert len(np.unique(expected_index)) == len(DEFAULT_QUERIES), "every query wins somewhere"
    np.testing.assert_array_equal(index[store.valid], expected_index)
    np.testing.assert_allclose(margin[store.valid], expected_margin, rtol=0, atol=0.5 + 1e-3)
    assert (index[~store.valid] == 255).all() and (margin[~store.valid] == 255).all()
    assert (masks[:, store.valid] == 255).all() and (masks[:, ~store.valid] == 0).all()


def test_bands_say_what_they_are_and_the_margin_band_is_no_alpha_band(dominant: Path) -> None:
    with rasterio.open(dominant) as cog_file:
        assert cog_file.colorinterp == (ColorInterp.palette, ColorInterp.undefined)
        assert cog_file.descriptions == ("dominant query", "margin over the runner-up query")
        assert cog_file.units == ("query", "percentage points")
        assert cog_file.tags()["UNTRAINED"] == "true"
        assert cog_file.tags(1)["VARIABLE"] == "score_softmax"


def test_category_names_and_colours_are_inside_the_file_and_match_the_qml(
    store: SyntheticStore, dominant: Path
) -> None:
    expected_index, _ = expected_dominant(store)
    with rasterio.open(dominant) as cog_file:
        colormap = cog_file.colormap(1)
        names = cog_file.tags(1)
    assert not dominant.with_suffix(".tif.aux.xml").exists()
    root = ET.parse(dominant.with_suffix(".qml")).getroot()
    renderer = root.find("pipe/rasterrenderer")
    assert renderer is not None and renderer.attrib["type"] == "paletted"
    entries = renderer.findall("colorPalette/paletteEntry")
    assert [int(entry.attrib["value"]) for entry in entries] == list(range(len(DEFAULT_QUERIES)))
    for value, (entry, query) in enumerate(zip(entries, DEFAULT_QUERIES, strict=True)):
        share = 100 * np.mean(expected_index == value)
        assert entry.attrib["label"] == f"{query.id}: {query.label} ({share:.1f}% of tiles)"
        assert names[f"CATEGORY_{value}"] == entry.attrib["label"]
        assert "#{:02x}{:02x}{:02x}".format(*colormap[value][:3]) == entry.attrib["color"]
        assert colormap[value][3] == 255
    assert len({entry.attrib["color"] for entry in entries}) == len(entries)
    assert colormap[255][3] == 0, "nodata is transparent"


def test_overviews_keep_the_categories(dominant: Path) -> None:
    with rasterio.open(dominant, overview_level=0) as overview:
        index, margin = overview.read()
    assert set(np.unique(index)) <= {*range(len(DEFAULT_QUERIES)), 255}
    assert margin[index != 255].max() <= 100


def test_reprojected_dominant_map_shares_the_query_cogs_grid(store: SyntheticStore, tmp_path: Path) -> None:
    dominant = write_dominant_cog(store.path, tmp_path, dst_crs="EPSG:4326")
    (birds, *_) = write_query_cogs(store.path, tmp_path, dst_crs="EPSG:4326")
    assert cog_validate(dominant, quiet=True) == (True, [], [])
    with rasterio.open(dominant) as reprojected, rasterio.open(birds) as scores:
        assert reprojected.crs.to_epsg() == 4326
        assert (reprojected.transform, reprojected.shape) == (scores.transform, scores.shape)
        index = reprojected.read(1)
        assert reprojected.colorinterp[1] == ColorInterp.undefined
        np.testing.assert_array_equal(index == 255, np.isnan(scores.read(1)))


def test_one_query_is_dominant_everywhere_with_full_margin(tmp_path: Path) -> None:
    store = write_synthetic_store(tmp_path / "soundscape.zarr", 8, 6, queries=(Query("birds", "birds"),))
    with rasterio.open(write_dominant_cog(store.path, tmp_path / "cog")) as cog_file:
        index, margin = cog_file.read()
    assert (index[store.valid] == 0).all() and (margin[store.valid] == 100).all()


def test_dominant_query_breaks_ties_by_query_order_and_keeps_nodata() -> None:
    probabilities = np.array([[0.4, 0.2, 0.5, np.nan], [0.4, 0.7, np.nan, 0.5], [0.2, 0.1, 0.5, np.nan]])
    index, margin = dominant_query(iter(probabilities))
    assert index.tolist() == [0, 1, -1, -1]
    assert margin[:2] == pytest.approx([0.0, 0.5], abs=1e-6) and np.isnan(margin[2:]).all()
    alone, certain = dominant_query([np.array([1.0, np.nan])])
    assert alone.tolist() == [0, -1] and certain[0] == 1.0 and math.isnan(certain[1])

"""The percentile COG per query (`cog/<id>_percentile.tif`): the store's percentiles, checked against a numpy
mean-rank computation, nodata where the raw score is, and a QGIS style of classes in plain words."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rio_cogeo.cogeo import cog_validate
from support.synthetic_store import DEFAULT_QUERIES, SyntheticStore, write_synthetic_store

from pipeline.config import Query, load_build_config
from pipeline.errors import BuildConfigError, ExportError
from pipeline.export.cog import RESERVED_NAMES, write_query_cogs

CLASS_BOUNDS = [50.0, 75.0, 90.0, 95.0, 99.0, 100.0]
VIRIDIS_ENDS = ("#440154", "#fde725")


def mean_rank_percentile(values: np.ndarray, population: np.ndarray) -> np.ndarray:
    """100 x (tiles below + half the tiles equal) / tiles, by brute-force comparison."""
    below = (population[None, :] < values[:, None]).sum(axis=1)
    equal = (population[None, :] == values[:, None]).sum(axis=1)
    return 100.0 * (below + equal / 2.0) / len(population)


@pytest.fixture(scope="module")
def tied_store(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStore:
    """Scores rounded to 0.05, so that many tiles share a score."""
    plain = write_synthetic_store(tmp_path_factory.mktemp("plain") / "soundscape.zarr")
    tied = np.round(np.nan_to_num(plain.score) * 20) / 20
    return write_synthetic_store(tmp_path_factory.mktemp("tied") / "soundscape.zarr", score=tied)


@pytest.fixture(scope="module")
def percentile_cogs(tied_store: SyntheticStore, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_query_cogs(tied_store.path, tmp_path_factory.mktemp("cog"), variable="score_percentile")


def test_one_valid_percentile_cog_per_query_beside_the_raw_ones(percentile_cogs: list[Path]) -> None:
    assert [path.name for path in percentile_cogs] == [f"{query.id}_percentile.tif" for query in DEFAULT_QUERIES]
    for path in percentile_cogs:
        assert cog_validate(path, quiet=True) == (True, [], [])
        assert path.with_suffix(".qml").is_file()


def test_percentiles_are_the_mean_rank_among_the_regions_valid_tiles(
    tied_store: SyntheticStore, percentile_cogs: list[Path]
) -> None:
    for index, path in enumerate(percentile_cogs):
        scores = tied_store.score[index]
        valid_scores = scores[tied_store.valid]
        assert len(np.unique(valid_scores)) < len(valid_scores) / 5, "the fixture has many ties"
        with rasterio.open(path) as cog_file:
            values = cog_file.read(1)
            assert math.isnan(cog_file.nodata)
            assert cog_file.units == ("%",)
            assert cog_file.descriptions == (DEFAULT_QUERIES[index].label,)
            assert cog_file.tags()["VARIABLE"] == "score_percentile"
        np.testing.assert_array_equal(np.isnan(values), np.isnan(scores), "nodata exactly where the raw score is")
        expected = mean_rank_percentile(valid_scores, valid_scores)
        np.testing.assert_allclose(values[tied_store.valid], expected, rtol=0, atol=1e-4)
        best = valid_scores == valid_scores.max()
        assert values[tied_store.valid][best] == pytest.approx(100 * (1 - best.sum() / 2 / len(valid_scores)))


def test_qml_shows_percentile_classes_in_plain_words(percentile_cogs: list[Path]) -> None:
    root = ET.parse(percentile_cogs[0].with_suffix(".qml")).getroot()
    renderer = root.find("pipe/rasterrenderer")
    assert renderer is not None
    assert renderer.attrib["type"] == "singlebandpseudocolor"
    assert root.findtext("pipe/rasterrenderer/minMaxOrigin/limits") == "None", "classes are not stretched to data"
    shader = renderer.find("rastershader/colorrampshader")
    assert shader is not None and shader.attrib["colorRampType"] == "DISCRETE"
    items = shader.findall("item")
    assert [float(item.attrib["value"]) for item in items] == CLASS_BOUNDS
    labels = [item.attrib["label"] for item in items]
    assert labels[3] == "top 10 % of this region for 'birds chirping in a park'"
    assert labels[5] == "top 1 % of this region for 'birds chirping in a park'"
    assert labels[0] == "bottom half of this region for 'birds chirping in a park'"
    colours = [item.attrib["color"] for item in items]
    assert (colours[0], colours[-1]) == VIRIDIS_ENDS and len(set(colours)) == len(colours)


def test_a_softmax_cog_is_named_after_its_variable(tied_store: SyntheticStore, tmp_path: Path) -> None:
    paths = write_query_cogs(tied_store.path, tmp_path, variable="score_softmax")
    assert [path.name for path in paths] == [f"{query.id}_softmax.tif" for query in DEFAULT_QUERIES]
    with rasterio.open(paths[0]) as cog_file:
        assert cog_file.units == ("probability",)


@pytest.mark.parametrize("query_id", [*RESERVED_NAMES, "birds_percentile"])
def test_query_ids_that_would_overwrite_the_builds_own_maps_are_refused_by_config_and_export(
    query_id: str, tmp_path: Path
) -> None:
    config = {"name": "test", "region": "1,1,1.1,1.1", "queries": [{"id": query_id, "text": "birds"}]}
    with pytest.raises(BuildConfigError, match=f"'{query_id}' would name one of the build's own maps"):
        load_build_config(config)
    store = write_synthetic_store(tmp_path / "soundscape.zarr", 6, 4, queries=(Query(query_id, "birds"),))
    with pytest.raises(ExportError, match=f"query id '{query_id}' cannot name a file"):
        write_query_cogs(store.path, tmp_path / "cog", variable="score_percentile")

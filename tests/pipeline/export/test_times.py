"""A build of several times (model.month x model.hour): the store's `month`/`hour` dimensions read with xarray, one
named band per time in the query and percentile COGs read with rasterio, and the one-map exports (dominant,
concepts, top places, the tile index) of the first time."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
from rio_cogeo.cogeo import cog_validate
from support.synthetic_store import DEFAULT_QUERIES, SyntheticStore, write_synthetic_store

from pipeline.config import Times
from pipeline.export.cog import write_concept_cog, write_dominant_cog, write_query_cogs
from pipeline.export.places import best_tiles
from pipeline.store.layout import gdal_path
from pipeline.store.read import SoundscapeStore
from pipeline.store.scores import dominant_query

TIMES = Times((6, 12), (8, 20))
LABELS = ["month 6, hour 8", "month 6, hour 20", "month 12, hour 8", "month 12, hour 20"]


def mean_rank_percentile(values: np.ndarray, population: np.ndarray) -> np.ndarray:
    below = (population[None, :] < values[:, None]).sum(axis=1)
    equal = (population[None, :] == values[:, None]).sum(axis=1)
    return 100.0 * (below + equal / 2.0) / len(population)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStore:
    return write_synthetic_store(tmp_path_factory.mktemp("store") / "soundscape.zarr", 24, 16, chunk=8, times=TIMES)


@pytest.fixture(scope="module")
def cog_dir(store: SyntheticStore, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cog")
    write_query_cogs(store.path, folder)
    write_query_cogs(store.path, folder, variable="score_percentile")
    write_dominant_cog(store.path, folder)
    write_concept_cog(store.path, folder)
    return folder


def test_the_store_has_month_and_hour_dimensions_before_the_grid(store: SyntheticStore) -> None:
    opened = xr.open_zarr(store.path)
    for name in ("score", "score_percentile", "score_softmax"):
        assert opened[name].dims == ("month", "hour", "query", "y", "x"), name
    assert opened["embedding"].dims == ("month", "hour", "dim", "y", "x")
    assert opened["concept_index"].dims == ("month", "hour", "rank", "y", "x")
    assert opened["valid"].dims == ("y", "x")
    assert opened["month"].values.tolist() == [6, 12] and opened["hour"].values.tolist() == [8, 20]
    assert opened["score"].encoding["chunks"] == (1, 1, 1, 8, 8), "one time and query per chunk"
    by_time = opened["score"].values.reshape(len(LABELS), len(DEFAULT_QUERIES), store.height, store.width)
    np.testing.assert_array_equal(by_time, store.score_by_time)
    embedding = opened["embedding"].sel(month=12, hour=8).values
    np.testing.assert_array_equal(embedding, np.moveaxis(store.embedding_by_time[2], -1, 0))


def test_gdal_reads_one_time_and_query_of_the_store_as_a_georeferenced_layer(store: SyntheticStore) -> None:
    # month 12 (index 1), hour 8 (index 0), query 2: the third time.
    with rasterio.open(gdal_path(store.path, "score", 1, 0, 2)) as layer:
        assert layer.crs.to_epsg() == 3857 and layer.transform.almost_equals(store.plan.grid.transform, 1e-6)
        np.testing.assert_array_equal(layer.read(1), store.score_by_time[2, 2])


def test_percentiles_are_within_the_region_per_time_and_softmax_per_time(store: SyntheticStore) -> None:
    opened = xr.open_zarr(store.path)
    percentile = opened["score_percentile"].values.reshape(len(LABELS), len(DEFAULT_QUERIES), -1)
    softmax = opened["score_softmax"].values.reshape(len(LABELS), len(DEFAULT_QUERIES), -1)
    valid = store.valid.ravel()
    for time in range(len(LABELS)):
        for query in range(len(DEFAULT_QUERIES)):
            scores = store.score_by_time[time, query].ravel()[valid]
            expected = mean_rank_percentile(scores, scores)
            np.testing.assert_allclose(percentile[time, query][valid], expected, atol=1e-4)
        np.testing.assert_allclose(softmax[time][:, valid].sum(axis=0), 1.0, atol=1e-5)
    assert not np.allclose(softmax[0][:, valid], softmax[3][:, valid], atol=1e-3), "each time has its own softmax"


def test_reader_lists_the_times_and_reads_each(store: SyntheticStore) -> None:
    soundscape = SoundscapeStore(store.path)
    assert [time.label for time in soundscape.times.all] == LABELS
    every = slice(None)
    for time in range(len(LABELS)):
        np.testing.assert_array_equal(soundscape.scores("score", 1, every, every, time), store.score_by_time[time, 1])


def test_query_cogs_have_one_named_band_per_time(store: SyntheticStore, cog_dir: Path) -> None:
    for index, query in enumerate(DEFAULT_QUERIES):
        for suffix, variable in (("", "score"), ("_percentile", "score_percentile")):
            path = cog_dir / f"{query.id}{suffix}.tif"
            assert cog_validate(path, quiet=True) == (True, [], [])
            with rasterio.open(path) as cog_file:
                assert cog_file.count == len(LABELS)
                assert list(cog_file.descriptions) == LABELS
                assert [cog_file.tags(band)["MONTH"] for band in (1, 2, 3, 4)] == ["6", "6", "12", "12"]
                assert [cog_file.tags(band)["HOUR"] for band in (1, 2, 3, 4)] == ["8", "20", "8", "20"]
                assert cog_file.tags()["QUERY"] == query.label
                values = cog_file.read()
            if variable == "score":
                np.testing.assert_array_equal(values, store.score_by_time[:, index])
            else:
                for time in range(len(LABELS)):
                    scores = store.score_by_time[time, index][store.valid]
                    expected = mean_rank_percentile(scores, scores)
                    np.testing.assert_allclose(values[time][store.valid], expected, atol=1e-4)


def test_dominant_concepts_and_places_are_of_the_first_time(store: SyntheticStore, cog_dir: Path) -> None:
    soundscape = SoundscapeStore(store.path)
    every = slice(None)
    with rasterio.open(cog_dir / "dominant.tif") as cog_file:
        assert cog_file.tags()["TIME"] == LABELS[0]
        index = cog_file.read(1)
    first = dominant_query(soundscape.scores("score_softmax", query, every, every, 0) for query in range(3))[0]
    later = dominant_query(soundscape.scores("score_softmax", query, every, every, 1) for query in range(3))[0]
    np.testing.assert_array_equal(index[store.valid], first[store.valid])
    assert (first[store.valid] != later[store.valid]).any(), "the fixture's times disagree somewhere"
    with rasterio.open(cog_dir / "concepts.tif") as cog_file:
        assert cog_file.tags()["TIME"] == LABELS[0]
    best = best_tiles(soundscape, 3)[0]
    expected = np.sort(store.score_by_time[0, 0][store.valid])[::-1][:3]
    np.testing.assert_allclose(best.score, expected, rtol=1e-6)
    assert not math.isclose(float(best.score[0]), float(np.nanmax(store.score_by_time[3, 0])))

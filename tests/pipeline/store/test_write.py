"""The store writer: layout, the one invalid-tile mask, every score kind, queries and provenance, atomic replace."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
from support.synthetic_store import DEFAULT_QUERIES, SyntheticStore, write_synthetic_store

from pipeline.build import finish_lines, retry_unavailable
from pipeline.config import Query
from pipeline.store.layout import GRIDDED_VARIABLES, gdal_path
from pipeline.store.read import SoundscapeStore
from pipeline.store.scores import percentile_within

EXTRA_DIMS = {
    "score": "query",
    "score_percentile": "query",
    "score_softmax": "query",
    "embedding": "dim",
    "concept_index": "rank",
    "concept_weight": "rank",
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStore:
    return write_synthetic_store(tmp_path_factory.mktemp("store") / "soundscape.zarr", dim=5, chunk=16)


@pytest.fixture(scope="module")
def opened(store: SyntheticStore) -> xr.Dataset:
    """The store as anyone opens it: plain xr.open_zarr, no options."""
    return xr.open_zarr(store.path).load()


def test_every_gridded_variable_ends_in_y_x_with_its_extra_dimension_first(opened: xr.Dataset) -> None:
    for name in GRIDDED_VARIABLES:
        extra = EXTRA_DIMS.get(name)
        assert opened[name].dims == ((extra,) if extra else ()) + ("y", "x")
    assert opened["embedding"].dtype == np.float16
    assert opened["concept_index"].dtype == np.int32
    assert opened["valid"].dtype == bool
    assert opened["score"].encoding["chunks"] == (1, 16, 16), "one query per chunk: a GIS reads one at a time"
    assert opened["embedding"].encoding["chunks"] == (5, 16, 16)


def test_plain_open_zarr_gives_every_variable_its_crs_and_transform(store: SyntheticStore, opened: xr.Dataset) -> None:
    assert opened.rio.crs.to_epsg() == 3857
    for name in GRIDDED_VARIABLES:
        variable = opened[name]
        assert variable.rio.crs is not None and variable.rio.crs.to_epsg() == 3857, name
        assert variable.rio.transform().almost_equals(store.plan.grid.transform, precision=1e-6), name
        assert variable.attrs["_CRS"]["url"].endswith("/EPSG/0/3857")


def test_gdal_from_3_9_reads_extra_dimensions_as_bands(store: SyntheticStore) -> None:
    # rasterio's wheel bundles a recent GDAL (>= 3.9): a 3-D array is one band per query, CRS from the grid mapping.
    with rasterio.open(gdal_path(store.path, "score")) as layer:
        assert tuple(int(part) for part in rasterio.__gdal_version__.split(".")[:2]) >= (3, 9)
        assert layer.count == len(DEFAULT_QUERIES)
        assert layer.crs.to_epsg() == 3857
        assert layer.transform.almost_equals(store.plan.grid.transform, precision=1e-6)
        np.testing.assert_array_equal(layer.read(2), store.score[1])


def test_store_holds_the_files_values_and_nodata_wherever_a_tile_is_not_valid(
    store: SyntheticStore, opened: xr.Dataset
) -> None:
    invalid_in_chunk = store.in_chunk & ~store.valid
    assert invalid_in_chunk.any() and (~store.in_chunk).any(), "the fixture has both kinds of nodata tile"
    np.testing.assert_array_equal(opened["valid"].values, store.valid)
    np.testing.assert_array_equal(opened["score"].values, store.score)
    np.testing.assert_array_equal(opened["embedding"].values, np.moveaxis(store.embedding, -1, 0))
    np.testing.assert_array_equal(opened["concept_index"].values, np.moveaxis(store.concept_index, -1, 0))
    np.testing.assert_array_equal(opened["concept_weight"].values, np.moveaxis(store.concept_weight, -1, 0))
    for name in GRIDDED_VARIABLES:
        values = opened[name].values
        if name == "valid":
            continue
        nodata = values[..., ~store.valid]
        assert (nodata == -1).all() if name == "concept_index" else np.isnan(nodata).all(), name
        if name != "concept_index":
            assert np.isfinite(values[..., store.valid]).all(), name


def test_percentile_and_softmax_come_from_the_valid_cosines(store: SyntheticStore, opened: xr.Dataset) -> None:
    for query in range(len(DEFAULT_QUERIES)):
        valid_scores = np.sort(store.score[query][store.valid])
        expected = percentile_within(store.score[query], valid_scores)
        np.testing.assert_allclose(opened["score_percentile"].values[query], expected, rtol=1e-6)
        row, col = np.argwhere(store.valid)[len(valid_scores) // 2]
        below = (valid_scores < store.score[query, row, col]).sum()
        equal = (valid_scores == store.score[query, row, col]).sum()
        assert expected[row, col] == pytest.approx(100 * (below + equal / 2) / len(valid_scores), rel=1e-5)
    logits = np.exp(store.logit_scale)[:, None] * store.score[:, store.valid].astype(np.float64)
    weights = np.exp(logits - logits.max(axis=0))
    np.testing.assert_allclose(opened["score_softmax"].values[:, store.valid], weights / weights.sum(axis=0), rtol=1e-5)
    assert np.isnan(opened["score_softmax"].values[:, ~store.valid]).all()


def test_each_querys_facts_are_stored_once_and_read_back_as_queries(store: SyntheticStore, opened: xr.Dataset) -> None:
    assert "queries" not in opened.attrs and "query_label" not in opened.variables
    assert opened["query_kind"].values.tolist() == ["text", "audio", "composed"]
    assert opened["query_text"].values.tolist() == ["birds chirping in a park", "", "with seagulls"]
    assert opened["query_audio"].values.tolist() == ["", "queries/rain_on_roof.flac", "queries/harbour.wav"]
    queries = SoundscapeStore(store.path).queries
    assert queries == DEFAULT_QUERIES
    assert all(isinstance(query, Query) for query in queries)


def test_provenance_attributes(opened: xr.Dataset) -> None:
    attrs = opened.attrs
    assert attrs["title"] == "Sat2Sound soundscape map of synthetic ellipse"
    assert attrs["untrained"] is True
    assert (attrs["checkpoint"], attrs["checkpoint_sha256"]) == ("synthetic-test-checkpoint.safetensors", "0" * 64)
    assert (attrs["sat_type"], attrs["zoom_level"], attrs["tile_zoom"]) == ("sentinel", 1, 14)
    assert attrs["imagery_attribution"] == "Synthetic test imagery"
    assert attrs["software_version"].startswith("sat2sound-maps ")
    assert "coordinates" not in attrs, "xarray turns the global `coordinates` attribute into coordinates"
    assert "spatial_ref" in opened.coords


def test_a_failed_store_write_keeps_the_previous_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "soundscape.zarr"
    write_synthetic_store(target, 8, 6)
    before = sorted(path.relative_to(target) for path in target.rglob("*"))

    def killed(*args: object, **kwargs: object) -> None:
        raise RuntimeError("killed")

    monkeypatch.setattr(xr.Dataset, "to_zarr", killed)
    with pytest.raises(RuntimeError, match="killed"):
        write_synthetic_store(tmp_path / "soundscape.zarr", 8, 6, seed=1)
    assert sorted(path.relative_to(target) for path in target.rglob("*")) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["soundscape.zarr", "soundscape.zarr.inputs"]


def test_tiles_left_empty_for_unavailable_imagery_are_counted_in_the_attributes(tmp_path: Path) -> None:
    store = write_synthetic_store(tmp_path / "soundscape.zarr", dim=5, chunk=16, unavailable=True)
    attrs = xr.open_zarr(store.path).attrs
    with xr.open_zarr(store.path) as opened:
        in_store_invalid = int((~opened.valid.values).sum())
    empty = attrs["empty_tiles_unavailable_imagery"]
    assert 0 < empty <= in_store_invalid
    assert attrs["unavailable_source_tiles"] == 2  # distinct over the chunks
    assert attrs["empty_tiles_reason"] == (
        f"{empty} tiles left empty: imagery unavailable (2 source tiles failed or corrupt); rerun to retry"
    )
    assert finish_lines("build", store.path)[-1] == f"warning: {attrs['empty_tiles_reason']}"


def test_a_store_without_missing_imagery_says_so(opened: xr.Dataset, store: SyntheticStore) -> None:
    assert opened.attrs["empty_tiles_unavailable_imagery"] == 0
    assert opened.attrs["empty_tiles_reason"] == ""
    assert finish_lines("build", store.path) == [
        f"done: build/preview.html, build/project.qgz (QGIS), build/cog/*.tif (+ .qml), build/top_places.gpkg"
        f" (+ .csv), {store.path}"
    ]


def test_a_rerun_retries_the_jobs_whose_chunks_lacked_imagery(tmp_path: Path) -> None:
    (tmp_path / "embedded").mkdir()
    (tmp_path / "imagery").mkdir()
    for job in range(3):
        (tmp_path / "imagery" / f"{job}.json").write_text("{}")
    lacking = {"chunk": "b", "tiles": 4, "valid": 2, "reused": False, "empty_unavailable": 2}
    complete = {"chunk": "c", "tiles": 4, "valid": 4, "reused": False, "empty_unavailable": 0}
    (tmp_path / "embedded" / "0.json").write_text(json.dumps({"chunks": [complete, lacking]}))
    (tmp_path / "embedded" / "1.json").write_text(json.dumps({"chunks": [complete]}))
    (tmp_path / "soundscape.zarr").mkdir()
    (tmp_path / "soundscape.zarr" / ".zmetadata").write_text("{}")
    assert retry_unavailable(tmp_path, 3) == 1
    assert sorted(path.name for path in (tmp_path / "embedded").iterdir()) == ["1.json"]
    assert sorted(path.name for path in (tmp_path / "imagery").iterdir()) == ["1.json", "2.json"]
    assert not (tmp_path / "soundscape.zarr" / ".zmetadata").exists()
    assert retry_unavailable(tmp_path, 3) == 0

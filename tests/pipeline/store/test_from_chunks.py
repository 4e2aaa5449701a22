"""The store assembled from hand-made chunk files: every tile where the grid puts it, and every score kind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr

from pipeline.config import TilingSettings
from pipeline.plan import ImageryFit, ModelView, make_plan
from pipeline.queries import QueryEmbeddings, write_queries
from pipeline.regions import parse_region
from pipeline.store.scores import percentile_within, score_chunk, softmax_over_queries
from pipeline.store.write import ChunkFiles, soundscape_dataset, write_soundscape

FIT = ImageryFit("test", "test-source", "test attribution", 1.0, False)


def mean_rank_percentile(values: np.ndarray, score: float) -> float:
    """By definition: the share of values below `score` plus half of those equal to it, in percent."""
    below = sum(float(value) < score for value in values)
    equal = sum(float(value) == score for value in values)
    return 100.0 * (below + 0.5 * equal) / len(values)


def softmax(logits: np.ndarray) -> np.ndarray:
    weights = np.exp(logits - logits.max())
    return weights / weights.sum()


def test_percentile_is_the_mean_rank_among_the_regions_valid_scores() -> None:
    rng = np.random.default_rng(0)
    region = np.round(rng.normal(size=200), 1)  # rounding makes ties
    probe = np.array([region[3], -5.0, 5.0, np.nan, 0.05])
    got = percentile_within(probe, np.sort(region))
    expected = [mean_rank_percentile(region, float(value)) for value in probe[:3]]
    np.testing.assert_allclose(got[:3], expected, rtol=1e-5)
    assert np.isnan(got[3]) and 0 < got[4] < 100
    assert np.isnan(percentile_within(probe, np.empty(0))).all()


def test_softmax_runs_across_queries_with_each_kinds_logit_scale() -> None:
    scores = np.array([[0.2, np.nan], [0.5, np.nan], [-0.1, np.nan]], np.float32)
    scale = np.log(np.array([100.0, 50.0, 20.0], np.float32))
    got = softmax_over_queries(scores, scale)
    np.testing.assert_allclose(got[:, 0], softmax(np.exp(scale) * scores[:, 0]), rtol=1e-5)
    assert np.isnan(got[:, 1]).all()


def _synthetic_build(tmp_path: Path) -> tuple[Any, dict[tuple[int, int], dict[str, Any]], QueryEmbeddings]:
    """A plan over two chunks and hand-made chunk, query and score files; returns what each tile holds."""
    region = parse_region("-72.2245,18.5035,-72.2015,18.5245")
    plan, chunks = make_plan(region, ModelView.of("bingmap", 5), TilingSettings(2, 13, 10_000), FIT, limit_hint="")
    rng = np.random.default_rng(1)
    dim, top_k = 6, 2
    query_embedding = rng.normal(size=(3, dim)).astype(np.float32)
    query_embedding /= np.linalg.norm(query_embedding, axis=1, keepdims=True)
    queries = QueryEmbeddings(
        ["a", "b", "c"],
        ["text"] * 3,
        ["a", "b", "c"],
        ["a", "b", "c"],
        [""] * 3,
        query_embedding,
        np.log(np.array([10.0, 20.0, 30.0], np.float32)),
    )
    write_queries(tmp_path / "queries.npz", queries)
    (tmp_path / "chunks").mkdir()
    expected: dict[tuple[int, int], dict[str, Any]] = {}
    for chunk in chunks:
        x, y, row, col = chunk.x, chunk.y, chunk.row, chunk.col
        count = len(chunk)
        valid = rng.random(count) > 0.3
        embedding = rng.normal(size=(count, dim)).astype(np.float32)
        embedding /= np.linalg.norm(embedding, axis=1, keepdims=True)
        embedding[~valid] = 0
        concept_index = np.where(valid[:, None], rng.integers(0, 50, (count, top_k)), -1).astype(np.int32)
        concept_weight = np.where(valid[:, None], rng.random((count, top_k)), 0).astype(np.float32)
        arrays = {
            "x": x,
            "y": y,
            "row": row,
            "col": col,
            "coverage": valid.astype(np.float32),
            "valid": valid,
            "embedding": embedding.astype(np.float16),
            "concept_index": concept_index,
            "concept_weight": concept_weight,
        }
        np.savez(tmp_path / "chunks" / f"{chunk.id}.npz", **arrays)
        score_chunk(
            tmp_path / "chunks" / f"{chunk.id}.npz",
            tmp_path / "queries.npz",
            tmp_path / "scores" / f"{chunk.id}.npz",
        )
        for index in range(count):
            expected[int(row[index]), int(col[index])] = {name: value[index] for name, value in arrays.items()}
    return plan, expected, queries


def test_store_blocks_hold_every_tile_where_the_grid_puts_it(tmp_path: Path) -> None:
    plan, expected, queries = _synthetic_build(tmp_path)
    assert len(plan.chunk_ids) >= 2
    files = ChunkFiles(plan, tmp_path / "chunks", tmp_path / "scores", block_px=3)
    dataset = soundscape_dataset(plan, files, queries, top_k=2, dim=6)
    write_soundscape(dataset, {"untrained": True}, tmp_path / "store.zarr")
    store = xr.open_zarr(tmp_path / "store.zarr", decode_coords="all").load()
    valid_scores = store.score.values[0][store.valid.values]
    for row in range(plan.grid.height):
        for col in range(plan.grid.width):
            tile = expected.get((row, col))
            cell = store.isel(y=row, x=col)
            if tile is None or not tile["valid"]:
                assert not bool(cell.valid) and np.isnan(cell.score.values).all()
                assert np.isnan(cell.embedding.values).all()
                assert (cell.concept_index.values == -1).all()
                continue
            assert bool(cell.valid)
            np.testing.assert_array_equal(cell.embedding.values, tile["embedding"])
            np.testing.assert_array_equal(cell.concept_index.values, tile["concept_index"])
            cosines = queries.embedding @ tile["embedding"].astype(np.float32)
            np.testing.assert_allclose(cell.score.values, cosines, atol=1e-6)
            np.testing.assert_allclose(
                cell.score_softmax.values, softmax(np.exp(queries.logit_scale) * cosines), rtol=1e-5
            )
            assert float(cell.score_percentile.values[0]) == pytest.approx(
                mean_rank_percentile(valid_scores, float(cell.score.values[0])), abs=1e-3
            )
    assert store.rio.crs.to_epsg() == 3857
    assert store.score.rio.transform().c == pytest.approx(plan.grid.bounds.left)
    assert store.attrs["untrained"] is True

"""Every kind of tile score against the queries, in one place: raw cosine plus two normalisations a map reader can
interpret.

- score: cosine similarity of the tile and query embeddings, -1..1. Comparable across tiles, not across
  models; untrained or not, its absolute level means little on its own.
- score_percentile: where the tile's score falls among the region's valid tiles for that query, 0..100
  (50 = the region's median tile). Ties count half (the "mean" rank of scipy's percentileofscore).
- score_softmax: per tile, a distribution over the query set, softmax_q(exp(s_q) * cosine_q), where s_q
  is the model's logit scale for the query's kind (see pipeline.queries): "which of these queries fits
  this tile best". It depends on which queries are in the set.

The score step writes each chunk's raw cosines (scores/<chunk>.npz: `ids`, `score` (T, Q, N) per time of the
build, every tile, valid or not); the store writer turns them into all three kinds with `RegionScores` and masks
the invalid tiles. Each time is normalised on its own: percentiles among that time's scores, softmax over that
time's queries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

from common.atomic import atomic_save_npz
from pipeline.queries import read_queries

# A chunk's (T, N, dim) tile embeddings and (N,) valid mask -> its gallery matches by store variable, (T, k, N) each.
TileMatcher = Callable[[np.ndarray, np.ndarray], Mapping[str, np.ndarray]]


class ScoreKind(NamedTuple):
    """One score variable: its CF `long_name` and `units` in the store, its unit and meaning on a GeoTIFF band."""

    name: str
    long_name: str
    units: str
    band_unit: str
    meaning: str


SCORE_KINDS: dict[str, ScoreKind] = {
    kind.name: kind
    for kind in (
        ScoreKind(
            "score",
            "cosine similarity of tile and query embeddings",
            "1",
            "cosine",
            "cosine similarity of the tile's and the query's embeddings (-1 to 1)",
        ),
        ScoreKind(
            "score_percentile",
            "percentile of the tile's score among the region's valid tiles for the query",
            "percent",
            "%",
            "percentile of the tile's score among the region's valid tiles (0 to 100)",
        ),
        ScoreKind(
            "score_softmax",
            "softmax across the query set of exp(logit_scale) x cosine, with the query kind's scale",
            "1",
            "probability",
            "probability of this query among the query set (softmax of logit-scaled cosine, 0 to 1)",
        ),
    )
}


def cosine_scores(embedding: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """(Q, N) float32 cosines of unit tile embeddings (N, D) with unit queries (Q, D)."""
    return queries.astype(np.float32) @ embedding.astype(np.float32).T


def percentile_within(scores: np.ndarray, sorted_valid: np.ndarray) -> np.ndarray:
    """Percentile (0..100) of each score among `sorted_valid` (ascending, finite); NaN stays NaN."""
    if len(sorted_valid) == 0:
        return np.full(np.shape(scores), np.nan, np.float32)
    below = np.searchsorted(sorted_valid, scores, side="left")
    not_above = np.searchsorted(sorted_valid, scores, side="right")
    percentile = 100.0 * (below + not_above) / (2.0 * len(sorted_valid))
    return np.where(np.isnan(scores), np.nan, percentile).astype(np.float32)


def softmax_over_queries(scores: np.ndarray, logit_scale: np.ndarray) -> np.ndarray:
    """(Q, N) softmax over axis 0 of exp(logit_scale) * scores; columns holding NaN stay NaN."""
    logits = np.exp(logit_scale.astype(np.float64))[:, None] * scores
    logits = logits - logits.max(axis=0, keepdims=True)
    weights = np.exp(logits)
    return (weights / weights.sum(axis=0, keepdims=True)).astype(np.float32)


def dominant_query(layers: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """From each query's `score_softmax` values in turn (query order, same shape), each tile's most probable query
    (its index; ties go to the earlier query) and its margin: its probability minus the runner-up's (1 with a
    single query). -1 / NaN where any query's value is NaN. One layer is read at a time, so memory does not grow
    with the number of queries."""
    layer_iter = iter(layers)
    first = np.asarray(next(layer_iter), np.float32)
    second = np.zeros_like(first)
    best = np.zeros(first.shape, np.int32)
    missing = np.isnan(first)
    for index, layer in enumerate(layer_iter, start=1):
        better = layer > first
        second = np.where(better, first, np.maximum(second, layer))
        first = np.where(better, layer, first)
        best[better] = index
        missing |= np.isnan(layer)
    best[missing] = -1
    margin = first - second
    margin[missing] = np.nan
    return best, margin


class RegionScores(NamedTuple):
    """What the normalised scores of a region need: each time's and query's valid scores (ascending, time-major)
    and each query's logit scale."""

    sorted_valid: list[np.ndarray]
    logit_scale: np.ndarray

    @classmethod
    def collect(cls, chunks: Iterable[tuple[np.ndarray, np.ndarray]], logit_scale: np.ndarray) -> RegionScores:
        """From each chunk's (T, Q, N) raw cosines and (N,) valid mask, one region-wide pass (4 bytes per tile,
        time and query)."""
        parts: dict[int, list[np.ndarray]] = {}
        for scores, valid in chunks:
            for row_index, row in enumerate(scores.reshape(-1, scores.shape[-1])):
                parts.setdefault(row_index, []).append(row[valid & np.isfinite(row)])
        return cls([np.sort(np.concatenate(parts[index])) for index in sorted(parts)], logit_scale)

    def kind(self, name: str, cosines: np.ndarray) -> np.ndarray:
        """(T, Q, N) float32 scores of kind `name` from one chunk's raw cosines."""
        if name == "score":
            return cosines.astype(np.float32, copy=False)
        if name == "score_percentile":
            rows = cosines.reshape(-1, cosines.shape[-1])
            percentiles = [percentile_within(row, self.sorted_valid[index]) for index, row in enumerate(rows)]
            return np.stack(percentiles).reshape(cosines.shape)
        if name == "score_softmax":
            return np.stack([softmax_over_queries(per_time, self.logit_scale) for per_time in cosines])
        raise KeyError(f"unknown score kind {name!r}; use one of {', '.join(SCORE_KINDS)}")


def score_chunk(chunk: Path, queries_path: Path, out: Path, matches: TileMatcher | None = None) -> None:
    """Write scores/<chunk>.npz: `ids` and `score` (T, Q, N) raw cosines of every tile of the chunk, per time; with
    `matches`, the arrays it gives for the chunk's (T, N, dim) embeddings and (N,) valid mask."""
    queries = read_queries(queries_path)
    with np.load(chunk) as data:
        embedding, valid = data["embedding"], data["valid"].astype(bool)
    scores = np.stack([cosine_scores(per_time, queries.embedding) for per_time in embedding])
    arrays = {"ids": np.array(queries.ids), "score": scores}
    if matches is not None:
        arrays.update(matches(embedding, valid))
    atomic_save_npz(out, arrays)

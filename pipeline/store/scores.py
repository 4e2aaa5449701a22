"""Tile scores against the queries: raw cosine similarity plus two normalisations a map reader can interpret.

- score: cosine similarity of the tile and query embeddings, -1..1. Comparable across tiles, not across
  models; untrained or not, its absolute level means little on its own.
- score_percentile: where the tile's score falls among the region's valid tiles for that query, 0..100
  (50 = the region's median tile). Ties count half (the "mean" rank of scipy's percentileofscore).
- score_softmax: per tile, a distribution over the query set, softmax_q(exp(s_q) * cosine_q), where s_q
  is the model's logit scale for the query's kind (see pipeline.queries): "which of these queries fits
  this tile best". It depends on which queries are in the set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.atomic import atomic_save_npz
from pipeline.queries import read_queries


def cosine_scores(embedding: np.ndarray, valid: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """(Q, N) float32 cosines of unit tile embeddings (N, D) with queries (Q, D); NaN where invalid."""
    scores = queries.astype(np.float32) @ embedding.astype(np.float32).T
    scores[:, ~valid] = np.nan
    return scores


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


def score_chunk(chunk: Path, queries_path: Path, out: Path) -> None:
    """Write scores/<chunk>.npz: `score` (Q, N) raw cosines of the chunk's tiles, NaN where invalid."""
    queries = read_queries(queries_path)
    with np.load(chunk) as data:
        scores = cosine_scores(data["embedding"], data["valid"], queries.embedding)
    atomic_save_npz(out, {"ids": np.array(queries.ids), "score": scores})

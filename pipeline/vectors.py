"""Inner-product search over unit vectors with faiss, shared by the tile index (`pipeline.search`) and the sound
gallery (`pipeline.gallery`).

- Which index: exact (`IndexFlatIP`) while one query scans at most EXACT_MAX_VALUES values (vectors x width);
  beyond, HNSW, whose recall against exact search the tests and benchmarks/bench_query.py measure. Where faiss
  sees GPUs, always the exact index, searched on all of them; an HNSW index made elsewhere is then searched
  exactly through its stored vectors.
- How a search runs: on the GPUs when there are any; else one query on one thread (its scan is bound by memory:
  more OpenMP threads only wait for each other, 3x slower on a busy 2-core machine), a batch of queries on all.
- Files: `write_index` writes atomically, `read_index` reads back; a caller keeps its own record beside them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np

from common.atomic import atomic_path

FLAT, HNSW = "flat", "hnsw"
# A flat query scans vectors x width float32 values: 2**28 (262,144 tiles of width 1,024, 4.2 M of width 64) take
# ~38 ms on one core of a busy 2-core machine, 1 M tiles of width 1,024 ~170 ms (benchmarks/bench_query.py). Every
# build within the default tiling.max_tiles (250,000) is searched exactly, even with the full model.
EXACT_MAX_VALUES = 2**28
# HNSW: neighbours per node, and the candidate lists when building and searching (searching: at least k).
HNSW_NEIGHBOURS = 32
HNSW_EF_CONSTRUCTION = 64
HNSW_EF_SEARCH = 512


def index_kind(count: int, dim: int) -> str:
    """Exact while a query's scan is fast (or GPUs do it), HNSW beyond."""
    return FLAT if faiss.get_num_gpus() > 0 or count * dim <= EXACT_MAX_VALUES else HNSW


def new_index(kind: str, dim: int) -> Any:
    """An empty inner-product index of `kind` for vectors of width `dim`."""
    if kind == FLAT:
        return faiss.IndexFlatIP(dim)
    index = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    return index


def index_of(vectors: np.ndarray) -> Any:
    """An index of the kind `index_kind` picks, holding `vectors` (count, dim)."""
    index = new_index(index_kind(*vectors.shape), vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def kind_of(index: Any) -> str:
    return HNSW if isinstance(index, faiss.IndexHNSW) else FLAT


def stored_vectors(index: Any) -> np.ndarray:
    """(count, dim) float32 view of the vectors the index holds (no copy; valid while the index lives)."""
    flat: Any = faiss.downcast_index(index.storage) if isinstance(index, faiss.IndexHNSW) else index
    return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)


class VectorSearch:
    """A loaded index, searched where it is fastest (see the module docstring)."""

    def __init__(self, index: Any) -> None:
        self.index = index
        self.kind = kind_of(index)
        self.vectors = stored_vectors(index)
        self._exact_on_gpus = _on_gpus(faiss.downcast_index(index.storage) if self.kind == HNSW else index)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, k) inner products and ids of the (at most) k best vectors of each query (n, dim), best first; id -1
        (score -inf or 0) where fewer than k vectors were found."""
        batch = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.index.d)
        if self._exact_on_gpus is not None:
            scores, found = self._exact_on_gpus.search(batch, k)
            return scores, found
        if self.kind == HNSW:
            self.index.hnsw.efSearch = max(HNSW_EF_SEARCH, k)
        if len(batch) > 1:
            scores, found = self.index.search(batch, k)
            return scores, found
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            scores, found = self.index.search(batch, k)
            return scores, found
        finally:
            faiss.omp_set_num_threads(threads)


def _on_gpus(flat: Any) -> Any | None:
    """A copy of the flat index on every GPU faiss sees, or None without GPUs (or with faiss-cpu)."""
    return faiss.index_cpu_to_all_gpus(flat) if faiss.get_num_gpus() > 0 else None


def write_index(path: Path, index: Any) -> None:
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def read_index(path: Path) -> Any:
    """The index in `path`; OSError or RuntimeError where it is missing or not a faiss index."""
    return faiss.read_index(str(path))

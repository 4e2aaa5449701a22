"""A faiss index of a build's tile embeddings, made once and kept in the build folder, so that a new query finds
its best tiles without a rebuild (`python -m pipeline query`).

- What it holds: every valid tile's embedding from `soundscape.zarr`, as float32 (the store's float16 values
  exactly), read one store chunk at a time: the index is the only thing as large as the region. `positions`
  says where each vector's tile is (row * width + col). A store of several times is indexed at its first time.
- Which index: exact inner product (`IndexFlatIP`) while a query scans at most EXACT_MAX_VALUES values (tiles x
  width); beyond, HNSW, whose recall against exact search the tests and benchmarks/bench_query.py measure. Where
  faiss sees GPUs, always the exact index, searched on all of them (a GPU scans millions of tiles in
  milliseconds); an HNSW index made elsewhere is then searched exactly through its stored vectors.
- Where: `<build>/index/tiles.faiss`, `tiles_positions.npy` and `tiles.json` (kind, count, width, the stamp of
  the store's `embedding` and `valid` arrays, faiss version), each written atomically, the record last. An
  index whose record names another stamp (the store was rebuilt) or that cannot be read is made again.
- Scoring every tile (a query's percentiles and map) is one matrix product over the index's own vectors.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import faiss
import numpy as np

from common.atomic import atomic_path, atomic_write_bytes
from pipeline.errors import ExportError, SearchWarning
from pipeline.store.layout import arrays_stamp
from pipeline.store.read import SoundscapeStore

INDEX_DIR = "index"
INDEX_NAME = "tiles.faiss"
POSITIONS_NAME = "tiles_positions.npy"
RECORD_NAME = "tiles.json"
INDEXED_ARRAYS = ("embedding", "valid")
FLAT, HNSW = "flat", "hnsw"
# A flat query scans tiles x width float32 values: 2**28 (262,144 tiles of width 1,024, 4.2 M of width 64) take
# ~38 ms on one core of a busy 2-core machine, 1 M tiles of width 1,024 ~170 ms (benchmarks/bench_query.py). Every
# build within the default tiling.max_tiles (250,000) is searched exactly, even with the full model.
EXACT_MAX_VALUES = 2**28
# HNSW: neighbours per node, and the candidate lists when building and searching (searching: at least k).
HNSW_NEIGHBOURS = 32
HNSW_EF_CONSTRUCTION = 64
HNSW_EF_SEARCH = 512


@dataclass(frozen=True)
class IndexRecord:
    kind: str
    count: int
    dim: int
    store_stamp: str
    faiss_version: str


class TileIndex:
    """A loaded index: `search` for the best tiles of a query, `score_grid` for every tile's score."""

    def __init__(self, index: Any, positions: np.ndarray, shape: tuple[int, int], record: IndexRecord) -> None:
        self.index = index
        self.positions = positions
        self.shape = shape
        self.record = record
        self._vectors = _stored_vectors(index)
        self._exact_on_gpus = _on_gpus(faiss.downcast_index(index.storage) if record.kind == HNSW else index)

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The grid positions (row * width + col) of the (at most) k tiles whose embeddings have the largest inner
        product with `query` (dim,), best first, and those inner products."""
        vector = np.ascontiguousarray(query, dtype=np.float32)[None, :]
        if self._exact_on_gpus is not None:
            scores, found = self._exact_on_gpus.search(vector, k)
        else:
            scores, found = self._search_on_one_thread(vector, k)
        kept = found[0] >= 0
        return self.positions[found[0][kept]], scores[0][kept]

    def _search_on_one_thread(self, vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """One query's scan is bound by memory: more OpenMP threads only wait for each other (3x slower on a busy
        2-core machine, and no faster on an idle one: benchmarks/bench_query.py)."""
        if self.record.kind == HNSW:
            self.index.hnsw.efSearch = max(HNSW_EF_SEARCH, k)
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            return self.index.search(vector, k)
        finally:
            faiss.omp_set_num_threads(threads)

    def score_grid(self, query: np.ndarray) -> np.ndarray:
        """float32 (height, width): every tile's inner product with `query`, NaN where no tile is indexed."""
        grid = np.full(self.shape[0] * self.shape[1], np.nan, np.float32)
        grid[self.positions] = self._vectors @ np.asarray(query, dtype=np.float32)
        return grid.reshape(self.shape)


class OpenedIndex(NamedTuple):
    tiles: TileIndex
    built: bool  # made now (False: read from the build folder)
    seconds: float


def open_tile_index(store: SoundscapeStore, folder: Path) -> OpenedIndex:
    """The store's index from `folder` if it is there and of this very store, else made now and kept there (where
    the folder cannot be written, made for this run only, with a warning)."""
    start = time.perf_counter()
    stamp = arrays_stamp(store.path, INDEXED_ARRAYS)
    shape = (store.grid.height, store.grid.width)
    kept = _read_kept(folder, stamp)
    if kept is not None:
        index, positions, record = kept
        return OpenedIndex(TileIndex(index, positions, shape, record), False, time.perf_counter() - start)
    index, positions = build_index(store)
    record = IndexRecord(_kind(index), int(index.ntotal), int(index.d), stamp, faiss.__version__)
    try:
        _write(folder, index, positions, record)
    except (OSError, RuntimeError) as exc:
        warnings.warn(
            SearchWarning(f"cannot keep the tile index in {folder} ({exc}); it was made for this run only"),
            stacklevel=2,
        )
    return OpenedIndex(TileIndex(index, positions, shape, record), True, time.perf_counter() - start)


def build_index(store: SoundscapeStore) -> tuple[Any, np.ndarray]:
    """An index of the store's valid tiles, read one store chunk at a time, and each vector's grid position."""
    count = sum(int(store.valid(rows, cols).sum()) for rows, cols in store.embedding_blocks())
    if count == 0:
        raise ExportError("the store has no valid tile; check that the imagery covers the region")
    dim = int(store.dataset.sizes["dim"])
    index = new_index(index_kind(count, dim), dim)
    positions = []
    for rows, cols in store.embedding_blocks():
        row, col = np.nonzero(store.valid(rows, cols))
        if len(row) == 0:
            continue
        vectors = np.ascontiguousarray(store.embeddings(rows, cols)[:, row, col].T, dtype=np.float32)
        if not np.isfinite(vectors).all():
            raise ExportError(f"the store {store.path} holds non-finite embeddings of valid tiles; rebuild it")
        index.add(vectors)
        positions.append((row + rows.start) * store.grid.width + col + cols.start)
    return index, np.concatenate(positions).astype(np.int64)


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


def _kind(index: Any) -> str:
    return HNSW if isinstance(index, faiss.IndexHNSW) else FLAT


def _stored_vectors(index: Any) -> np.ndarray:
    """(count, dim) float32 view of the vectors the index holds (no copy; valid while the index lives)."""
    flat: Any = faiss.downcast_index(index.storage) if isinstance(index, faiss.IndexHNSW) else index
    return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)


def _on_gpus(flat: Any) -> Any | None:
    """A copy of the flat index on every GPU faiss sees, or None without GPUs (or with faiss-cpu)."""
    return faiss.index_cpu_to_all_gpus(flat) if faiss.get_num_gpus() > 0 else None


def _read_kept(folder: Path, stamp: str) -> tuple[Any, np.ndarray, IndexRecord] | None:
    """The kept index, its positions and record, if they are whole and of the store with `stamp`."""
    try:
        record = IndexRecord(**json.loads((folder / RECORD_NAME).read_text()))
        if record.store_stamp != stamp:
            return None
        index = faiss.read_index(str(folder / INDEX_NAME))
        positions = np.load(folder / POSITIONS_NAME)
    except (OSError, RuntimeError, ValueError, TypeError):
        return None
    if (index.ntotal, index.d, len(positions), _kind(index)) != (record.count, record.dim, record.count, record.kind):
        return None
    return index, positions, record


def _write(folder: Path, index: Any, positions: np.ndarray, record: IndexRecord) -> None:
    with atomic_path(folder / INDEX_NAME) as tmp:
        faiss.write_index(index, str(tmp))
    with atomic_path(folder / POSITIONS_NAME) as tmp, tmp.open("wb") as handle:
        np.save(handle, positions)
    atomic_write_bytes(folder / RECORD_NAME, json.dumps(asdict(record), indent=1).encode())

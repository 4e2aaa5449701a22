"""A faiss index of a build's tile embeddings, made once and kept in the build folder, so that a new query finds
its best tiles without a rebuild (`python -m pipeline query`).

- What it holds: every valid tile's embedding from `soundscape.zarr`, as float32 (the store's float16 values
  exactly), read one store chunk at a time: the index is the only thing as large as the region. `positions`
  says where each vector's tile is (row * width + col). A store of several times is indexed at its first time.
- Which index, and how it is searched: `pipeline.vectors` (exact while a scan is fast or GPUs do it, HNSW
  beyond).
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
from pipeline.vectors import VectorSearch, index_kind, kind_of, new_index, read_index, write_index

INDEX_DIR = "index"
INDEX_NAME = "tiles.faiss"
POSITIONS_NAME = "tiles_positions.npy"
RECORD_NAME = "tiles.json"
INDEXED_ARRAYS = ("embedding", "valid")


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
        self._search = VectorSearch(index)

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The grid positions (row * width + col) of the (at most) k tiles whose embeddings have the largest inner
        product with `query` (dim,), best first, and those inner products."""
        scores, found = self._search.search(query, k)
        kept = found[0] >= 0
        return self.positions[found[0][kept]], scores[0][kept]

    def score_grid(self, query: np.ndarray) -> np.ndarray:
        """float32 (height, width): every tile's inner product with `query`, NaN where no tile is indexed."""
        grid = np.full(self.shape[0] * self.shape[1], np.nan, np.float32)
        grid[self.positions] = self._search.vectors @ np.asarray(query, dtype=np.float32)
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
    record = IndexRecord(kind_of(index), int(index.ntotal), int(index.d), stamp, faiss.__version__)
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
    dim = store.embedding_dim
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


def _read_kept(folder: Path, stamp: str) -> tuple[Any, np.ndarray, IndexRecord] | None:
    """The kept index, its positions and record, if they are whole and of the store with `stamp`."""
    try:
        record = IndexRecord(**json.loads((folder / RECORD_NAME).read_text()))
        if record.store_stamp != stamp:
            return None
        index = read_index(folder / INDEX_NAME)
        positions = np.load(folder / POSITIONS_NAME)
    except (OSError, RuntimeError, ValueError, TypeError):
        return None
    if (index.ntotal, index.d, len(positions), kind_of(index)) != (record.count, record.dim, record.count, record.kind):
        return None
    return index, positions, record


def _write(folder: Path, index: Any, positions: np.ndarray, record: IndexRecord) -> None:
    write_index(folder / INDEX_NAME, index)
    with atomic_path(folder / POSITIONS_NAME) as tmp, tmp.open("wb") as handle:
        np.save(handle, positions)
    atomic_write_bytes(folder / RECORD_NAME, json.dumps(asdict(record), indent=1).encode())

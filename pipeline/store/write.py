"""soundscape.zarr: the region-wide store, assembled block by block with dask from the per-chunk files.

Each dask block (`zarr_chunk_px` square, the store's own chunking) reads only the chunk files that hold
tiles inside it, so memory stays flat however large the region. The one region-wide pass collects
each query's valid scores (4 bytes per tile and query) for the percentile normalisation.

The store is Zarr format 2 with consolidated metadata so that GDAL reads it too; x/y are EPSG:3857
pixel centres and a CF `spatial_ref` grid mapping carries the CRS and GeoTransform. It is written to a
temporary folder and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any, NamedTuple

import dask
import dask.array as da
import numpy as np
import rioxarray  # noqa: F401 - registers the .rio accessor
import xarray as xr
from rasterio.transform import from_bounds

from pipeline.plan import Plan
from pipeline.geometry import WEB_MERCATOR
from pipeline.model_setup import ModelRecord
from pipeline.queries import QueryEmbeddings
from pipeline.store.scores import percentile_within, softmax_over_queries

PACKAGE_NAME = "sat2sound-maps"
ZARR_FORMAT = 2

VARIABLE_ATTRS: dict[str, dict[str, str]] = {
    "score": {"long_name": "cosine similarity of tile and query embeddings", "units": "1"},
    "score_percentile": {
        "long_name": "percentile of the tile's score among the region's valid tiles for the query",
        "units": "percent",
    },
    "score_softmax": {
        "long_name": "softmax across the query set of exp(logit_scale) x cosine, with the query kind's scale",
        "units": "1",
    },
    "embedding": {"long_name": "L2-normalised Sat2Sound tile embedding"},
    "concept_index": {"long_name": "codebook concepts with the largest weights, -1 for none"},
    "concept_weight": {"long_name": "sparse codebook weights of concept_index", "units": "1"},
    "valid": {"long_name": "tile inside the region with enough imagery to be scored"},
}


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; it replaces `target` only if the block succeeds."""
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        yield tmp
        if target.exists():
            stale = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
            target.rename(stale)
            tmp.rename(target)
            shutil.rmtree(stale)
        else:
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class ChunkFiles:
    """The per-chunk npz files of a build, where their tiles sit in the grid and which blocks they touch."""

    def __init__(self, plan: Plan, chunks_dir: Path, scores_dir: Path, block_px: int) -> None:
        self.chunks_dir = chunks_dir
        self.scores_dir = scores_dir
        self.block_px = block_px
        self._positions: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._by_block: dict[tuple[int, int], list[str]] = {}
        for chunk in plan.chunk_ids:
            row, col = self.chunk_arrays(chunk, "row", "col")
            self._positions[chunk] = (row, col)
            for block in set(zip((row // block_px).tolist(), (col // block_px).tolist(), strict=True)):
                self._by_block.setdefault(block, []).append(chunk)

    def position(self, chunk: str) -> tuple[np.ndarray, np.ndarray]:
        return self._positions[chunk]

    def chunk_arrays(self, chunk: str, *names: str) -> list[np.ndarray]:
        with np.load(self.chunks_dir / f"{chunk}.npz") as data:
            return [data[name] for name in names]

    def scores(self, chunk: str) -> np.ndarray:
        """(Q, N) raw cosines of the chunk's tiles."""
        with np.load(self.scores_dir / f"{chunk}.npz") as data:
            return data["score"]

    def block(self, location: list[tuple[int, int]], variable: GridVariable) -> np.ndarray:
        """The (rows, cols[, depth]) block of `variable` at `location` ((y0, y1), (x0, x1))."""
        (row0, row1), (col0, col1) = location
        depth = () if variable.depth is None else (variable.depth,)
        out = np.full((row1 - row0, col1 - col0, *depth), variable.fill, variable.dtype)
        for chunk in self._by_block.get((row0 // self.block_px, col0 // self.block_px), []):
            row, col = self._positions[chunk]
            inside = (row >= row0) & (row < row1) & (col >= col0) & (col < col1)
            out[row[inside] - row0, col[inside] - col0] = variable.values(chunk)[inside]
        return out


class GridVariable(NamedTuple):
    """How to build one store variable: `values(chunk)` gives (N[, depth]) values of the chunk's tiles."""

    dims: tuple[str, ...]
    dtype: np.dtype
    fill: float
    values: Callable[[str], np.ndarray]
    depth: int | None

    @property
    def queries_first(self) -> bool:
        return self.dims[0] == "query"


def sorted_valid_scores(files: ChunkFiles, chunks: tuple[str, ...], query_count: int) -> list[np.ndarray]:
    """Each query's scores over the region's valid tiles, ascending."""
    parts: list[list[np.ndarray]] = [[] for _ in range(query_count)]
    for chunk in chunks:
        for query, row in enumerate(files.scores(chunk)):
            parts[query].append(row[np.isfinite(row)])
    return [np.sort(np.concatenate(rows)) if rows else np.empty(0, np.float32) for rows in parts]


def _lazy_array(files: ChunkFiles, variable: GridVariable, height: int, width: int) -> da.Array:
    """A dask array of `variable` over the grid whose blocks `files.block` fills when computed."""
    spatial = (_splits(height, files.block_px), _splits(width, files.block_px))
    depth = () if variable.depth is None else ((variable.depth,),)

    def fill_block(block_info: dict[Any, Any] | None = None) -> np.ndarray:
        assert block_info is not None
        location = block_info[None]["array-location"]
        if variable.queries_first:
            return np.moveaxis(files.block(location[1:], variable), 2, 0)
        return files.block(location[:2], variable)

    chunks = (*depth, *spatial) if variable.queries_first else (*spatial, *depth)
    meta = np.empty((0,) * len(chunks), variable.dtype)
    return da.map_blocks(fill_block, dtype=variable.dtype, chunks=chunks, meta=meta)


def _splits(length: int, size: int) -> tuple[int, ...]:
    return tuple(min(size, length - start) for start in range(0, length, size))


def grid_variables(
    files: ChunkFiles, queries: QueryEmbeddings, sorted_scores: list[np.ndarray], top_k: int, dim: int
) -> dict[str, GridVariable]:
    count = len(queries.ids)
    by_query = ("query", "y", "x")
    float32, nan = np.dtype("float32"), float("nan")

    def percentiles(chunk: str) -> np.ndarray:
        rows = [percentile_within(row, sorted_scores[query]) for query, row in enumerate(files.scores(chunk))]
        return np.stack(rows, axis=1)

    def embedding(chunk: str) -> np.ndarray:
        valid, values = files.chunk_arrays(chunk, "valid", "embedding")
        return np.where(valid[:, None], values, np.float16(nan))

    def softmax(chunk: str) -> np.ndarray:
        return softmax_over_queries(files.scores(chunk), queries.logit_scale).T

    return {
        "score": GridVariable(by_query, float32, nan, lambda chunk: files.scores(chunk).T, count),
        "score_percentile": GridVariable(by_query, float32, nan, percentiles, count),
        "score_softmax": GridVariable(by_query, float32, nan, softmax, count),
        "embedding": GridVariable(("y", "x", "dim"), np.dtype("float16"), nan, embedding, dim),
        "concept_index": GridVariable(
            ("y", "x", "rank"),
            np.dtype("int32"),
            -1,
            lambda chunk: files.chunk_arrays(chunk, "concept_index")[0],
            top_k,
        ),
        "concept_weight": GridVariable(
            ("y", "x", "rank"),
            float32,
            0.0,
            lambda chunk: files.chunk_arrays(chunk, "concept_weight")[0],
            top_k,
        ),
        "valid": GridVariable(
            ("y", "x"), np.dtype("bool"), False, lambda chunk: files.chunk_arrays(chunk, "valid")[0], None
        ),
    }


def soundscape_dataset(
    plan: Plan, files: ChunkFiles, queries: QueryEmbeddings, top_k: int, dim: int
) -> xr.Dataset:
    """The lazy region-wide Dataset (chunk files are read only as it is written)."""
    grid = plan.grid
    sorted_scores = sorted_valid_scores(files, plan.chunk_ids, len(queries.ids))
    variables = grid_variables(files, queries, sorted_scores, top_k, dim)
    data_vars = {
        name: xr.Variable(variable.dims, _lazy_array(files, variable, grid.height, grid.width), VARIABLE_ATTRS[name])
        for name, variable in variables.items()
    }
    pixel = (grid.bounds.right - grid.bounds.left) / grid.width
    coords = {
        "query": np.array(queries.ids),
        "query_label": ("query", np.array(queries.labels)),
        "query_kind": ("query", np.array(queries.kinds)),
        "y": grid.bounds.top - (np.arange(grid.height) + 0.5) * pixel,
        "x": grid.bounds.left + (np.arange(grid.width) + 0.5) * pixel,
        "dim": np.arange(dim),
        "rank": np.arange(top_k),
    }
    dataset = xr.Dataset(data_vars, coords=coords)
    transform = from_bounds(*grid.bounds, grid.width, grid.height)
    return dataset.rio.write_crs(WEB_MERCATOR).rio.write_transform(transform).rio.write_coordinate_system()


def provenance(
    record: ModelRecord, plan: Plan, queries: QueryEmbeddings, config: Mapping[str, Any]
) -> dict[str, Any]:
    query_list = [
        {"id": query_id, "kind": kind, "text": text or None, "audio": audio or None}
        for query_id, kind, text, audio in zip(queries.ids, queries.kinds, queries.texts, queries.audio, strict=True)
    ]
    return {
        "title": f"Sat2Sound soundscape map of {plan.region.name}",
        "checkpoint": record.checkpoint,
        "checkpoint_sha256": record.sha256,
        "untrained": record.untrained,
        "sat_type": plan.view.sat_type,
        "zoom_level": plan.view.zoom_level,
        "tile_zoom": plan.zoom,
        "queries": json.dumps(query_list),
        "config": json.dumps(config, sort_keys=True),
        "imagery_source": plan.imagery.source,
        "imagery_attribution": plan.imagery.attribution,
        "software_version": f"{PACKAGE_NAME} {version(PACKAGE_NAME)}",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_soundscape(dataset: xr.Dataset, attrs: Mapping[str, Any], out: Path, workers: int = 2) -> None:
    """Compute `dataset` block by block into a Zarr store at `out` (replaced atomically)."""
    dataset = dataset.assign_attrs(**attrs)
    encoding: dict[str, dict[str, Any]] = {
        str(name): {"_FillValue": None} for name, variable in dataset.data_vars.items() if variable.dtype.kind in "ib"
    }
    with atomic_directory(out) as tmp, dask.config.set(scheduler="threads", num_workers=workers):
        dataset.to_zarr(tmp, mode="w", zarr_format=ZARR_FORMAT, consolidated=True, encoding=encoding)

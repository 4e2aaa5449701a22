"""Reading `soundscape.zarr`: its grid, its queries, its provenance and its layers, window by window.

The store already holds nodata wherever a tile is not valid (see pipeline.store.write), so readers take its
values as they are. Nothing is loaded until a window is asked for. It is read with zarr itself, not xarray: the
export jobs would otherwise pay ~1 s each to import xarray, pandas and (through xarray's indexing) dask.array.

Times: every per-time read takes `time`, an index into `times` (month-major; 0, the build's first time, by
default). A store of one time has no time dimensions and one entry in `times`; a store of several has `month`
and `hour` dimensions (pipeline.store.layout) and `times` lists their product.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import zarr
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import CRSError

from pipeline.config import ONE_UNKNOWN_TIME, Query, Times
from pipeline.errors import ExportError
from pipeline.store.layout import (
    GALLERY_ATTRS,
    GALLERY_ITEM,
    GRID_MAPPING,
    GRIDDED_VARIABLES,
    QUERY_FACTS,
    STORE_DIMS_ATTR,
    TIME_DIMS,
    UNKNOWN_TIME,
)
from pipeline.store.scores import SCORE_KINDS

PROVENANCE_ATTRS = (
    "checkpoint",
    "checkpoint_sha256",
    "untrained",
    "model_description",
    "imagery_source",
    "imagery_attribution",
    "software_version",
    "created",
)

Rows = slice | np.ndarray
Index = int | slice | np.ndarray


class StoreGrid(NamedTuple):
    width: int
    height: int
    transform: Affine
    crs: CRS

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in the grid's CRS."""
        left, top = self.transform @ (0, 0)
        right, bottom = self.transform @ (self.width, self.height)
        return left, bottom, right, top


class SoundscapeStore:
    """An opened store: `grid`, `queries`, `provenance`, `times` (`times.all` is what a `time` index picks) and
    `attrs` (all its attributes), and windows of its layers as numpy arrays."""

    def __init__(self, path: Path) -> None:
        if not path.is_dir():
            raise ExportError(f"no Zarr store at {path}; run the build's mosaic step first")
        try:
            group = zarr.open_group(path, mode="r", use_consolidated=False)
            self._arrays: dict[str, zarr.Array] = dict(group.arrays())
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ExportError(f"cannot open the Zarr store {path} ({exc}); rebuild it with the map workflow") from exc
        needed = (*GRIDDED_VARIABLES, GRID_MAPPING, *QUERY_FACTS)
        missing = [name for name in needed if name not in self._arrays]
        if missing:
            raise ExportError(f"the Zarr store {path} lacks {', '.join(missing)}; rebuild it with the map workflow")
        self.path = path
        self.attrs = _attrs(group)
        self._x, self._y = _values(self._arrays["x"]), _values(self._arrays["y"])
        self._x.flags.writeable = self._y.flags.writeable = False
        self.grid = _grid(self._x, self._y, self._arrays[GRID_MAPPING])
        self.queries = _queries(self._arrays)
        self.provenance = _provenance(self.attrs)
        self.times = _times(self._arrays)

    def _read(self, name: str, **window: Index) -> np.ndarray:
        """Variable `name` at `window` (dimension name -> index, as xarray's isel; every other dimension whole)."""
        array = self._arrays[name]
        dims = _dims(array)
        unknown = window.keys() - set(dims)
        if unknown:
            raise ValueError(f"{name} has no dimension {', '.join(sorted(unknown))} (it has {', '.join(dims)})")
        return np.asarray(array.oindex[tuple(window.get(dim, slice(None)) for dim in dims)])

    def _at_time(self, time: int) -> dict[str, int]:
        """The window of one time: none for a store of one time."""
        if not self.times.sweeps:
            return {}
        month, hour = divmod(time, len(self.times.hours))
        return {"month": month, "hour": hour}

    def scores(self, variable: str, query_index: int, rows: Rows, cols: Rows, time: int = 0) -> np.ndarray:
        """float32 (rows, cols) of one query's `variable` (a score kind) at `time`, NaN where the tile is not valid."""
        if variable not in SCORE_KINDS:
            raise ExportError(f"unknown score variable {variable!r}; use one of {', '.join(SCORE_KINDS)}")
        values = self._read(variable, query=query_index, y=rows, x=cols, **self._at_time(time))
        return values.astype(np.float32, copy=False)

    def dominant_concepts(self, rows: Rows, cols: Rows, time: int = 0) -> np.ndarray:
        """int32 (rows, cols): each tile's highest-weight codebook concept at `time`, -1 where there is none."""
        concepts = self._read("concept_index", rank=0, y=rows, x=cols, **self._at_time(time))
        return concepts.astype(np.int32, copy=False)

    def sample_scores(self, variable: str, query_index: int, max_px: int, time: int = 0) -> np.ndarray:
        """A query's scores at `time` on a regular lattice of at most about `max_px` tiles (for colour ranges)."""
        lattice = sample_lattice(self.grid, max_px)
        return self.scores(variable, query_index, lattice, lattice, time)

    @property
    def gallery(self) -> Path | None:
        """The folder of the gallery whose best items per tile the store holds (None: it holds none)."""
        if not GALLERY_ATTRS.keys() <= self._arrays.keys():
            return None
        return self.path.parent / str(self.attrs["gallery"])

    def gallery_items(self, rows: Rows, cols: Rows, time: int = 0) -> np.ndarray:
        """int32 (gallery_rank, rows, cols): each tile's best gallery items at `time` (positions in the gallery's
        items), best first, -1 for none."""
        if self.gallery is None:
            raise ExportError(f"the store {self.path} holds no gallery matches; build it with outputs.gallery set")
        items = self._read(GALLERY_ITEM, y=rows, x=cols, **self._at_time(time))
        return items.astype(np.int32, copy=False)

    def valid(self, rows: Rows, cols: Rows) -> np.ndarray:
        """bool (rows, cols): whether each tile has a prediction."""
        return self._read("valid", y=rows, x=cols).astype(bool, copy=False)

    def embeddings(self, rows: Rows, cols: Rows, time: int = 0) -> np.ndarray:
        """float16 (dim, rows, cols) tile embeddings at `time` as stored, NaN where the tile is not valid."""
        return self._read("embedding", y=rows, x=cols, **self._at_time(time))

    @property
    def embedding_dim(self) -> int:
        embedding = self._arrays["embedding"]
        return int(embedding.shape[_dims(embedding).index("dim")])

    def tile_centres(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, y): the EPSG:3857 centres of the grid's columns and rows, as the store holds them."""
        return self._x, self._y

    def embedding_blocks(self) -> Iterator[tuple[slice, slice]]:
        """The (rows, cols) windows of the store's own spatial chunks of `embedding`, row by row: each reads its
        chunk files once, and memory stays that of one chunk however large the region."""
        block_rows, block_cols = self._arrays["embedding"].chunks[-2:]
        height, width = self.grid.height, self.grid.width
        for row in range(0, height, block_rows):
            for col in range(0, width, block_cols):
                yield slice(row, min(row + block_rows, height)), slice(col, min(col + block_cols, width))


def open_store(path: Path) -> SoundscapeStore:
    return SoundscapeStore(path)


def sample_lattice(grid: StoreGrid, max_px: int) -> slice:
    """Every n-th row (and column) of the grid, n such that the lattice holds at most about `max_px` tiles."""
    return slice(None, None, max(1, math.ceil(math.sqrt(grid.width * grid.height / max_px))))


def _grid(x: np.ndarray, y: np.ndarray, spatial_ref: zarr.Array) -> StoreGrid:
    """The store's raster grid: size and origin from the pixel-centre x/y coordinates, CRS from spatial_ref."""
    grid_mapping = _attrs(spatial_ref)
    try:
        crs = CRS.from_wkt(grid_mapping["crs_wkt"])
        # A one-pixel-wide axis has no coordinate spacing; only then does the GDAL GeoTransform give the size.
        geotransform = [float(part) for part in grid_mapping["GeoTransform"].split()]
    except (KeyError, CRSError, ValueError) as exc:
        raise ExportError(
            f"the store's spatial_ref lacks a usable crs_wkt or GeoTransform ({exc}); rebuild it"
        ) from exc
    pixel_width = (x[-1] - x[0]) / (len(x) - 1) if len(x) > 1 else geotransform[1]
    pixel_height = (y[-1] - y[0]) / (len(y) - 1) if len(y) > 1 else geotransform[5]
    transform = Affine(pixel_width, 0.0, x[0] - pixel_width / 2, 0.0, pixel_height, y[0] - pixel_height / 2)
    return StoreGrid(len(x), len(y), transform, crs)


def _times(arrays: dict[str, zarr.Array]) -> Times:
    """The store's months and hours from its time coordinates; one unknown time for a store without them."""
    if not all(dim in arrays for dim in TIME_DIMS):
        return ONE_UNKNOWN_TIME
    months, hours = (
        tuple(None if value == UNKNOWN_TIME else int(value) for value in _values(arrays[dim])) for dim in TIME_DIMS
    )
    return Times(months, hours)


def _queries(arrays: dict[str, zarr.Array]) -> tuple[Query, ...]:
    """The store's queries, in the order of its `query` coordinate, from the coordinates along it."""
    columns = [[str(value) for value in _values(arrays[name])] for name in ("query", *QUERY_FACTS)]
    queries = []
    for query_id, kind, text, audio in zip(*columns, strict=True):
        query = Query(query_id, text or None, audio or None)
        if not (text or audio) or query.kind != kind:
            raise ExportError(
                f"query {query_id!r} is stored as {kind!r} with text {text!r} and audio {audio!r}; rebuild the store"
            )
        queries.append(query)
    return tuple(queries)


def _provenance(attrs: dict[str, Any]) -> dict[str, Any]:
    missing = [name for name in PROVENANCE_ATTRS if name not in attrs]
    if missing:
        raise ExportError(f"the store lacks provenance attributes {', '.join(missing)}; rebuild it")
    return {name: attrs[name] for name in PROVENANCE_ATTRS}


def _values(array: zarr.Array) -> np.ndarray:
    return np.asarray(array[...])


def _attrs(node: zarr.Array | zarr.Group) -> dict[str, Any]:
    return dict(node.attrs)


def _dims(array: zarr.Array) -> list[str]:
    return [str(dim) for dim in _attrs(array)[STORE_DIMS_ATTR]]

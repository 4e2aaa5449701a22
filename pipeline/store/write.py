"""soundscape.zarr: the region-wide store, assembled block by block with dask from the per-chunk files.

Each dask block (`block_px` square, the store's own spatial chunking) reads only the chunk files that hold tiles
inside it, so memory stays flat however large the region. The one region-wide pass collects each query's valid
scores (4 bytes per tile and query) for the percentile normalisation.

This is the one place where invalid tiles become nodata: whatever the chunk and score files hold for a tile that
is not `valid`, and for grid cells no chunk covers, the store holds NaN (floats), -1 (concept_index) or False
(valid). Readers and exports take the store's values as they are. See `pipeline.store.layout` for the layout; it
is written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any, NamedTuple

import dask
import dask.array as da
import numpy as np
import rioxarray  # noqa: F401 - registers the .rio accessor
import xarray as xr
from pyproj import CRS

from common.atomic import atomic_directory
from pipeline.config import ONE_UNKNOWN_TIME, Query, Times
from pipeline.geometry import WEB_MERCATOR, RasterGrid
from pipeline.model_setup import ModelRecord
from pipeline.plan import Plan
from pipeline.queries import QueryEmbeddings
from pipeline.store.layout import (
    CONCEPT_NONE,
    EMBEDDING_DIM_CHUNK,
    GALLERY_ATTRS,
    GALLERY_NONE,
    GALLERY_RANK,
    GRID_MAPPING,
    SPATIAL_DIMS,
    TIME_DIMS,
    VARIABLE_ATTRS,
    ZARR_FORMAT,
    gdal_crs_attribute,
    time_coordinate,
)
from pipeline.store.scores import SCORE_KINDS, RegionScores

PACKAGE_NAME = "sat2sound-maps"


class GridVariable(NamedTuple):
    """How to build one store variable: `values(chunk)` gives (N, *depth) values of the chunk's tiles, `depth`
    being the sizes of the dimensions before (y, x), stored in chunks of `depth_chunks` along them (None: whole)."""

    dims: tuple[str, ...]
    dtype: np.dtype
    nodata: float | bool
    values: Callable[[str], np.ndarray]
    depth: tuple[int, ...]
    depth_chunks: tuple[int, ...] | None = None


class TimeAxes(NamedTuple):
    """The store's time dimensions: `month` and `hour` for a build of several times, none for one."""

    dims: tuple[str, ...]
    shape: tuple[int, ...]

    @classmethod
    def of(cls, times: Times) -> TimeAxes:
        return cls(TIME_DIMS, (len(times.months), len(times.hours))) if times.sweeps else cls((), ())

    def by_tile(self, values: np.ndarray) -> np.ndarray:
        """A chunk's per-time values (T, N, ...) as (N, *shape, ...): months x hours, or no time axis for one."""
        tiles = np.moveaxis(values, 1, 0)
        return tiles.reshape(tiles.shape[0], *self.shape, *tiles.shape[2:])

    def coords(self, times: Times) -> dict[str, np.ndarray]:
        if not self.dims:
            return {}
        return {
            dim: time_coordinate(values) for dim, values in zip(self.dims, (times.months, times.hours), strict=True)
        }


class GalleryMatches(NamedTuple):
    """The gallery whose best items per tile the score files hold: its folder, item count and items per tile."""

    folder: Path
    items: int
    top_k: int

    def attrs(self, store: Path) -> dict[str, Any]:
        """The store's record of the gallery: its folder relative to the store's folder when inside it (the build's
        own moves with the build), else absolute."""
        folder, build = self.folder.resolve(), store.resolve().parent
        recorded = folder.relative_to(build) if folder.is_relative_to(build) else folder
        return {"gallery": str(recorded), "gallery_count": self.items}


class ChunkFiles:
    """The per-chunk npz files of a build, where their tiles sit in the grid and which blocks they touch."""

    def __init__(self, chunk_ids: Sequence[str], chunks_dir: Path, scores_dir: Path, block_px: int) -> None:
        self.chunk_ids = tuple(chunk_ids)
        self.chunks_dir = chunks_dir
        self.scores_dir = scores_dir
        self.block_px = block_px
        self._positions: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._valid: dict[str, np.ndarray] = {}
        self._by_block: dict[tuple[int, int], list[str]] = {}
        for chunk in self.chunk_ids:
            row, col, valid = self.chunk_arrays(chunk, "row", "col", "valid")
            self._positions[chunk] = (row, col)
            self._valid[chunk] = valid.astype(bool)
            for block in set(zip((row // block_px).tolist(), (col // block_px).tolist(), strict=True)):
                self._by_block.setdefault(block, []).append(chunk)

    def chunk_arrays(self, chunk: str, *names: str) -> list[np.ndarray]:
        with np.load(self.chunks_dir / f"{chunk}.npz") as data:
            return [data[name] for name in names]

    def valid(self, chunk: str) -> np.ndarray:
        """(N,) whether each tile of the chunk is valid: the one mask every variable of the store follows."""
        return self._valid[chunk]

    def scores(self, chunk: str, name: str = "score") -> np.ndarray:
        """(T, Q, N) raw cosines of the chunk's tiles, per time; or another array of its score file."""
        with np.load(self.scores_dir / f"{chunk}.npz") as data:
            return data[name]

    def block(self, location: Sequence[tuple[int, int]], variable: GridVariable) -> np.ndarray:
        """The (*depth, rows, cols) block of `variable` at `location` ((y0, y1), (x0, x1)); nodata where invalid."""
        (row0, row1), (col0, col1) = location
        out = np.full((row1 - row0, col1 - col0, *variable.depth), variable.nodata, variable.dtype)
        for chunk in self._by_block.get((row0 // self.block_px, col0 // self.block_px), []):
            row, col = self._positions[chunk]
            inside = (row >= row0) & (row < row1) & (col >= col0) & (col < col1)
            keep = inside & self.valid(chunk)
            out[row[keep] - row0, col[keep] - col0] = variable.values(chunk)[keep]
        return np.moveaxis(out, (0, 1), (-2, -1))


def _lazy_array(files: ChunkFiles, variable: GridVariable, height: int, width: int) -> da.Array:
    """A dask array of `variable` over the grid whose blocks `files.block` fills when computed."""
    spatial = (_splits(height, files.block_px), _splits(width, files.block_px))
    depth = tuple((size,) for size in variable.depth)

    def fill_block(block_info: dict[Any, Any] | None = None) -> np.ndarray:
        assert block_info is not None
        location = block_info[None]["array-location"]
        return files.block(location[-2:], variable)

    chunks = (*depth, *spatial)
    meta = np.empty((0,) * len(chunks), variable.dtype)
    array = da.map_blocks(fill_block, dtype=variable.dtype, chunks=chunks, meta=meta)
    if variable.depth_chunks is not None:
        # Each block is read once with its full depth, then split: GDAL reads one band without the others.
        array = array.rechunk(dict(enumerate(variable.depth_chunks)))
    return array


def _splits(length: int, size: int) -> tuple[int, ...]:
    return tuple(min(size, length - start) for start in range(0, length, size))


def grid_variables(
    files: ChunkFiles,
    region_scores: RegionScores,
    top_k: int,
    dim: int,
    axes: TimeAxes,
    gallery: GalleryMatches | None = None,
) -> dict[str, GridVariable]:
    count = len(region_scores.logit_scale)
    float32, nan = np.dtype("float32"), float("nan")
    one_time = (1,) * len(axes.shape)

    def score_kind(name: str) -> Callable[[str], np.ndarray]:
        return lambda chunk: axes.by_tile(np.moveaxis(region_scores.kind(name, files.scores(chunk)), -1, 1))

    def array(name: str) -> Callable[[str], np.ndarray]:
        return lambda chunk: axes.by_tile(files.chunk_arrays(chunk, name)[0])

    def per_time(
        extra: str, dtype: np.dtype, nodata: float, values: Callable[[str], np.ndarray], size: int, chunk: int
    ) -> GridVariable:
        dims = (*axes.dims, extra, *SPATIAL_DIMS)
        return GridVariable(dims, dtype, nodata, values, (*axes.shape, size), (*one_time, chunk))

    def scored(name: str) -> Callable[[str], np.ndarray]:
        return lambda chunk: axes.by_tile(np.moveaxis(files.scores(chunk, name), -1, 1))

    scores = {name: per_time("query", float32, nan, score_kind(name), count, 1) for name in SCORE_KINDS}
    matches: dict[str, GridVariable] = {}
    if gallery is not None:
        item, *similarities = GALLERY_ATTRS
        k = gallery.top_k
        matches[item] = per_time(GALLERY_RANK, np.dtype("int32"), GALLERY_NONE, scored(item), k, k)
        matches.update({name: per_time(GALLERY_RANK, float32, nan, scored(name), k, k) for name in similarities})
    return {
        **scores,
        **matches,
        "embedding": per_time("dim", np.dtype("float16"), nan, array("embedding"), dim, min(dim, EMBEDDING_DIM_CHUNK)),
        "concept_index": per_time("rank", np.dtype("int32"), CONCEPT_NONE, array("concept_index"), top_k, top_k),
        "concept_weight": per_time("rank", float32, nan, array("concept_weight"), top_k, top_k),
        "valid": GridVariable(SPATIAL_DIMS, np.dtype("bool"), False, files.valid, ()),
    }


def soundscape_dataset(
    grid: RasterGrid,
    files: ChunkFiles,
    queries: Sequence[Query],
    logit_scale: np.ndarray,
    top_k: int,
    dim: int,
    times: Times = ONE_UNKNOWN_TIME,
    gallery: GalleryMatches | None = None,
) -> xr.Dataset:
    """The lazy region-wide Dataset (chunk files are read only as it is written)."""
    region_scores = RegionScores.collect(
        ((files.scores(chunk), files.valid(chunk)) for chunk in files.chunk_ids), logit_scale
    )
    crs = CRS.from_user_input(WEB_MERCATOR)
    gdal_crs = gdal_crs_attribute(crs)
    axes = TimeAxes.of(times)
    data_vars = {
        name: xr.Variable(
            variable.dims,
            _lazy_array(files, variable, grid.height, grid.width),
            {**VARIABLE_ATTRS, **GALLERY_ATTRS}[name] | {"_CRS": gdal_crs},
        )
        for name, variable in grid_variables(files, region_scores, top_k, dim, axes, gallery).items()
    }
    left, _, _, top = grid.bounds
    coords = {
        **axes.coords(times),
        "query": np.array([query.id for query in queries], dtype=str),
        "query_kind": ("query", np.array([query.kind for query in queries], dtype=str)),
        "query_text": ("query", np.array([query.text or "" for query in queries], dtype=str)),
        "query_audio": ("query", np.array([query.audio or "" for query in queries], dtype=str)),
        "y": top - (np.arange(grid.height) + 0.5) * grid.pixel_m,
        "x": left + (np.arange(grid.width) + 0.5) * grid.pixel_m,
        "dim": np.arange(dim),
        "rank": np.arange(top_k),
        **({GALLERY_RANK: np.arange(gallery.top_k)} if gallery is not None else {}),
    }
    dataset = xr.Dataset(data_vars, coords=coords)
    dataset = dataset.rio.write_crs(crs, grid_mapping_name=GRID_MAPPING).rio.write_transform(grid.transform)
    dataset = dataset.rio.write_coordinate_system()
    for variable in dataset.data_vars.values():
        variable.encoding["grid_mapping"] = GRID_MAPPING
    # CF keeps grid mappings out of `coordinates`; listing it globally lets plain xr.open_zarr find the CRS.
    return dataset.assign_attrs(coordinates=GRID_MAPPING)


def provenance(model: ModelRecord, plan: Plan, config: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "title": f"Sat2Sound soundscape map of {plan.region.name}",
        "Conventions": "CF-1.8",
        "checkpoint": model.checkpoint,
        "checkpoint_sha256": model.sha256,
        "untrained": bool(model.untrained),
        "model_description": model.description,
        "sat_type": plan.view.sat_type,
        "zoom_level": plan.view.zoom_level,
        "tile_zoom": plan.grid.zoom,
        "config": json.dumps(config, sort_keys=True),
        "imagery_source": plan.imagery.source,
        "imagery_attribution": plan.imagery.attribution,
        "software_version": f"{PACKAGE_NAME} {version(PACKAGE_NAME)}",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


class ImageryGaps(NamedTuple):
    """Tiles left empty because their imagery could not be had (`imagery.on_missing: leave_empty`), and the
    distinct source tiles (z, x, y) that could not be had."""

    empty_tiles: int
    source_tiles: int

    @property
    def line(self) -> str | None:
        """The build summary's line (None when nothing is missing)."""
        if not self.empty_tiles and not self.source_tiles:
            return None
        return (
            f"{self.empty_tiles:,} tiles left empty: imagery unavailable ({self.source_tiles:,} source tiles failed "
            "or corrupt); rerun to retry"
        )

    def attrs(self) -> dict[str, Any]:
        return {
            EMPTY_TILES_ATTR: self.empty_tiles,
            "unavailable_source_tiles": self.source_tiles,
            "empty_tiles_reason": self.line or "",
        }


EMPTY_TILES_ATTR = "empty_tiles_unavailable_imagery"


def imagery_gaps(chunk_ids: Sequence[str], chunks_dir: Path) -> ImageryGaps:
    """Count, over the chunk files, the tiles left empty for unavailable imagery and the distinct source tiles."""
    empty = 0
    sources: set[tuple[int, int, int]] = set()
    for chunk in chunk_ids:
        with np.load(chunks_dir / f"{chunk}.npz") as archive:
            if "unavailable" not in archive.files:
                continue
            empty += int(archive["unavailable"].sum())
            sources.update((int(z), int(x), int(y)) for z, x, y in archive["unavailable_source_tiles"].tolist())
    return ImageryGaps(empty, len(sources))


def write_soundscape(dataset: xr.Dataset, attrs: Mapping[str, Any], out: Path, workers: int = 2) -> None:
    """Compute `dataset` block by block into a Zarr store at `out` (replaced atomically)."""
    dataset = dataset.assign_attrs(**attrs)
    encoding: dict[str, dict[str, Any]] = {
        # Integers and booleans keep their dtype in xarray (no CF masking to float); -1/False are documented.
        str(name): {"_FillValue": None}
        for name, variable in dataset.data_vars.items()
        if variable.dtype.kind in "ib"
    }
    with atomic_directory(out) as tmp, dask.config.set(scheduler="threads", num_workers=workers):
        dataset.to_zarr(tmp, mode="w", zarr_format=ZARR_FORMAT, consolidated=True, encoding=encoding)


def write_store(
    plan: Plan,
    chunks_dir: Path,
    scores_dir: Path,
    queries: QueryEmbeddings,
    model: ModelRecord,
    config: Mapping[str, Any],
    out: Path,
    *,
    top_k: int,
    block_px: int,
    workers: int = 2,
    times: Times = ONE_UNKNOWN_TIME,
    gallery: GalleryMatches | None = None,
) -> xr.Dataset:
    """The mosaic step in one call: assemble the plan's chunk and score files (made for `times`, with the best
    items of `gallery` where given) into `out`; returns the lazy Dataset."""
    files = ChunkFiles(plan.chunk_ids, chunks_dir, scores_dir, block_px)
    dim = int(queries.embedding.shape[1])
    dataset = soundscape_dataset(
        plan.grid, files, queries.queries, queries.logit_scale, top_k=top_k, dim=dim, times=times, gallery=gallery
    )
    attrs = {**provenance(model, plan, config), **imagery_gaps(plan.chunk_ids, chunks_dir).attrs()}
    if gallery is not None:
        attrs.update(gallery.attrs(out))
    write_soundscape(dataset, attrs, out, workers)
    return dataset

"""Cloud-Optimized GeoTIFFs, each with a QGIS style beside it, from a build's `soundscape.zarr`.

The store is read window by window, so a region of any size exports in bounded memory: windows go into a tiled
staging GeoTIFF, which GDAL's COG driver then copies (with overviews, and optionally reprojected) onto the target.

Georeferencing is the store's own: pixel size and origin from the x/y pixel-centre coordinates, the CRS from the
`spatial_ref` grid mapping. Choices, and why:

- Nodata is NaN for scores: it can never be a score, it is what the store holds, GDAL skips it when averaging
  overviews and warping, and QGIS draws it transparent. Concepts are int32 with nodata -1.
- Overviews average scores (an overview pixel shows the mean score of the tiles it covers) and take the most
  common concept.
- Reprojection is nearest neighbour: a pixel is one prediction for one tile, so every output value stays a
  real model output and the region's edge stays sharp; bilinear would blend neighbouring tiles and nodata.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import rasterio
import rasterio.shutil
import xarray as xr
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import CRSError, RasterioError
from rasterio.windows import Window

from common.atomic import atomic_path
from pipeline.errors import ExportError
from pipeline.export.qgis_style import (
    DisplayRange,
    PaletteEntry,
    category_colour,
    paletted_qml,
    pseudocolor_qml,
    write_style,
)

SCORE_VARIABLES = {
    "score": "cosine similarity of the tile's and the query's embeddings (-1 to 1)",
    "score_percentile": "percentile of the tile's score among the region's valid tiles (0 to 100)",
    "score_softmax": "probability of this query among the query set (softmax of logit-scaled cosine, 0 to 1)",
}
DEFAULT_VARIABLE = "score"
CONCEPTS_NAME = "concepts"
CONCEPT_NODATA = -1
BLOCK_PX = 256
# Pixels per side of one read from the store; a multiple of BLOCK_PX so windows fill whole GeoTIFF tiles.
WINDOW_PX = 2048
# GDAL's block cache defaults to 5% of RAM; a fixed cap keeps an export's memory the same on any machine.
GDAL_CACHE_MB = 256
# The colour range is taken from at most this many tiles, sampled on a regular lattice.
MAX_SAMPLE_PX = 2**20
DISPLAY_PERCENTILES = (2, 98)
QUERY_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
QUERY_KINDS = ("text", "audio", "composed")
PROVENANCE_ATTRS = (
    "checkpoint",
    "checkpoint_sha256",
    "untrained",
    "imagery_source",
    "imagery_attribution",
    "software_version",
    "created",
)


class Query(NamedTuple):
    id: str
    kind: str
    text: str | None
    audio: str | None

    @property
    def label(self) -> str:
        """What the query is, in words: its text, its audio file's name, or both."""
        if self.kind == "text":
            return str(self.text)
        audio_name = Path(str(self.audio)).name
        return audio_name if self.kind == "audio" else f"{audio_name} + {self.text}"


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


def write_query_cogs(
    store: Path, out_dir: Path, variable: str = DEFAULT_VARIABLE, dst_crs: str | None = None
) -> list[Path]:
    """One COG per query of `variable` (float32, NaN nodata) with a `.qml` colour ramp beside it."""
    if variable not in SCORE_VARIABLES:
        raise ExportError(f"unknown score variable {variable!r}; use one of {', '.join(SCORE_VARIABLES)}")
    dataset = open_store(store)
    grid = store_grid(dataset)
    target_crs = _target_crs(dst_crs, grid.crs)
    provenance = provenance_tags(dataset)
    paths = []
    for index, query in enumerate(store_queries(dataset)):
        stem = query.id if variable == DEFAULT_VARIABLE else f"{query.id}_{variable}"
        target = out_dir / f"{stem}.tif"
        tags = {
            **provenance,
            "QUERY_ID": query.id,
            "QUERY_KIND": query.kind,
            "QUERY": query.label,
            "VARIABLE": variable,
            "VARIABLE_MEANING": SCORE_VARIABLES[variable],
        }
        display = display_range(dataset, variable, index)
        _write_cog(
            target,
            grid,
            partial(read_scores, dataset, variable, index),
            dtype="float32",
            nodata=float("nan"),
            description=query.label,
            tags=tags,
            overview_resampling="AVERAGE",
            dst_crs=target_crs,
        )
        write_style(target.with_suffix(".qml"), pseudocolor_qml(display))
        paths.append(target)
    return paths


def write_concept_cog(store: Path, out_dir: Path, dst_crs: str | None = None) -> Path:
    """`concepts.tif`: each tile's dominant codebook concept (int32, nodata -1), with a palette `.qml` beside it."""
    dataset = open_store(store)
    grid = store_grid(dataset)
    target_crs = _target_crs(dst_crs, grid.crs)
    target = out_dir / f"{CONCEPTS_NAME}.tif"
    tags = {
        **provenance_tags(dataset),
        "VARIABLE": "concept_index",
        "VARIABLE_MEANING": "index of the codebook concept with the highest weight for the tile",
    }
    counts = _concept_counts(dataset, grid)
    total = counts.sum()
    entries = [
        PaletteEntry(value, f"concept {value} ({count / total:.1%} of tiles)", category_colour(value))
        for value, count in enumerate(counts.tolist())
        if count
    ]
    _write_cog(
        target,
        grid,
        partial(_read_concepts, dataset),
        dtype="int32",
        nodata=CONCEPT_NODATA,
        description="dominant codebook concept",
        tags=tags,
        overview_resampling="MODE",
        dst_crs=target_crs,
    )
    write_style(target.with_suffix(".qml"), paletted_qml(entries))
    return target


def open_store(store: Path) -> xr.Dataset:
    """The store's variables, read lazily (nothing is loaded until a window is asked for)."""
    if not store.is_dir():
        raise ExportError(f"no Zarr store at {store}; run the build's mosaic step first")
    try:
        dataset = xr.open_zarr(store, chunks=None, consolidated=False, mask_and_scale=False)
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(f"cannot open the Zarr store {store} ({exc}); rebuild it with the map workflow") from exc
    missing = [name for name in (*SCORE_VARIABLES, "concept_index", "valid", "spatial_ref") if name not in dataset]
    if missing:
        raise ExportError(f"the Zarr store {store} lacks {', '.join(missing)}; rebuild it with the map workflow")
    return dataset


def store_grid(dataset: xr.Dataset) -> StoreGrid:
    """The store's raster grid: size and origin from the pixel-centre x/y coordinates, CRS from spatial_ref."""
    x = dataset["x"].to_numpy()
    y = dataset["y"].to_numpy()
    grid_mapping = dataset["spatial_ref"].attrs
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


def store_queries(dataset: xr.Dataset) -> tuple[Query, ...]:
    """The store's queries in the order of its `query` coordinate, from its `queries` attribute."""
    ids = [str(value) for value in dataset["query"].to_numpy()]
    try:
        listed = {entry["id"]: entry for entry in json.loads(dataset.attrs["queries"])}
        queries = tuple(Query(id, listed[id]["kind"], listed[id].get("text"), listed[id].get("audio")) for id in ids)
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportError(
            f"the store's 'queries' attribute does not describe its queries {ids} ({exc!r}); rebuild the store"
        ) from exc
    for query in queries:
        if not QUERY_ID_PATTERN.fullmatch(query.id) or query.id == CONCEPTS_NAME:
            raise ExportError(
                f"query id {query.id!r} cannot name a file; use letters, digits, '_' and '-' (not {CONCEPTS_NAME!r})"
            )
        if query.kind not in QUERY_KINDS:
            raise ExportError(f"query {query.id!r} has kind {query.kind!r}; use one of {', '.join(QUERY_KINDS)}")
    return queries


def provenance_tags(dataset: xr.Dataset) -> dict[str, str]:
    """The store's provenance attributes as GeoTIFF tags (upper-case keys, `untrained` as true/false)."""
    missing = [name for name in PROVENANCE_ATTRS if name not in dataset.attrs]
    if missing:
        raise ExportError(f"the store lacks provenance attributes {', '.join(missing)}; rebuild it")
    return {name.upper(): _tag_text(dataset.attrs[name]) for name in PROVENANCE_ATTRS}


def read_scores(
    dataset: xr.Dataset, variable: str, query_index: int, rows: slice | np.ndarray, cols: slice | np.ndarray
) -> np.ndarray:
    """float32 (rows, cols) of one query, NaN wherever the tile is not valid."""
    values = dataset[variable].isel(query=query_index, y=rows, x=cols)
    return _mask_invalid(dataset, values, rows, cols, np.float32(np.nan)).astype(np.float32, copy=False)


def display_range(dataset: xr.Dataset, variable: str, query_index: int) -> DisplayRange:
    """The 2nd and 98th percentiles of a query's valid scores, from a regular sample of at most MAX_SAMPLE_PX."""
    stride = max(1, math.ceil(math.sqrt(dataset.sizes["y"] * dataset.sizes["x"] / MAX_SAMPLE_PX)))
    lattice = slice(None, None, stride)
    sample = read_scores(dataset, variable, query_index, lattice, lattice)
    values = sample[np.isfinite(sample)]
    if values.size == 0:
        query_id = dataset["query"].to_numpy()[query_index]
        raise ExportError(f"query {query_id!r} has no valid tile; check that the imagery covers the region")
    low, high = (float(value) for value in np.percentile(values, DISPLAY_PERCENTILES))
    if high <= low:
        # Every sampled tile has one value: any non-empty range around it shows that value.
        high = low + max(abs(low), 1.0) * 1e-6
    return DisplayRange(low, high, *DISPLAY_PERCENTILES)


def _read_concepts(dataset: xr.Dataset, rows: slice, cols: slice) -> np.ndarray:
    dominant = dataset["concept_index"].isel(rank=0, y=rows, x=cols)
    return _mask_invalid(dataset, dominant, rows, cols, np.int32(CONCEPT_NODATA)).astype(np.int32, copy=False)


def _mask_invalid(
    dataset: xr.Dataset,
    values: xr.DataArray,
    rows: slice | np.ndarray,
    cols: slice | np.ndarray,
    fill: np.generic,
) -> np.ndarray:
    valid = dataset["valid"].isel(y=rows, x=cols).transpose("y", "x").to_numpy()
    return np.where(valid, values.transpose("y", "x").to_numpy(), fill)


def _concept_counts(dataset: xr.Dataset, grid: StoreGrid) -> np.ndarray:
    """How many valid tiles have each concept as their dominant one, indexed by concept."""
    counts = np.zeros(0, dtype=np.int64)
    for window in _windows(grid):
        concepts = _read_concepts(dataset, *window.toslices())
        window_counts = np.bincount(concepts[concepts != CONCEPT_NODATA].ravel())
        if len(window_counts) > len(counts):
            counts = np.pad(counts, (0, len(window_counts) - len(counts)))
        counts[: len(window_counts)] += window_counts
    if not counts.any():
        raise ExportError("the store has no valid tile; check that the imagery covers the region")
    return counts


def _target_crs(dst_crs: str | None, grid_crs: CRS) -> CRS | None:
    """The CRS to reproject to, or None to keep the store's grid."""
    if dst_crs is None:
        return None
    try:
        crs = CRS.from_user_input(dst_crs)
    except CRSError as exc:
        raise ExportError(f"unknown CRS {dst_crs!r} ({exc}); name one like EPSG:4326 or EPSG:32633") from exc
    return None if crs == grid_crs else crs


def _write_cog(
    target: Path,
    grid: StoreGrid,
    read_window: Callable[[slice, slice], np.ndarray],
    *,
    dtype: str,
    nodata: float,
    description: str,
    tags: dict[str, str],
    overview_resampling: str,
    dst_crs: CRS | None,
) -> None:
    """Stage the store's windows in a tiled GeoTIFF beside `target`, then copy it to a COG at `target`."""
    options: dict[str, Any] = {
        "BLOCKSIZE": BLOCK_PX,
        "COMPRESS": "DEFLATE",
        "PREDICTOR": "YES",
        "BIGTIFF": "IF_SAFER",
        "OVERVIEW_RESAMPLING": overview_resampling,
        "OVERVIEW_COUNT": _overview_count(grid),
    }
    if dst_crs is not None:
        options |= {"TARGET_SRS": dst_crs.to_wkt(), "WARP_RESAMPLING": "NEAREST", "ADD_ALPHA": "NO"}
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with (
            rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB),
            tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.stem}-staging-") as scratch,
        ):
            staging = Path(scratch) / "staging.tif"
            with rasterio.open(
                staging,
                "w",
                driver="GTiff",
                width=grid.width,
                height=grid.height,
                count=1,
                dtype=dtype,
                crs=grid.crs,
                transform=grid.transform,
                nodata=nodata,
                tiled=True,
                blockxsize=BLOCK_PX,
                blockysize=BLOCK_PX,
                compress="DEFLATE",
                zlevel=1,
                BIGTIFF="IF_SAFER",
            ) as staged:
                for window in _windows(grid):
                    staged.write(read_window(*window.toslices()), 1, window=window)
                staged.set_band_description(1, description)
                staged.update_tags(**tags)
            with atomic_path(target) as tmp:
                rasterio.shutil.copy(staging, tmp, driver="COG", **options)
    except (OSError, RasterioError) as exc:
        raise ExportError(f"cannot write {target} ({exc}); check that its folder is writable and has space") from exc


def _windows(grid: StoreGrid) -> Iterator[Window]:
    for row in range(0, grid.height, WINDOW_PX):
        for col in range(0, grid.width, WINDOW_PX):
            yield Window(col, row, min(WINDOW_PX, grid.width - col), min(WINDOW_PX, grid.height - row))


def _overview_count(grid: StoreGrid) -> int:
    """Halvings until the raster fits one block, and at least one so that every COG has an overview."""
    longest = max(grid.width, grid.height)
    if longest < 2:
        return 0
    return min(max(1, math.ceil(math.log2(longest / BLOCK_PX))), math.floor(math.log2(longest)))


def _tag_text(value: object) -> str:
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    return str(value)

"""Cloud-Optimized GeoTIFFs, each with a QGIS style beside it, from a build's `soundscape.zarr`.

The store is read window by window, so a region of any size exports in bounded memory: windows go into a tiled
staging GeoTIFF, which GDAL's COG driver then copies (with overviews, and optionally reprojected) onto the target.

Georeferencing is the store's own (pipeline.store.read). The store already holds nodata wherever a tile is not
valid; the export writes its values as they are. Choices, and why:

- Nodata is NaN for scores: it can never be a score, it is what the store holds, GDAL skips it when averaging
  overviews and warping, and QGIS draws it transparent.
- Each score band carries its unit (GDAL unit type), the query as its description, and the variable and its
  meaning as band metadata; the dataset tags repeat them with the store's provenance.
- `concepts.tif` is Byte (nodata 255) when every concept present is below 255, else UInt16 (nodata 65535): TIFF
  colour tables need one of them. The file holds its colour table; GeoTIFF cannot hold GDAL category names (GDAL
  keeps them only in a .aux.xml beside the file), so each present concept's name is band metadata
  `CATEGORY_<value>`. The `.qml` beside it has the same colours and names.
- Overviews average scores (an overview pixel shows the mean score of the tiles it covers) and take the most
  common concept.
- Reprojection is nearest neighbour: a pixel is one prediction for one tile, so every output value stays a
  real model output and the region's edge stays sharp; bilinear would blend neighbouring tiles and nodata.
"""

from __future__ import annotations

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
from rasterio.crs import CRS
from rasterio.errors import CRSError, RasterioError
from rasterio.windows import Window

from common.atomic import atomic_path
from pipeline.config import Query
from pipeline.errors import ExportError
from pipeline.export.qgis_style import (
    Colour,
    PaletteEntry,
    category_colours,
    display_range,
    paletted_qml,
    pseudocolor_qml,
    write_style,
)
from pipeline.store.layout import CONCEPT_NONE
from pipeline.store.read import SoundscapeStore, StoreGrid
from pipeline.store.scores import SCORE_KINDS

DEFAULT_VARIABLE = "score"
CONCEPTS_NAME = "concepts"
CONCEPTS_MEANING = "index of the codebook concept with the highest weight for the tile"
CONCEPTS_UNIT = "codebook concept"
BLOCK_PX = 256
# Pixels per side of one read from the store; a multiple of BLOCK_PX so windows fill whole GeoTIFF tiles.
WINDOW_PX = 2048
# GDAL's block cache defaults to 5% of RAM; a fixed cap keeps an export's memory the same on any machine.
GDAL_CACHE_MB = 256
# The colour range is taken from at most this many tiles, sampled on a regular lattice.
MAX_SAMPLE_PX = 2**20
QUERY_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class Band(NamedTuple):
    """What the one band of a COG says about itself."""

    dtype: str
    nodata: float
    description: str
    unit: str
    metadata: dict[str, str]
    colormap: dict[int, tuple[int, int, int, int]] | None = None


def write_query_cogs(
    store: Path, out_dir: Path, variable: str = DEFAULT_VARIABLE, dst_crs: str | None = None
) -> list[Path]:
    """One COG per query of `variable` (float32, NaN nodata) with a `.qml` colour ramp beside it."""
    if variable not in SCORE_KINDS:
        raise ExportError(f"unknown score variable {variable!r}; use one of {', '.join(SCORE_KINDS)}")
    soundscape = SoundscapeStore(store)
    target_crs = _target_crs(dst_crs, soundscape.grid.crs)
    provenance = provenance_tags(soundscape)
    kind = SCORE_KINDS[variable]
    for query in soundscape.queries:
        _check_file_name(query)
    paths = []
    for index, query in enumerate(soundscape.queries):
        stem = query.id if variable == DEFAULT_VARIABLE else f"{query.id}_{variable}"
        target = out_dir / f"{stem}.tif"
        meaning = {"VARIABLE": variable, "VARIABLE_MEANING": kind.meaning}
        tags = {**provenance, "QUERY_ID": query.id, "QUERY_KIND": query.kind, "QUERY": query.label, **meaning}
        display = display_range(soundscape.sample_scores(variable, index, MAX_SAMPLE_PX), f"query {query.id!r}")
        band = Band("float32", float("nan"), query.label, kind.band_unit, meaning)
        _write_cog(
            target,
            soundscape.grid,
            partial(soundscape.scores, variable, index),
            band,
            tags=tags,
            overview_resampling="AVERAGE",
            dst_crs=target_crs,
        )
        write_style(target.with_suffix(".qml"), pseudocolor_qml(display))
        paths.append(target)
    return paths


def write_concept_cog(store: Path, out_dir: Path, dst_crs: str | None = None) -> Path:
    """`concepts.tif`: each tile's dominant codebook concept, with its colour table and a palette `.qml` beside it."""
    soundscape = SoundscapeStore(store)
    target_crs = _target_crs(dst_crs, soundscape.grid.crs)
    target = out_dir / f"{CONCEPTS_NAME}.tif"
    counts = _concept_counts(soundscape)
    present = np.flatnonzero(counts)
    total = counts.sum()
    # The most common concepts get the most distinct colours.
    by_frequency = present[np.argsort(-counts[present], kind="stable")]
    colours: dict[int, Colour] = dict(zip(by_frequency.tolist(), category_colours(len(present)), strict=True))
    entries = [
        PaletteEntry(value, f"concept {value} ({counts[value] / total:.1%} of tiles)", colours[value])
        for value in present.tolist()
    ]
    dtype, nodata = ("uint8", 255) if present[-1] < 255 else ("uint16", 65535)
    if present[-1] >= nodata:
        raise ExportError(f"concept {present[-1]} does not fit a colour-table raster (at most {nodata - 1})")
    meaning = {"VARIABLE": "concept_index", "VARIABLE_MEANING": CONCEPTS_MEANING}
    colormap = {entry.value: (*entry.colour, 255) for entry in entries} | {nodata: (0, 0, 0, 0)}
    band = Band(
        dtype,
        nodata,
        "dominant codebook concept",
        CONCEPTS_UNIT,
        meaning | {f"CATEGORY_{entry.value}": entry.label for entry in entries},
        colormap,
    )
    _write_cog(
        target,
        soundscape.grid,
        partial(_read_concepts, soundscape, dtype, nodata),
        band,
        tags={**provenance_tags(soundscape), **meaning},
        overview_resampling="MODE",
        dst_crs=target_crs,
    )
    write_style(target.with_suffix(".qml"), paletted_qml(entries))
    return target


def provenance_tags(soundscape: SoundscapeStore) -> dict[str, str]:
    """The store's provenance attributes as GeoTIFF tags (upper-case keys, `untrained` as true/false)."""
    return {name.upper(): _tag_text(value) for name, value in soundscape.provenance.items()}


def _check_file_name(query: Query) -> None:
    if not QUERY_ID_PATTERN.fullmatch(query.id) or query.id == CONCEPTS_NAME:
        raise ExportError(
            f"query id {query.id!r} cannot name a file; use letters, digits, '_' and '-' (not {CONCEPTS_NAME!r})"
        )


def _read_concepts(soundscape: SoundscapeStore, dtype: str, nodata: int, rows: slice, cols: slice) -> np.ndarray:
    concepts = soundscape.dominant_concepts(rows, cols)
    return np.where(concepts == CONCEPT_NONE, nodata, concepts).astype(dtype)


def _concept_counts(soundscape: SoundscapeStore) -> np.ndarray:
    """How many valid tiles have each concept as their dominant one, indexed by concept."""
    counts = np.zeros(0, dtype=np.int64)
    for window in _windows(soundscape.grid):
        concepts = soundscape.dominant_concepts(*window.toslices())
        window_counts = np.bincount(concepts[concepts != CONCEPT_NONE].ravel())
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
    band: Band,
    *,
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
                dtype=band.dtype,
                crs=grid.crs,
                transform=grid.transform,
                nodata=band.nodata,
                tiled=True,
                blockxsize=BLOCK_PX,
                blockysize=BLOCK_PX,
                compress="DEFLATE",
                zlevel=1,
                BIGTIFF="IF_SAFER",
            ) as staged:
                for window in _windows(grid):
                    staged.write(read_window(*window.toslices()), 1, window=window)
                staged.set_band_description(1, band.description)
                staged.set_band_unit(1, band.unit)
                staged.update_tags(1, **band.metadata)
                if band.colormap is not None:
                    staged.write_colormap(1, band.colormap)
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

"""Cloud-Optimized GeoTIFFs, each with a QGIS style beside it, from a build's `soundscape.zarr`.

The store is read window by window, so a region of any size exports in bounded memory: windows go into a tiled
staging GeoTIFF (reprojected beside it if asked), which gets its overviews and is then copied onto the target as a
COG, the way GDAL's COG driver does it (see `_cog_options` for why not through that driver).

Georeferencing is the store's own (pipeline.store.read). The store already holds nodata wherever a tile is not
valid; the export writes its values as they are (scores, percentiles, softmax: never recomputed). Choices, and why:

- Nodata is NaN for scores: it can never be a score, it is what the store holds, GDAL skips it when averaging
  overviews and warping, and QGIS draws it transparent.
- Each score band carries its unit (GDAL unit type), the query as its description, and the variable and its
  meaning as band metadata; the dataset tags repeat them with the store's provenance.
- `<id>.tif` holds the raw cosine, `<id>_percentile.tif` the store's `score_percentile` (0-100 within the region),
  styled as plain-words classes ("top 10 % of this region for '...'").
- Categorical maps (`concepts.tif`, `dominant.tif`) are Byte (nodata 255) when every category is below 255, else
  UInt16 (nodata 65535): TIFF colour tables need one of them. The file holds its colour table; GeoTIFF cannot hold
  GDAL category names (GDAL keeps them only in a .aux.xml beside the file), so each category's name is band
  metadata `CATEGORY_<value>`. The `.qml` beside it has the same colours and names.
- `dominant.tif` band 1 is the index (in the store's query order) of the query with the highest `score_softmax`,
  band 2 the margin over the runner-up in percentage points (0-100, rounded): GeoTIFF bands share one data type,
  and a colour table needs an integer one. Its colours follow the query order, so a query keeps its colour
  across builds with the same queries.
- Overviews average scores (an overview pixel shows the mean score of the tiles it covers) and take the most
  common category (and margin).
- Reprojection is nearest neighbour: a pixel is one prediction for one tile, so every output value stays a
  real model output and the region's edge stays sharp; bilinear would blend neighbouring tiles and nodata.
- Times: a build of several times (`model.month`/`model.hour` lists or `all`) gives each query COG and percentile
  COG one band per time, in the store's month-major order, each described by its time ("month 6, hour 14") with
  band metadata MONTH and HOUR ("unknown" where the config left it so); the percentile is within the region at
  that time. Its colour range spans every time. `concepts.tif` and `dominant.tif` are one map each: of the
  build's first time (their TIME tag says which), as are the top places and new queries on the built map.
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
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import CRSError, RasterioError
from rasterio.io import DatasetWriter
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from common.atomic import atomic_path
from pipeline.config import Query, Time
from pipeline.errors import ExportError
from pipeline.export.qgis_style import (
    Colour,
    PaletteEntry,
    category_colours,
    classed_qml,
    display_range,
    paletted_qml,
    percentile_classes,
    pseudocolor_qml,
    query_colours,
    write_style,
)
from pipeline.store.read import SoundscapeStore, StoreGrid, sample_lattice
from pipeline.store.scores import SCORE_KINDS, dominant_query

DEFAULT_VARIABLE = "score"
# The file name of each score kind's COG: `<query id><suffix>.tif`.
FILE_SUFFIXES = {"score": "", "score_percentile": "_percentile", "score_softmax": "_softmax"}
CONCEPTS_NAME = "concepts"
CONCEPTS_MEANING = "index of the codebook concept with the highest weight for the tile"
CONCEPTS_UNIT = "codebook concept"
DOMINANT_NAME = "dominant"
DOMINANT_MEANING = (
    "index (in the query order) of the query with the highest softmax across the query set of logit-scaled cosines"
)
MARGIN_MEANING = "softmax probability of the dominant query minus that of the runner-up, in percentage points"
RESERVED_NAMES = (CONCEPTS_NAME, DOMINANT_NAME)
BLOCK_PX = 256
# Pixels per side of one read from the store; a multiple of BLOCK_PX so windows fill whole GeoTIFF tiles.
WINDOW_PX = 2048
# GDAL's block cache defaults to 5% of RAM; a fixed cap keeps an export's memory the same on any machine.
GDAL_CACHE_MB = 256
# The colour range is taken from at most this many tiles, sampled on a regular lattice.
MAX_SAMPLE_PX = 2**20
QUERY_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
# The staging GeoTIFF: tiled like the COG, compressed fast (it is read once).
STAGING_OPTIONS: dict[str, Any] = {
    "tiled": True,
    "blockxsize": BLOCK_PX,
    "blockysize": BLOCK_PX,
    "compress": "DEFLATE",
    "zlevel": 1,
    "BIGTIFF": "IF_SAFER",
}


class Band(NamedTuple):
    """What a band of a COG says about itself."""

    description: str
    unit: str
    metadata: dict[str, str]
    colormap: dict[int, tuple[int, int, int, int]] | None = None


class Raster(NamedTuple):
    """A COG's pixel type and nodata (GeoTIFF has one of each for all bands) and its bands."""

    dtype: str
    nodata: float
    bands: tuple[Band, ...]


def write_query_cogs(
    store: Path, out_dir: Path, variable: str = DEFAULT_VARIABLE, dst_crs: str | None = None
) -> list[Path]:
    """One COG per query of `variable` (float32, NaN nodata), `<id><FILE_SUFFIXES[variable]>.tif`, with a `.qml`
    beside it: a colour ramp, or for percentiles classes in plain words."""
    if variable not in SCORE_KINDS:
        raise ExportError(f"unknown score variable {variable!r}; use one of {', '.join(SCORE_KINDS)}")
    soundscape = SoundscapeStore(store)
    for query in soundscape.queries:
        check_file_name(query)
    times = soundscape.times.all if soundscape.times.sweeps else ()
    return [
        write_score_cog(
            soundscape, query, variable, partial(_every_time, soundscape, variable, index), out_dir, dst_crs, times
        )
        for index, query in enumerate(soundscape.queries)
    ]


def _every_time(soundscape: SoundscapeStore, variable: str, query_index: int, rows: slice, cols: slice) -> np.ndarray:
    """(T, rows, cols): a query's `variable` at each of the store's times."""
    return np.stack(
        [soundscape.scores(variable, query_index, rows, cols, time) for time in range(len(soundscape.times.all))]
    )


def write_score_cog(
    soundscape: SoundscapeStore,
    query: Query,
    variable: str,
    read_window: Callable[[slice, slice], np.ndarray],
    out_dir: Path,
    dst_crs: str | None = None,
    times: tuple[Time, ...] = (),
) -> Path:
    """`<id><FILE_SUFFIXES[variable]>.tif` of one query on the store's grid and its `.qml`, from
    `read_window(rows, cols)`: the query's `variable` scores, NaN where the tile is not valid, one band per time of
    `times` ((T, rows, cols), each band named by its time), or one band named by the query without them. A build's
    queries read them from the store; a new query on a built map (`pipeline.new_query`) passes its own."""
    target_crs = _target_crs(dst_crs, soundscape.grid.crs)
    target = out_dir / f"{query.id}{FILE_SUFFIXES[variable]}.tif"
    kind = SCORE_KINDS[variable]
    meaning = {"VARIABLE": variable, "VARIABLE_MEANING": kind.meaning}
    tags = {
        **provenance_tags(soundscape),
        "QUERY_ID": query.id,
        "QUERY_KIND": query.kind,
        "QUERY": query.label,
        **meaning,
    }
    style = _score_style(soundscape.grid, query, variable, read_window)
    bands = tuple(Band(time.label, kind.band_unit, meaning | time_tags(time)) for time in times)
    raster = Raster("float32", float("nan"), bands or (Band(query.label, kind.band_unit, meaning),))
    _write_cog(
        target,
        soundscape.grid,
        read_window,
        raster,
        tags=tags,
        overview_resampling=Resampling.average,
        dst_crs=target_crs,
    )
    write_style(target.with_suffix(".qml"), style)
    return target


def _score_style(
    grid: StoreGrid, query: Query, variable: str, read_window: Callable[[slice, slice], np.ndarray]
) -> str:
    if variable == "score_percentile":
        return classed_qml(percentile_classes(query.label), minimum=0.0)
    lattice = sample_lattice(grid, MAX_SAMPLE_PX)
    return pseudocolor_qml(display_range(read_window(lattice, lattice), f"query {query.id!r}"))


def write_concept_cog(store: Path, out_dir: Path, dst_crs: str | None = None) -> Path:
    """`concepts.tif`: each tile's dominant codebook concept, with its colour table and a palette `.qml` beside it."""
    soundscape = SoundscapeStore(store)
    target_crs = _target_crs(dst_crs, soundscape.grid.crs)
    target = out_dir / f"{CONCEPTS_NAME}.tif"
    counts = _category_counts(soundscape, soundscape.dominant_concepts)
    present = np.flatnonzero(counts)
    total = counts.sum()
    # The most common concepts get the most distinct colours.
    by_frequency = present[np.argsort(-counts[present], kind="stable")]
    colours: dict[int, Colour] = dict(zip(by_frequency.tolist(), category_colours(len(present)), strict=True))
    entries = [
        PaletteEntry(value, f"concept {value} ({counts[value] / total:.1%} of tiles)", colours[value])
        for value in present.tolist()
    ]
    dtype, nodata = _category_type(int(present[-1]), "concept")
    meaning = {"VARIABLE": "concept_index", "VARIABLE_MEANING": CONCEPTS_MEANING}
    band = _category_band("dominant codebook concept", CONCEPTS_UNIT, meaning, entries, nodata)
    _write_cog(
        target,
        soundscape.grid,
        partial(_read_categories, soundscape.dominant_concepts, dtype, nodata),
        Raster(dtype, nodata, (band,)),
        tags={**provenance_tags(soundscape), **first_time_tags(soundscape), **meaning},
        overview_resampling=Resampling.mode,
        dst_crs=target_crs,
    )
    write_style(target.with_suffix(".qml"), paletted_qml(entries))
    return target


def write_dominant_cog(store: Path, out_dir: Path, dst_crs: str | None = None) -> Path:
    """`dominant.tif`: which query fits each tile best (band 1, with colour table and category names) and by how
    much (band 2, margin in percentage points), with a palette `.qml` beside it."""
    soundscape = SoundscapeStore(store)
    target_crs = _target_crs(dst_crs, soundscape.grid.crs)
    target = out_dir / f"{DOMINANT_NAME}.tif"
    queries = soundscape.queries
    counts = _category_counts(soundscape, partial(_dominant_index, soundscape), len(queries))
    total = counts.sum()
    entries = [
        PaletteEntry(index, f"{query.id}: {query.label} ({counts[index] / total:.1%} of tiles)", colour)
        for (index, query), colour in zip(enumerate(queries), query_colours(len(queries)), strict=True)
    ]
    dtype, nodata = _category_type(len(queries) - 1, "query")
    meaning = {"VARIABLE": "score_softmax", "VARIABLE_MEANING": DOMINANT_MEANING}
    bands = (
        _category_band("dominant query", "query", meaning, entries, nodata),
        Band("margin over the runner-up query", "percentage points", {"VARIABLE_MEANING": MARGIN_MEANING}),
    )
    _write_cog(
        target,
        soundscape.grid,
        partial(_read_dominant, soundscape, dtype, nodata),
        Raster(dtype, nodata, bands),
        tags={**provenance_tags(soundscape), **first_time_tags(soundscape), **meaning},
        overview_resampling=Resampling.mode,
        dst_crs=target_crs,
    )
    write_style(target.with_suffix(".qml"), paletted_qml(entries))
    return target


def provenance_tags(soundscape: SoundscapeStore) -> dict[str, str]:
    """The store's provenance attributes as GeoTIFF tags (upper-case keys, `untrained` as true/false)."""
    return {name.upper(): _tag_text(value) for name, value in soundscape.provenance.items()}


def first_time_tags(soundscape: SoundscapeStore) -> dict[str, str]:
    """TIME: which time a one-map export of a store of several times shows (the first); none for one time."""
    return {"TIME": soundscape.times.all[0].label} if soundscape.times.sweeps else {}


def time_tags(time: Time) -> dict[str, str]:
    """A band's MONTH and HOUR metadata ("unknown" where the config left it so)."""
    return {
        name.upper(): "unknown" if value is None else str(value)
        for name, value in (("month", time.month), ("hour", time.hour))
    }


def check_file_name(query: Query) -> None:
    """Refuse a query id that cannot name its files or would name one of the build's own maps."""
    suffix = FILE_SUFFIXES["score_percentile"]
    if not QUERY_ID_PATTERN.fullmatch(query.id) or query.id in RESERVED_NAMES or query.id.endswith(suffix):
        raise ExportError(
            f"query id {query.id!r} cannot name a file; use letters, digits, '_' and '-' (not"
            f" {' or '.join(map(repr, RESERVED_NAMES))}, nor ending in {suffix!r})"
        )


def _category_type(largest: int, what: str) -> tuple[str, int]:
    """The smallest colour-table data type that holds categories up to `largest`, and its nodata value."""
    dtype, nodata = ("uint8", 255) if largest < 255 else ("uint16", 65535)
    if largest >= nodata:
        raise ExportError(f"{what} {largest} does not fit a colour-table raster (at most {nodata - 1})")
    return dtype, nodata


def _category_band(
    description: str, unit: str, meaning: dict[str, str], entries: list[PaletteEntry], nodata: int
) -> Band:
    """A categorical band: its colour table (nodata transparent) and each category's name as band metadata."""
    colormap = {entry.value: (*entry.colour, 255) for entry in entries} | {nodata: (0, 0, 0, 0)}
    names = {f"CATEGORY_{entry.value}": entry.label for entry in entries}
    return Band(description, unit, meaning | names, colormap)


# A window's categories (rows, cols) from the store: concept or query indices, negative for none.
Categories = Callable[[slice, slice], np.ndarray]


def _read_categories(read: Categories, dtype: str, nodata: int, rows: slice, cols: slice) -> np.ndarray:
    categories = read(rows, cols)
    return np.where(categories < 0, nodata, categories).astype(dtype)


def _softmax_layers(soundscape: SoundscapeStore, rows: slice, cols: slice) -> Iterator[np.ndarray]:
    for index in range(len(soundscape.queries)):
        yield soundscape.scores("score_softmax", index, rows, cols)


def _dominant_index(soundscape: SoundscapeStore, rows: slice, cols: slice) -> np.ndarray:
    return dominant_query(_softmax_layers(soundscape, rows, cols))[0]


def _read_dominant(soundscape: SoundscapeStore, dtype: str, nodata: int, rows: slice, cols: slice) -> np.ndarray:
    """(2, rows, cols): the dominant query's index and its margin in percentage points, `nodata` where invalid."""
    index, margin = dominant_query(_softmax_layers(soundscape, rows, cols))
    points = np.round(np.multiply(np.nan_to_num(margin, copy=False), 100, out=margin), out=margin)
    values = np.stack([index.astype(dtype), points.astype(dtype)])
    values[:, index < 0] = nodata
    return values


def _category_counts(soundscape: SoundscapeStore, read: Categories, minlength: int = 0) -> np.ndarray:
    """How many valid tiles have each category, indexed by category (at least `minlength` of them)."""
    counts = np.zeros(minlength, dtype=np.int64)
    for window in windows(soundscape.grid):
        categories = read(*window.toslices())
        window_counts = np.bincount(categories[categories >= 0].ravel())
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
    raster: Raster,
    *,
    tags: dict[str, str],
    overview_resampling: Resampling,
    dst_crs: CRS | None,
) -> None:
    """Stage the store's windows in a tiled GeoTIFF beside `target` (reprojected there if asked), give it its
    overviews, then copy it to a COG at `target`. `read_window(rows, cols)` gives a window's values, (rows, cols)
    for one band or (bands, rows, cols)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with (
            rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB),
            tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.stem}-staging-") as scratch,
        ):
            staging = Path(scratch) / "staging.tif"
            profile = {"count": len(raster.bands), "dtype": raster.dtype, "nodata": raster.nodata}
            with rasterio.open(
                staging,
                "w",
                driver="GTiff",
                width=grid.width,
                height=grid.height,
                crs=grid.crs,
                transform=grid.transform,
                **profile,
                **STAGING_OPTIONS,
            ) as staged:
                for window in windows(grid):
                    values = read_window(*window.toslices())
                    staged.write(values.reshape(-1, *values.shape[-2:]), window=window)
            if dst_crs is not None:
                staging = _reproject(staging, dst_crs, raster.nodata)
            with rasterio.open(staging, "r+") as staged:
                _describe(staged, raster, tags)
                staged.build_overviews(_overview_factors(staged.width, staged.height), overview_resampling)
            with atomic_path(target) as tmp:
                rasterio.shutil.copy(staging, tmp, driver="GTiff", **_cog_options(raster))
    except (OSError, RasterioError) as exc:
        raise ExportError(f"cannot write {target} ({exc}); check that its folder is writable and has space") from exc


def _reproject(staging: Path, dst_crs: CRS, nodata: float) -> Path:
    """The staging file warped to `dst_crs` (nearest neighbour, GDAL's suggested grid) beside it."""
    warped = staging.with_name("warped.tif")
    with (
        rasterio.open(staging) as source,
        WarpedVRT(source, crs=dst_crs, resampling=Resampling.nearest, nodata=nodata) as view,
    ):
        rasterio.shutil.copy(view, warped, driver="GTiff", **STAGING_OPTIONS)
    return warped


def _describe(dataset: DatasetWriter, raster: Raster, tags: dict[str, str]) -> None:
    for index, band in enumerate(raster.bands, start=1):
        dataset.set_band_description(index, band.description)
        dataset.set_band_unit(index, band.unit)
        dataset.update_tags(index, **band.metadata)
        if band.colormap is not None:
            dataset.write_colormap(index, band.colormap)
    # Every band is data: none is an alpha band, whatever GDAL assumes of a palette band's companions.
    dataset.colorinterp = [_colour_interpretation(index, band) for index, band in enumerate(raster.bands)]
    dataset.update_tags(**tags)


def _colour_interpretation(index: int, band: Band) -> ColorInterp:
    if band.colormap is not None:
        return ColorInterp.palette
    return ColorInterp.gray if index == 0 else ColorInterp.undefined


def _cog_options(raster: Raster) -> dict[str, Any]:
    """GTiff creation options that copy a staging file with overviews into a COG: the layout GDAL's COG driver
    makes (it calls the same copy), plus PHOTOMETRIC=MINISBLACK for several bands, which the COG driver cannot
    pass: without it a palette band's companions are written as alpha (TIFF ExtraSamples)."""
    options: dict[str, Any] = {
        "TILED": "YES",
        "BLOCKXSIZE": BLOCK_PX,
        "BLOCKYSIZE": BLOCK_PX,
        "COMPRESS": "DEFLATE",
        "PREDICTOR": 3 if np.dtype(raster.dtype).kind == "f" else 2,
        "BIGTIFF": "IF_SAFER",
        "COPY_SRC_OVERVIEWS": "YES",
    }
    if len(raster.bands) > 1:
        options["PHOTOMETRIC"] = "MINISBLACK"
    return options


def windows(grid: StoreGrid) -> Iterator[Window]:
    """The store's grid in windows of at most WINDOW_PX a side, row by row."""
    for row in range(0, grid.height, WINDOW_PX):
        for col in range(0, grid.width, WINDOW_PX):
            yield Window(col, row, min(WINDOW_PX, grid.width - col), min(WINDOW_PX, grid.height - row))


def _overview_factors(width: int, height: int) -> list[int]:
    """Halvings until the raster fits one block, and at least one so that every COG has an overview."""
    longest = max(width, height)
    if longest < 2:
        return []
    count = min(max(1, math.ceil(math.log2(longest / BLOCK_PX))), math.floor(math.log2(longest)))
    return [2**level for level in range(1, count + 1)]


def _tag_text(value: object) -> str:
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    return str(value)

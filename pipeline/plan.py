"""The plan of a map build: the one place where a region, a model view, tiling and imagery become tiles.

`make_plan` checks the imagery against the model's view, covers the region with output tiles, groups them
into chunks and places them on the output raster. The workflow makes the plan once, when it starts, and
writes it to plan.npz: a JSON header plus, per chunk, its tiles (x, y), their grid cells (row, col), their
model views (EPSG:3857 bounds) and their centres (lon, lat). Every job reads its chunk from that file and
never re-derives it. `python -m pipeline plan` makes the very same plan, and says what it will cost.

Output tiles are `tile_zoom_offset` zooms finer than the zoom whose tiles match the model's view: with an
offset the views of neighbouring tiles overlap, which gives a smoother map.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import mercantile
import numpy as np
from shapely.geometry import mapping, shape

from common.atomic import atomic_save_npz
from model import GSD_BY_SAT_TYPE, MODEL_INPUT_PX, TILE_PX_BY_SAT_TYPE, TRAINED_ZOOM_LEVELS
from pipeline.config import ImagerySettings, TilingSettings
from pipeline.errors import ImageryMismatchError, TilingError, TooManyTilesError
from pipeline.geometry import (
    EARTH_CIRCUMFERENCE_M,
    Bounds,
    CoverBlocks,
    RasterGrid,
    TileCover,
    chunk_depth,
    cover_blocks,
    default_chunk_zoom,
    output_zoom,
    region_latitude,
    tile_centres_lnglat,
    union_bounds,
    view_bounds,
)
from pipeline.regions import Region

if TYPE_CHECKING:
    from pipeline.imagery import FetchEstimate, ImageryReader

PLAN_FORMAT = "sat2sound-maps/plan-v3"
# Imagery more than this many times coarser than the model's view would feed it blurred views it never saw.
COARSER_LIMIT = 1.5
# Above this many output tiles the download estimate is extrapolated from evenly spread chunks.
EXACT_ESTIMATE_TILES = 100_000
# A survey lists its chunks (~300 bytes each while it is made), not its tiles: the whole world at sentinel zoom
# level 1 is ~65,000 chunks.
SURVEY_MAX_CHUNKS = 1_000_000
_HEADER = "header"
_CHUNK_ARRAYS = ("x", "y", "row", "col", "views", "lon", "lat")


class ModelView(NamedTuple):
    """What the model sees of each output tile: a square of `size_m` true ground metres at `MODEL_INPUT_PX`."""

    sat_type: str
    zoom_level: int

    @classmethod
    def of(cls, sat_type: str, zoom_level: int) -> ModelView:
        if sat_type not in GSD_BY_SAT_TYPE:
            raise TilingError(f"unknown sat type {sat_type!r}; use one of {', '.join(sorted(GSD_BY_SAT_TYPE))}")
        if zoom_level < 1:
            raise TilingError(f"zoom level {zoom_level} is below 1; use a trained one {TRAINED_ZOOM_LEVELS}")
        view = cls(sat_type, zoom_level)
        if view.size_m > EARTH_CIRCUMFERENCE_M:
            raise TilingError(
                f"zoom level {zoom_level} makes {sat_type} views {view.size_m / 1000:,.0f} km wide, more than the"
                f" world; use a trained one {TRAINED_ZOOM_LEVELS}"
            )
        return view

    @property
    def size_m(self) -> float:
        """True ground edge (m): zoom_level x the sat type's tile px x its GSD."""
        return self.zoom_level * level_one_size_m(self.sat_type)

    @property
    def gsd_m(self) -> float:
        """Ground metres per pixel the model sees."""
        return self.size_m / MODEL_INPUT_PX

    def takes(self, native_gsd_m: float) -> bool:
        """Whether imagery of `native_gsd_m` m/px is fine enough for this view (at most COARSER_LIMIT x coarser)."""
        return native_gsd_m <= COARSER_LIMIT * self.gsd_m


def level_one_size_m(sat_type: str) -> float:
    return TILE_PX_BY_SAT_TYPE[sat_type] * GSD_BY_SAT_TYPE[sat_type]


class ImageryFit(NamedTuple):
    """The imagery of a build, its resolution, and whether it is fetched into the tile cache ahead of embedding."""

    source: str
    source_id: str
    attribution: str
    native_gsd_m: float
    fetches_ahead: bool


def fitting_zoom_level(native_gsd_m: float, sat_type: str) -> int | None:
    """The finest trained zoom level whose view takes imagery of `native_gsd_m` m/px; None if even the coarsest
    is too fine for it."""
    return next((level for level in TRAINED_ZOOM_LEVELS if ModelView(sat_type, level).takes(native_gsd_m)), None)


def check_imagery(reader: ImageryReader, settings: ImagerySettings, view: ModelView, latitude: float) -> ImageryFit:
    """The fit of `reader`'s imagery to the model's view; raises ImageryMismatchError when it is too coarse."""
    native_m = settings.native_gsd_m or reader.native_gsd_m(latitude)
    if not view.takes(native_m):
        level = fitting_zoom_level(native_m, view.sat_type)
        coarsest = ModelView(view.sat_type, TRAINED_ZOOM_LEVELS[-1])
        hint = (
            f"set model.zoom_level: {level} or use finer imagery"
            if level is not None
            else f"the imagery is too coarse for this model, even at its coarsest trained zoom_level"
            f" {coarsest.zoom_level} (at most {COARSER_LIMIT * coarsest.gsd_m:.3g} m/px); use finer imagery"
        )
        raise ImageryMismatchError(
            f"imagery {settings.shown_source} has {native_m:.3g} m/px but a {view.sat_type} model at zoom_level"
            f" {view.zoom_level} expects {view.gsd_m:.3g} m/px (at most {COARSER_LIMIT:g}x coarser); {hint}"
        )
    return ImageryFit(settings.shown_source, reader.source_id, reader.attribution, native_m, reader.fetches_ahead)


class ChunkTiles(NamedTuple):
    """One chunk's output tiles, row by row: tile x/y, grid row/col, model views (N, 4) and centres."""

    id: str
    x: np.ndarray
    y: np.ndarray
    row: np.ndarray
    col: np.ndarray
    views: np.ndarray
    lon: np.ndarray
    lat: np.ndarray

    def __len__(self) -> int:
        return len(self.x)


class Plan(NamedTuple):
    region: Region
    view: ModelView
    latitude: float
    auto_zoom: int
    grid: RasterGrid
    chunk_zoom: int
    chunk_ids: tuple[str, ...]
    chunk_sizes: tuple[int, ...]
    tile_count: int
    imagery: ImageryFit

    @property
    def zoom(self) -> int:
        """Zoom of the output tiles."""
        return self.grid.zoom

    def views_extent(self) -> Bounds:
        """The EPSG:3857 box that holds every model view of the grid: the views of its corner tiles (a row's views
        are all one size, and the largest are in its top or bottom row), grown east and west by one of their
        pixels (each view sits within half a pixel of its tile's centre, `on_pixel_lattice`)."""
        grid = self.grid
        x, y = np.meshgrid(
            [grid.first_column, grid.first_column + grid.width - 1], [grid.top_row, grid.top_row + grid.height - 1]
        )
        corners = view_bounds(x.ravel(), y.ravel(), self.zoom, self.view.size_m, MODEL_INPUT_PX)
        pixel = float(np.max(corners[:, 2] - corners[:, 0])) / MODEL_INPUT_PX
        left, bottom, right, top = union_bounds(corners)
        return Bounds(left - pixel, bottom, right + pixel, top)


def chunk_id(tile: mercantile.Tile) -> str:
    return f"{tile.z}_{tile.x}_{tile.y}"


def make_plan(
    region: Region,
    view: ModelView,
    tiling: TilingSettings,
    imagery: ImageryFit,
    *,
    limit_hint: str,
    sampled_only: bool = False,
) -> tuple[Plan, list[ChunkTiles]]:
    """The plan and its chunks; `limit_hint` says how to lift the tile limit where the caller is (config or CLI).

    With `sampled_only` the list holds only the chunks `estimate_downloads` counts on (every `sample_step`-th):
    what `python -m pipeline plan` needs, in bounded memory for a country. The build writes all of them.
    """
    latitude = region_latitude(region.geometry)
    auto_zoom = output_zoom(view.size_m, latitude)
    zoom = auto_zoom + tiling.tile_zoom_offset
    try:
        blocks = cover_blocks(region.geometry, zoom, max_tiles=tiling.max_tiles)
    except TooManyTilesError as exc:
        raise TooManyTilesError(f"region {region.name!r} needs {exc}; {limit_hint}") from None
    grid = blocks.grid()
    chunk_zoom = default_chunk_zoom(zoom) if tiling.chunk_zoom is None else tiling.chunk_zoom
    if sampled_only:
        ids, sizes, chunks = _survey_chunks(region, blocks, chunk_zoom, grid, view)
    else:
        spans = _chunk_spans(blocks.tiles(), chunk_zoom)
        ids, sizes = tuple(span.id for span in spans), tuple(len(span.x) for span in spans)
        chunks = [_chunk_tiles(span, zoom, grid, view) for span in spans]
    plan = Plan(
        region=region,
        view=view,
        latitude=latitude,
        auto_zoom=auto_zoom,
        grid=grid,
        chunk_zoom=chunk_zoom,
        chunk_ids=ids,
        chunk_sizes=sizes,
        tile_count=len(blocks),
        imagery=imagery,
    )
    return plan, chunks


def _survey_chunks(
    region: Region, blocks: CoverBlocks, chunk_zoom: int, grid: RasterGrid, view: ModelView
) -> tuple[tuple[str, ...], tuple[int, ...], list[ChunkTiles]]:
    """Every chunk's id and size, counted from the cover's blocks, and the tiles of every `sample_step`-th chunk
    alone: memory for the chunks, not for the tiles (the world at sentinel zoom level 1 holds 268 M)."""
    bound = blocks.chunk_bound(chunk_zoom)
    if bound > SURVEY_MAX_CHUNKS:
        raise TooManyTilesError(
            f"region {region.name!r} needs {len(blocks):,} tiles at zoom {blocks.zoom} in up to {bound:,} chunks of"
            f" zoom {chunk_zoom}, more than the {SURVEY_MAX_CHUNKS:,} a plan lists; plan a part of it, a coarser"
            " view (a larger model.zoom_level or a smaller tiling.tile_zoom_offset) or larger chunks (a smaller"
            " tiling.chunk_zoom)"
        )
    keys, sizes = blocks.chunk_sizes(chunk_zoom)
    side = 2**chunk_zoom
    ids = tuple(chunk_id(mercantile.Tile(key % side, key // side, chunk_zoom)) for key in keys.tolist())
    sampled = blocks.tiles_in(keys[:: sample_step(len(blocks))], chunk_zoom)
    chunks = [_chunk_tiles(span, blocks.zoom, grid, view) for span in _chunk_spans(sampled, chunk_zoom)]
    return ids, tuple(sizes.tolist()), chunks


class _ChunkSpan(NamedTuple):
    id: str
    x: np.ndarray
    y: np.ndarray


def _chunk_spans(tile_cover: TileCover, chunk_zoom: int) -> list[_ChunkSpan]:
    """The cover's tiles grouped by their parent at `chunk_zoom`, chunks and tiles row by row (views of 2 arrays)."""
    depth = chunk_depth(tile_cover.zoom, chunk_zoom)
    parent_x, parent_y = tile_cover.x >> depth, tile_cover.y >> depth
    order = np.lexsort((tile_cover.x, tile_cover.y, parent_x, parent_y))
    x, y = tile_cover.x[order], tile_cover.y[order]
    px, py = x >> depth, y >> depth
    starts = np.flatnonzero(np.r_[True, (px[1:] != px[:-1]) | (py[1:] != py[:-1])])
    spans = []
    for start, stop in zip(starts.tolist(), [*starts[1:].tolist(), len(x)], strict=True):
        parent = mercantile.Tile(int(px[start]), int(py[start]), chunk_zoom)
        spans.append(_ChunkSpan(chunk_id(parent), x[start:stop], y[start:stop]))
    return spans


def _chunk_tiles(span: _ChunkSpan, zoom: int, grid: RasterGrid, view: ModelView) -> ChunkTiles:
    row, col = grid.cells(span.x, span.y)
    lon, lat = tile_centres_lnglat(span.x, span.y, zoom)
    views = view_bounds(span.x, span.y, zoom, view.size_m, MODEL_INPUT_PX)
    return ChunkTiles(span.id, span.x, span.y, row, col, views, lon, lat)


def embed_jobs(plan: Plan, tiles_per_job: int) -> tuple[tuple[str, ...], ...]:
    """The plan's chunks in order, grouped into embed jobs of about `tiles_per_job` tiles (whole chunks; a chunk
    larger than that is a job of its own)."""
    jobs: list[tuple[str, ...]] = []
    current: list[str] = []
    tiles = 0
    for chunk, size in zip(plan.chunk_ids, plan.chunk_sizes, strict=True):
        if current and tiles + size > tiles_per_job:
            jobs.append(tuple(current))
            current, tiles = [], 0
        current.append(chunk)
        tiles += size
    if current:
        jobs.append(tuple(current))
    return tuple(jobs)


def sample_step(tile_count: int) -> int:
    """Every how many chunks the download estimate counts (1: all; above EXACT_ESTIMATE_TILES tiles, fewer)."""
    return max(1, math.ceil(tile_count / EXACT_ESTIMATE_TILES))


def estimate_downloads(
    reader: ImageryReader, plan: Plan, chunks: Sequence[ChunkTiles]
) -> tuple[FetchEstimate | None, float]:
    """What fetching the plan's imagery downloads, and the share of chunks it was counted on (1.0 = all).

    Beyond EXACT_ESTIMATE_TILES tiles the count runs over every `sample_step`-th chunk and is scaled up;
    `chunks` are all the plan's chunks, or already that sample (`make_plan(..., sampled_only=True)`).
    """
    total, chunk_count = plan.tile_count, len(plan.chunk_ids)
    sampled = chunks[:: sample_step(total)] if len(chunks) == chunk_count else chunks
    views = np.concatenate([chunk.views for chunk in sampled]) if sampled else np.zeros((0, 4))
    estimate = reader.estimate(views, MODEL_INPUT_PX)
    if estimate is None or len(sampled) == chunk_count:
        return estimate, 1.0
    scale = total / len(views)
    return (
        estimate._replace(
            tiles=round(estimate.tiles * scale),
            cached=round(estimate.cached * scale),
            bytes_to_fetch=round(estimate.bytes_to_fetch * scale),
        ),
        len(sampled) / chunk_count,
    )


def write_plan(path: Path, plan: Plan, chunks: Sequence[ChunkTiles]) -> bool:
    """Write plan.npz unless the file already holds this very plan (so its time stamp, which Snakemake
    compares, changes only with its content). Returns whether it wrote."""
    arrays = {f"{chunk.id}/{name}": getattr(chunk, name) for chunk in chunks for name in _CHUNK_ARRAYS}
    header = _header(plan)
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    header["digest"] = digest.hexdigest()
    if path.is_file():
        try:
            if _read_header(path).get("digest") == header["digest"]:
                return False
        except (OSError, ValueError, KeyError):
            pass
    atomic_save_npz(path, {_HEADER: np.array(json.dumps(header)), **arrays})
    return True


def _header(plan: Plan) -> dict[str, Any]:
    return {
        "format": PLAN_FORMAT,
        "region": region_feature(plan),
        "view": plan.view._asdict(),
        "latitude": plan.latitude,
        "auto_zoom": plan.auto_zoom,
        "grid": plan.grid._asdict(),
        "chunk_zoom": plan.chunk_zoom,
        "chunk_ids": list(plan.chunk_ids),
        "chunk_sizes": list(plan.chunk_sizes),
        "tile_count": plan.tile_count,
        "imagery": plan.imagery._asdict(),
    }


def _read_header(path: Path) -> dict[str, Any]:
    with np.load(path) as archive:
        header: dict[str, Any] = json.loads(str(archive[_HEADER]))
    if header.get("format") != PLAN_FORMAT:
        raise ValueError(f"{path} is not a {PLAN_FORMAT} file")
    return header


def read_plan(path: Path) -> Plan:
    header = _read_header(path)
    region = header["region"]
    return Plan(
        region=Region(region["properties"]["name"], shape(region["geometry"])),
        view=ModelView(**header["view"]),
        latitude=header["latitude"],
        auto_zoom=header["auto_zoom"],
        grid=RasterGrid(**header["grid"]),
        chunk_zoom=header["chunk_zoom"],
        chunk_ids=tuple(header["chunk_ids"]),
        chunk_sizes=tuple(header["chunk_sizes"]),
        tile_count=header["tile_count"],
        imagery=ImageryFit(**header["imagery"]),
    )


def read_chunk(path: Path, chunk: str) -> ChunkTiles:
    with np.load(path) as archive:
        return ChunkTiles(chunk, *(archive[f"{chunk}/{name}"] for name in _CHUNK_ARRAYS))


def region_feature(plan: Plan) -> dict[str, Any]:
    """The region as a GeoJSON Feature (EPSG:4326)."""
    return {"type": "Feature", "properties": {"name": plan.region.name}, "geometry": mapping(plan.region.geometry)}

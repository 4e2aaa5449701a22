"""The plan of a map build: the one place where a region, a model view, tiling and imagery become tiles.

`make_plan` checks the imagery against the model's view, covers the region with output tiles, groups them
into chunks and places them on the output raster. The workflow makes the plan once, when it starts, and
writes it to plan.npz: a JSON header plus the region's cover as blocks of tiles grouped by chunk
(`pipeline.geometry.ChunkBlocks`), so the file and the start hold memory for the blocks, not the tiles. Every job
lists its chunk's tiles from that file (`read_chunks`: tiles x, y, their grid cells row, col, their model views
and centres) and never re-derives the plan. `python -m pipeline plan` makes the very same plan, and says what it
will cost.

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
    ChunkBlocks,
    RasterGrid,
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

PLAN_FORMAT = "sat2sound-maps/plan-v4"
# Imagery more than this many times coarser than the model's view would feed it blurred views it never saw.
COARSER_LIMIT = 1.5
# Above this many output tiles the download estimate is extrapolated from evenly spread chunks.
EXACT_ESTIMATE_TILES = 100_000
# A plan holds its chunks (~300 bytes each while it is made) and blocks, not its tiles: the whole world at
# sentinel zoom level 1 is ~65,000 chunks.
MAX_CHUNKS = 1_000_000
_HEADER = "header"
_BLOCK_ARRAYS = ("keys", "starts", "depth", "x", "y")


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

    @property
    def tile_count(self) -> int:
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
    region: Region, view: ModelView, tiling: TilingSettings, imagery: ImageryFit, *, limit_hint: str
) -> tuple[Plan, ChunkBlocks, list[ChunkTiles]]:
    """The plan, its cover's blocks by chunk (what plan.npz keeps), and the tiles of every `sample_step`-th chunk
    (all of them up to EXACT_ESTIMATE_TILES tiles): what the start's checks and the download estimate read, in
    memory for the blocks whatever the region's size. `limit_hint` says how to lift the tile limit where the
    caller is (config or CLI)."""
    latitude = region_latitude(region.geometry)
    auto_zoom = output_zoom(view.size_m, latitude)
    zoom = auto_zoom + tiling.tile_zoom_offset
    try:
        blocks = cover_blocks(region.geometry, zoom, max_tiles=tiling.max_tiles)
    except TooManyTilesError as exc:
        raise TooManyTilesError(f"region {region.name!r} needs {exc}; {limit_hint}") from None
    grid = blocks.grid()
    chunk_zoom = default_chunk_zoom(zoom) if tiling.chunk_zoom is None else tiling.chunk_zoom
    bound = blocks.chunk_bound(chunk_zoom)
    if bound > MAX_CHUNKS:
        raise TooManyTilesError(
            f"region {region.name!r} needs {len(blocks):,} tiles at zoom {zoom} in up to {bound:,} chunks of"
            f" zoom {chunk_zoom}, more than the {MAX_CHUNKS:,} a plan holds; plan a part of it, a coarser view (a"
            " larger model.zoom_level or a smaller tiling.tile_zoom_offset) or larger chunks (a smaller"
            " tiling.chunk_zoom)"
        )
    chunked = blocks.chunked(chunk_zoom)
    plan = Plan(
        region=region,
        view=view,
        latitude=latitude,
        auto_zoom=auto_zoom,
        grid=grid,
        chunk_zoom=chunk_zoom,
        chunk_ids=tuple(chunk_id(chunked.chunk(index)) for index in range(len(chunked))),
        chunk_sizes=tuple(chunked.sizes().tolist()),
        tile_count=len(blocks),
        imagery=imagery,
    )
    sampled = range(0, len(chunked), sample_step(plan.tile_count))
    return plan, chunked, [chunk_tiles(plan, chunked, index) for index in sampled]


def chunk_tiles(plan: Plan, blocks: ChunkBlocks, index: int) -> ChunkTiles:
    """Chunk `index` of the plan, listed from its blocks."""
    tiles = blocks.tiles(index)
    row, col = plan.grid.cells(tiles.x, tiles.y)
    lon, lat = tile_centres_lnglat(tiles.x, tiles.y, tiles.zoom)
    views = view_bounds(tiles.x, tiles.y, tiles.zoom, plan.view.size_m, MODEL_INPUT_PX)
    return ChunkTiles(plan.chunk_ids[index], tiles.x, tiles.y, row, col, views, lon, lat)


def all_chunks(plan: Plan, blocks: ChunkBlocks) -> list[ChunkTiles]:
    """Every chunk of the plan, listed: memory for all its tiles, where a caller wants them at once."""
    return [chunk_tiles(plan, blocks, index) for index in range(len(blocks))]


def embed_jobs(plan: Plan, tiles_per_job: int) -> tuple[tuple[str, ...], ...]:
    """The plan's chunks in order, grouped into embed jobs of about `tiles_per_job` tiles (whole chunks; a chunk
    larger than that is a job of its own). A job's fetch job fetches the same chunks."""
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

    `chunks` are those `make_plan` lists: every chunk, or beyond EXACT_ESTIMATE_TILES tiles every
    `sample_step`-th, whose count is scaled up.
    """
    views = np.concatenate([chunk.views for chunk in chunks]) if chunks else np.zeros((0, 4))
    estimate = reader.estimate(views, MODEL_INPUT_PX)
    if estimate is None or len(chunks) == len(plan.chunk_ids):
        return estimate, 1.0
    scale = plan.tile_count / len(views)
    return (
        estimate._replace(
            tiles=round(estimate.tiles * scale),
            cached=round(estimate.cached * scale),
            bytes_to_fetch=round(estimate.bytes_to_fetch * scale),
        ),
        len(chunks) / len(plan.chunk_ids),
    )


def write_plan(path: Path, plan: Plan, blocks: ChunkBlocks) -> bool:
    """Write plan.npz unless the file already holds this very plan (so its time stamp, which Snakemake
    compares, changes only with its content). Returns whether it wrote."""
    arrays = {f"blocks/{name}": getattr(blocks, name) for name in _BLOCK_ARRAYS}
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


def read_chunks(path: Path, plan: Plan, chunks: Sequence[str]) -> list[ChunkTiles]:
    """The tiles of the named chunks of `plan`, read from its file at `path` (`read_plan`)."""
    with np.load(path) as archive:
        blocks = ChunkBlocks(plan.zoom, plan.chunk_zoom, *(archive[f"blocks/{name}"] for name in _BLOCK_ARRAYS))
    index = {chunk: number for number, chunk in enumerate(plan.chunk_ids)}
    return [chunk_tiles(plan, blocks, index[chunk]) for chunk in chunks]


def job_chunks(path: Path, plan: Plan, tiles_per_job: int, job: int) -> list[ChunkTiles]:
    """The tiles of the chunks of fetch and embed job `job` (`embed_jobs`), read from the plan's file at `path`."""
    return read_chunks(path, plan, embed_jobs(plan, tiles_per_job)[job])


def region_feature(plan: Plan) -> dict[str, Any]:
    """The region as a GeoJSON Feature (EPSG:4326)."""
    return {"type": "Feature", "properties": {"name": plan.region.name}, "geometry": mapping(plan.region.geometry)}

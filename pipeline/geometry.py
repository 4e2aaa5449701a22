"""Web Mercator geometry, in one place: bounds types, tile bounds, zoom rules, model views, region covers,
chunks and the output raster grid.

One output pixel is one Web Mercator tile at the output zoom, so every output raster aligns with web-map tiles.
The model looks at a square of a given true ground size centred on each output tile; in EPSG:3857 that square
is 1/cos(latitude) times larger. Tile bounds and the Earth's constants are mercantile's.
Pure functions over NamedTuples and arrays; imports nothing of ours but the errors.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import mercantile
import numpy as np
import shapely
from numpy.typing import ArrayLike
from rasterio.transform import Affine
from shapely.geometry.base import BaseGeometry

from pipeline.errors import TilingError, TooManyTilesError

WEB_MERCATOR = "EPSG:3857"
WGS84 = "EPSG:4326"
EARTH_RADIUS_M = mercantile.RE
EARTH_CIRCUMFERENCE_M = mercantile.CE
WORLD_HALF_M = EARTH_CIRCUMFERENCE_M / 2.0
SOURCE_TILE_PX = 256
# log2 values this close to an integer count as that integer, so exact powers of two do not flip a zoom.
ZOOM_EPSILON = 1e-9
# Tile-edge tolerance in tile units: bounds on a tile edge must not pull in the neighbour.
EDGE_EPSILON = 1e-6
# A chunk is the parent tile this many zooms above the output zoom: up to 4**6 = 4,096 output tiles.
DEFAULT_CHUNK_DEPTH = 6
MAX_ZOOM = 30


class Bounds(NamedTuple):
    """Axis-aligned bounds in the units of some CRS (metres for EPSG:3857)."""

    left: float
    bottom: float
    right: float
    top: float


def mercator_scale(lat: float) -> float:
    """How many EPSG:3857 metres one true ground metre spans at `lat` (1 / cos(lat))."""
    if not -90.0 < lat < 90.0:
        raise TilingError(f"latitude {lat:g} has no Web Mercator scale; use a latitude strictly inside -90..90")
    return 1.0 / math.cos(math.radians(lat))


def lnglat_of_mercator(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Longitudes (wrapped to -180..180) and latitudes (degrees) of EPSG:3857 points."""
    lon = np.degrees(np.asarray(x, dtype=np.float64) / EARTH_RADIUS_M)
    lat = np.degrees(np.arctan(np.sinh(np.asarray(y, dtype=np.float64) / EARTH_RADIUS_M)))
    return (lon + 180.0) % 360.0 - 180.0, lat


def tile_bounds(tile: mercantile.Tile) -> Bounds:
    """EPSG:3857 bounds of a tile."""
    return Bounds(*mercantile.xy_bounds(tile))


def tile_size_m(zoom: int) -> float:
    """EPSG:3857 edge (m) of a tile at `zoom`."""
    return EARTH_CIRCUMFERENCE_M / 2**zoom


def tile_ground_size_m(zoom: int, lat: float) -> float:
    """True ground edge (m) of a zoom-`zoom` tile at latitude `lat`."""
    return tile_size_m(zoom) / mercator_scale(lat)


def ground_resolution_m(zoom: int, lat: float, tile_px: int = SOURCE_TILE_PX) -> float:
    """True ground metres per pixel of `tile_px`-pixel imagery tiles at `zoom` and `lat`."""
    return tile_ground_size_m(zoom, lat) / tile_px


def output_zoom(view_size_m: float, lat: float) -> int:
    """Zoom whose tiles' ground size at `lat` is closest (in ratio) to a model view of `view_size_m`."""
    _check_view_size(view_size_m)
    exact = math.log2(EARTH_CIRCUMFERENCE_M / mercator_scale(lat) / view_size_m)
    return max(0, math.floor(exact + 0.5 + ZOOM_EPSILON))


def imagery_zoom(pixel_m: float, tile_px: int = SOURCE_TILE_PX) -> int:
    """The one imagery-zoom rule: the coarsest tile zoom whose EPSG:3857 pixels are at most `pixel_m` metres.

    Finer imagery would be thrown away by the resize to the model's input; readers cap the result at their
    source's zoom range.
    """
    if not pixel_m > 0.0:
        raise TilingError(f"pixel size {pixel_m:g} m is not positive; pass the read's EPSG:3857 metres per pixel")
    exact = math.log2(EARTH_CIRCUMFERENCE_M / (tile_px * pixel_m))
    return max(0, math.ceil(exact - ZOOM_EPSILON))


def _check_view_size(view_size_m: float) -> None:
    if not view_size_m > 0.0:
        raise TilingError(f"model view size {view_size_m:g} m is not positive; use a positive ground size")


def tile_centres(x: ArrayLike, y: ArrayLike, zoom: int) -> tuple[np.ndarray, np.ndarray]:
    """EPSG:3857 centres (m) of tiles x/y at `zoom`."""
    size = tile_size_m(zoom)
    centre_x = (np.asarray(x, dtype=np.float64) + 0.5) * size - WORLD_HALF_M
    centre_y = WORLD_HALF_M - (np.asarray(y, dtype=np.float64) + 0.5) * size
    return centre_x, centre_y


def tile_centres_lnglat(x: ArrayLike, y: ArrayLike, zoom: int) -> tuple[np.ndarray, np.ndarray]:
    """Longitudes and latitudes (degrees) of the EPSG:3857 centres of tiles x/y at `zoom`."""
    return lnglat_of_mercator(*tile_centres(x, y, zoom))


def view_bounds(x: ArrayLike, y: ArrayLike, zoom: int, view_size_m: float, pixels: int) -> np.ndarray:
    """(N, 4) EPSG:3857 bounds (left, bottom, right, top) of the model's square views of `view_size_m` true
    ground metres and `pixels` px, centred on tiles x/y at `zoom` to within half a pixel
    (`on_pixel_lattice`). Views of tiles at the world's edge may reach past the antimeridian (x beyond
    ±20037508.34 m)."""
    return on_pixel_lattice(views_centred_at(*tile_centres(x, y, zoom), view_size_m), pixels)


def on_pixel_lattice(views: np.ndarray, pixels: int) -> np.ndarray:
    """(N, 4) views moved east or west by half a pixel at most (of `pixels` across) so that each starts a whole
    number of its pixels from the world's west edge: overlapping views of one row then share their pixels
    (`lattice_blocks`), and are cut once."""
    width = views[:, 2] - views[:, 0]
    step = width / pixels
    left = np.rint((views[:, 0] + WORLD_HALF_M) / step) * step - WORLD_HALF_M
    return np.stack([left, views[:, 1], left + width, views[:, 3]], axis=-1)


def views_centred_at(centre_x: ArrayLike, centre_y: ArrayLike, view_size_m: float) -> np.ndarray:
    """(N, 4) EPSG:3857 bounds (left, bottom, right, top) of the model's square views of `view_size_m` true
    ground metres centred on EPSG:3857 points."""
    _check_view_size(view_size_m)
    centre_x, centre_y = np.asarray(centre_x, dtype=np.float64), np.asarray(centre_y, dtype=np.float64)
    _, lat = lnglat_of_mercator(centre_x, centre_y)
    half = view_size_m / np.cos(np.radians(lat)) / 2.0
    return np.stack([centre_x - half, centre_y - half, centre_x + half, centre_y + half], axis=-1)


# Views of one strip are read at one resolution: rows whose views differ more in size go to separate strips.
MAX_STRIP_SIZE_RATIO = 1.02


class ViewStrip(NamedTuple):
    """Views `start`..`stop` - 1 of a row-by-row sequence, read together: `pixels` is their union's size at
    the finest view's resolution."""

    start: int
    stop: int
    pixels: int


def view_strips(views: np.ndarray, width: int, max_pixels: int, max_views: int) -> list[ViewStrip]:
    """Consecutive rows of (N, 4) views (rows: runs of equal top and bottom; rows longer than `max_views` in
    pieces) grouped into strips of at most `max_views` views whose union, at the finest view's `width`-px
    resolution, holds at most `max_pixels` pixels (a piece of a row alone may hold more), and whose views differ
    in size by MAX_STRIP_SIZE_RATIO at most (rows of one chunk, not unrelated views).

    Overlapping views (finer output tiles than views) share the pixels of a strip, so each is read once."""
    pieces = [
        (start, min(start + max_views, row.stop))
        for row in view_rows(views)
        for start in range(row.start, row.stop, max_views)
    ]
    widths = views[:, 2] - views[:, 0]
    strips: list[ViewStrip] = []
    first = 0
    for index, (_, stop) in enumerate(pieces):
        start = pieces[first][0]
        group = widths[start:stop]
        if index > first and (
            stop - start > max_views
            or group.max() > MAX_STRIP_SIZE_RATIO * group.min()
            or _union_pixels(views[start:stop], width) > max_pixels
        ):
            end = pieces[index - 1][1]
            strips.append(ViewStrip(start, end, _union_pixels(views[start:end], width)))
            first = index
    if pieces:
        start = pieces[first][0]
        strips.append(ViewStrip(start, len(views), _union_pixels(views[start:], width)))
    return strips


def view_rows(views: np.ndarray) -> list[slice]:
    """Runs of consecutive (N, 4) views with the same top and bottom: rows of output tiles."""
    if not len(views):
        return []
    change = np.flatnonzero(np.any(np.diff(views[:, [1, 3]], axis=0) != 0.0, axis=1)) + 1
    bounds = [0, *change.tolist(), len(views)]
    return [slice(start, stop) for start, stop in itertools.pairwise(bounds)]


# Views whose offsets differ from whole pixels by less than this (px) share a pixel lattice.
LATTICE_TOLERANCE_PX = 1e-6


class LatticeBlocks(NamedTuple):
    """Square blocks (M, 4) that hold the pixels of (N, 4) views: view i starts `shift[i]` pixels into block
    `block[i]` and runs on into the next one (the blocks of a row lie side by side)."""

    bounds: np.ndarray
    block: np.ndarray
    shift: np.ndarray

    @property
    def shared(self) -> bool:
        """Whether blocks are fewer than the views (some views are slices of them)."""
        return len(self.bounds) < len(self.block)


def lattice_blocks(views: np.ndarray, pixels: int) -> LatticeBlocks:
    """Blocks as large as the views (`pixels` across) on their pixel lattice, side by side along each row of
    views on one lattice (`on_pixel_lattice`) whose blocks hold fewer pixels than its views; any other view is
    a block of its own. Cutting the blocks and slicing them gives each view's pixels."""
    blocks: list[np.ndarray] = []
    block = np.zeros(len(views), np.int64)
    shift = np.zeros(len(views), np.int64)
    for row in view_rows(views):
        group = views[row]
        width = group[:, 2] - group[:, 0]
        offsets = (group[:, 0] - group[:, 0].min()) / (width[0] / pixels)
        columns = np.rint(offsets).astype(np.int64)
        count = math.ceil((int(columns.max()) + pixels) / pixels)
        shared = (
            np.all(np.abs(width - width[0]) <= LATTICE_TOLERANCE_PX * width[0] / pixels)
            and np.all(np.abs(offsets - columns) <= LATTICE_TOLERANCE_PX)
            and count < len(group)
        )
        if shared:
            lefts = group[:, 0].min() + np.arange(count) * width[0]
            row_bounds = np.broadcast_to(group[0], (count, 4)).copy()
            row_bounds[:, 0], row_bounds[:, 2] = lefts, lefts + width[0]
            block[row], shift[row] = len(blocks) + columns // pixels, columns % pixels
            blocks.extend(row_bounds)
        else:
            block[row] = len(blocks) + np.arange(len(group))
            blocks.extend(group)
    return LatticeBlocks(np.array(blocks, dtype=np.float64).reshape(-1, 4), block, shift)


def union_bounds(views: np.ndarray) -> Bounds:
    """The bounds of (N, 4) bounds (left, bottom, right, top) together."""
    return Bounds(
        float(views[:, 0].min()), float(views[:, 1].min()), float(views[:, 2].max()), float(views[:, 3].max())
    )


def finest_pixel_m(views: np.ndarray, width: int) -> float:
    """EPSG:3857 metres per pixel of the narrowest of (N, 4) views read at `width` px."""
    return float(np.min(views[:, 2] - views[:, 0])) / width


def strip_grid(views: np.ndarray, width: int) -> tuple[Bounds, int, int]:
    """The EPSG:3857 grid of a strip of views: their union at the finest view's resolution, as (bounds,
    columns, rows). Readers without a grid of their own mosaic a strip on it; its size is the strip's budget."""
    union = union_bounds(views)
    pixel_m = finest_pixel_m(views, width)
    columns = max(1, math.ceil((union.right - union.left) / pixel_m - EDGE_EPSILON))
    rows = max(1, math.ceil((union.top - union.bottom) / pixel_m - EDGE_EPSILON))
    return Bounds(union.left, union.top - rows * pixel_m, union.left + columns * pixel_m, union.top), columns, rows


def _union_pixels(views: np.ndarray, width: int) -> int:
    _, columns, rows = strip_grid(views, width)
    return columns * rows


def region_latitude(geometry: BaseGeometry) -> float:
    """The latitude a region's zoom choice is made at: that of its centroid."""
    return float(geometry.centroid.y)


@dataclass(frozen=True)
class TileCover:
    """The tiles at `zoom` whose interiors meet a region, sorted row by row (y, then x)."""

    zoom: int
    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.x)

    def tiles(self) -> Iterator[mercantile.Tile]:
        for x, y in zip(self.x.tolist(), self.y.tolist(), strict=True):
            yield mercantile.Tile(x, y, self.zoom)


@dataclass(frozen=True)
class CoverBlocks:
    """A cover as `cover_blocks` finds it: square blocks of tiles at `zoom`, each (depth, x, y) the 4**depth tiles
    under tiles (x, y) of zoom - depth (depth 0: single tiles, along the region's boundary). Counting its tiles,
    their raster grid and its chunks' sizes take memory for the blocks alone; `tiles` lists every tile."""

    zoom: int
    blocks: tuple[tuple[int, np.ndarray, np.ndarray], ...]

    def __len__(self) -> int:
        return sum(len(x) * 4**depth for depth, x, _ in self.blocks)

    def tiles(self) -> TileCover:
        return _listed(self.zoom, [_descendants(x, y, depth) for depth, x, y in self.blocks])

    def grid(self) -> RasterGrid:
        """The smallest tile-aligned raster holding every tile, wrapping at the antimeridian."""
        if len(self) == 0:
            raise TilingError("the tile cover is empty; the region has no area at this zoom")
        starts = np.concatenate([x << depth for depth, x, _ in self.blocks])
        ends = np.concatenate([(x + 1) << depth for depth, x, _ in self.blocks])
        top = min(int(y.min()) << depth for depth, _, y in self.blocks if len(y))
        bottom = max(((int(y.max()) + 1) << depth) - 1 for depth, _, y in self.blocks if len(y))
        return _column_grid(self.zoom, starts, ends, top, bottom)

    def chunk_bound(self, chunk_zoom: int) -> int:
        """An upper bound on the number of chunks at `chunk_zoom` that hold tiles of the cover: the blocks
        `chunked` cuts them into."""
        depth = chunk_depth(self.zoom, chunk_zoom)
        return sum(len(x) * 4 ** max(block - depth, 0) for block, x, _ in self.blocks)

    def chunked(self, chunk_zoom: int) -> ChunkBlocks:
        """The blocks cut to fit the chunks of `chunk_zoom` (a block larger than a chunk becomes the chunks it holds)
        and grouped by chunk, chunks row by row."""
        chunk = chunk_depth(self.zoom, chunk_zoom)
        parts = []
        for block, block_x, block_y in self.blocks:
            if block >= chunk:
                block_x, block_y = _descendants(block_x, block_y, block - chunk)
                block = chunk
            parts.append((np.full(len(block_x), block, dtype=np.int64), block_x, block_y))
        depth, x, y = (np.concatenate([np.zeros(0, np.int64), *(part[i] for part in parts)]) for i in range(3))
        shift = chunk - depth
        keys = (y >> shift) * 2**chunk_zoom + (x >> shift)
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, np.int64)
        return ChunkBlocks(
            self.zoom, chunk_zoom, keys[starts], np.r_[starts, len(keys)], depth[order], x[order], y[order]
        )


@dataclass(frozen=True)
class ChunkBlocks:
    """A cover's blocks grouped by chunk (`CoverBlocks.chunked`): chunk i, the tile `keys[i]` (row *
    2**chunk_zoom + column) of `chunk_zoom`, holds blocks starts[i]:starts[i + 1] of (depth, x, y). A chunk's tiles
    are listed from its own blocks, so a plan keeps the blocks of a region, never all its tiles at once."""

    zoom: int
    chunk_zoom: int
    keys: np.ndarray
    starts: np.ndarray
    depth: np.ndarray
    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    def chunk(self, index: int) -> mercantile.Tile:
        row, column = divmod(int(self.keys[index]), 2**self.chunk_zoom)
        return mercantile.Tile(column, row, self.chunk_zoom)

    def sizes(self) -> np.ndarray:
        """How many tiles each chunk holds."""
        if not len(self):
            return np.zeros(0, np.int64)
        return np.add.reduceat(np.int64(4) ** self.depth, self.starts[:-1])

    def tiles(self, index: int) -> TileCover:
        """Chunk `index`'s tiles, row by row."""
        part = slice(int(self.starts[index]), int(self.starts[index + 1]))
        depth, x, y = self.depth[part], self.x[part], self.y[part]
        return _listed(self.zoom, [_descendants(x[depth == d], y[depth == d], int(d)) for d in np.unique(depth)])


def cover_blocks(geometry: BaseGeometry, zoom: int, max_tiles: int | None = None) -> CoverBlocks:
    """The tiles at `zoom` whose interior intersects the EPSG:4326 `geometry` (holes and gaps excluded), as blocks.

    Descends from the zoom-0 tile, keeping tiles that touch the region's boundary and taking tiles that lie
    wholly inside it as one block each, so the work grows with the boundary, not the area. Raises a
    `TooManyTilesError` ("more than N tiles at zoom Z"; callers name the region and the fix) as soon as more than
    `max_tiles` tiles are certain.
    """
    if not 0 <= zoom <= MAX_ZOOM:
        raise TilingError(f"tile zoom {zoom} is outside 0..30; use a coarser model view (a larger model.zoom_level)")
    shapely.prepare(geometry)
    inner_blocks: list[tuple[int, np.ndarray, np.ndarray]] = []
    inner_count = 0
    x = np.zeros(1, dtype=np.int64)
    y = np.zeros(1, dtype=np.int64)
    for level in range(zoom + 1):
        boxes = _lnglat_boxes(x, y, level)
        meets = shapely.intersects(geometry, boxes)
        x, y, boxes = x[meets], y[meets], boxes[meets]
        if level == zoom:
            interior = ~shapely.touches(geometry, boxes)
            x, y = x[interior], y[interior]
            break
        inside = shapely.contains_properly(geometry, boxes)
        if inside.any():
            inner_blocks.append((zoom - level, x[inside], y[inside]))
        inner_count += int(inside.sum()) * 4 ** (zoom - level)
        x, y = x[~inside], y[~inside]
        # Each remaining tile meets the region, so all but those merely touching it hold a tile of the cover.
        if max_tiles is not None and inner_count + len(x) > max_tiles:
            raise TooManyTilesError(f"more than {max_tiles:,} tiles at zoom {zoom}")
        x, y = _children(x, y)
    blocks = CoverBlocks(zoom, ((0, x, y), *inner_blocks))
    if max_tiles is not None and len(blocks) > max_tiles:
        raise TooManyTilesError(f"{len(blocks):,} tiles at zoom {zoom}, more than {max_tiles:,}")
    return blocks


def _listed(zoom: int, parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> TileCover:
    all_x = np.concatenate([np.zeros(0, np.int64), *(part[0] for part in parts)])
    all_y = np.concatenate([np.zeros(0, np.int64), *(part[1] for part in parts)])
    order = np.lexsort((all_x, all_y))
    return TileCover(zoom=zoom, x=all_x[order], y=all_y[order])


def _lnglat_boxes(x: np.ndarray, y: np.ndarray, zoom: int) -> np.ndarray:
    # The same expressions as mercantile.bounds, so boxes of aligned regions meet tile edges exactly.
    north, south = (np.degrees(np.arctan(np.sinh(np.pi * (1.0 - 2.0 * row / 2.0**zoom)))) for row in (y, y + 1))
    west, east = (column / 2.0**zoom * 360.0 - 180.0 for column in (x, x + 1))
    return shapely.box(west, south, east, north)


def _children(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (
        (2 * x[:, None] + np.array([0, 1, 0, 1])).ravel(),
        (2 * y[:, None] + np.array([0, 0, 1, 1])).ravel(),
    )


def _descendants(x: np.ndarray, y: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    side = 2**depth
    offset_x, offset_y = np.meshgrid(np.arange(side), np.arange(side))
    return (
        ((x[:, None] << depth) + offset_x.ravel()).ravel(),
        ((y[:, None] << depth) + offset_y.ravel()).ravel(),
    )


def default_chunk_zoom(zoom: int) -> int:
    return max(0, zoom - DEFAULT_CHUNK_DEPTH)


def chunk_depth(zoom: int, chunk_zoom: int) -> int:
    if not 0 <= chunk_zoom <= zoom:
        raise TilingError(
            f"chunk zoom {chunk_zoom} is outside 0..{zoom}: tiling.chunk_zoom must be between 0 and the output zoom"
            f" ({zoom}); set it in that range or leave it out (zoom {default_chunk_zoom(zoom)})"
        )
    return zoom - chunk_zoom


class RasterGrid(NamedTuple):
    """The tile-aligned EPSG:3857 raster that holds one pixel per output tile of `zoom`.

    Its top-left pixel is tile (`first_column`, `top_row`). For regions crossing the antimeridian
    `bounds.right` lies past the world's edge (x > 20037508.34 m) and columns continue across it.
    """

    zoom: int
    first_column: int
    top_row: int
    width: int
    height: int

    @property
    def pixel_m(self) -> float:
        return tile_size_m(self.zoom)

    @property
    def bounds(self) -> Bounds:
        left, _, _, top = tile_bounds(mercantile.Tile(self.first_column, self.top_row, self.zoom))
        return Bounds(left, top - self.height * self.pixel_m, left + self.width * self.pixel_m, top)

    @property
    def lnglat_bounds(self) -> Bounds:
        """West, south, east, north in degrees: east < west across the antimeridian, -180 to 180 for the world."""
        degrees = 360.0 / 2**self.zoom
        west = self.first_column * degrees - 180.0
        east = west + self.width * degrees
        _, bottom, _, top = self.bounds
        _, (south, north) = lnglat_of_mercator([0.0, 0.0], [bottom, top])
        return Bounds(west, float(south), east - 360.0 if east > 180.0 else east, float(north))

    @property
    def transform(self) -> Affine:
        left, _, _, top = self.bounds
        return Affine(self.pixel_m, 0.0, left, 0.0, -self.pixel_m, top)

    def cells(self, x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """Grid rows and columns (int32) of output tiles x/y; columns continue across the antimeridian."""
        rows = np.asarray(y, dtype=np.int64) - self.top_row
        columns = (np.asarray(x, dtype=np.int64) - self.first_column) % 2**self.zoom
        return rows.astype(np.int32), columns.astype(np.int32)


def _column_grid(zoom: int, starts: np.ndarray, ends: np.ndarray, top_row: int, bottom_row: int) -> RasterGrid:
    """The grid of rows `top_row`..`bottom_row` and of the columns that [start, end) ranges cover."""
    world_columns = 2**zoom
    order = np.argsort(starts, kind="stable")
    starts, reach = starts[order], np.maximum.accumulate(ends[order])
    # Runs of covered columns, and the empty columns after each (the last run's wrap round to the first).
    opens = np.r_[True, starts[1:] > reach[:-1]]
    run_starts, run_ends = starts[opens], reach[np.r_[opens[1:], True]]
    gaps = np.r_[run_starts[1:], run_starts[0] + world_columns] - run_ends
    # The widest run of empty columns stays outside the raster; on a tie, the run across the antimeridian.
    widest = len(gaps) - 1 if gaps[-1] == gaps.max() else int(np.argmax(gaps))
    first_column = int(run_starts[(widest + 1) % len(run_starts)])
    return RasterGrid(zoom, first_column, top_row, world_columns - int(gaps[widest]), bottom_row - top_row + 1)


class TileBlock(NamedTuple):
    """The block of source tiles under a read: columns x0..x1 (may run past the antimeridian), rows y0..y1."""

    zoom: int
    x0: int
    x1: int
    y0: int
    y1: int

    @classmethod
    def covering(cls, bounds: Bounds, zoom: int) -> TileBlock:
        size = tile_size_m(zoom)
        last_row = 2**zoom - 1
        x0 = math.floor((bounds.left + WORLD_HALF_M) / size + EDGE_EPSILON)
        x1 = math.ceil((bounds.right + WORLD_HALF_M) / size - EDGE_EPSILON) - 1
        y0 = max(0, math.floor((WORLD_HALF_M - bounds.top) / size + EDGE_EPSILON))
        y1 = min(last_row, math.ceil((WORLD_HALF_M - bounds.bottom) / size - EDGE_EPSILON) - 1)
        return cls(zoom, x0, max(x0, x1), y0, y1)

    @property
    def columns(self) -> int:
        return self.x1 - self.x0 + 1

    @property
    def rows(self) -> int:
        return max(0, self.y1 - self.y0 + 1)

    def tiles(self) -> list[mercantile.Tile]:
        """Source tiles row by row; columns past the antimeridian wrap around."""
        n = 2**self.zoom
        return [
            mercantile.Tile(x % n, y, self.zoom)
            for y in range(self.y0, self.y1 + 1)
            for x in range(self.x0, self.x1 + 1)
        ]

    def transform(self, tile_px: int) -> Affine:
        """EPSG:3857 transform of the mosaic of `tile_px`-pixel tiles."""
        size = tile_size_m(self.zoom)
        pixel_m = size / tile_px
        return Affine(pixel_m, 0.0, self.x0 * size - WORLD_HALF_M, 0.0, -pixel_m, WORLD_HALF_M - self.y0 * size)

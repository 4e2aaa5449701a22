"""Web Mercator tile math: model footprints, zoom choices, region covers, chunks and a footprint sampler.

One output pixel is one Web Mercator tile at the output zoom, so every output raster aligns with
web-map tiles. The model looks at a square of `footprint_size_m` true ground metres centred on
each output tile; in EPSG:3857 that square is 1/cos(latitude) times larger.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import mercantile
import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from model.config import GSD_BY_SAT_TYPE, MODEL_INPUT_PX, TILE_PX_BY_SAT_TYPE
from pipeline.errors import TilingError, TooManyTilesError
from pipeline.types import WEB_MERCATOR, Bounds, LngLatBBox

EARTH_RADIUS_M = 6378137.0
EARTH_CIRCUMFERENCE_M = 2.0 * math.pi * EARTH_RADIUS_M
SOURCE_TILE_PX = 256
# log2 values this close to an integer count as that integer, so exact powers of two do not flip a zoom.
ZOOM_EPSILON = 1e-9
# A chunk is the parent tile this many zooms above the output zoom: up to 4**6 = 4,096 output tiles.
DEFAULT_CHUNK_DEPTH = 6


class Footprint(NamedTuple):
    """What the model sees for one output tile.

    `bounds` (EPSG:3857) is the model's square view centred on the output tile's centre; it may reach
    past the antimeridian (x beyond ±20037508.34 m) for tiles at the edge of the world.
    """

    tile: mercantile.Tile
    bounds: Bounds
    gsd_m: float

    @property
    def crs(self) -> str:
        return WEB_MERCATOR


def footprint_size_m(sat_type: str, zoom_level: int) -> float:
    """True ground edge (m) of the model input: zoom_level x the sat type's tile px x its GSD."""
    if sat_type not in GSD_BY_SAT_TYPE:
        raise TilingError(f"unknown sat type {sat_type!r}; use one of {sorted(GSD_BY_SAT_TYPE)}")
    if zoom_level < 1:
        raise TilingError(f"zoom level {zoom_level} is below 1; use the checkpoint's zoom level (1, 3 or 5)")
    return zoom_level * TILE_PX_BY_SAT_TYPE[sat_type] * GSD_BY_SAT_TYPE[sat_type]


def mercator_scale(lat: float) -> float:
    """How many EPSG:3857 metres one true ground metre spans at `lat` (1 / cos(lat))."""
    if not -90.0 < lat < 90.0:
        raise TilingError(f"latitude {lat:g} has no Web Mercator scale; use a latitude strictly inside -90..90")
    return 1.0 / math.cos(math.radians(lat))


def tile_ground_size_m(zoom: int, lat: float) -> float:
    """True ground edge (m) of a zoom-`zoom` tile at latitude `lat`."""
    return EARTH_CIRCUMFERENCE_M / 2**zoom / mercator_scale(lat)


def ground_resolution_m(zoom: int, lat: float, tile_px: int = SOURCE_TILE_PX) -> float:
    """True ground metres per pixel of `tile_px`-pixel imagery tiles at `zoom` and `lat`."""
    return tile_ground_size_m(zoom, lat) / tile_px


def output_zoom(footprint_size_m: float, lat: float) -> int:
    """Zoom whose tiles' ground size at `lat` is closest (in ratio) to the model footprint."""
    _check_footprint(footprint_size_m)
    exact = math.log2(EARTH_CIRCUMFERENCE_M / mercator_scale(lat) / footprint_size_m)
    return max(0, math.floor(exact + 0.5 + ZOOM_EPSILON))


def imagery_zoom(footprint_size_m: float, lat: float, tile_px: int = SOURCE_TILE_PX) -> int:
    """Coarsest imagery zoom whose true GSD at `lat` is at most the model's input GSD (footprint / 224 px).

    Finer imagery would be thrown away by the resize to 224 px; callers cap the result at the source's
    maximum zoom.
    """
    _check_footprint(footprint_size_m)
    target_gsd_m = footprint_size_m / MODEL_INPUT_PX
    exact = math.log2(EARTH_CIRCUMFERENCE_M / mercator_scale(lat) / tile_px / target_gsd_m)
    return max(0, math.ceil(exact - ZOOM_EPSILON))


def _check_footprint(footprint_size_m: float) -> None:
    if not footprint_size_m > 0.0:
        raise TilingError(f"footprint size {footprint_size_m:g} m is not positive; derive it with footprint_size_m()")


def tile_bounds(tile: mercantile.Tile) -> Bounds:
    """EPSG:3857 bounds of a tile, exact to floating point."""
    size = EARTH_CIRCUMFERENCE_M / 2**tile.z
    left = tile.x * size - EARTH_CIRCUMFERENCE_M / 2.0
    top = EARTH_CIRCUMFERENCE_M / 2.0 - tile.y * size
    return Bounds(left, top - size, left + size, top)


def tile_lnglat_bounds(tile: mercantile.Tile) -> LngLatBBox:
    """EPSG:4326 bounds of a tile."""
    west, east = _tile_longitudes(np.array([tile.x, tile.x + 1]), tile.z)
    north, south = _tile_latitudes(np.array([tile.y, tile.y + 1]), tile.z)
    return LngLatBBox(float(west), float(south), float(east), float(north))


def _tile_longitudes(x: np.ndarray, zoom: int) -> np.ndarray:
    return x / 2.0**zoom * 360.0 - 180.0


def _tile_latitudes(y: np.ndarray, zoom: int) -> np.ndarray:
    return np.degrees(np.arctan(np.sinh(np.pi * (1.0 - 2.0 * y / 2.0**zoom))))


def latitude_of_mercator_y(y: float) -> float:
    """Latitude (degrees) of an EPSG:3857 northing (m)."""
    return math.degrees(math.atan(math.sinh(y / EARTH_RADIUS_M)))


def footprint(tile: mercantile.Tile, footprint_size_m: float) -> Footprint:
    """The model's square view of `footprint_size_m` ground metres centred on `tile`."""
    _check_footprint(footprint_size_m)
    left, bottom, right, top = tile_bounds(tile)
    centre_x, centre_y = (left + right) / 2.0, (bottom + top) / 2.0
    half = footprint_size_m * mercator_scale(latitude_of_mercator_y(centre_y)) / 2.0
    return Footprint(
        tile=tile,
        bounds=Bounds(centre_x - half, centre_y - half, centre_x + half, centre_y + half),
        gsd_m=footprint_size_m / MODEL_INPUT_PX,
    )


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


def cover(geometry: BaseGeometry, zoom: int, max_tiles: int | None = None) -> TileCover:
    """Tiles at `zoom` whose interior intersects the EPSG:4326 `geometry` (holes and gaps excluded).

    Descends from the zoom-0 tile, keeping tiles that touch the region's boundary and filling tiles that
    lie wholly inside it in one step, so the work grows with the boundary, not the area. Raises a
    `TooManyTilesError` ("more than N tiles at zoom Z"; callers name the region and the fix) as soon as more than
    `max_tiles` tiles are certain.
    """
    if not 0 <= zoom <= 30:
        raise TilingError(f"tile zoom {zoom} is outside 0..30; pick a coarser model view")
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
    filled = [_descendants(block_x, block_y, depth) for depth, block_x, block_y in inner_blocks]
    all_x = np.concatenate([x, *(block[0] for block in filled)])
    all_y = np.concatenate([y, *(block[1] for block in filled)])
    if max_tiles is not None and len(all_x) > max_tiles:
        raise TooManyTilesError(f"{len(all_x):,} tiles at zoom {zoom}, more than {max_tiles:,}")
    order = np.lexsort((all_x, all_y))
    return TileCover(zoom=zoom, x=all_x[order], y=all_y[order])


def _lnglat_boxes(x: np.ndarray, y: np.ndarray, zoom: int) -> np.ndarray:
    west, east = _tile_longitudes(x, zoom), _tile_longitudes(x + 1, zoom)
    north, south = _tile_latitudes(y, zoom), _tile_latitudes(y + 1, zoom)
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


def chunk_tiles(tile_cover: TileCover, chunk_zoom: int) -> list[mercantile.Tile]:
    """The parent tiles at `chunk_zoom` that hold at least one tile of the cover, row by row."""
    depth = _chunk_depth(tile_cover, chunk_zoom)
    parents = np.unique(np.column_stack((tile_cover.y >> depth, tile_cover.x >> depth)), axis=0)
    return [mercantile.Tile(int(x), int(y), chunk_zoom) for y, x in parents]


def _chunk_depth(tile_cover: TileCover, chunk_zoom: int) -> int:
    if not 0 <= chunk_zoom <= tile_cover.zoom:
        raise TilingError(
            f"chunk zoom {chunk_zoom} is outside 0..{tile_cover.zoom} (the output zoom); pick a coarser chunk zoom"
        )
    return tile_cover.zoom - chunk_zoom


class TileGridSampler:
    """Footprints of a region's output tiles, optionally only those inside one chunk (TorchGeo-style sampler).

    Its length is known before iterating; iteration yields `Footprint`s row by row.
    """

    def __init__(self, tile_cover: TileCover, footprint_size_m: float, chunk: mercantile.Tile | None = None) -> None:
        _check_footprint(footprint_size_m)
        x, y = tile_cover.x, tile_cover.y
        if chunk is not None:
            depth = _chunk_depth(tile_cover, chunk.z)
            inside = ((x >> depth) == chunk.x) & ((y >> depth) == chunk.y)
            x, y = x[inside], y[inside]
        self._zoom = tile_cover.zoom
        self._x, self._y = x, y
        self._footprint_size_m = footprint_size_m

    def __len__(self) -> int:
        return len(self._x)

    def __iter__(self) -> Iterator[Footprint]:
        for x, y in zip(self._x.tolist(), self._y.tolist(), strict=True):
            yield footprint(mercantile.Tile(x, y, self._zoom), self._footprint_size_m)


class RasterGrid(NamedTuple):
    """The tile-aligned EPSG:3857 raster that holds one pixel per output tile.

    For regions crossing the antimeridian `bounds.right` lies past the world's edge (x > 20037508.34 m)
    and columns continue across it.
    """

    width: int
    height: int
    bounds: Bounds


def raster_grid(tile_cover: TileCover) -> RasterGrid:
    """Smallest tile-aligned raster holding every tile of a non-empty cover, wrapping at the antimeridian."""
    if len(tile_cover) == 0:
        raise TilingError("the tile cover is empty; the region has no area at this zoom")
    world_columns = 2**tile_cover.zoom
    columns = np.unique(tile_cover.x)
    # The widest run of empty columns stays outside the raster; on a tie, the run across the antimeridian.
    steps = np.diff(columns, append=columns[0] + world_columns)
    widest = len(steps) - 1 if steps[-1] == steps.max() else int(np.argmax(steps))
    first_column = int(columns[(widest + 1) % len(columns)])
    width = world_columns - int(steps[widest]) + 1
    top_row, bottom_row = int(tile_cover.y.min()), int(tile_cover.y.max())
    left, _, _, top = tile_bounds(mercantile.Tile(first_column, top_row, tile_cover.zoom))
    size = EARTH_CIRCUMFERENCE_M / world_columns
    height = bottom_row - top_row + 1
    return RasterGrid(width, height, Bounds(left, top - height * size, left + width * size, top))


class RegionTiling(NamedTuple):
    """How a region is cut into output tiles and chunks for one model view."""

    footprint_size_m: float
    latitude: float
    auto_zoom: int
    cover: TileCover
    chunk_zoom: int
    chunks: list[mercantile.Tile]
    grid: RasterGrid

    @property
    def zoom(self) -> int:
        return self.cover.zoom


def tile_region(
    geometry: BaseGeometry,
    sat_type: str,
    zoom_level: int,
    *,
    zoom_offset: int = 0,
    chunk_zoom: int | None = None,
    max_tiles: int | None = None,
) -> RegionTiling:
    """Output tiles (the automatic zoom plus `zoom_offset`), chunks and raster grid of a region.

    A positive `zoom_offset` makes output tiles finer than the model's view, so neighbouring views overlap.
    """
    size_m = footprint_size_m(sat_type, zoom_level)
    latitude = region_latitude(geometry)
    auto_zoom = output_zoom(size_m, latitude)
    tile_cover = cover(geometry, auto_zoom + zoom_offset, max_tiles=max_tiles)
    chunk_zoom = default_chunk_zoom(tile_cover.zoom) if chunk_zoom is None else chunk_zoom
    chunks = chunk_tiles(tile_cover, chunk_zoom)
    return RegionTiling(size_m, latitude, auto_zoom, tile_cover, chunk_zoom, chunks, raster_grid(tile_cover))

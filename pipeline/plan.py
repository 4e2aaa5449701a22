"""What a map run will do before it does it: output tiles, chunks, imagery downloads and output raster size."""

from __future__ import annotations

import math
import re
from typing import NamedTuple, Protocol, runtime_checkable

import mercantile
from pyproj import Geod

from pipeline.errors import TooManyTilesError
from pipeline.geometry import (
    EARTH_RADIUS_M,
    MODEL_INPUT_PX,
    SOURCE_TILE_PX,
    WEB_MERCATOR,
    Bounds,
    RasterGrid,
    TileCover,
    TileGridSampler,
    ground_resolution_m,
    imagery_zoom,
    latitude_of_mercator_y,
    tile_ground_size_m,
    tile_region,
)
from pipeline.imagery.base import ImageryReader
from pipeline.regions import Region

DEFAULT_MAX_TILES = 250_000
# Above this many output tiles the imagery numbers are extrapolated from evenly spread chunks.
EXACT_IMAGERY_FOOTPRINTS = 100_000

_SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?)?b?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY_SIZE_UNITS = {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


@runtime_checkable
class TiledImagery(Protocol):
    """The planning surface of readers backed by a tile pyramid (XYZReader): what a read downloads."""

    max_zoom: int
    typical_tile_bytes: int

    def source_tiles(self, bounds: Bounds, zoom: int) -> list[mercantile.Tile]: ...

    def is_cached(self, tile: mercantile.Tile) -> bool: ...


class ImageryEstimate(NamedTuple):
    """Source tiles the footprints need; counts are extrapolated when `sampled_chunks` < `chunks`."""

    min_zoom: int
    max_zoom: int
    source_max_zoom: int
    tiles: int
    cached: int
    bytes_to_fetch: int
    sampled_chunks: int
    chunks: int

    @property
    def extrapolated(self) -> bool:
        return self.sampled_chunks < self.chunks


class Plan(NamedTuple):
    region: Region
    sat_type: str
    zoom_level: int
    footprint_size_m: float
    latitude: float
    tile_cover: TileCover
    chunk_zoom: int
    chunks: list[mercantile.Tile]
    grid: RasterGrid
    source_id: str
    attribution: str
    imagery: ImageryEstimate | None


def make_plan(
    region: Region,
    reader: ImageryReader,
    *,
    sat_type: str = "bingmap",
    zoom_level: int = 1,
    zoom_offset: int = 0,
    chunk_zoom: int | None = None,
    max_tiles: int | None = DEFAULT_MAX_TILES,
) -> Plan:
    """Tile a region for a model view and count what the run needs; `max_tiles=None` lifts the size limit."""
    try:
        tiling = tile_region(
            region.geometry, sat_type, zoom_level, zoom_offset=zoom_offset, chunk_zoom=chunk_zoom, max_tiles=max_tiles
        )
    except TooManyTilesError as exc:
        raise TooManyTilesError(
            f"region {region.name!r} needs {exc}; pick a smaller region or a larger --zoom-level,"
            " raise --max-tiles, or pass --allow-large"
        ) from None
    size_m, tile_cover, chunks = tiling.footprint_size_m, tiling.cover, tiling.chunks
    imagery = _estimate_imagery(reader, tile_cover, chunks, size_m) if isinstance(reader, TiledImagery) else None
    return Plan(
        region=region,
        sat_type=sat_type,
        zoom_level=zoom_level,
        footprint_size_m=size_m,
        latitude=tiling.latitude,
        tile_cover=tile_cover,
        chunk_zoom=tiling.chunk_zoom,
        chunks=chunks,
        grid=tiling.grid,
        source_id=reader.source_id,
        attribution=reader.attribution,
        imagery=imagery,
    )


def _estimate_imagery(
    reader: TiledImagery, tile_cover: TileCover, chunks: list[mercantile.Tile], size_m: float
) -> ImageryEstimate:
    step = max(1, math.ceil(len(tile_cover) / EXACT_IMAGERY_FOOTPRINTS))
    if step == 1:
        samplers = [TileGridSampler(tile_cover, size_m)]
    else:
        samplers = [TileGridSampler(tile_cover, size_m, chunk) for chunk in chunks[::step]]
    zoom_by_row: dict[int, int] = {}
    needed: set[mercantile.Tile] = set()
    sampled_footprints = 0
    for sampler in samplers:
        sampled_footprints += len(sampler)
        for view in sampler:
            zoom = zoom_by_row.get(view.tile.y)
            if zoom is None:
                centre_lat = latitude_of_mercator_y((view.bounds.bottom + view.bounds.top) / 2.0)
                zoom = min(imagery_zoom(size_m, centre_lat, SOURCE_TILE_PX), reader.max_zoom)
                zoom_by_row[view.tile.y] = zoom
            needed.update(reader.source_tiles(view.bounds, zoom))
    cached = sum(1 for tile in needed if reader.is_cached(tile))
    scale = len(tile_cover) / sampled_footprints
    tiles, cached = round(len(needed) * scale), round(cached * scale)
    return ImageryEstimate(
        min_zoom=min(zoom_by_row.values()),
        max_zoom=max(zoom_by_row.values()),
        source_max_zoom=reader.max_zoom,
        tiles=tiles,
        cached=cached,
        bytes_to_fetch=(tiles - cached) * reader.typical_tile_bytes,
        sampled_chunks=len(chunks) if step == 1 else len(samplers),
        chunks=len(chunks),
    )


def format_plan(plan: Plan, *, offline: bool = False) -> str:
    """A short human summary with units, one fact per line."""
    lat = plan.latitude
    area_m2 = abs(Geod(ellps="WGS84").geometry_area_perimeter(plan.region.geometry)[0])
    grid = plan.grid
    west, north = _mercator_to_lnglat(grid.bounds.left, grid.bounds.top)
    east, south = _mercator_to_lnglat(grid.bounds.right, grid.bounds.bottom)
    tile_ground_m = tile_ground_size_m(plan.tile_cover.zoom, lat)
    lines = [
        f"Region         {plan.region.name}: {_format_area(area_m2)} around latitude {_format_lat(lat)}",
        f"Model view     {plan.sat_type} zoom level {plan.zoom_level}: {_format_length(plan.footprint_size_m)}"
        f" squares, {plan.footprint_size_m / MODEL_INPUT_PX:.2f} m/px at {MODEL_INPUT_PX} px",
        f"Output tiles   {len(plan.tile_cover):,} at zoom {plan.tile_cover.zoom}",
        f"Chunks         {len(plan.chunks):,} at zoom {plan.chunk_zoom}"
        f" (up to {4 ** (plan.tile_cover.zoom - plan.chunk_zoom):,} tiles each)",
        f"Output raster  {grid.width:,} x {grid.height:,} px in {WEB_MERCATOR},"
        f" {_format_length(tile_ground_m)}/px true GSD at {_format_lat(lat)};"
        f" extent {_format_lon(west)} {_format_lat(south)} to {_format_lon(east)} {_format_lat(north)}",
    ]
    lines.extend(_format_imagery(plan, offline))
    lines.append(f"Attribution    {plan.attribution}")
    return "\n".join(lines)


def _format_imagery(plan: Plan, offline: bool) -> list[str]:
    if plan.imagery is None:
        return [f"Imagery        {plan.source_id}: read on demand, nothing to download up front"]
    imagery = plan.imagery
    zooms = (
        f"zoom {imagery.min_zoom}"
        if imagery.min_zoom == imagery.max_zoom
        else f"zooms {imagery.min_zoom}-{imagery.max_zoom}"
    )
    wanted_zoom = imagery_zoom(plan.footprint_size_m, plan.latitude, SOURCE_TILE_PX)
    gsd_m = ground_resolution_m(min(wanted_zoom, imagery.source_max_zoom), plan.latitude, SOURCE_TILE_PX)
    approx = "~" if imagery.extrapolated else ""
    missing = imagery.tiles - imagery.cached
    fetch = (
        f"{approx}{missing:,} missing (offline: read as no imagery)"
        if offline
        else f"{approx}{missing:,} to fetch, ~{format_bytes(imagery.bytes_to_fetch)}"
    )
    lines = [
        f"Imagery        {plan.source_id} at {zooms} ({gsd_m:.2f} m/px true GSD at {_format_lat(plan.latitude)}):"
        f" {approx}{imagery.tiles:,} tiles, {approx}{imagery.cached:,} cached, {fetch}"
    ]
    if imagery.extrapolated:
        lines.append(
            f"               (imagery counts extrapolated from {imagery.sampled_chunks} of {imagery.chunks} chunks)"
        )
    if wanted_zoom > imagery.source_max_zoom:
        lines.append(
            f"               (the source stops at zoom {imagery.source_max_zoom}: coarser than the model's"
            f" {plan.footprint_size_m / MODEL_INPUT_PX:.2f} m/px)"
        )
    return lines


def _mercator_to_lnglat(x: float, y: float) -> tuple[float, float]:
    lon = math.degrees(x / EARTH_RADIUS_M)
    return (lon + 180.0) % 360.0 - 180.0, latitude_of_mercator_y(y)


def _format_lat(lat: float) -> str:
    return f"{abs(lat):.4f}°{'N' if lat >= 0 else 'S'}"


def _format_lon(lon: float) -> str:
    return f"{abs(lon):.4f}°{'E' if lon >= 0 else 'W'}"


def _format_length(metres: float) -> str:
    return f"{metres / 1000:.1f} km" if metres >= 10_000 else f"{metres:,.0f} m"


def _format_area(square_metres: float) -> str:
    return f"{square_metres / 1e6:,.1f} km²" if square_metres >= 1e5 else f"{square_metres:,.0f} m²"


def format_bytes(count: int) -> str:
    """Decimal units (kB, MB, GB) as disks and downloads are sized."""
    value = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000.0:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000.0
    return f"{value:.1f} TB"


def parse_size(text: str) -> int:
    """Bytes in '2GB', '500 MB', '1.5GiB' or '1000000' (decimal units unless spelt with 'i')."""
    match = _SIZE_PATTERN.match(text)
    if match is None:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 2GB, 500MB or 1.5GiB")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    factor = _BINARY_SIZE_UNITS[unit] if unit.endswith("i") else _SIZE_UNITS[unit]
    return int(number * factor)

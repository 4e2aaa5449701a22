"""The plan of one map build (plan.json): region, zooms, output grid, chunks, imagery; and the tile math
that places a chunk's tiles in the grid.

Output tiles are `tile_zoom_offset` zooms finer than the zoom whose tiles match the model's footprint:
with an offset the model views of neighbouring tiles overlap, which gives a smoother map.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import mercantile
import numpy as np
import shapely
from shapely.geometry import mapping, shape

from common.atomic import atomic_path
from pipeline.config import TilingSettings
from pipeline.errors import TooManyTilesError
from pipeline.geometry import (
    EARTH_CIRCUMFERENCE_M,
    EARTH_RADIUS_M,
    WEB_MERCATOR,
    Bounds,
    Footprint,
    RasterGrid,
    TileCover,
    TileGridSampler,
    cover,
    latitude_of_mercator_y,
    tile_bounds,
    tile_region,
)
from pipeline.gsd import ImageryFit
from pipeline.regions import Region

PLAN_FORMAT = "sat2sound-maps/plan-v1"


class BuildPlan(NamedTuple):
    region: Region
    sat_type: str
    zoom_level: int
    footprint_size_m: float
    auto_tile_zoom: int
    tile_zoom: int
    chunk_zoom: int
    tile_count: int
    grid: RasterGrid
    chunks: tuple[str, ...]
    imagery: ImageryFit

    @property
    def first_column(self) -> int:
        """Tile column (x) at the grid's left edge."""
        tile_m = EARTH_CIRCUMFERENCE_M / 2**self.tile_zoom
        return round((self.grid.bounds.left + EARTH_CIRCUMFERENCE_M / 2.0) / tile_m) % 2**self.tile_zoom

    @property
    def top_row(self) -> int:
        """Tile row (y) at the grid's top edge."""
        tile_m = EARTH_CIRCUMFERENCE_M / 2**self.tile_zoom
        return round((EARTH_CIRCUMFERENCE_M / 2.0 - self.grid.bounds.top) / tile_m)


def chunk_id(tile: mercantile.Tile) -> str:
    return f"{tile.z}_{tile.x}_{tile.y}"


def chunk_tile(identifier: str) -> mercantile.Tile:
    z, x, y = (int(part) for part in identifier.split("_"))
    return mercantile.Tile(x, y, z)


def make_build_plan(
    region: Region, sat_type: str, zoom_level: int, settings: TilingSettings, imagery: ImageryFit
) -> BuildPlan:
    try:
        tiling = tile_region(
            region.geometry,
            sat_type,
            zoom_level,
            zoom_offset=settings.tile_zoom_offset,
            chunk_zoom=settings.chunk_zoom,
            max_tiles=settings.max_tiles,
        )
    except TooManyTilesError as exc:
        raise TooManyTilesError(
            f"{exc}; lower tiling.tile_zoom_offset, raise model.zoom_level or tiling.max_tiles, or map a smaller region"
        ) from None
    return BuildPlan(
        region=region,
        sat_type=sat_type,
        zoom_level=zoom_level,
        footprint_size_m=tiling.footprint_size_m,
        auto_tile_zoom=tiling.auto_zoom,
        tile_zoom=tiling.zoom,
        chunk_zoom=tiling.chunk_zoom,
        tile_count=len(tiling.cover),
        grid=tiling.grid,
        chunks=tuple(chunk_id(tile) for tile in tiling.chunks),
        imagery=imagery,
    )


def region_feature(region: Region) -> dict[str, Any]:
    """The region as a GeoJSON Feature (EPSG:4326)."""
    return {"type": "Feature", "properties": {"name": region.name}, "geometry": mapping(region.geometry)}


def write_plan(path: Path, plan: BuildPlan) -> None:
    grid = plan.grid
    payload = {
        "format": PLAN_FORMAT,
        "region": region_feature(plan.region),
        "sat_type": plan.sat_type,
        "zoom_level": plan.zoom_level,
        "footprint_size_m": plan.footprint_size_m,
        "auto_tile_zoom": plan.auto_tile_zoom,
        "tile_zoom": plan.tile_zoom,
        "chunk_zoom": plan.chunk_zoom,
        "tile_count": plan.tile_count,
        "grid": {
            "width": grid.width,
            "height": grid.height,
            "bounds": list(grid.bounds),
            "crs": WEB_MERCATOR,
        },
        "chunks": list(plan.chunks),
        "imagery": plan.imagery._asdict(),
    }
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=1))


def read_plan(path: Path) -> BuildPlan:
    payload = json.loads(path.read_text())
    grid = payload["grid"]
    feature = payload["region"]
    return BuildPlan(
        region=Region(feature["properties"]["name"], shape(feature["geometry"])),
        sat_type=payload["sat_type"],
        zoom_level=payload["zoom_level"],
        footprint_size_m=payload["footprint_size_m"],
        auto_tile_zoom=payload["auto_tile_zoom"],
        tile_zoom=payload["tile_zoom"],
        chunk_zoom=payload["chunk_zoom"],
        tile_count=payload["tile_count"],
        grid=RasterGrid(grid["width"], grid["height"], Bounds(*grid["bounds"])),
        chunks=tuple(payload["chunks"]),
        imagery=ImageryFit(**payload["imagery"]),
    )


def plan_cover(plan: BuildPlan) -> TileCover:
    """The plan's output tiles, recomputed from its region (deterministic, so every job agrees)."""
    shapely.prepare(plan.region.geometry)
    return cover(plan.region.geometry, plan.tile_zoom)


def chunk_footprints(plan: BuildPlan, tile_cover: TileCover, identifier: str) -> list[Footprint]:
    """Model views of the chunk's output tiles, row by row."""
    return list(TileGridSampler(tile_cover, plan.footprint_size_m, chunk_tile(identifier)))


def grid_index(plan: BuildPlan, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Grid rows and columns of output tiles x/y; columns continue across the antimeridian."""
    rows = np.asarray(y, dtype=np.int64) - plan.top_row
    columns = (np.asarray(x, dtype=np.int64) - plan.first_column) % 2**plan.tile_zoom
    return rows.astype(np.int32), columns.astype(np.int32)


def tile_centres_lnglat(tiles: list[mercantile.Tile]) -> tuple[np.ndarray, np.ndarray]:
    """Longitudes and latitudes (degrees) of the centres of `tiles` in Web Mercator."""
    bounds = np.array([tile_bounds(tile) for tile in tiles], dtype=np.float64).reshape(-1, 4)
    centre_x = (bounds[:, 0] + bounds[:, 2]) / 2.0
    centre_y = (bounds[:, 1] + bounds[:, 3]) / 2.0
    lon = np.degrees(centre_x / EARTH_RADIUS_M)
    lat = np.array([latitude_of_mercator_y(value) for value in centre_y])
    return lon, lat

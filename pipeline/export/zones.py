"""Zonal statistics: for each polygon of a zone file (districts, parks, planning zones) and each query, what the
build's tiles say inside it, as `zones.gpkg` for GIS users and `zones.csv` for spreadsheet users.

How a tile counts: by the ground area of the part of it inside the zone. Tiles are squares in the grid's CRS
(EPSG:3857), so the share of a tile inside the zone is computed exactly with shapely on the tile squares against
the zone reprojected there; that share of the tile's geodesic area (WGS84) is its weight. A tile wholly inside
weighs its whole area, one half inside half of it, and a zone smaller than one tile takes the values of the
tiles it lies on (slivers under a millionth of a tile, rounding along shared edges, do not count). Tiles without
a prediction (no imagery, outside the region) never count.

Per zone: `zone` (its name), `tiles` (valid tiles with a part inside), `area_km2` (the ground area of those
parts: what the statistics rest on) and `zone_km2` (the zone's own geodesic area); per query `<id>_mean` (mean
raw cosine), `<id>_max` (highest raw cosine of a tile with a part inside), `<id>_mean_percentile` (mean of the
store's percentile within the region) and `<id>_top_decile_pct` (the share, in %, of that area on tiles in the
region's top decile). Means and shares are weighted by area. A zone without a valid tile has null statistics.

Only zones that overlap the build's grid are written, in the file's order, with their whole outline in EPSG:4326.
How a zone file is read and named: `pipeline.zone_file`.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterator
from functools import cache, partial
from pathlib import Path
from typing import NamedTuple

import geopandas as gpd
import numpy as np
import shapely
from pyogrio.errors import DataSourceError
from pyproj import Transformer
from rasterio.windows import Window
from shapely.geometry import box
from shapely.geometry.base import BaseGeometry

from common.atomic import atomic_path
from pipeline.config import OutputSettings
from pipeline.errors import ExportError
from pipeline.export.cog import windows
from pipeline.export.places import CSV_ENCODING, PLACES_CRS, grid_xy, tile_boxes, write_layers
from pipeline.geometry import lnglat_of_mercator
from pipeline.regions import ground_area_m2
from pipeline.store.read import SoundscapeStore, StoreGrid
from pipeline.zone_file import read_zones

ZONES_LAYER = "zones"
ZONES_CRS = PLACES_CRS
STATISTICS = ("mean", "max", "mean_percentile", "top_decile_pct")
CSV_FORMATS = {
    "area_km2": "{:.4f}",
    "zone_km2": "{:.4f}",
    "mean": "{:.6f}",
    "max": "{:.6f}",
    "mean_percentile": "{:.2f}",
    "top_decile_pct": "{:.2f}",
}
# A tile is in the region's top decile when its percentile is above 90: the percentile maps' "top 10 %" classes.
TOP_DECILE_ABOVE = 90.0
# A tile counts when at least this share of it lies inside a zone: a zone drawn along tile edges meets its
# neighbours in slivers of rounding error once reprojected.
MIN_SHARE = 1e-6
# The zone file's bounds around the grid are widened by this share on each side, so that no edge of a projected
# zone file's CRS, curved against the grid's, cuts a zone short.
CLIP_MARGIN = 0.05


class ZoneSums(NamedTuple):
    """What one zone's statistics are made of: per query, the area-weighted sums and the maximum."""

    tiles: int
    area_m2: float
    score: np.ndarray  # (Q,) sum of area x raw cosine
    percentile: np.ndarray  # (Q,) sum of area x percentile
    top_decile: np.ndarray  # (Q,) area on tiles in the top decile
    maximum: np.ndarray  # (Q,) highest raw cosine, NaN without tiles

    @classmethod
    def none(cls, queries: int) -> ZoneSums:
        zeros = np.zeros(queries)
        return cls(0, 0.0, zeros, zeros, zeros, np.full(queries, np.nan))

    def added(self, other: ZoneSums) -> ZoneSums:
        return ZoneSums(
            self.tiles + other.tiles,
            self.area_m2 + other.area_m2,
            self.score + other.score,
            self.percentile + other.percentile,
            self.top_decile + other.top_decile,
            np.fmax(self.maximum, other.maximum),
        )

    def statistics(self) -> dict[str, np.ndarray]:
        """Per statistic of STATISTICS, its (Q,) values: NaN (null) for a zone without a valid tile."""
        if self.tiles == 0:
            empty = np.full(len(self.score), np.nan)
            return dict.fromkeys(STATISTICS, empty)
        return {
            "mean": self.score / self.area_m2,
            "max": self.maximum,
            "mean_percentile": self.percentile / self.area_m2,
            "top_decile_pct": 100.0 * self.top_decile / self.area_m2,
        }


def zone_statistics(store: Path, outputs: OutputSettings) -> gpd.GeoDataFrame:
    """One row per zone that overlaps the build's grid: its name, tile count, areas and every query's
    statistics (see the module's note), with its outline in EPSG:4326."""
    soundscape = SoundscapeStore(store)
    zones = read_zones(outputs)
    in_grid = _in_grid(zones, soundscape.grid)
    overlapping = shapely.area(in_grid) > 0
    if not overlapping.any():
        raise ExportError(f"no zone of {outputs.zones} overlaps the build's grid; give zones of the region")
    zones, in_grid = zones[overlapping].reset_index(drop=True), in_grid[overlapping]
    # A tile's ground area depends on its grid row alone: each row's is computed once for all zones.
    tile_m2 = cache(partial(_tile_ground_m2, soundscape.grid))
    sums = [_zone_sums(soundscape, zone, tile_m2) for zone in in_grid]
    outlines = zones.to_crs(ZONES_CRS)
    columns: dict[str, object] = {
        "zone": zones["zone"],
        "tiles": [zone.tiles for zone in sums],
        "area_km2": [zone.area_m2 / 1e6 for zone in sums],
        "zone_km2": [ground_area_m2(outline) / 1e6 for outline in outlines.geometry],
    }
    statistics = [zone.statistics() for zone in sums]
    for index, query in enumerate(soundscape.queries):
        for name in STATISTICS:
            columns[f"{query.id}_{name}"] = [values[name][index] for values in statistics]
    return gpd.GeoDataFrame(columns, geometry=outlines.geometry.to_numpy(), crs=ZONES_CRS)


def _in_grid(zones: gpd.GeoDataFrame, grid: StoreGrid) -> np.ndarray:
    """Each zone's part inside the grid, in the grid's CRS. The zones are first cut to the grid's bounds (with a
    margin) in their own CRS, so that parts far away (polar ones) never go through Web Mercator."""
    left, bottom, right, top = Transformer.from_crs(grid.crs, zones.crs, always_xy=True).transform_bounds(
        *grid.bounds, densify_pts=21
    )
    margin_x, margin_y = CLIP_MARGIN * (right - left), CLIP_MARGIN * (top - bottom)
    near = shapely.box(left - margin_x, bottom - margin_y, right + margin_x, top + margin_y)
    cut = gpd.GeoSeries(shapely.intersection(zones.geometry.to_numpy(), near), crs=zones.crs)
    return np.asarray(shapely.intersection(cut.to_crs(grid.crs).to_numpy(), shapely.box(*grid.bounds)))


def _zone_sums(soundscape: SoundscapeStore, zone: BaseGeometry, tile_m2: Callable[[int], float]) -> ZoneSums:
    """The sums of one zone (in the grid's CRS, inside the grid), over the windows of the grid it lies in."""
    total = ZoneSums.none(len(soundscape.queries))
    shapely.prepare(zone)
    for window in _zone_windows(soundscape.grid, zone):
        total = total.added(_window_sums(soundscape, zone, window, tile_m2))
    return total


def _zone_windows(grid: StoreGrid, zone: BaseGeometry) -> Iterator[Window]:
    """The store's read windows (`cog.windows`) cut to the rows and columns of the zone's bounds."""
    left, bottom, right, top = zone.bounds
    inverse = ~grid.transform
    first_col, first_row = inverse @ (left, top)
    last_col, last_row = inverse @ (right, bottom)
    rows = (max(0, math.floor(first_row)), min(grid.height, math.ceil(last_row)))
    cols = (max(0, math.floor(first_col)), min(grid.width, math.ceil(last_col)))
    span = Window(cols[0], rows[0], cols[1] - cols[0], rows[1] - rows[0])
    for window in windows(grid):
        if span.width > 0 and span.height > 0 and _overlaps(window, span):
            yield window.intersection(span)


def _overlaps(one: Window, other: Window) -> bool:
    return (
        one.col_off < other.col_off + other.width
        and other.col_off < one.col_off + one.width
        and one.row_off < other.row_off + other.height
        and other.row_off < one.row_off + one.height
    )


def _window_sums(
    soundscape: SoundscapeStore, zone: BaseGeometry, window: Window, tile_m2: Callable[[int], float]
) -> ZoneSums:
    grid = soundscape.grid
    rows, cols = window.toslices()
    row, col = np.nonzero(soundscape.valid(rows, cols))
    area = _area_inside(grid, zone, row + window.row_off, col + window.col_off, tile_m2)
    inside = area > 0
    row, col, area = row[inside], col[inside], area[inside]
    if len(area) == 0:
        return ZoneSums.none(len(soundscape.queries))
    queries = range(len(soundscape.queries))
    score = np.stack([soundscape.scores("score", query, rows, cols)[row, col] for query in queries])
    percentile = np.stack([soundscape.scores("score_percentile", query, rows, cols)[row, col] for query in queries])
    return ZoneSums(
        len(area),
        float(area.sum()),
        score.astype(np.float64) @ area,
        percentile.astype(np.float64) @ area,
        (percentile > TOP_DECILE_ABOVE) @ area,
        score.max(axis=1).astype(np.float64),
    )


def _area_inside(
    grid: StoreGrid, zone: BaseGeometry, rows: np.ndarray, cols: np.ndarray, tile_m2: Callable[[int], float]
) -> np.ndarray:
    """The ground area (m²) of the part of each tile inside the zone: its share of the tile, exact in the grid's
    CRS, times the tile's ground area (`tile_m2` of its grid row: all tiles of a row have the same)."""
    boxes = tile_boxes(grid, rows, cols)
    share = shapely.covers(zone, boxes).astype(np.float64)
    edge = (share == 0) & shapely.intersects(zone, boxes)
    share[edge] = shapely.area(shapely.intersection(boxes[edge], zone)) / shapely.area(boxes[edge])
    share[share < MIN_SHARE] = 0.0
    grid_rows, position = np.unique(rows, return_inverse=True)
    return share * np.array([tile_m2(int(row)) for row in grid_rows])[position]


def _tile_ground_m2(grid: StoreGrid, row: int) -> float:
    """The ground area of a tile of grid row `row`: its edges are meridians and parallels, so its corners give
    its outline in lon/lat."""
    lon, lat = lnglat_of_mercator(*grid_xy(grid, np.array([row, row + 1]), np.array([0, 1])))
    return ground_area_m2(box(lon.min(), lat.min(), lon.max(), lat.max()))


def write_zones(store: Path, outputs: OutputSettings, gpkg: Path, csv_path: Path) -> int:
    """Write `gpkg` (layer `zones`) and `csv_path` (the same rows without geometry); returns the zones written."""
    table = zone_statistics(store, outputs)
    try:
        write_layers(gpkg, {ZONES_LAYER: table})
        _write_csv(csv_path, table)
    except (OSError, DataSourceError) as exc:
        raise ExportError(f"cannot write the zone statistics ({exc}); check that the build folder is writable") from exc
    return len(table)


def _write_csv(path: Path, table: gpd.GeoDataFrame) -> None:
    columns = [str(column) for column in table.columns if column != table.geometry.name]
    with atomic_path(path) as tmp, tmp.open("w", encoding=CSV_ENCODING, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for record in table[columns].itertuples(index=False):
            writer.writerow(_csv_value(column, value) for column, value in zip(columns, record, strict=True))


def _csv_value(column: str, value: object) -> object:
    """A cell as text: statistics and areas in their format, null statistics empty."""
    template = next((text for name, text in CSV_FORMATS.items() if column.endswith(f"_{name}") or column == name), None)
    if isinstance(value, float) and math.isnan(value):
        return ""
    return value if template is None else template.format(value)

"""The best places for each query, from a build's `soundscape.zarr`: `top_places.gpkg` for GIS users and
`top_places.csv` for spreadsheet users.

For each query, its `top_k` valid tiles with the highest raw cosine (ties: the northern, then the western tile
first), each with its rank (1 = best), score, percentile (the store's `score_percentile`, not recomputed), the
lon/lat of its centre and the area it belongs to. A store of several times gives the places of its first time
(as `dominant.tif` shows that time). Tiles of one query's top k that share an edge make one area
(tiles touching at a corner only do not): its dissolved outline, its tile count, its size in km² (geodesic), and
the rank, score, percentile and centre of its best tile. Areas are numbered by their best tile's rank.

The GeoPackage holds two layers per query, `<id>_places` (one tile polygon per place) and `<id>_areas`, rather
than one layer with a query column: QGIS offers each layer by name when the file is dropped in, each is toggled,
styled and labelled on its own, and places of different queries on the same tile do not hide one another. With
a suffix on both layers no two queries' layers can share a name. Geometries are in EPSG:4326 (GeoPackage's and
web maps' usual CRS, the CRS of the lon/lat columns; QGIS reprojects on the fly): the edges of a Web Mercator
tile are a meridian and a parallel, so its corners give its exact outline in lon/lat, and so do a dissolved
area's. The CSV holds every query's places, one row each, in UTF-8 with a byte order mark so that spreadsheet
programs read accented query texts right.
"""

from __future__ import annotations

import csv
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import geopandas as gpd
import numpy as np
import shapely
from pyogrio.errors import DataSourceError
from pyproj import Transformer

from common.atomic import atomic_path
from pipeline.config import Query
from pipeline.errors import ExportError
from pipeline.export.cog import windows
from pipeline.geometry import WGS84
from pipeline.regions import ground_area_m2
from pipeline.store.read import SoundscapeStore, StoreGrid

PLACES_CRS = WGS84
PLACES_LAYER = "{query}_places"
AREAS_LAYER = "{query}_areas"
# GDAL's GPKG driver warns of a GeoPackage named otherwise.
GPKG_SUFFIX = ".gpkg"
CSV_COLUMNS = ("query", "query_text", "rank", "score", "percentile", "lon", "lat", "area")
CSV_FORMATS = {"score": "{:.6f}", "percentile": "{:.2f}", "lon": "{:.6f}", "lat": "{:.6f}"}
# Excel takes a UTF-8 file without the byte order mark for its local code page.
CSV_ENCODING = "utf-8-sig"
# The four tiles that share an edge with a tile, as (row, col) steps.
EDGE_NEIGHBOURS = ((-1, 0), (1, 0), (0, -1), (0, 1))


class Candidates(NamedTuple):
    """Tiles of one query: raw cosine, grid row and column, and the store's percentile."""

    score: np.ndarray
    row: np.ndarray
    col: np.ndarray
    percentile: np.ndarray

    @classmethod
    def none(cls) -> Candidates:
        return cls(np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))

    def best(self, k: int) -> Candidates:
        """The k best, best first: highest score, then northernmost, then westernmost."""
        order = np.lexsort((self.col, self.row, -self.score))[:k]
        return Candidates(*(field[order] for field in self))

    def merged(self, other: Candidates, k: int) -> Candidates:
        return Candidates(*(np.concatenate(pair) for pair in zip(self, other, strict=True))).best(k)


def top_places(store: Path, top_k: int) -> dict[str, tuple[gpd.GeoDataFrame, gpd.GeoDataFrame]]:
    """For each query id, its places and its areas (GeoDataFrames in EPSG:4326), best first."""
    soundscape = SoundscapeStore(store)
    return {
        query.id: place_layers(soundscape.grid, query, best)
        for query, best in zip(soundscape.queries, best_tiles(soundscape, top_k), strict=True)
    }


def place_layers(grid: StoreGrid, query: Query, best: Candidates) -> tuple[gpd.GeoDataFrame, gpd.GeoDataFrame]:
    """A query's places and areas (EPSG:4326) from its best tiles in rank order (`Candidates.best`)."""
    if len(best.score) == 0:
        raise ExportError("the store has no valid tile; check that the imagery covers the region")
    to_lnglat = Transformer.from_crs(grid.crs, PLACES_CRS, always_xy=True)
    areas = contiguous_areas(best.row, best.col)
    tiles = tile_boxes(grid, best.row, best.col)
    centre_x, centre_y = grid_xy(grid, best.row + 0.5, best.col + 0.5)
    lon, lat = to_lnglat.transform(centre_x, centre_y)
    places = gpd.GeoDataFrame(
        {
            "query": query.id,
            "query_text": query.label,
            "rank": np.arange(1, len(best.score) + 1),
            "score": best.score.astype(np.float64),
            "percentile": best.percentile.astype(np.float64),
            "lon": lon,
            "lat": lat,
            "area": areas,
        },
        geometry=_to_lnglat(tiles, to_lnglat),
        crs=PLACES_CRS,
    )
    return places, _dissolve(places, tiles, to_lnglat)


def best_tiles(soundscape: SoundscapeStore, k: int) -> list[Candidates]:
    """Each query's k best valid tiles, reading the store one query's window at a time (memory stays flat)."""
    kept = [Candidates.none() for _ in soundscape.queries]
    for window in windows(soundscape.grid):
        rows, cols = window.toslices()
        for query in range(len(kept)):
            score = soundscape.scores("score", query, rows, cols)
            row, col = np.nonzero(_at_least_kth(score, k))
            percentile = soundscape.scores("score_percentile", query, rows, cols)[row, col]
            found = Candidates(score[row, col], row + window.row_off, col + window.col_off, percentile)
            kept[query] = kept[query].merged(found, k)
    return kept


def _at_least_kth(scores: np.ndarray, k: int) -> np.ndarray:
    """Where the finite scores are at least the k-th highest (ties included); the rest cannot be among the k best."""
    finite = np.isfinite(scores)
    values = scores[finite]
    if len(values) <= k:
        return finite
    return finite & (scores >= np.partition(values, len(values) - k)[len(values) - k])


def contiguous_areas(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Area numbers (1, 2, ...) of tiles given in rank order: tiles sharing an edge, directly or through other
    tiles of the set, share an area; areas are numbered by their best tile."""
    position = {(int(row), int(col)): index for index, (row, col) in enumerate(zip(rows, cols, strict=True))}
    areas = np.zeros(len(rows), np.int64)
    count = 0
    for start in range(len(rows)):
        if areas[start]:
            continue
        count += 1
        areas[start] = count
        stack = [start]
        while stack:
            tile = stack.pop()
            for step_row, step_col in EDGE_NEIGHBOURS:
                neighbour = position.get((int(rows[tile]) + step_row, int(cols[tile]) + step_col))
                if neighbour is not None and not areas[neighbour]:
                    areas[neighbour] = count
                    stack.append(neighbour)
    return areas


def tile_boxes(grid: StoreGrid, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The tiles' squares in the grid's CRS."""
    left, top = grid_xy(grid, rows, cols)
    right, bottom = grid_xy(grid, rows + 1, cols + 1)
    return np.asarray(shapely.box(left, bottom, right, top))


def grid_xy(grid: StoreGrid, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The grid's CRS coordinates of (fractional) pixel positions; (row, col) is a pixel's top-left corner."""
    transform = grid.transform
    return (
        transform.a * cols + transform.b * rows + transform.c,
        transform.d * cols + transform.e * rows + transform.f,
    )


def _to_lnglat(geometries: np.ndarray, to_lnglat: Transformer) -> np.ndarray:
    return np.asarray(shapely.transform(geometries, lambda xy: np.column_stack(to_lnglat.transform(*xy.T))))


def _dissolve(places: gpd.GeoDataFrame, tiles: np.ndarray, to_lnglat: Transformer) -> gpd.GeoDataFrame:
    """One row per area: the union of its tiles (in the grid's CRS, where they meet exactly) and its best tile."""
    numbers = places["area"].to_numpy()
    # Places are in rank order, so an area's first place is its best.
    best = places.drop_duplicates("area").reset_index(drop=True)
    outlines = _to_lnglat(np.array([shapely.union_all(tiles[numbers == area]) for area in best["area"]]), to_lnglat)
    return gpd.GeoDataFrame(
        {
            "query": best["query"],
            "query_text": best["query_text"],
            "area": best["area"],
            "tiles": np.bincount(numbers)[best["area"]],
            "area_km2": [ground_area_m2(outline) / 1e6 for outline in outlines],
            "best_rank": best["rank"],
            "best_score": best["score"],
            "best_percentile": best["percentile"],
            "lon": best["lon"],
            "lat": best["lat"],
        },
        geometry=outlines,
        crs=PLACES_CRS,
    )


def write_top_places(store: Path, top_k: int, gpkg: Path, csv_path: Path) -> int:
    """Write `gpkg` (layers `<id>_places` and `<id>_areas` per query) and `csv_path`; returns the places written."""
    layers = top_places(store, top_k)
    write_places(layers, gpkg, csv_path)
    return sum(len(places) for places, _ in layers.values())


def write_places(
    layers: Mapping[str, tuple[gpd.GeoDataFrame, gpd.GeoDataFrame]], gpkg: Path | None, csv_path: Path | None
) -> None:
    """Write each query's places and areas (`place_layers`) into a GeoPackage and/or its places into a CSV."""
    try:
        if gpkg is not None:
            tables = {
                template.format(query=query_id): table
                for query_id, pair in layers.items()
                for template, table in zip((PLACES_LAYER, AREAS_LAYER), pair, strict=True)
            }
            write_layers(gpkg, tables)
        if csv_path is not None:
            _write_csv(csv_path, [places for places, _ in layers.values()])
    except (OSError, DataSourceError) as exc:
        raise ExportError(f"cannot write the top places ({exc}); check that the build folder is writable") from exc


def write_layers(gpkg: Path, layers: Mapping[str, gpd.GeoDataFrame]) -> None:
    """A GeoPackage of the named layers, in their order, written atomically."""
    gpkg.parent.mkdir(parents=True, exist_ok=True)
    # GDAL wants a GeoPackage named *.gpkg: it is made in a scratch folder, then renamed into place.
    with tempfile.TemporaryDirectory(dir=gpkg.parent, prefix=f".{gpkg.stem}-") as scratch:
        staged = Path(scratch) / gpkg.name
        for name, table in layers.items():
            table.to_file(staged, layer=name, driver="GPKG")
        with atomic_path(gpkg) as tmp:
            staged.replace(tmp)


def _write_csv(path: Path, tables: Sequence[gpd.GeoDataFrame]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", encoding=CSV_ENCODING, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for table in tables:
            for record in table[list(CSV_COLUMNS)].itertuples(index=False):
                writer.writerow(
                    CSV_FORMATS[column].format(value) if column in CSV_FORMATS else value
                    for column, value in zip(CSV_COLUMNS, record, strict=True)
                )

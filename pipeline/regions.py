"""Turn a region specification (file, bbox, point + radius or catalog name) into a clean EPSG:4326 polygon.

Every region leaves here valid, polygonal, within the Web Mercator latitude limit and, where it
crosses the antimeridian, split into parts on either side of ±180°; each change is reported with a
`RegionWarning`, and each unusable input raises a one-line `RegionError`.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import unicodedata
import warnings
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import shapely
from pyproj import CRS, Geod, Transformer
from shapely.affinity import translate
from shapely.errors import GEOSException
from shapely.geometry import MultiPolygon, Polygon, box
from shapely.geometry.base import BaseGeometry, BaseMultipartGeometry
from shapely.geometry.polygon import orient

from common.errors import first_line
from pipeline.errors import RegionError, RegionWarning
from pipeline.geometry import WGS84

if TYPE_CHECKING:
    import geopandas as gpd

REGIONS_DIR = Path(__file__).resolve().parents[1] / "regions"
CATALOG_FILES = ("countries.geojson", "cities.geojson")

# Latitude at which the square Web Mercator world ends: atan(sinh(pi)).
WEB_MERCATOR_MAX_LAT = math.degrees(math.atan(math.sinh(math.pi)))
MAX_RADIUS_M = 2_000_000.0
CIRCLE_QUAD_SEGMENTS = 32
BBOX_EDGE_DEG = 1.0
VECTOR_SUFFIXES = frozenset({".geojson", ".json", ".gpkg", ".shp", ".parquet", ".geoparquet", ".fgb", ".kml", ".zip"})
PARQUET_SUFFIXES = frozenset({".parquet", ".geoparquet"})
JSON_SUFFIXES = frozenset({".geojson", ".json"})
RING_FIX = "close every ring: at least 4 points, the last one repeating the first"
# Beyond this magnitude a geographic file's coordinates look like metres or feet; closer, like a typo in degrees.
PROJECTED_MAGNITUDE = 1000.0
_GEOD = Geod(ellps="WGS84")

BBOX_LAYOUT = "minlon,minlat,maxlon,maxlat"
POINT_LAYOUT = "lat,lon,RADIUS (e.g. 38.627,-90.199,3km)"

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)"
_BBOX_PATTERN = re.compile(rf"^\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*$")
_POINT_PATTERN = re.compile(rf"^\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*(km|m)\s*$", re.IGNORECASE)


class Region(NamedTuple):
    """A named area to map: a valid (Multi)Polygon in EPSG:4326, split at ±180° when it crosses it."""

    name: str
    geometry: Polygon | MultiPolygon

    @property
    def area_m2(self) -> float:
        return ground_area_m2(self.geometry)


def ground_area_m2(geometry: BaseGeometry) -> float:
    """Ground area (m²) of a lon/lat (Multi)Polygon: each polygon's geodesic area, taken in halves either side of
    the prime meridian (a ring around the whole band would otherwise leave it unclear which side it encloses) and
    with edges of at most 1°, so that they follow the parallels and meridians it is drawn with, not geodesics."""
    area = 0.0
    for west in (-180.0, 0.0):
        half = geometry.intersection(box(west, -90.0, west + 180.0, 90.0))
        for polygon in polygon_parts(shapely.segmentize(half, max_segment_length=1.0)):
            area += _GEOD.geometry_area_perimeter(orient(polygon))[0]
    return area


def parse_region(spec: str) -> Region:
    """Read a region from a vector file path, `minlon,minlat,maxlon,maxlat`, `lat,lon,3km` or a catalog name.

    A bbox runs east from its west edge: west > east crosses the antimeridian (as in RFC 7946), and
    -180,S,180,N is the whole band of latitudes.
    """
    spec = spec.strip()
    if not spec:
        raise RegionError(f"empty region; give a file, a bbox {BBOX_LAYOUT}, a point {POINT_LAYOUT} or a name")
    if bbox_match := _BBOX_PATTERN.match(spec):
        west, south, east, north = (float(value) for value in bbox_match.groups())
        return _finish(spec, _bbox_geometry(west, south, east, north))
    if point_match := _POINT_PATTERN.match(spec):
        lat, lon, radius = (float(value) for value in point_match.groups()[:3])
        radius_m = radius * 1000.0 if point_match.group(4).lower() == "km" else radius
        return _finish(spec, _circle_geometry(lat, lon, radius_m))
    if _looks_like_path(spec):
        path = Path(spec).expanduser()
        return _finish(path.stem, _read_vector_file(path))
    if "," in spec:
        raise RegionError(f"cannot read {spec!r} as a bbox {BBOX_LAYOUT} or a point {POINT_LAYOUT}")
    return _catalog_region(spec)


def catalog_names() -> list[str]:
    """Names (countries, then example cities) that `parse_region` accepts, in catalog order."""
    return [entry.name for entry in _catalog_entries()]


def _looks_like_path(spec: str) -> bool:
    path = Path(spec).expanduser()
    return path.suffix.lower() in VECTOR_SUFFIXES or "/" in spec or "\\" in spec or path.exists()


def _check_latitude(lat: float, what: str, layout: str) -> None:
    if not -90.0 <= lat <= 90.0:
        raise RegionError(f"{what} latitude {lat:g} is out of range -90..90; write {layout}")


def _check_longitude(lon: float, what: str, layout: str) -> None:
    if not -180.0 <= lon <= 180.0:
        raise RegionError(f"{what} longitude {lon:g} is out of range -180..180; write {layout}")


def _bbox_geometry(west: float, south: float, east: float, north: float) -> BaseGeometry:
    for lat, what in ((south, "bbox south"), (north, "bbox north")):
        _check_latitude(lat, what, BBOX_LAYOUT)
    for lon, what in ((west, "bbox west"), (east, "bbox east")):
        _check_longitude(lon, what, BBOX_LAYOUT)
    if south >= north:
        raise RegionError(f"inverted bbox: south {south:g} is not below north {north:g}; write {BBOX_LAYOUT}")
    if west == east or (west, east) == (180.0, -180.0):
        raise RegionError(f"bbox has zero width (west {west:g}, east {east:g}); write {BBOX_LAYOUT}")
    if west > east:
        warnings.warn(
            f"bbox west {west:g} > east {east:g}: reading it as crossing the antimeridian (RFC 7946)",
            RegionWarning,
            stacklevel=2,
        )
        east += 360.0
    # Edges of at most BBOX_EDGE_DEG: a ring edge longer than 180° would read as one across the antimeridian
    # (`_unwrap_polygon`), and the geodesic area of the plan's summary follows the parallels.
    return shapely.segmentize(box(west, south, east, north), BBOX_EDGE_DEG)


def _circle_geometry(lat: float, lon: float, radius_m: float) -> BaseGeometry:
    _check_latitude(lat, "point", POINT_LAYOUT)
    _check_longitude(lon, "point", POINT_LAYOUT)
    if not 0.0 < radius_m <= MAX_RADIUS_M:
        raise RegionError(
            f"radius {radius_m / 1000:g} km is out of range; give 0 < radius <= {MAX_RADIUS_M / 1000:g}km"
            " (use a bbox or a file for larger areas)"
        )
    if _distance_to_nearest_pole_m(lat) <= radius_m:
        raise RegionError(f"the {radius_m / 1000:g} km circle around {lat:g},{lon:g} contains a pole; use a bbox")
    # A circle is round on the ground, so draw it in an azimuthal equidistant projection centred on the point.
    local = CRS.from_proj4(f"+proj=aeqd +lat_0={lat} +lon_0={lon} +datum=WGS84 +units=m")
    circle = shapely.Point(0.0, 0.0).buffer(radius_m, quad_segs=CIRCLE_QUAD_SEGMENTS)
    to_lonlat = Transformer.from_crs(local, WGS84, always_xy=True)
    return shapely.transform(circle, lambda xy: np.column_stack(to_lonlat.transform(xy[:, 0], xy[:, 1])))


def _distance_to_nearest_pole_m(lat: float) -> float:
    pole_lat = 90.0 if lat >= 0 else -90.0
    return float(_GEOD.inv(0.0, lat, 0.0, pole_lat)[2])


class UnusableFeaturesError(ValueError):
    """A vector file that reads but cannot be used as it is: the message says what it holds and the fix, to follow
    the file's name."""


def read_features(path: Path) -> gpd.GeoDataFrame:
    """The features of a vector file of one layer (GeoParquet by its suffix). A table without geometry, such as
    a CSV, raises ValueError, as other files that are no vector data do; several layers or a NaN or infinite
    coordinate raise UnusableFeaturesError."""
    # Imported where files are read: jobs that only carry a plan's region do not load geopandas (~0.9 s).
    import geopandas as gpd
    import pyogrio

    parquet = path.suffix.lower() in PARQUET_SUFFIXES
    layers = [] if parquet else pyogrio.list_layers(path)[:, 0].tolist()
    if len(layers) > 1:
        raise UnusableFeaturesError(
            f"holds {len(layers)} layers ({', '.join(layers)}) where one is read; save the layer you want alone"
            f" (ogr2ogr OUT.gpkg {path.name} LAYER)"
        )
    with warnings.catch_warnings():
        # Shapely's warning on decoding a NaN coordinate; the feature that holds it is named below.
        warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
        frame = gpd.read_parquet(path) if parquet else gpd.read_file(path)
    if not isinstance(frame, gpd.GeoDataFrame):
        raise ValueError("it holds no geometry column")
    _check_finite(frame.geometry.to_numpy())
    return frame


def _check_finite(geometries: np.ndarray) -> None:
    coordinates, owners = shapely.get_coordinates(geometries, return_index=True)
    bad = owners[~np.isfinite(coordinates).all(axis=1)]
    if bad.size:
        raise UnusableFeaturesError(f"has NaN or infinite coordinates (feature {bad[0] + 1}); fix or remove them")


def _read_vector_file(path: Path) -> BaseGeometry:
    from pyogrio.errors import DataLayerError, DataSourceError

    if not path.exists():
        raise RegionError(f"region file {path} does not exist; check the path")
    try:
        with warnings.catch_warnings():
            # GDAL's warning suggests a GDAL option; the GEOSException that follows gets a line saying what to fix.
            warnings.filterwarnings("ignore", "Non closed ring detected", RuntimeWarning)
            frame = read_features(path)
    except UnusableFeaturesError as exc:
        raise RegionError(f"region file {path} {exc}") from None
    except ImportError:
        raise RegionError(f"reading {path.name} needs pyarrow; install it with 'pip install pyarrow'") from None
    except GEOSException as exc:
        # Raised while the geometries are decoded: a ring that is not closed or has too few points.
        raise RegionError(f"region file {path} holds a malformed polygon ({first_line(exc)}); {RING_FIX}") from None
    except (DataSourceError, DataLayerError, ValueError, OSError) as exc:
        raise RegionError(_unreadable_message(path, exc)) from None
    shapes = frame.geometry.to_numpy()
    if not (shapely.is_geometry(shapes) & ~shapely.is_empty(shapes)).any():
        raise RegionError(f"region file {path} holds no geometries; draw a polygon into it")
    rings = shapely.get_rings(shapely.get_parts(shapes))
    if (shapely.get_num_coordinates(rings) < 4).any():
        raise RegionError(f"region file {path} holds a polygon ring of fewer than 4 points; {RING_FIX}")
    try:
        return shapely.union_all(_repaired_polygons(_in_wgs84(frame, path).geometry.to_numpy(), path.name))
    except UnusableFeaturesError as exc:
        raise RegionError(f"region file {path} {exc}") from None


def _unreadable_message(path: Path, exc: Exception) -> str:
    if path.suffix.lower() in JSON_SUFFIXES:
        try:
            json.loads(path.read_bytes())
        except json.JSONDecodeError as bad:
            return (
                f"region file {path} is not valid JSON ({bad.msg} at line {bad.lineno} column {bad.colno});"
                " fix it or export the region again as GeoJSON"
            )
        except (OSError, UnicodeDecodeError):
            pass
    return (
        f"cannot read {path} as vector data ({first_line(exc)});"
        " give a GeoJSON, GeoPackage, Shapefile or GeoParquet file"
    )


def _in_wgs84(frame: gpd.GeoDataFrame, path: Path) -> gpd.GeoDataFrame:
    """The file's geometries in EPSG:4326; coordinates without a CRS or in a geographic one must be lon/lat."""
    if frame.crs is not None and not frame.crs.is_geographic:
        return frame.to_crs(WGS84)
    # A file without a CRS is most often a lon/lat Shapefile that lost its .prj, so coordinates within
    # -180..180 are taken as EPSG:4326 and anything else (x 250..300 may as well be metres) is refused. A
    # geographic CRS may run to 360 (0..360 longitudes; rings unwrapped across ±180°).
    max_lon = 180.0 if frame.crs is None else 360.0
    bounds = frame.total_bounds
    west, south, east, north = bounds
    if west < -max_lon or east > max_lon or south < -90.0 or north > 90.0:
        raise RegionError(f"region file {path} {_outside_lonlat(frame.crs, bounds, max_lon, path.name)}")
    if frame.crs is None:
        warnings.warn(f"{path.name} has no CRS; assuming EPSG:4326 (lon/lat)", RegionWarning, stacklevel=2)
        return frame.set_crs(WGS84)
    return frame if frame.crs.equals(CRS(WGS84)) else frame.to_crs(WGS84)


def _outside_lonlat(crs: CRS | None, bounds: np.ndarray, max_lon: float, name: str) -> str:
    """What is wrong with coordinates beyond ±`max_lon`° or ±90°, and the fix."""
    west, south, east, north = bounds
    ranges = f"x {west:.10g}..{east:.10g}, y {south:.10g}..{north:.10g}"
    set_crs = f"set its CRS (e.g. ogr2ogr -a_srs EPSG:32633 fixed.gpkg {name}) or reproject it to EPSG:4326"
    if crs is None:
        return f"has no CRS and its coordinates ({ranges}) are outside the longitude/latitude range; {set_crs}"
    if np.abs(bounds).max() > PROJECTED_MAGNITUDE:
        return (
            f"has coordinates that look projected ({ranges}) but no projected CRS (it reads as {crs.name}); {set_crs}"
        )
    if south < -90.0 or north > 90.0:
        axis, value, limit = "latitude", (south if south < -90.0 else north), 90.0
    else:
        axis, value, limit = "longitude", (west if west < -max_lon else east), max_lon
    return (
        f"has {axis} {value:.10g}, outside the longitude/latitude range ({axis}s -{limit:g}..{limit:g} in"
        f" {crs.name}); fix that coordinate, or give the file its real CRS"
    )


def repaired(geometries: np.ndarray) -> tuple[np.ndarray, int]:
    """The geometries in 2-D, invalid ones repaired, and how many were: rings stay the shells and holes they were
    drawn as (GEOS's 'structure' method; its 'linework' would turn a hole as large as its shell into the shell's
    area). A polygon that keeps no area raises UnusableFeaturesError."""
    geometries = shapely.force_2d(geometries)
    invalid = np.flatnonzero(shapely.is_geometry(geometries) & ~shapely.is_valid(geometries))
    before = geometries[invalid]
    geometries[invalid] = shapely.make_valid(before, method="structure")
    polygonal = np.isin(shapely.get_type_id(before), (shapely.GeometryType.POLYGON, shapely.GeometryType.MULTIPOLYGON))
    collapsed = np.flatnonzero(polygonal & (shapely.area(geometries[invalid]) == 0.0))
    if collapsed.size:
        first = collapsed[0]
        raise UnusableFeaturesError(
            f"has a polygon that encloses no area once repaired (feature {invalid[first] + 1}:"
            f" {shapely.is_valid_reason(before[first])}); fix the polygon in a GIS: its holes must lie inside its"
            " shell, enclose less than it and cross no ring"
        )
    return geometries, invalid.size


def _repaired_polygons(geometries: np.ndarray, source: str) -> list[BaseGeometry]:
    geometries, count = repaired(geometries)
    if count:
        warnings.warn(
            f"{source}: repaired {count} invalid geometries (self-intersecting or badly nested rings)",
            RegionWarning,
            stacklevel=2,
        )
    polygons = [part for geometry in geometries for part in polygon_parts(geometry)]
    if not polygons:
        raise RegionError(f"{source} holds no polygons; give areas, or a point with a radius as lat,lon,3km")
    return polygons


def polygon_parts(geometry: BaseGeometry | None) -> Iterator[Polygon]:
    """The non-empty polygons of a geometry, however nested in multi-parts and collections."""
    if isinstance(geometry, Polygon):
        if not geometry.is_empty:
            yield geometry
    elif isinstance(geometry, BaseMultipartGeometry):
        for part in geometry.geoms:
            yield from polygon_parts(part)


def _finish(name: str, geometry: BaseGeometry) -> Region:
    """Split at the antimeridian, clip to the Web Mercator latitudes and check that something is left."""
    geometry = _split_at_antimeridian(geometry)
    world = box(-180.0, -WEB_MERCATOR_MAX_LAT, 180.0, WEB_MERCATOR_MAX_LAT)
    south, north = geometry.bounds[1], geometry.bounds[3]
    if south < -WEB_MERCATOR_MAX_LAT or north > WEB_MERCATOR_MAX_LAT:
        geometry = geometry.intersection(world)
        if not geometry.is_empty:
            warnings.warn(
                f"region {name!r} clipped to the Web Mercator limit of ±{WEB_MERCATOR_MAX_LAT:.4f}° latitude",
                RegionWarning,
                stacklevel=2,
            )
    polygons = list(polygon_parts(geometry))
    if not polygons or sum(polygon.area for polygon in polygons) == 0.0:
        raise RegionError(
            f"region {name!r} is empty after clipping to ±{WEB_MERCATOR_MAX_LAT:.4f}° latitude, as far north and"
            f" south as Web Mercator maps show; map a region between {WEB_MERCATOR_MAX_LAT:.4f}°S and"
            f" {WEB_MERCATOR_MAX_LAT:.4f}°N"
        )
    merged = polygons[0] if len(polygons) == 1 else MultiPolygon(polygons)
    return Region(name=name, geometry=merged)


def _split_at_antimeridian(geometry: BaseGeometry) -> BaseGeometry:
    """Unwrap rings that jump across ±180° and cut everything outside -180..180 back into range."""
    unwrapped = [_unwrap_polygon(polygon) for polygon in polygon_parts(geometry)]
    if not unwrapped:
        return geometry
    geometry = shapely.union_all(unwrapped)
    west, _, east, _ = geometry.bounds
    if west >= -180.0 and east <= 180.0:
        return geometry
    pieces = []
    for shift in (-360.0, 0.0, 360.0):
        window = box(-180.0 + shift, -90.0, 180.0 + shift, 90.0)
        piece = geometry.intersection(window)
        if not piece.is_empty:
            pieces.append(translate(piece, xoff=-shift))
    return shapely.union_all(pieces)


def _unwrap_polygon(polygon: Polygon) -> Polygon:
    """Remove longitude jumps of more than 180° between neighbouring vertices (edges across the antimeridian).

    Rings that wind around a pole (their unwrapped ends differ by 360°) are left as they are: they
    already describe a cap between two meridians at ±180°; so are rings that unwrapping would leave without
    area, whose jumps run from -180° to 180° along the whole band (a world box).
    """
    exterior = _unwrapped_ring(np.asarray(polygon.exterior.coords))
    if exterior is None:
        return polygon
    centre = float(np.mean(exterior[:, 0]))
    holes = []
    for interior in polygon.interiors:
        hole = _unwrapped_ring(np.asarray(interior.coords))
        if hole is None:
            return polygon
        hole[:, 0] += 360.0 * round((centre - float(np.mean(hole[:, 0]))) / 360.0)
        holes.append(hole)
    unwrapped = Polygon(exterior, holes)
    return unwrapped if unwrapped.area > 0.0 else polygon


def _unwrapped_ring(coords: np.ndarray) -> np.ndarray | None:
    lons = coords[:, 0]
    if not (np.abs(np.diff(lons)) > 180.0).any():
        return coords.copy()
    unwrapped = np.unwrap(lons, period=360.0)
    if abs(unwrapped[-1] - unwrapped[0]) > 180.0:
        return None
    result = coords.copy()
    result[:, 0] = unwrapped
    return result


def _normalised(name: str) -> str:
    """Case-, accent- and punctuation-blind form of a name, so 'sao paulo' finds 'São Paulo'."""
    stripped = "".join(char for char in unicodedata.normalize("NFKD", name) if not unicodedata.combining(char))
    return " ".join(re.sub(r"[^\w\s]", " ", stripped.casefold()).split())


class _CatalogEntry(NamedTuple):
    name: str
    iso_code: str | None
    geometry: BaseGeometry


@cache
def _catalog_entries() -> tuple[_CatalogEntry, ...]:
    import geopandas as gpd

    entries: list[_CatalogEntry] = []
    for filename in CATALOG_FILES:
        frame = gpd.read_file(REGIONS_DIR / filename)
        codes = frame["iso_a3"] if "iso_a3" in frame else [None] * len(frame)
        for name, code, geometry in zip(frame["name"], codes, frame.geometry, strict=True):
            entries.append(_CatalogEntry(name, code if isinstance(code, str) else None, geometry))
    return tuple(entries)


@cache
def _catalog_index() -> dict[str, int]:
    """Normalised name or ISO 3166 alpha-3 country code -> position in `_catalog_entries`."""
    entries = _catalog_entries()
    index = {_normalised(entry.iso_code): position for position, entry in enumerate(entries) if entry.iso_code}
    index.update((_normalised(entry.name), position) for position, entry in enumerate(entries))
    return index


def _catalog_region(spec: str) -> Region:
    index = _catalog_index()
    key = _normalised(spec)
    if key not in index:
        names = {_normalised(name): name for name in catalog_names()}
        close = difflib.get_close_matches(key, list(names), n=3, cutoff=0.6)
        hint = (
            f"did you mean {', '.join(repr(names[match]) for match in close)}?"
            if close
            else f"use a country or city name, a file, a bbox {BBOX_LAYOUT} or a point {POINT_LAYOUT}"
        )
        raise RegionError(f"unknown region {spec!r}; {hint}")
    entry = _catalog_entries()[index[key]]
    return _finish(entry.name, entry.geometry)

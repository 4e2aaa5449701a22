"""A zone file (`outputs.zones`: districts, parks, planning zones), read and checked: the zones' polygons and names.

A zone file of one layer is read whole (in any CRS it declares); features without area (points, lines) are
left out, invalid polygons repaired. Zones are named by `outputs.zone_field`, else by a `name` column (any case),
else by their number in the file (1, 2, ...). Apart from the zonal statistics (`pipeline.export.zones`): a build's
start checks the file and loads no exporter (0.3 s of the store reader and the COG writer).
"""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from pyogrio.errors import DataLayerError, DataSourceError
from shapely.errors import GEOSException

from common.errors import first_line
from pipeline.config import OutputSettings
from pipeline.errors import BuildConfigError
from pipeline.geometry import WGS84
from pipeline.regions import Region, UnusableFeaturesError, polygon_parts, read_features, repaired

# The column that names zones when outputs.zone_field is null (compared without case).
NAME_COLUMN = "name"


def check_zones(outputs: OutputSettings, region: Region) -> None:
    """Refuse, before any job, a zone file that cannot serve the build: see `read_zones`, and zones of which
    none overlaps the region."""
    zones = read_zones(outputs).to_crs(WGS84)
    geometry = zones.geometry.to_numpy()
    overlap = shapely.intersects(geometry, region.geometry) & ~shapely.touches(geometry, region.geometry)
    if not overlap.any():
        west, south, east, north = zones.total_bounds
        raise BuildConfigError(
            f"config.outputs.zones: no zone of {outputs.zones} overlaps region {region.name} (the zones span"
            f" {west:.4f} to {east:.4f} longitude, {south:.4f} to {north:.4f} latitude); give zones of the region"
            " or set outputs.zones: null"
        )


def read_zones(outputs: OutputSettings) -> gpd.GeoDataFrame:
    """The zones of `outputs.zones`: a `zone` name column and their polygons (invalid ones repaired, features
    without area left out), in the file's CRS; a file that cannot serve is refused in one line."""
    if outputs.zones is None:
        raise BuildConfigError("config.outputs.zones is not set; name a polygon file to get zonal statistics")
    path = Path(outputs.zones)
    where = f"config.outputs.zones: {path}"
    if not path.is_file():
        raise BuildConfigError(f"{where} does not exist; check the path or set outputs.zones: null")
    try:
        frame = read_features(path)
        shapes, _ = repaired(frame.geometry.to_numpy())
    except UnusableFeaturesError as exc:
        raise BuildConfigError(f"{where} {exc}") from None
    except (DataSourceError, DataLayerError, GEOSException, ValueError, OSError) as exc:
        raise BuildConfigError(
            f"{where} cannot be read as vector data ({first_line(exc)}); give a GeoPackage, GeoJSON or Shapefile"
        ) from None
    if frame.crs is None:
        raise BuildConfigError(f"{where} has no CRS; set it (e.g. ogr2ogr -a_srs EPSG:4326 fixed.gpkg {path.name})")
    names = _zone_names(frame, outputs.zone_field, path)
    geometry = np.array([shapely.union_all(list(polygon_parts(shape))) for shape in shapes], dtype=object)
    kept = ~shapely.is_empty(geometry)
    if not kept.any():
        raise BuildConfigError(f"{where} holds no polygons; give areas (polygons or multipolygons)")
    return gpd.GeoDataFrame({"zone": names[kept]}, geometry=geometry[kept], crs=frame.crs).reset_index(drop=True)


def _zone_names(frame: gpd.GeoDataFrame, field: str | None, path: Path) -> np.ndarray:
    """Each feature's name: the `field` column, else the `name` column (any case), else its number (1, 2, ...);
    a feature without a value takes its number too."""
    columns = [str(column) for column in frame.columns if column != frame.geometry.name]
    numbers = pd.Series(np.arange(1, len(frame) + 1).astype(str), index=frame.index)
    if field is None:
        field = next((column for column in columns if column.casefold() == NAME_COLUMN), None)
        if field is None:
            return numbers.to_numpy()
    elif field not in columns:
        listed = ", ".join(columns) or "none"
        raise BuildConfigError(
            f"config.outputs.zone_field: {field!r} is not a column of {path} (it has {listed});"
            " name one of them or set zone_field: null"
        )
    values = frame[field]
    return values.astype(str).where(values.notna(), numbers).to_numpy()

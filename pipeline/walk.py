"""A soundwalk's route: a GeoJSON (or any vector file) line, walked at a steady speed and sampled in time.

The line's length is geodesic (WGS84); points are spaced evenly along it in Web Mercator, which over a walk's
few kilometres is even on the ground too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import shapely
from pyogrio.errors import DataSourceError
from pyproj import Geod, Transformer
from shapely.geometry import LineString

from common.errors import first_line
from pipeline.errors import ListenError
from pipeline.geometry import WEB_MERCATOR, WGS84
from pipeline.regions import read_features


def route_line(path: Path) -> LineString:
    """The one line (in lon/lat) of the file at `path`, its parts joined end to end."""
    if not path.is_file():
        raise ListenError(f"no route file {path}; pass --along a GeoJSON file holding a line")
    try:
        frame = read_features(path)
    except (DataSourceError, OSError, ValueError) as exc:
        raise ListenError(f"cannot read the route {path} ({first_line(exc)}); pass a GeoJSON line") from None
    if frame.crs is not None:
        frame = frame.to_crs(WGS84)
    merged = shapely.line_merge(shapely.union_all(frame.geometry.to_numpy()))
    if not isinstance(merged, LineString) or merged.is_empty:
        raise ListenError(
            f"the route {path} holds no single line ({merged.geom_type}); draw the walk as one connected LineString"
        )
    return merged


def route_points(
    path: Path, speed: float, step: float, min_seconds: float, max_seconds: float
) -> tuple[np.ndarray, np.ndarray]:
    """Latitudes and longitudes where a walker at `speed` m/s along the route is in the middle of each `step`."""
    line = route_line(path)
    metres = Geod(ellps="WGS84").geometry_length(line)
    seconds = metres / speed
    if not min_seconds <= seconds <= max_seconds:
        raise ListenError(
            f"walking the route {path} ({metres:,.0f} m) at {speed:g} m/s takes {seconds:,.0f} s, outside"
            f" {min_seconds:g} to {max_seconds:g} s; draw another route or change --speed"
        )
    to_mercator = Transformer.from_crs(WGS84, WEB_MERCATOR, always_xy=True)
    projected = shapely.transform(line, lambda xy: np.column_stack(to_mercator.transform(xy[:, 0], xy[:, 1])))
    fractions = (np.arange(int(seconds // step)) + 0.5) * step / seconds
    points = shapely.line_interpolate_point(projected, fractions, normalized=True)
    lons, lats = to_mercator.transform(shapely.get_x(points), shapely.get_y(points), direction="INVERSE")
    return np.asarray(lats), np.asarray(lons)

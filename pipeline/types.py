"""Small value types shared by tiling, imagery and writers. Imports nothing of ours."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

WEB_MERCATOR = "EPSG:3857"
WGS84 = "EPSG:4326"


class Bounds(NamedTuple):
    """Axis-aligned bounds in the units of some CRS (metres for EPSG:3857)."""

    left: float
    bottom: float
    right: float
    top: float


class LngLatBBox(NamedTuple):
    """Geographic bounding box in degrees (EPSG:4326)."""

    west: float
    south: float
    east: float
    north: float


@dataclass(frozen=True)
class ImageData:
    """One read from an imagery source: masked RGB pixels plus their georeferencing.

    `array` is a masked uint8 array shaped (bands, height, width); masked pixels had no imagery.
    `gsd_m` is the true ground sample distance in metres at the centre of the read (Mercator
    scale factor applied), not the nominal one of the source's zoom level.
    """

    array: np.ma.MaskedArray
    bounds: Bounds
    crs: str
    gsd_m: float

    @property
    def width(self) -> int:
        return int(self.array.shape[-1])

    @property
    def height(self) -> int:
        return int(self.array.shape[-2])

    @property
    def coverage(self) -> float:
        """Fraction of pixels that hold imagery (0 means 'no imagery here')."""
        mask = np.ma.getmaskarray(self.array)
        return float(1.0 - mask.all(axis=0).mean())

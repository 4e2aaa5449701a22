"""`imagery.tif`: the build's own imagery over the map's grid at a modest resolution, read through the reader the
embed step uses (same source, bands and stretch). It is the preview's offline underlay, and the QGIS project's
imagery layer where the source itself cannot be a layer (STAC searches, tile servers that need a key).

Its pixels are at most UNDERLAY_MAX_PX on the long side and no finer than the source's own pixels, in EPSG:3857
over exactly the grid's bounds: RGB, JPEG-compressed (lossy, like the imagery it shows) with an internal mask
where there is no imagery. Tile servers are read at the zoom that fits this resolution (a few dozen tiles, fetched
once and cached); a tile that cannot be had leaves its part empty instead of stopping the build, since the
underlay only shows where the scores are.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import rasterio
from rasterio.errors import RasterioError
from rasterio.transform import from_bounds

from common.atomic import atomic_path
from pipeline.config import ImagerySettings
from pipeline.errors import ExportError
from pipeline.geometry import WEB_MERCATOR, Bounds

UNDERLAY_NAME = "imagery.tif"
UNDERLAY_MAX_PX = 2048
JPEG_QUALITY = 85
BLOCK_PX = 256


class Underlay(NamedTuple):
    """What `write_underlay` wrote: its size in pixels and the share of them that hold imagery."""

    width: int
    height: int
    coverage: float


def underlay_size(bounds: Bounds, native_gsd_m: float, latitude: float) -> tuple[int, int]:
    """(width, height) of the underlay over EPSG:3857 `bounds`: UNDERLAY_MAX_PX on the long side, or fewer
    where the source's pixels (`native_gsd_m` on the ground at `latitude`) are coarser than that."""
    width_m, height_m = bounds.right - bounds.left, bounds.top - bounds.bottom
    # A Web Mercator metre spans cos(latitude) metres on the ground.
    source_px = native_gsd_m / math.cos(math.radians(latitude))
    pixel = max(max(width_m, height_m) / UNDERLAY_MAX_PX, source_px)
    return max(1, round(width_m / pixel)), max(1, round(height_m / pixel))


def write_underlay(
    imagery: ImagerySettings, bounds: Bounds, native_gsd_m: float, latitude: float, out: Path
) -> Underlay:
    """Read the build's imagery over EPSG:3857 `bounds` and write it to `out` (see the module's note)."""
    width, height = underlay_size(bounds, native_gsd_m, latitude)
    with replace(imagery, on_missing="leave_empty").open_reader() as reader:
        image = reader.part(bounds, width, height)
    valid = ~np.ma.getmaskarray(image.array).any(axis=0)
    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": 3,
        "dtype": "uint8",
        "crs": WEB_MERCATOR,
        "transform": from_bounds(*bounds, width, height),
        "tiled": True,
        "blockxsize": BLOCK_PX,
        "blockysize": BLOCK_PX,
        "compress": "JPEG",
        "photometric": "YCBCR",
        "jpeg_quality": JPEG_QUALITY,
    }
    try:
        with (
            atomic_path(out) as tmp,
            rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True),
            rasterio.open(tmp, "w", **profile) as dataset,
        ):
            dataset.write(np.ma.getdata(image.array))
            dataset.write_mask(np.where(valid, 255, 0).astype(np.uint8))
            dataset.update_tags(IMAGERY_SOURCE=reader.source_id, IMAGERY_ATTRIBUTION=reader.attribution)
    except (OSError, RasterioError) as exc:
        raise ExportError(f"cannot write {out} ({exc}); check that the build folder is writable") from exc
    return Underlay(width, height, float(valid.mean()))


def read_underlay(path: Path) -> tuple[np.ndarray, np.ndarray, Bounds]:
    """An underlay's RGB (3, H, W) uint8, where it holds imagery (H, W), and its EPSG:3857 bounds."""
    try:
        with rasterio.open(path) as dataset:
            return dataset.read(), dataset.dataset_mask() > 0, Bounds(*dataset.bounds)
    except RasterioError as exc:
        raise ExportError(f"cannot read the imagery underlay {path} ({exc}); rerun the build") from exc

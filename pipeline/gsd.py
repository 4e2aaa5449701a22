"""Does the imagery fit the model? The source's native ground sample distance against the model's view.

The model sees `footprint / 224` metres per pixel. Finer imagery is fine (reads downsample it); imagery
more than `COARSER_LIMIT` times coarser would feed the model blurred views it was never trained on.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import rasterio
from rasterio.errors import RasterioError

from model.config import GSD_BY_SAT_TYPE, TILE_PX_BY_SAT_TYPE
from pipeline.errors import ImageryError, ImageryMismatchError
from pipeline.geometry import MODEL_INPUT_PX, Bounds, footprint_size_m, ground_resolution_m
from pipeline.imagery import ImageryReader, LocalRasterReader, StacReader, XYZReader
from pipeline.imagery.base import true_gsd_m
from pipeline.imagery.stac import SENTINEL2_L2A

COARSER_LIMIT = 1.5
SENTINEL2_TRUE_COLOUR_GSD_M = 10.0


class ImageryFit(NamedTuple):
    """The imagery of a build and how its resolution compares with the model's view."""

    source: str
    source_id: str
    attribution: str
    native_gsd_m: float
    model_gsd_m: float


def native_gsd_m(reader: ImageryReader, latitude: float) -> float:
    """Ground metres per pixel of the source's finest imagery around `latitude`."""
    if isinstance(reader, XYZReader):
        return ground_resolution_m(reader.max_zoom, latitude, reader.tile_size)
    if isinstance(reader, LocalRasterReader):
        try:
            with rasterio.open(reader.path) as dataset:
                return true_gsd_m(Bounds(*dataset.bounds), dataset.width, dataset.crs.to_string())
        except RasterioError as exc:
            raise ImageryError(f"cannot read the resolution of {reader.path} ({exc}); check the file") from None
    if isinstance(reader, StacReader) and reader.collection == SENTINEL2_L2A:
        return SENTINEL2_TRUE_COLOUR_GSD_M
    raise ImageryError(f"cannot tell the resolution of imagery {reader.source_id}; set imagery.native_gsd_m (m/px)")


def model_gsd_m(sat_type: str, zoom_level: int) -> float:
    """Metres per pixel the model sees: its footprint spread over 224 px."""
    return footprint_size_m(sat_type, zoom_level) / MODEL_INPUT_PX


def fitting_zoom_level(native_m: float, sat_type: str) -> int:
    """Smallest zoom level whose model view is at least as coarse as the imagery."""
    one_level_m = TILE_PX_BY_SAT_TYPE[sat_type] * GSD_BY_SAT_TYPE[sat_type] / MODEL_INPUT_PX
    return max(1, math.ceil(native_m / one_level_m - 1e-9))


def check_imagery_fit(
    reader: ImageryReader, source: str, native_m: float, sat_type: str, zoom_level: int
) -> ImageryFit:
    """The fit of `reader`'s imagery; raises ImageryMismatchError when it is too coarse for the model."""
    wanted_m = model_gsd_m(sat_type, zoom_level)
    if native_m > COARSER_LIMIT * wanted_m:
        raise ImageryMismatchError(
            f"imagery {source} has {native_m:.3g} m/px but a {sat_type} model at zoom_level {zoom_level}"
            f" expects {wanted_m:.3g} m/px (at most {COARSER_LIMIT:g}x coarser); set model.zoom_level:"
            f" {fitting_zoom_level(native_m, sat_type)} or use finer imagery"
        )
    return ImageryFit(source, reader.source_id, reader.attribution, native_m, wanted_m)

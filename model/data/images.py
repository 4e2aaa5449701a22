"""Decode a pair's image (PNG, JPEG or GeoTIFF, as bytes or a file) to uint8 RGB with GDAL through rasterio."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.io import MemoryFile

from common.png import png_cut_short
from model.errors import DataError, first_line


def decode_image(source: bytes | Path, what: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an 8-bit image; grey is repeated into three bands, alpha and extra bands dropped.
    `what` names the image in errors (a file, or a row of a shard). PNG bytes cut short are refused (a folder's
    files are checked so when its split is opened)."""
    if isinstance(source, bytes) and png_cut_short(source, source):
        raise DataError(f"{what} is truncated: the PNG lacks its closing IEND chunk; export it again")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            if isinstance(source, Path):
                with rasterio.open(source) as dataset:
                    pixels = dataset.read()
            else:
                with MemoryFile(source) as memfile, memfile.open() as dataset:
                    pixels = dataset.read()
    except RasterioError as exc:
        raise DataError(f"{what} does not decode as PNG, JPEG or GeoTIFF ({first_line(exc)}); re-export it") from None
    if pixels.dtype != np.uint8:
        raise DataError(f"{what} holds {pixels.dtype} pixels; export it as 8-bit RGB")
    rgb = np.repeat(pixels[:1], 3, axis=0) if pixels.shape[0] < 3 else pixels[:3]
    return np.ascontiguousarray(np.moveaxis(rgb, 0, -1))

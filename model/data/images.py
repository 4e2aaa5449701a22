"""Decode a pair's image (PNG, JPEG or GeoTIFF, as bytes or a file) to uint8 RGB with GDAL through rasterio."""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.io import MemoryFile

from common.colours import band_colormap, rgb_bands
from common.png import PNG_SIGNATURE, png_cut_short
from model.errors import DataError, first_line

# How the files decode_image reads open: PNG, JPEG, TIFF (classic or BigTIFF, either byte order).
IMAGE_SIGNATURES = (PNG_SIGNATURE, b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# A PNG's IHDR chunk follows its signature: its length, type, width and height (4 bytes each), then the bit depth.
PNG_SIZE_AT = len(PNG_SIGNATURE) + 8
PNG_BIT_DEPTH_AT = PNG_SIZE_AT + 8
# The first bytes of a file check_image_head reads.
IMAGE_HEAD_BYTES = PNG_BIT_DEPTH_AT + 1


def check_image_head(head: bytes, what: str) -> None:
    """Refuse, from its first IMAGE_HEAD_BYTES bytes, a file that is no PNG, JPEG or TIFF, or a PNG of other than
    8 bits a sample, without decoding it (a PNG too short to tell is left to the check for being cut short)."""
    if not head.startswith(IMAGE_SIGNATURES):
        raise undecodable(what, "it opens with none of their signatures")
    if head.startswith(PNG_SIGNATURE) and len(head) > PNG_BIT_DEPTH_AT and head[PNG_BIT_DEPTH_AT] != 8:
        raise not_8_bit(what, f"{head[PNG_BIT_DEPTH_AT]}-bit")


def image_size(head: bytes, path: Path, what: str) -> tuple[int, int]:
    """(width, height) in pixels of the image file at `path`, whose first IMAGE_HEAD_BYTES bytes are `head` (passed
    `check_image_head`): a PNG's from its header chunk, a JPEG's or TIFF's from GDAL's reading of its header (which
    also refuses one of other than 8 bits a sample)."""
    if head.startswith(PNG_SIGNATURE) and len(head) >= PNG_BIT_DEPTH_AT:
        width, height = struct.unpack(">II", head[PNG_SIZE_AT:PNG_BIT_DEPTH_AT])
        return width, height
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as dataset:
                size, dtype = (dataset.width, dataset.height), dataset.dtypes[0]
    except RasterioError as exc:
        raise undecodable(what, first_line(exc)) from None
    if dtype != "uint8":
        raise not_8_bit(what, dtype)
    return size


def undecodable(what: str, why: str) -> DataError:
    return DataError(f"{what} does not decode as PNG, JPEG or GeoTIFF ({why}); re-export it")


def not_8_bit(what: str, pixels: str) -> DataError:
    return DataError(f"{what} holds {pixels} pixels; export it as 8-bit RGB")


def decode_image(source: bytes | Path, what: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an 8-bit image (`common.colours`: a palette through its colours, grey repeated,
    alpha and extra bands dropped). `what` names the image in errors (a file, or a row of a shard). PNG bytes cut
    short are refused (a folder's files are checked so when its split is opened)."""
    if isinstance(source, bytes) and png_cut_short(source, source):
        raise DataError(f"{what} is truncated: the PNG lacks its closing IEND chunk; export it again")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            if isinstance(source, Path):
                with rasterio.open(source) as dataset:
                    pixels, colormap = dataset.read(), band_colormap(dataset)
            else:
                with MemoryFile(source) as memfile, memfile.open() as dataset:
                    pixels, colormap = dataset.read(), band_colormap(dataset)
    except RasterioError as exc:
        raise undecodable(what, first_line(exc)) from None
    if pixels.dtype != np.uint8:
        raise not_8_bit(what, str(pixels.dtype))
    return np.ascontiguousarray(np.moveaxis(rgb_bands(pixels, colormap), 0, -1))

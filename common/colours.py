"""8-bit RGB from the bands GDAL reads of an image: a paletted band through its colour map, grey (with or without
alpha) repeated into three bands, RGB(A) as it is. The map's imagery tiles and the training images decode alike."""

from __future__ import annotations

import numpy as np
import rasterio


def band_colormap(dataset: rasterio.io.DatasetReader) -> dict[int, tuple[int, ...]] | None:
    """The colour map of a one-band paletted image; None for any other."""
    if dataset.count != 1:
        return None
    try:
        return dataset.colormap(1)
    except ValueError:  # GDAL: the band has no colour table
        return None


def rgb_bands(pixels: np.ndarray, colormap: dict[int, tuple[int, ...]] | None) -> np.ndarray:
    """(3, H, W) uint8 RGB of the (bands, H, W) `pixels` read with `colormap` (`band_colormap`)."""
    if colormap is not None:
        lookup = np.zeros((256, 3), np.uint8)
        for index, colour in colormap.items():
            lookup[index] = colour[:3]
        return np.moveaxis(lookup[pixels[0]], -1, 0)
    if pixels.shape[0] in (1, 2):  # grey, or grey + alpha
        return np.repeat(pixels[:1], 3, axis=0).astype(np.uint8)
    return pixels[:3].astype(np.uint8)

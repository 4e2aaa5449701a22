"""QGIS layer styles (.qml) for the exported rasters: a perceptual colour ramp for scores, classes in plain words
for percentiles, a palette for categories (concepts, dominant queries), and the vector styles of the top places and
the zones (graduated classes of a statistic).

QGIS loads `<name>.qml` beside `<name>.tif` as the layer's default style. The XML follows what QGIS 3.x writes
for a `singlebandpseudocolor` renderer (interpolated or discrete colour ramp shader) and a `paletted` renderer.
The score ramp is also the preview's colour map, so a tile has the same colour in QGIS and in the browser.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
from branca.colormap import LinearColormap, linear

from common.atomic import atomic_path
from pipeline.errors import ExportError

QGIS_VERSION = "3.28.0"
DOCTYPE = "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>"
LABEL_FORMAT = ".4g"
DISPLAY_PERCENTILES = (2, 98)
# Categories get this many mutually distinct colours; further ones reuse them in the same order.
DISTINCT_COLOURS = 64
# Candidate colours: every channel in steps of 255 / 15; too dark or too light ones hide on a basemap.
CANDIDATE_LEVELS = 16
LIGHTNESS_RANGE = (30.0, 90.0)


# Score layers are drawn this opaque over imagery, in QGIS and in the preview, so that the ground shows through.
OVERLAY_OPACITY = 0.75
# Top places: fill opacity (0-255) and outline widths (mm), and the size of their rank labels (points).
PLACE_FILL_ALPHA = 70
PLACE_OUTLINE_MM = "0.6"
AREA_OUTLINE_MM = "0.9"
LABEL_SIZE_PT = "9"
# Zones: at most this many classes of equal width, and the width (mm) of their dark outline.
ZONE_CLASSES = 5
ZONE_OUTLINE_MM = "0.4"
ZONE_OUTLINE_RGBA = "40,40,40,255"


class Colour(NamedTuple):
    red: int
    green: int
    blue: int

    @property
    def hex(self) -> str:
        return f"#{self.red:02x}{self.green:02x}{self.blue:02x}"

    @property
    def qgis_rgba(self) -> str:
        return f"{self.red},{self.green},{self.blue},255"


class RampStop(NamedTuple):
    """A colour at `position` in 0..1 along a ramp."""

    position: float
    colour: Colour


class DisplayRange(NamedTuple):
    """The values the ramp's ends are pinned to, and the data percentiles they were taken at."""

    minimum: float
    maximum: float
    lower_percentile: int
    upper_percentile: int

    def label(self, value: float) -> str:
        if value == self.minimum:
            return f"{value:{LABEL_FORMAT}} ({_ordinal(self.lower_percentile)} percentile)"
        if value == self.maximum:
            return f"{value:{LABEL_FORMAT}} ({_ordinal(self.upper_percentile)} percentile)"
        return f"{value:{LABEL_FORMAT}}"


class PaletteEntry(NamedTuple):
    value: int
    label: str
    colour: Colour


class ValueClass(NamedTuple):
    """A class of a discrete legend: the values above the previous class's `upper` up to and including its own."""

    upper: float
    label: str
    colour: Colour


# Percentile classes of a query's percentile map, lowest first, each with words true of every tile in it (a tile
# at the 93rd percentile is in the top 10 %). The upper bounds are those of QGIS's discrete shader (inclusive).
# Legends add the query: "top 10 % of this region for 'birds singing'".
PERCENTILE_CLASSES = (
    (50.0, "bottom half of this region"),
    (75.0, "above this region's median"),
    (90.0, "top 25 % of this region"),
    (95.0, "top 10 % of this region"),
    (99.0, "top 5 % of this region"),
    (100.0, "top 1 % of this region"),
)


def _viridis() -> tuple[RampStop, ...]:
    # branca sets its named ramps as attributes at import, out of sight of type checkers.
    ramp: LinearColormap = linear.viridis  # type: ignore[attr-defined]
    return tuple(
        RampStop(float(position), Colour(*(round(channel * 255) for channel in rgba[:3])))
        for position, rgba in zip(ramp.index, ramp.colors, strict=True)
    )


# Viridis: perceptually uniform, readable in greyscale and by the colour-blind.
SCORE_RAMP = _viridis()


def display_range(values: np.ndarray, what: str) -> DisplayRange:
    """The 2nd and 98th percentiles of the finite `values` (a sample of one layer), for a colour ramp."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise ExportError(f"{what} has no valid tile; check that the imagery covers the region")
    low, high = (float(value) for value in np.percentile(finite, DISPLAY_PERCENTILES))
    if high <= low:
        # Every sampled tile has one value: any non-empty range around it shows that value.
        high = low + max(abs(low), 1.0) * 1e-6
    return DisplayRange(low, high, *DISPLAY_PERCENTILES)


def percentile_classes(query_label: str) -> tuple[ValueClass, ...]:
    """The plain-words legend of a percentile map, coloured along the score ramp from its first to last stop."""
    last = len(PERCENTILE_CLASSES) - 1
    return tuple(
        ValueClass(upper, f"{words} for '{query_label}'", ramp_colour(index / last))
        for index, (upper, words) in enumerate(PERCENTILE_CLASSES)
    )


def percentile_class(percentile: np.ndarray) -> np.ndarray:
    """The index in PERCENTILE_CLASSES of each percentile's class (the first whose upper bound it does not
    exceed), as QGIS's discrete shader picks it; -1 for NaN."""
    uppers = [upper for upper, _ in PERCENTILE_CLASSES]
    index = np.minimum(np.searchsorted(uppers, np.nan_to_num(percentile), side="left"), len(uppers) - 1)
    return np.where(np.isnan(percentile), -1, index)


def ramp_colour(position: float, ramp: Sequence[RampStop] = SCORE_RAMP) -> Colour:
    """The colour at `position` (0..1) along `ramp`, interpolated linearly in sRGB between its stops."""
    positions = [stop.position for stop in ramp]
    channels = np.array([stop.colour for stop in ramp], dtype=float)
    return Colour(*(round(float(np.interp(position, positions, channels[:, index]))) for index in range(3)))


def category_colours(count: int) -> tuple[Colour, ...]:
    """`count` colours for categories, the first DISTINCT_COLOURS as far apart as possible (then repeating).

    Glasbey-style: each next colour is the candidate farthest in CIELAB (ΔE76) from every colour already taken,
    and from black and white, so any two categories of a map differ clearly, not only neighbouring values.
    Give the most common categories the first colours.
    """
    palette = _distinct_palette()
    return tuple(palette[index % len(palette)] for index in range(count))


@cache
def _distinct_palette() -> tuple[Colour, ...]:
    levels = np.linspace(0, 255, CANDIDATE_LEVELS).round()
    candidates = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 3)
    lab = srgb_to_lab(candidates)
    low, high = LIGHTNESS_RANGE
    usable = (lab[:, 0] >= low) & (lab[:, 0] <= high)
    candidates, lab = candidates[usable], lab[usable]
    taken = srgb_to_lab(np.array([[0.0, 0.0, 0.0], [255.0, 255.0, 255.0]]))
    distance = np.min(np.linalg.norm(lab[:, None, :] - taken[None, :, :], axis=-1), axis=1)
    chosen = []
    for _ in range(DISTINCT_COLOURS):
        best = int(np.argmax(distance))
        chosen.append(Colour(*(int(channel) for channel in candidates[best])))
        distance = np.minimum(distance, np.linalg.norm(lab - lab[best], axis=-1))
    return tuple(chosen)


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB colours (..., 3) in 0..255."""
    linear_rgb = rgb / 255.0
    linear_rgb = np.where(linear_rgb <= 0.04045, linear_rgb / 12.92, ((linear_rgb + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = linear_rgb @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def pseudocolor_qml(display: DisplayRange, ramp: Sequence[RampStop] = SCORE_RAMP) -> str:
    """A singleband pseudocolor style: `ramp` stretched over the display range, nodata transparent."""
    low, high = display.minimum, display.maximum
    cuts = (display.lower_percentile / 100, display.upper_percentile / 100)
    renderer, shader = _ramp_shader("INTERPOLATED", low, high, ramp, "CumulativeCut", cuts, label_precision=4)
    values = [low + stop.position * (high - low) for stop in ramp]
    values[0], values[-1] = low, high
    for value, stop in zip(values, ramp, strict=True):
        ET.SubElement(
            shader, "item", value=_number(value), color=stop.colour.hex, alpha="255", label=display.label(value)
        )
    legend = ET.SubElement(
        shader,
        "rampLegendSettings",
        minimumLabel=display.label(low),
        maximumLabel=display.label(high),
        prefix="",
        suffix="",
        direction="0",
        orientation="2",
        useContinuousLegend="1",
    )
    _numeric_format(legend)
    return _document(renderer)


def classed_qml(classes: Sequence[ValueClass], minimum: float) -> str:
    """A singleband pseudocolor style with discrete classes: a pixel takes the colour and legend line of the first
    class whose `upper` it does not exceed; `minimum` is the lowest value the first class holds."""
    ramp = [RampStop(index / (len(classes) - 1), item.colour) for index, item in enumerate(classes)]
    # Limits "None": the classes are fixed, QGIS must not stretch them to the data it sees.
    renderer, shader = _ramp_shader("DISCRETE", minimum, classes[-1].upper, ramp, "None", (0.02, 0.98))
    for item in classes:
        ET.SubElement(shader, "item", value=_number(item.upper), color=item.colour.hex, alpha="255", label=item.label)
    return _document(renderer)


def paletted_qml(entries: Sequence[PaletteEntry]) -> str:
    """A paletted (unique values) style with one entry per category; values without an entry stay unstyled."""
    renderer = _renderer("paletted")
    _min_max_origin(renderer, "None", 0.02, 0.98)
    palette = ET.SubElement(renderer, "colorPalette")
    for entry in sorted(entries):
        ET.SubElement(
            palette, "paletteEntry", value=str(entry.value), color=entry.colour.hex, alpha="255", label=entry.label
        )
    ET.SubElement(ET.SubElement(renderer, "colorramp", type="randomcolors", name="[source]"), "Option")
    return _document(renderer)


def query_colours(count: int) -> tuple[Colour, ...]:
    """The colour of each of `count` queries, in the store's order, on every map of a build: the dominant-sound
    palette (COG, QGIS, preview) and the top places."""
    return category_colours(count)


def rgb_renderer(bands: Sequence[int], low: float, high: float) -> ET.Element:
    """Imagery drawn as the build reads it: `bands` in RGB order (or one grey band), each stretched linearly from
    `low` to `high`."""
    limits = {"minValue": _number(low), "maxValue": _number(high)}
    if len(bands) == 1:
        renderer = _renderer("singlebandgray", grayBand=str(bands[0]), gradient="BlackToWhite")
        _min_max_origin(renderer, "None", 0.02, 0.98)
        _contrast(renderer, "contrastEnhancement", limits)
        return renderer
    red, green, blue = (str(band) for band in bands)
    renderer = _renderer("multibandcolor", redBand=red, greenBand=green, blueBand=blue)
    del renderer.attrib["band"]
    _min_max_origin(renderer, "None", 0.02, 0.98)
    for colour in ("red", "green", "blue"):
        _contrast(renderer, f"{colour}ContrastEnhancement", limits)
    return renderer


def colour_data_renderer() -> ET.Element:
    """Tiles that are already RGB(A) pictures (an XYZ tile server), drawn as they are."""
    renderer = _renderer("singlebandcolordata")
    _min_max_origin(renderer, "None", 0.02, 0.98)
    return renderer


def places_renderer(colour: Colour) -> ET.Element:
    """Top places (tile squares): a see-through fill and a solid outline in the query's colour."""
    return _single_fill(
        {
            "color": _rgba(colour, PLACE_FILL_ALPHA),
            "outline_color": _rgba(colour, 255),
            "outline_style": "solid",
            "outline_width": PLACE_OUTLINE_MM,
            "style": "solid",
        }
    )


def areas_renderer(colour: Colour) -> ET.Element:
    """Merged areas: a dashed outline in the query's colour, no fill (the places inside stay readable)."""
    return _single_fill(
        {
            "color": _rgba(colour, 0),
            "outline_color": _rgba(colour, 255),
            "outline_style": "dash",
            "outline_width": AREA_OUTLINE_MM,
            "style": "no",
        }
    )


def value_classes(values: np.ndarray) -> tuple[ValueClass, ...]:
    """Up to ZONE_CLASSES classes of equal width from the lowest to the highest finite value, coloured along the
    score ramp and labelled by their bounds; none when no value is finite."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return ()
    low, high = float(finite.min()), float(finite.max())
    count = min(ZONE_CLASSES, len(np.unique(finite)))
    uppers = np.linspace(low, high, count + 1)[1:] if count > 1 else np.array([high])
    lowers = [low, *uppers[:-1]]
    return tuple(
        ValueClass(
            float(upper), f"{lower:{LABEL_FORMAT}} – {upper:{LABEL_FORMAT}}", ramp_colour(_position(index, count))
        )
        for index, (lower, upper) in enumerate(zip(lowers, uppers, strict=True))
    )


def _position(index: int, count: int) -> float:
    return index / (count - 1) if count > 1 else 1.0


def graduated_renderer(field: str, values: np.ndarray) -> ET.Element:
    """Polygons filled by the class (`value_classes`) their `field` falls in, among its `values`, with a dark
    outline; a feature without a value (null) is not drawn."""
    classes = value_classes(values)
    renderer = ET.Element(
        "renderer-v2",
        type="graduatedSymbol",
        attr=field,
        graduatedMethod="GraduatedColor",
        symbollevels="0",
        enableorderby="0",
        forceraster="0",
    )
    ranges = ET.SubElement(renderer, "ranges")
    symbols = ET.SubElement(renderer, "symbols")
    lowers = [float(np.nanmin(values)), *(item.upper for item in classes[:-1])] if classes else []
    for index, (lower, item) in enumerate(zip(lowers, classes, strict=True)):
        ET.SubElement(
            ranges,
            "range",
            lower=_number(lower),
            upper=_number(item.upper),
            symbol=str(index),
            label=item.label,
            render="true",
        )
        symbols.append(_fill_symbol(str(index), _zone_fill(item.colour)))
    ET.SubElement(renderer, "rotation")
    ET.SubElement(renderer, "sizescale")
    return renderer


def _zone_fill(colour: Colour) -> dict[str, str]:
    return {
        "color": _rgba(colour, 255),
        "outline_color": ZONE_OUTLINE_RGBA,
        "outline_style": "solid",
        "outline_width": ZONE_OUTLINE_MM,
        "style": "solid",
    }


def rank_labels(field: str) -> ET.Element:
    """Labels showing `field` (a place's rank, a zone's name) in dark bold text with a white halo, over each
    feature."""
    labeling = ET.Element("labeling", type="simple")
    settings = ET.SubElement(labeling, "settings", calloutType="simple")
    style = ET.SubElement(
        settings,
        "text-style",
        fieldName=field,
        isExpression="0",
        fontSize=LABEL_SIZE_PT,
        fontSizeUnit="Point",
        fontWeight="75",
        namedStyle="Bold",
        textColor="20,20,20,255",
        textOpacity="1",
    )
    ET.SubElement(
        style,
        "text-buffer",
        bufferDraw="1",
        bufferSize="0.8",
        bufferSizeUnits="MM",
        bufferColor="255,255,255,255",
        bufferOpacity="1",
    )
    # Placement 1 is "over point": the label sits on the feature's centre.
    ET.SubElement(settings, "placement", placement="1", dist="0")
    ET.SubElement(settings, "rendering", obstacle="0", displayAll="1", labelPerPart="0")
    return labeling


def write_style(path: Path, qml: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(qml, encoding="utf-8")


def _renderer(kind: str, **attributes: str) -> ET.Element:
    common = {"type": kind, "band": "1", "opacity": "1", "alphaBand": "-1", "nodataColor": ""}
    return ET.Element("rasterrenderer", common | attributes)


def _min_max_origin(renderer: ET.Element, limits: str, cut_lower: float, cut_upper: float) -> None:
    ET.SubElement(renderer, "rasterTransparency")
    origin = ET.SubElement(renderer, "minMaxOrigin")
    for tag, text in (
        ("limits", limits),
        ("extent", "WholeRaster"),
        ("statAccuracy", "Estimated"),
        ("cumulativeCutLower", _number(cut_lower)),
        ("cumulativeCutUpper", _number(cut_upper)),
        ("stdDevFactor", "2"),
    ):
        ET.SubElement(origin, tag).text = text


def _ramp_shader(
    ramp_type: str,
    low: float,
    high: float,
    ramp: Sequence[RampStop],
    limits: str,
    cuts: tuple[float, float],
    *,
    label_precision: int = 0,
) -> tuple[ET.Element, ET.Element]:
    """A singleband pseudocolor renderer and its colour ramp shader (`ramp_type` INTERPOLATED or DISCRETE) over
    `low`..`high`, its source ramp written; the caller adds the shader's items."""
    renderer = _renderer("singlebandpseudocolor", classificationMin=_number(low), classificationMax=_number(high))
    _min_max_origin(renderer, limits, *cuts)
    shader = ET.SubElement(
        ET.SubElement(renderer, "rastershader"),
        "colorrampshader",
        colorRampType=ramp_type,
        classificationMode="1",
        clip="0",
        minimumValue=_number(low),
        maximumValue=_number(high),
        labelPrecision=str(label_precision),
    )
    _gradient(shader, ramp)
    return renderer, shader


def _gradient(shader: ET.Element, ramp: Sequence[RampStop]) -> None:
    first, *middle, last = ramp
    properties = {
        "color1": first.colour.qgis_rgba,
        "color2": last.colour.qgis_rgba,
        "discrete": "0",
        "rampType": "gradient",
        "stops": ":".join(f"{stop.position:.6g};{stop.colour.qgis_rgba}" for stop in middle),
    }
    _properties(ET.SubElement(shader, "colorramp", type="gradient", name="[source]"), properties)


def _contrast(renderer: ET.Element, tag: str, limits: dict[str, str]) -> None:
    enhancement = ET.SubElement(renderer, tag)
    for name, value in limits.items():
        ET.SubElement(enhancement, name).text = value
    ET.SubElement(enhancement, "algorithm").text = "StretchToMinimumMaximum"


def _single_fill(properties: dict[str, str]) -> ET.Element:
    """A single-symbol vector renderer whose symbol is one simple fill with `properties` (QGIS's names)."""
    renderer = ET.Element("renderer-v2", type="singleSymbol", symbollevels="0", enableorderby="0", forceraster="0")
    ET.SubElement(renderer, "symbols").append(_fill_symbol("0", properties))
    ET.SubElement(renderer, "rotation")
    ET.SubElement(renderer, "sizescale")
    return renderer


def _fill_symbol(name: str, properties: dict[str, str]) -> ET.Element:
    """A fill symbol of one simple fill with `properties` (QGIS's names)."""
    symbol = ET.Element("symbol", type="fill", name=name, alpha="1", clip_to_extent="1")
    layer = ET.SubElement(symbol, "layer", {"class": "SimpleFill", "enabled": "1", "locked": "0", "pass": "0"})
    _properties(layer, properties | {"outline_width_unit": "MM", "joinstyle": "miter"})
    return symbol


def _properties(element: ET.Element, values: dict[str, str]) -> None:
    """`values` written into `element` both as QGIS >= 3.26 reads them (an Option map) and as older 3.x reads them
    (prop elements)."""
    options = ET.SubElement(element, "Option", type="Map")
    for key, value in values.items():
        ET.SubElement(options, "Option", type="QString", name=key, value=value)
    for key, value in values.items():
        ET.SubElement(element, "prop", k=key, v=value)


def _rgba(colour: Colour, alpha: int) -> str:
    return f"{colour.red},{colour.green},{colour.blue},{alpha}"


def _numeric_format(legend: ET.Element) -> None:
    options = ET.SubElement(ET.SubElement(legend, "numericFormat", id="basic"), "Option", type="Map")
    for name, kind, value in (
        ("decimal_separator", "QChar", ""),
        ("decimals", "int", "4"),
        ("rounding_type", "int", "1"),
        ("show_plus", "bool", "false"),
        ("show_thousand_separator", "bool", "true"),
        ("show_trailing_zeros", "bool", "false"),
        ("thousand_separator", "QChar", ""),
    ):
        ET.SubElement(options, "Option", name=name, type=kind, value=value)


def _document(renderer: ET.Element) -> str:
    root = ET.Element("qgis", version=QGIS_VERSION, styleCategories="Symbology")
    root.append(raster_pipe(renderer))
    ET.SubElement(root, "blendMode").text = "0"
    ET.indent(root)
    return f"{DOCTYPE}\n{ET.tostring(root, encoding='unicode')}\n"


def raster_pipe(renderer: ET.Element, smooth: bool = False) -> ET.Element:
    """A raster layer's `<pipe>`: `renderer` between QGIS's default provider, colour and resampling stages;
    `smooth` (imagery) resamples bilinearly when zoomed, else pixels stay sharp squares."""
    pipe = ET.Element("pipe")
    provider = ET.SubElement(pipe, "provider")
    # Each pixel of a map is one tile: resample with nearest neighbour so tile edges stay sharp.
    ET.SubElement(
        provider,
        "resampling",
        enabled="false",
        maxOversampling="2",
        zoomedInResamplingMethod="nearestNeighbour",
        zoomedOutResamplingMethod="nearestNeighbour",
    )
    pipe.append(renderer)
    ET.SubElement(pipe, "brightnesscontrast", brightness="0", contrast="0", gamma="1")
    ET.SubElement(
        pipe,
        "huesaturation",
        saturation="0",
        grayscaleMode="0",
        invertColors="0",
        colorizeOn="0",
        colorizeRed="255",
        colorizeGreen="128",
        colorizeBlue="128",
        colorizeStrength="100",
    )
    resampler = {"zoomedInResampler": "bilinear", "zoomedOutResampler": "bilinear"} if smooth else {}
    ET.SubElement(pipe, "rasterresampler", {"maxOversampling": "2", **resampler})
    ET.SubElement(pipe, "resamplingStage").text = "resamplingFilter"
    return pipe


def _number(value: float) -> str:
    return repr(float(value))


def _ordinal(number: int) -> str:
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"

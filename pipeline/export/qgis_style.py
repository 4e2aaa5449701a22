"""QGIS layer styles (.qml) for the exported rasters: a perceptual colour ramp for scores, a palette for concepts.

QGIS loads `<name>.qml` beside `<name>.tif` as the layer's default style. The XML follows what QGIS 3.x writes
for a `singlebandpseudocolor` renderer (interpolated colour ramp shader) and a `paletted` renderer. The score
ramp is also the preview's colour map, so a tile has the same colour in QGIS and in the browser.
"""

from __future__ import annotations

import colorsys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from branca.colormap import LinearColormap, linear

from common.atomic import atomic_path

QGIS_VERSION = "3.28.0"
DOCTYPE = "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>"
LABEL_FORMAT = ".4g"
GOLDEN_RATIO_CONJUGATE = 0.618033988749895


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


def _viridis() -> tuple[RampStop, ...]:
    # branca sets its named ramps as attributes at import, out of sight of type checkers.
    ramp: LinearColormap = linear.viridis  # type: ignore[attr-defined]
    return tuple(
        RampStop(float(position), Colour(*(round(channel * 255) for channel in rgba[:3])))
        for position, rgba in zip(ramp.index, ramp.colors, strict=True)
    )


# Viridis: perceptually uniform, readable in greyscale and by the colour-blind.
SCORE_RAMP = _viridis()


def category_colour(value: int) -> Colour:
    """A colour fixed by the category's value (golden-ratio hue steps), so neighbouring values differ clearly."""
    hue = (value * GOLDEN_RATIO_CONJUGATE) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.65, 0.95 if value % 2 == 0 else 0.75)
    return Colour(round(red * 255), round(green * 255), round(blue * 255))


def pseudocolor_qml(display: DisplayRange, ramp: Sequence[RampStop] = SCORE_RAMP) -> str:
    """A singleband pseudocolor style: `ramp` stretched over the display range, nodata transparent."""
    low, high = display.minimum, display.maximum
    renderer = _renderer("singlebandpseudocolor", classificationMin=_number(low), classificationMax=_number(high))
    _min_max_origin(renderer, "CumulativeCut", display.lower_percentile / 100, display.upper_percentile / 100)
    shader = ET.SubElement(
        ET.SubElement(renderer, "rastershader"),
        "colorrampshader",
        colorRampType="INTERPOLATED",
        classificationMode="1",
        clip="0",
        minimumValue=_number(low),
        maximumValue=_number(high),
        labelPrecision="4",
    )
    _gradient(shader, ramp)
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


def _gradient(shader: ET.Element, ramp: Sequence[RampStop]) -> None:
    """The source ramp, written both as QGIS >= 3.26 reads it (Option map) and as older 3.x reads it (prop)."""
    first, *middle, last = ramp
    properties = {
        "color1": first.colour.qgis_rgba,
        "color2": last.colour.qgis_rgba,
        "discrete": "0",
        "rampType": "gradient",
        "stops": ":".join(f"{stop.position:.6g};{stop.colour.qgis_rgba}" for stop in middle),
    }
    colour_ramp = ET.SubElement(shader, "colorramp", type="gradient", name="[source]")
    options = ET.SubElement(colour_ramp, "Option", type="Map")
    for key, value in properties.items():
        ET.SubElement(options, "Option", type="QString", name=key, value=value)
    for key, value in properties.items():
        ET.SubElement(colour_ramp, "prop", k=key, v=value)


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
    pipe = ET.SubElement(root, "pipe")
    provider = ET.SubElement(pipe, "provider")
    # Each pixel is one map tile: resample with nearest neighbour so tile edges stay sharp.
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
    ET.SubElement(pipe, "rasterresampler", maxOversampling="2")
    ET.SubElement(pipe, "resamplingStage").text = "resamplingFilter"
    ET.SubElement(root, "blendMode").text = "0"
    ET.indent(root)
    return f"{DOCTYPE}\n{ET.tostring(root, encoding='unicode')}\n"


def _number(value: float) -> str:
    return repr(float(value))


def _ordinal(number: int) -> str:
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"

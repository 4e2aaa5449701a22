"""`preview.html`: one self-contained page with a basemap, one toggleable score layer per query, legends and the region.

The page works offline: Leaflet (vendored in `pipeline/export/assets/leaflet`) and every overlay PNG are inlined, so
only the basemap's tiles come from the network; without it the overlays show on a blank background. The legend is
plain HTML/CSS drawn from the same viridis stops as the QGIS styles (branca's d3 legend would need a CDN).

Placement: an overlay is pinned to the EPSG:4326 corners of the store's EPSG:3857 grid. Leaflet stretches an
ImageOverlay linearly in Web Mercator between its corners, which is exact here because the PNG rows are the grid's
rows, evenly spaced in Mercator northing (not in latitude), so no `mercator_project` resampling is wanted.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path
from typing import Any, NamedTuple, cast

import folium
import numpy as np
from branca.element import Element, Figure, MacroElement
from folium.raster_layers import ImageOverlay
from folium.template import Template
from rasterio.crs import CRS

from common.atomic import atomic_path
from pipeline.errors import ExportError
from pipeline.export.qgis_style import SCORE_RAMP, DisplayRange, RampStop, display_range
from pipeline.geometry import lnglat_of_mercator
from pipeline.store.read import SoundscapeStore, StoreGrid
from pipeline.store.scores import SCORE_KINDS

# Longest side of an overlay PNG; larger grids are shown by a regular lattice of their tiles.
PREVIEW_MAX_PX = 1024
# The colour range is taken from at most this many tiles, sampled on a regular lattice.
MAX_SAMPLE_PX = 2**20
OVERLAY_OPACITY = 0.8
REGION_STYLE = {"color": "#ff3d00", "weight": 2, "fill": False}
LEAFLET_DIR = Path(__file__).parent / "assets" / "leaflet"
_CSS_IMAGE_URL = re.compile(r"url\((images/[\w.-]+\.png)\)")


class LegendEntry(NamedTuple):
    """One overlay's legend: shown while the overlay (the JavaScript variable `overlay_name`) is on the map."""

    overlay_name: str
    element_id: str
    html: str


class Lattice(NamedTuple):
    """The grid rows and columns a preview shows, and the EPSG:3857 bounds (left, bottom, right, top) they cover."""

    rows: np.ndarray
    cols: np.ndarray
    bounds: tuple[float, float, float, float]


def write_preview(store: Path, region_geojson: Path | dict[str, Any], out_html: Path, variable: str = "score") -> Path:
    """Write the folium preview of `variable` for every query of the store to `out_html`."""
    if variable not in SCORE_KINDS:
        raise ExportError(f"unknown score variable {variable!r}; use one of {', '.join(SCORE_KINDS)}")
    region = _region(region_geojson)
    soundscape = SoundscapeStore(store)
    grid = soundscape.grid
    if grid.crs != CRS.from_epsg(3857):
        raise ExportError(f"the preview needs an EPSG:3857 store, got {grid.crs}; rebuild the store")
    lattice = preview_lattice(grid)
    corners = lnglat_corners(lattice.bounds)

    fmap = folium.Map(tiles=None, control_scale=True)
    _inline_leaflet(fmap)
    folium.TileLayer("OpenStreetMap", name="OpenStreetMap").add_to(fmap)
    attribution = f"Imagery: {html.escape(str(soundscape.provenance['imagery_attribution']))}"
    legends: list[LegendEntry] = []
    for index, query in enumerate(soundscape.queries):
        display = display_range(soundscape.sample_scores(variable, index, MAX_SAMPLE_PX), f"query {query.id!r}")
        overlay = ImageOverlay(
            colourise(soundscape.scores(variable, index, lattice.rows, lattice.cols), display),
            bounds=corners,
            name=query.label,
            opacity=OVERLAY_OPACITY,
            show=index == 0,
            attribution=attribution,
        )
        overlay.add_to(fmap)
        element_id = f"legend-{query.id}"
        legends.append(LegendEntry(overlay.get_name(), element_id, _legend_html(element_id, query.label, display)))
    folium.GeoJson(region, name="region", control=False, style_function=_region_style).add_to(fmap)
    folium.LayerControl(collapsed=False).add_to(fmap)
    _Legend(SCORE_KINDS[variable].meaning, legends).add_to(fmap)
    gaps = str(soundscape.dataset.attrs.get("empty_tiles_reason", ""))
    _figure(fmap).html.add_child(Element(_banner(soundscape.provenance, variable, gaps)))
    fmap.fit_bounds(corners)
    with atomic_path(out_html) as tmp:
        tmp.write_text(_figure(fmap).render(), encoding="utf-8")
    return out_html


def preview_lattice(grid: StoreGrid) -> Lattice:
    """Every `stride`-th row and column (centred in its block), with stride keeping both sides <= PREVIEW_MAX_PX."""
    stride = max(1, math.ceil(max(grid.width, grid.height) / PREVIEW_MAX_PX))
    rows = np.minimum(np.arange(math.ceil(grid.height / stride)) * stride + stride // 2, grid.height - 1)
    cols = np.minimum(np.arange(math.ceil(grid.width / stride)) * stride + stride // 2, grid.width - 1)
    # The last block may reach past the grid's edge; the image covers whole blocks so its pixels stay square.
    left, top = grid.transform @ (0, 0)
    right, bottom = grid.transform @ (len(cols) * stride, len(rows) * stride)
    return Lattice(rows, cols, (left, bottom, right, top))


def lnglat_corners(bounds: tuple[float, float, float, float]) -> list[list[float]]:
    """[[south, west], [north, east]] of EPSG:3857 bounds; east may pass 180 when the grid crosses the antimeridian."""
    left, bottom, right, top = bounds
    (west, east), (south, north) = (values.tolist() for values in lnglat_of_mercator([left, right], [bottom, top]))
    if east <= west:
        east += 360.0
    return [[south, west], [north, east]]


def colourise(values: np.ndarray, display: DisplayRange, ramp: tuple[RampStop, ...] = SCORE_RAMP) -> np.ndarray:
    """RGBA uint8 (rows, cols, 4): `ramp` over the display range, clamped at its ends; NaN fully transparent."""
    lookup = _lookup_table(ramp)
    span = display.maximum - display.minimum
    position = np.clip(np.nan_to_num((values - display.minimum) / span), 0.0, 1.0)
    rgba = np.empty((*values.shape, 4), dtype=np.uint8)
    rgba[..., :3] = lookup[np.round(position * (len(lookup) - 1)).astype(np.intp)]
    rgba[..., 3] = np.where(np.isfinite(values), 255, 0)
    return rgba


def _lookup_table(ramp: tuple[RampStop, ...], size: int = 256) -> np.ndarray:
    positions = [stop.position for stop in ramp]
    steps = np.linspace(0.0, 1.0, size)
    channels = [np.interp(steps, positions, [stop.colour[channel] for stop in ramp]) for channel in range(3)]
    return np.round(np.stack(channels, axis=-1)).astype(np.uint8)


def _region(region_geojson: Path | dict[str, Any]) -> dict[str, Any]:
    if isinstance(region_geojson, dict):
        region = region_geojson
    else:
        try:
            region = json.loads(region_geojson.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ExportError(
                f"cannot read the region GeoJSON {region_geojson} ({exc}); pass the build's region"
            ) from exc
    if not isinstance(region, dict) or "type" not in region:
        raise ExportError("the region is not a GeoJSON object (no 'type'); pass the build's region GeoJSON")
    return region


def _region_style(_feature: dict[str, Any]) -> dict[str, Any]:
    return REGION_STYLE


def _figure(fmap: folium.Map) -> Figure:
    return cast(Figure, fmap.get_root())


def _inline_leaflet(fmap: folium.Map) -> None:
    """Replace folium's CDN links (Leaflet, jQuery, Bootstrap...) with the vendored Leaflet, inlined."""
    fmap.default_js = []
    fmap.default_css = []
    css = _CSS_IMAGE_URL.sub(
        lambda match: f"url(data:image/png;base64,{base64.b64encode((LEAFLET_DIR / match[1]).read_bytes()).decode()})",
        (LEAFLET_DIR / "leaflet.css").read_text(encoding="utf-8"),
    )
    script = (LEAFLET_DIR / "leaflet.js").read_text(encoding="utf-8")
    header = _figure(fmap).header
    header.add_child(Element(f"<style>{css}</style>"), name="leaflet_css", index=0)
    header.add_child(Element(f"<script>{script}</script>"), name="leaflet_js", index=1)
    header.add_child(Element(f"<style>{_PAGE_CSS}</style>"), name="sat2sound_css")


def _legend_html(element_id: str, caption: str, display: DisplayRange) -> str:
    gradient = ", ".join(f"{stop.colour.hex} {stop.position:.2%}" for stop in SCORE_RAMP)
    return (
        f'<div class="s2s-legend-entry" id="{html.escape(element_id)}">'
        f'<div class="s2s-caption">{html.escape(caption)}</div>'
        f'<div class="s2s-bar" style="background: linear-gradient(to right, {gradient})"></div>'
        f'<div class="s2s-ticks"><span>{html.escape(display.label(display.minimum))}</span>'
        f"<span>{html.escape(display.label(display.maximum))}</span></div></div>"
    )


def _banner(provenance: dict[str, Any], variable: str, gaps: str = "") -> str:
    """The title box: what is shown, the checkpoint, and warnings (untrained weights; tiles left empty because
    imagery could not be had, `gaps`)."""
    details = f"{variable}: {SCORE_KINDS[variable].meaning} · checkpoint {provenance['checkpoint']}"
    warning = (
        '<div class="s2s-warning">Untrained model weights (random, fixed seed): these maps are not predictions.</div>'
        if provenance["untrained"] is True
        else ""
    )
    if provenance.get("model_description"):
        warning += f'<div class="s2s-note">{html.escape(str(provenance["model_description"]))}</div>'
    if gaps:
        warning += f'<div class="s2s-warning">{html.escape(gaps)}</div>'
    return (
        f'<div class="s2s-banner"><div class="s2s-title">Sat2Sound soundscape preview</div>'
        f'<div class="s2s-details">{html.escape(details)}</div>{warning}</div>'
    )


class _Legend(MacroElement):
    """A bottom-right control holding one legend per overlay; each shows only while its overlay is on the map."""

    _template = Template(
        """
        {% macro script(this, kwargs) %}
        (function () {
            var map = {{ this._parent.get_name() }};
            var legend = L.control({position: "bottomright"});
            legend.onAdd = function () {
                var div = L.DomUtil.create("div", "s2s-legend");
                div.innerHTML = {{ this.html|tojson }};
                return div;
            };
            legend.addTo(map);
            var entries = [
                {% for entry in this.entries %}[{{ entry.overlay_name }}, {{ entry.element_id|tojson }}],{% endfor %}
            ];
            function sync() {
                entries.forEach(function (entry) {
                    document.getElementById(entry[1]).hidden = !map.hasLayer(entry[0]);
                });
            }
            map.on("overlayadd overlayremove", sync);
            sync();
        })();
        {% endmacro %}
        """
    )

    def __init__(self, meaning: str, entries: list[LegendEntry]) -> None:
        super().__init__()
        self._name = "Sat2SoundLegend"
        self.html = f'<div class="s2s-meaning">{html.escape(meaning)}</div>' + "".join(entry.html for entry in entries)
        self.entries = entries


_PAGE_CSS = """
.s2s-banner { position: fixed; top: 10px; left: 60px; z-index: 1000; max-width: 60%; padding: 6px 10px;
  background: rgba(255, 255, 255, 0.92); border-radius: 4px; font: 13px/1.4 sans-serif;
  box-shadow: 0 1px 5px rgba(0, 0, 0, 0.4); }
.s2s-title { font-weight: bold; }
.s2s-warning { color: #b00020; font-weight: bold; }
.s2s-note { color: #444; font-style: italic; }
.s2s-legend { background: rgba(255, 255, 255, 0.92); padding: 6px 10px; border-radius: 4px;
  font: 12px/1.4 sans-serif; box-shadow: 0 1px 5px rgba(0, 0, 0, 0.4); width: 260px; }
.s2s-meaning { font-style: italic; margin-bottom: 4px; }
.s2s-legend-entry { margin-top: 4px; }
.s2s-caption { font-weight: bold; }
.s2s-bar { height: 12px; border: 1px solid #555; }
.s2s-ticks { display: flex; justify-content: space-between; }
"""

"""`preview.html`: one self-contained page to read a build's answers in a browser.

Layers (toggled in the top-right panel): the build's own imagery as an underlay (`imagery.tif`, shown; the
OpenStreetMap basemap stays a click away when online), per query its percentile map (the first one shown, with a
legend in plain words: "top 10 % of this region for '...'") and its raw cosine map, the dominant sound (which query
fits each tile best, in the colours of `cog/dominant.tif`), and per query its top places as numbered markers (from
`top_places.gpkg`, the first query's shown). Clicking a tile opens a popup with every query's raw cosine and
percentile and the tile's dominant sound; with a sound gallery (`outputs.gallery`), also the captions of the
tile's best recordings, with players (`pipeline.export.preview_sounds`). Each legend shows while its layer is on
the map.

The page works offline: Leaflet (vendored in `pipeline/export/assets/leaflet`), every overlay image and the values
the popups read are inlined; only the basemap's tiles come from the network. Colours come from the same place as
the QGIS styles (pipeline.export.qgis_style), so a tile has the same colour in QGIS and in the browser.

Size: maps and popup values are read on a lattice of the grid (`preview_lattice`) of at most PREVIEW_MAX_PX a
side and PREVIEW_MAX_VALUES tiles x queries in all, so a page holds at most about 2 x PREVIEW_MAX_VALUES overlay
pixels (PNG) and 4 bytes of popup values per tile and query (int16 cosine x 10^4, uint16 percentile x 100), plus
the underlay (UNDERLAY_MAX_PX a side at most, as lossy WebP), the top places and the gallery's clips (each sound
rank counts as a query): near 10 MB at most whatever the region's size (8.3 MB measured for three queries at the
bound, underlay and clips aside). Where the lattice skips tiles, a
popup says so.

Times: a build of several times (`model.month`/`model.hour` lists or `all`) gets a time slider (bottom right,
labelled with the time, e.g. "month 6, hour 14"): moving it switches every query layer (percentile and raw
cosine), the dominant sound and the popups' values to that time; each layer holds one image per time, and its
raw cosine colours span every time so that times compare. The lattice shrinks so that tiles x queries x times
stays within PREVIEW_MAX_VALUES. The top places are those of the first time (as top_places.gpkg holds them).

Placement: an overlay is pinned to the EPSG:4326 corners of its EPSG:3857 bounds. Leaflet stretches an
ImageOverlay linearly in Web Mercator between its corners, which is exact here because the image rows are evenly
spaced in Mercator northing (not in latitude), so no `mercator_project` resampling is wanted.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, cast

import folium
import geopandas as gpd
import numpy as np
from branca.element import Element, Figure, MacroElement
from folium.raster_layers import ImageOverlay
from folium.template import Template
from folium.utilities import image_to_url
from pyogrio.errors import DataSourceError
from rasterio.crs import CRS

from common.atomic import atomic_path
from pipeline.config import Query, Time
from pipeline.errors import ExportError
from pipeline.export.places import PLACES_LAYER
from pipeline.export.preview_sounds import PREVIEW_SOUND_RANKS, PreviewSounds, preview_sounds
from pipeline.export.qgis_style import (
    OVERLAY_OPACITY,
    PERCENTILE_CLASSES,
    SCORE_RAMP,
    Colour,
    DisplayRange,
    RampStop,
    ValueClass,
    display_range,
    percentile_class,
    percentile_classes,
    query_colours,
)
from pipeline.export.underlay import read_underlay
from pipeline.geometry import WEB_MERCATOR, lnglat_of_mercator
from pipeline.imagery.codec import encode_webp
from pipeline.store.read import SoundscapeStore, StoreGrid
from pipeline.store.scores import SCORE_KINDS, dominant_query

# Longest side of an overlay image, and the most tiles x queries a page holds values of.
PREVIEW_MAX_PX = 1024
PREVIEW_MAX_VALUES = 2**20
# The colour range is taken from at most this many tiles, sampled on a regular lattice.
MAX_SAMPLE_PX = 2**20
UNDERLAY_QUALITY = 80
# Popup values: cosine x SCORE_SCALE as int16, percentile x PERCENTILE_SCALE as uint16, NODATA where not valid.
SCORE_SCALE = 10_000
PERCENTILE_SCALE = 100
SCORE_NODATA = -(2**15)
PERCENTILE_NODATA = 2**16 - 1
REGION_STYLE = {"color": "#ff3d00", "weight": 2, "fill": False}
DOMINANT_CAPTION = "Dominant sound: which query fits each tile best"
DOMINANT_MEANING = "the query with the highest softmax across the queries, in the colours of cog/dominant.tif"
LEAFLET_DIR = Path(__file__).parent / "assets" / "leaflet"
_CSS_IMAGE_URL = re.compile(r"url\((images/[\w.-]+\.png)\)")


class LegendEntry(NamedTuple):
    """One overlay's legend: shown while the overlay (the JavaScript variable `overlay_name`) is on the map."""

    overlay_name: str
    element_id: str
    html: str


class Lattice(NamedTuple):
    """The grid rows and columns a preview shows (one tile per `stride` x `stride` block), and the EPSG:3857
    bounds (left, bottom, right, top) the blocks cover."""

    rows: np.ndarray
    cols: np.ndarray
    bounds: tuple[float, float, float, float]
    stride: int


class Place(NamedTuple):
    rank: int
    score: float
    percentile: float
    lon: float
    lat: float
    area: int


class LatticeValues(NamedTuple):
    """The store's values on a lattice: per query its raw cosine and percentile, and the dominant query (-1 where
    not valid) with its margin (0-1)."""

    score: list[np.ndarray]
    percentile: list[np.ndarray]
    dominant: np.ndarray
    margin: np.ndarray

    @classmethod
    def read(cls, soundscape: SoundscapeStore, lattice: Lattice, time: int = 0) -> LatticeValues:
        """The values at `time` (an index into the store's times)."""

        def layer(variable: str, index: int) -> np.ndarray:
            return soundscape.scores(variable, index, lattice.rows, lattice.cols, time)

        indices = range(len(soundscape.queries))
        dominant, margin = dominant_query(layer("score_softmax", index) for index in indices)
        return cls(
            [layer("score", index) for index in indices],
            [layer("score_percentile", index) for index in indices],
            dominant,
            margin,
        )


def write_preview(
    store: Path,
    region_geojson: Path | dict[str, Any],
    out_html: Path,
    underlay: Path | None = None,
    places: Path | None = None,
) -> Path:
    """Write the preview of the store to `out_html`, with the imagery `underlay` (`imagery.tif`) and the top
    `places` (`top_places.gpkg`) where given."""
    region = _region(region_geojson)
    soundscape = SoundscapeStore(store)
    grid = soundscape.grid
    if grid.crs != CRS.from_user_input(WEB_MERCATOR):
        raise ExportError(f"the preview needs an {WEB_MERCATOR} store, got {grid.crs}; rebuild the store")
    queries = soundscape.queries
    colours = query_colours(len(queries))
    times = soundscape.times.all
    sound_ranks = PREVIEW_SOUND_RANKS if soundscape.gallery is not None else 0
    lattice = preview_lattice(grid, (len(queries) + sound_ranks) * len(times))
    values = [LatticeValues.read(soundscape, lattice, time) for time in range(len(times))]
    sounds = preview_sounds(soundscape, lattice.rows, lattice.cols)
    corners = lnglat_corners(lattice.bounds)
    attribution = f"Imagery: {html.escape(str(soundscape.provenance['imagery_attribution']))}"

    fmap = folium.Map(tiles=None, control_scale=True)
    _inline_leaflet(fmap)
    folium.TileLayer("OpenStreetMap", name="OpenStreetMap (online)").add_to(fmap)
    if underlay is not None:
        _underlay_overlay(underlay, attribution).add_to(fmap)
    overlays = _Overlays(fmap, corners, attribution)
    _add_maps(overlays, soundscape, values, colours)
    if places is not None:
        for index, (query, colour) in enumerate(zip(queries, colours, strict=True)):
            group = folium.FeatureGroup(name=f"{query.label} — top places", show=index == 0)
            _PlaceMarkers(query, colour, read_places(places, query)).add_to(group)
            group.add_to(fmap)
    folium.GeoJson(region, name="region", control=False, style_function=_region_style).add_to(fmap)
    folium.LayerControl(collapsed=False).add_to(fmap)
    _Legend(overlays.legends).add_to(fmap)
    if len(times) > 1:
        _TimeSlider(times, overlays.per_time).add_to(fmap)
    _TileValues(grid, lattice, queries, colours, values, times, sounds).add_to(fmap)
    gaps = str(soundscape.attrs.get("empty_tiles_reason", ""))
    _figure(fmap).html.add_child(Element(_banner(soundscape.provenance, gaps)))
    fmap.fit_bounds(corners)
    with atomic_path(out_html) as tmp:
        tmp.write_text(_figure(fmap).render(), encoding="utf-8")
    return out_html


class _Overlays:
    """Adds the map's overlays (RGBA images over the lattice's corners, one per time) in order, each with its
    legend; `per_time` keeps, per overlay, the image of every time (for the time slider)."""

    def __init__(self, fmap: folium.Map, corners: list[list[float]], attribution: str) -> None:
        self.fmap, self.corners, self.attribution = fmap, corners, attribution
        self.legends: list[LegendEntry] = []
        self.per_time: list[tuple[str, list[str]]] = []

    def add(self, images: Sequence[np.ndarray], name: str, show: bool, legend: tuple[str, str]) -> None:
        """Add `images` (one per time; the first shown) as overlay `name`, with `legend` as (element id, html)."""
        urls = [image_to_url(image) for image in images]
        overlay = ImageOverlay(
            urls[0], bounds=self.corners, name=name, opacity=OVERLAY_OPACITY, show=show, attribution=self.attribution
        )
        overlay.add_to(self.fmap)
        self.legends.append(LegendEntry(overlay.get_name(), *legend))
        if len(urls) > 1:
            self.per_time.append((overlay.get_name(), urls))


def _add_maps(
    overlays: _Overlays, soundscape: SoundscapeStore, values: Sequence[LatticeValues], colours: Sequence[Colour]
) -> None:
    """Per query its percentile map (the first shown) and raw cosine map, then the dominant sound; each with one
    image per time of `values`."""
    queries = soundscape.queries
    meaning = SCORE_KINDS["score_percentile"].meaning
    for index, query in enumerate(queries):
        classes = percentile_classes(query.label)
        images = [paint(percentile_class(at.percentile[index]), [item.colour for item in classes]) for at in values]
        legend = _class_legend(f"percentile-{query.id}", query.label, meaning, classes[::-1])
        overlays.add(images, f"{query.label} — percentile", index == 0, legend)
    for index, query in enumerate(queries):
        samples = [soundscape.sample_scores("score", index, MAX_SAMPLE_PX, time) for time in range(len(values))]
        display = display_range(np.stack(samples), f"query {query.id!r}")
        legend = _ramp_legend(f"score-{query.id}", query.label, display)
        overlays.add(
            [colourise(at.score[index], display) for at in values], f"{query.label} — raw cosine", False, legend
        )
    named = [
        ValueClass(index, query.label, colour)
        for index, (query, colour) in enumerate(zip(queries, colours, strict=True))
    ]
    legend = _class_legend("dominant", DOMINANT_CAPTION, DOMINANT_MEANING, named)
    overlays.add([paint(at.dominant, colours) for at in values], "Dominant sound", False, legend)


def preview_lattice(grid: StoreGrid, query_count: int = 1) -> Lattice:
    """Every `stride`-th row and column (centred in its block), with stride keeping both sides <= PREVIEW_MAX_PX
    and the lattice's tiles x `query_count` <= PREVIEW_MAX_VALUES."""
    side = min(PREVIEW_MAX_PX, math.isqrt(PREVIEW_MAX_VALUES // max(1, query_count)))
    stride = max(1, math.ceil(max(grid.width, grid.height) / side))
    rows = np.minimum(np.arange(math.ceil(grid.height / stride)) * stride + stride // 2, grid.height - 1)
    cols = np.minimum(np.arange(math.ceil(grid.width / stride)) * stride + stride // 2, grid.width - 1)
    # The last block may reach past the grid's edge; the image covers whole blocks so its pixels stay square.
    left, top = grid.transform @ (0, 0)
    right, bottom = grid.transform @ (len(cols) * stride, len(rows) * stride)
    return Lattice(rows, cols, (left, bottom, right, top), stride)


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


def paint(categories: np.ndarray, colours: Sequence[Colour]) -> np.ndarray:
    """RGBA uint8 (rows, cols, 4): each category (an index into `colours`) in its colour; negative transparent."""
    lookup = np.array([[*colour, 255] for colour in colours] + [[0, 0, 0, 0]], dtype=np.uint8)
    return lookup[np.where(categories < 0, len(colours), categories)]


def read_places(gpkg: Path, query: Query) -> list[Place]:
    """A query's top places, best first, from the build's `top_places.gpkg`."""
    layer = PLACES_LAYER.format(query=query.id)
    try:
        table = gpd.read_file(gpkg, layer=layer, ignore_geometry=True)
    except (OSError, DataSourceError, ValueError) as exc:
        raise ExportError(f"cannot read layer {layer} of {gpkg} ({exc}); rerun the build's places step") from exc
    return [Place(*row) for row in table[list(Place._fields)].itertuples(index=False)]


def _underlay_overlay(underlay: Path, attribution: str) -> ImageOverlay:
    """The build's imagery, smoothly resampled (the maps' tiles stay sharp squares)."""
    rgb, valid, bounds = read_underlay(underlay)
    url = f"data:image/webp;base64,{base64.b64encode(encode_webp(rgb, valid, UNDERLAY_QUALITY)).decode()}"
    return ImageOverlay(
        url,
        bounds=lnglat_corners(bounds),
        name="Imagery (this build's, offline)",
        show=True,
        attribution=attribution,
        className="s2s-imagery",
    )


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


def _class_legend(element_id: str, caption: str, meaning: str, classes: Sequence[ValueClass]) -> tuple[str, str]:
    """A legend of coloured classes in the order given, under its caption and what the map means."""
    rows = "".join(
        f'<div class="s2s-class"><span class="s2s-swatch" style="background: {item.colour.hex}"></span>'
        f"{html.escape(item.label)}</div>"
        for item in classes
    )
    body = f'<div class="s2s-caption">{html.escape(caption)}</div><div class="s2s-meaning">{html.escape(meaning)}</div>'
    return element_id, f'<div class="s2s-legend-entry" id="{html.escape(element_id)}">{body}{rows}</div>'


def _ramp_legend(element_id: str, caption: str, display: DisplayRange) -> tuple[str, str]:
    gradient = ", ".join(f"{stop.colour.hex} {stop.position:.2%}" for stop in SCORE_RAMP)
    return element_id, (
        f'<div class="s2s-legend-entry" id="{html.escape(element_id)}">'
        f'<div class="s2s-caption">{html.escape(caption)}</div>'
        f'<div class="s2s-meaning">{html.escape(SCORE_KINDS["score"].meaning)}</div>'
        f'<div class="s2s-bar" style="background: linear-gradient(to right, {gradient})"></div>'
        f'<div class="s2s-ticks"><span>{html.escape(display.label(display.minimum))}</span>'
        f"<span>{html.escape(display.label(display.maximum))}</span></div></div>"
    )


def _banner(provenance: dict[str, Any], gaps: str = "") -> str:
    """The title box: how to read the page, the checkpoint, and warnings (untrained weights; tiles left empty
    because imagery could not be had, `gaps`)."""
    details = f"Click a tile for every query's score and percentile · checkpoint {provenance['checkpoint']}"
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


def _base64(values: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(values, dtype=dtype).tobytes()).decode()


class _Legend(MacroElement):
    """A bottom-left control holding one legend per overlay (the layer list takes the right side); each shows only
    while its overlay is on the map."""

    _template = Template(
        """
        {% macro script(this, kwargs) %}
        (function () {
            var map = {{ this._parent.get_name() }};
            var legend = L.control({position: "bottomleft"});
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

    def __init__(self, entries: list[LegendEntry]) -> None:
        super().__init__()
        self._name = "Sat2SoundLegend"
        self.html = "".join(entry.html for entry in entries)
        self.entries = entries


class _PlaceMarkers(MacroElement):
    """A query's top places as numbered markers in its colour, each with a popup, added to the parent group."""

    _template = Template(
        """
        {% macro script(this, kwargs) %}
        (function () {
            var group = {{ this._parent.get_name() }};
            {{ this.places|tojson }}.forEach(function (place) {
                var icon = L.divIcon({
                    className: "s2s-place",
                    html: '<div style="background: {{ this.colour }}">' + place[0] + "</div>",
                    iconSize: [22, 22],
                    iconAnchor: [11, 11],
                });
                L.marker([place[1], place[2]], {icon: icon, title: place[3]}).bindPopup(place[4]).addTo(group);
            });
        })();
        {% endmacro %}
        """
    )

    def __init__(self, query: Query, colour: Colour, places: list[Place]) -> None:
        super().__init__()
        self._name = "Sat2SoundPlaces"
        self.colour = colour.hex
        self.places = [
            [place.rank, place.lat, place.lon, f"#{place.rank} for {query.label}", _place_popup(query, place)]
            for place in places
        ]


def _place_popup(query: Query, place: Place) -> str:
    words = PERCENTILE_CLASSES[int(percentile_class(np.array(place.percentile)))][1]
    return (
        f'<div class="s2s-popup"><b>#{place.rank} for {html.escape(query.label)}</b><br>'
        f"cosine {place.score:.4f} · percentile {place.percentile:.2f} ({words})<br>"
        f"area {place.area} · {place.lat:.5f}, {place.lon:.5f}</div>"
    )


class _TileValues(MacroElement):
    """Clicking the map opens a popup with the clicked tile's values for every query (read from the lattice)."""

    _template = Template(
        """
        {% macro script(this, kwargs) %}
        (function () {
            var map = {{ this._parent.get_name() }};
            var data = {{ this.data|tojson }};
            function decode(text, Type) {
                var bytes = Uint8Array.from(atob(text), function (c) { return c.charCodeAt(0); });
                return new Type(bytes.buffer);
            }
            var score = decode(data.score, Int16Array);
            var percentile = decode(data.percentile, Uint16Array);
            var dominant = decode(data.dominant, Int16Array);
            var margin = decode(data.margin, Uint8Array);
            var soundBest = decode(data.soundBest, Int32Array);
            function escape(text) {
                var div = document.createElement("div");
                div.textContent = text;
                return div.innerHTML;
            }
            function words(value) {
                for (var i = 0; i < data.classes.length; i++) {
                    if (value <= data.classes[i][0]) { return data.classes[i][1]; }
                }
                return data.classes[data.classes.length - 1][1];
            }
            function swatch(colour) {
                return '<span class="s2s-swatch" style="background: ' + colour + '"></span>';
            }
            function sounds(time, cells, cell) {
                var items = "";
                for (var rank = 0; rank < data.soundRanks; rank++) {
                    var index = soundBest[(time * data.soundRanks + rank) * cells + cell];
                    if (index < 0) { continue; }
                    var sound = data.sounds[index];
                    var credit = sound.licence + (sound.attribution ? " · " + sound.attribution : "");
                    items += '<li class="s2s-sound">' + escape(sound.caption)
                        + (sound.src ? '<br><audio controls preload="metadata" src="' + sound.src + '"></audio>' : "")
                        + '<div class="s2s-credit">' + escape(credit) + "</div></li>";
                }
                return items ? '<div class="s2s-sounds"><b>Probably sounds like</b> (its best gallery'
                    + " recordings)<ol>" + items + "</ol></div>" : "";
            }
            map.on("click", function (event) {
                var cells = data.rows * data.cols;
                var time = map.s2sTime || 0;
                var point = L.CRS.EPSG3857.project(event.latlng);
                var b = data.bounds;
                var col = Math.floor((point.x - b[0]) / (b[2] - b[0]) * data.cols);
                var row = Math.floor((b[3] - point.y) / (b[3] - b[1]) * data.rows);
                if (col < 0 || row < 0 || col >= data.cols || row >= data.rows) { return; }
                var tile = time * cells + row * data.cols + col;
                var centre = L.CRS.EPSG3857.unproject(L.point(data.x[col], data.y[row]));
                var where = "Tile at " + centre.lat.toFixed(5) + ", " + centre.lng.toFixed(5);
                if (data.stride > 1) {
                    where += " (the preview holds one tile in " + data.stride + " x " + data.stride
                        + "; the COGs hold them all)";
                }
                var body;
                if (dominant[tile] < 0) {
                    body = "<div>No prediction here: outside the region or without imagery.</div>";
                } else {
                    var best = data.queries[dominant[tile]];
                    body = '<div class="s2s-dominant">Dominant sound: ' + swatch(best.colour) + "<b>"
                        + escape(best.label) + "</b> (" + margin[tile]
                        + " points ahead of the runner-up in the softmax across queries)</div>" + data.times[time]
                        + "<table><tr><th>query</th><th>cosine</th><th>percentile</th></tr>";
                    data.queries.forEach(function (query, index) {
                        var at = (time * data.queries.length + index) * cells + row * data.cols + col;
                        var value = percentile[at] / data.percentileScale;
                        body += '<tr class="s2s-query" data-query="' + escape(query.id) + '"><td>'
                            + swatch(query.colour) + escape(query.label) + "</td><td>"
                            + (score[at] / data.scoreScale).toFixed(4) + "</td><td>" + value.toFixed(2)
                            + " (" + escape(words(value)) + ")</td></tr>";
                    });
                    body += "</table>" + sounds(time, cells, row * data.cols + col);
                }
                L.popup({maxWidth: 520, maxHeight: 440, autoPanPaddingTopLeft: [20, 100]})
                    .setLatLng(event.latlng)
                    .setContent('<div class="s2s-popup"><div class="s2s-where">' + where + "</div>" + body + "</div>")
                    .openOn(map);
            });
        })();
        {% endmacro %}
        """
    )

    def __init__(
        self,
        grid: StoreGrid,
        lattice: Lattice,
        queries: Sequence[Query],
        colours: Sequence[Colour],
        values: Sequence[LatticeValues],
        times: Sequence[Time],
        sounds: PreviewSounds | None = None,
    ) -> None:
        super().__init__()
        self._name = "Sat2SoundTileValues"
        score = np.stack([np.stack(at.score) for at in values])
        percentile = np.stack([np.stack(at.percentile) for at in values])
        dominant = np.stack([at.dominant for at in values])
        margin = np.stack([at.margin for at in values])
        # Tile centres in EPSG:3857 (the grid is north-up: columns give x, rows give y).
        x = grid.transform.c + grid.transform.a * (lattice.cols + 0.5)
        y = grid.transform.f + grid.transform.e * (lattice.rows + 0.5)
        self.data = {
            "bounds": lattice.bounds,
            "rows": len(lattice.rows),
            "cols": len(lattice.cols),
            "stride": lattice.stride,
            "x": np.asarray(x).tolist(),
            "y": np.asarray(y).tolist(),
            "queries": [
                {"id": query.id, "label": query.label, "colour": colour.hex}
                for query, colour in zip(queries, colours, strict=True)
            ],
            "classes": [[upper, words] for upper, words in PERCENTILE_CLASSES],
            "times": [
                f'<div class="s2s-time">{html.escape(time.label)}</div>' if len(times) > 1 else "" for time in times
            ],
            "scoreScale": SCORE_SCALE,
            "percentileScale": PERCENTILE_SCALE,
            "score": _base64(np.where(np.isnan(score), SCORE_NODATA, np.round(score * SCORE_SCALE)), "<i2"),
            "percentile": _base64(
                np.where(np.isnan(percentile), PERCENTILE_NODATA, np.round(percentile * PERCENTILE_SCALE)), "<u2"
            ),
            "dominant": _base64(dominant, "<i2"),
            "margin": _base64(np.round(np.nan_to_num(margin) * 100), "u1"),
            "sounds": [] if sounds is None else sounds.sounds,
            "soundRanks": 0 if sounds is None else sounds.best.shape[1],
            "soundBest": "" if sounds is None else _base64(sounds.best, "<i4"),
        }


class _TimeSlider(MacroElement):
    """A bottom-right slider over the store's times: moving it shows every per-time overlay's image of that time and
    makes the popups read that time's values (`map.s2sTime`)."""

    _template = Template(
        """
        {% macro script(this, kwargs) %}
        (function () {
            var map = {{ this._parent.get_name() }};
            var labels = {{ this.labels|tojson }};
            var layers = [
                {% for name, urls in this.layers %}[{{ name }}, {{ urls|tojson }}],{% endfor %}
            ];
            var control = L.control({position: "bottomright"});
            control.onAdd = function () {
                var div = L.DomUtil.create("div", "s2s-time-slider");
                div.innerHTML = '<label for="s2s-time">Time: <b id="s2s-time-label"></b></label>'
                    + '<input type="range" id="s2s-time" min="0" step="1" value="0" max="' + (labels.length - 1) + '">';
                L.DomEvent.disableClickPropagation(div);
                L.DomEvent.disableScrollPropagation(div);
                return div;
            };
            control.addTo(map);
            var input = document.getElementById("s2s-time");
            function show(time) {
                map.s2sTime = time;
                document.getElementById("s2s-time-label").textContent = labels[time];
                layers.forEach(function (layer) { layer[0].setUrl(layer[1][time]); });
                map.closePopup();
            }
            input.addEventListener("input", function () { show(parseInt(input.value, 10)); });
            show(0);
        })();
        {% endmacro %}
        """
    )

    def __init__(self, times: Sequence[Time], layers: list[tuple[str, list[str]]]) -> None:
        super().__init__()
        self._name = "Sat2SoundTimeSlider"
        self.labels = [time.label for time in times]
        self.layers = layers


_PAGE_CSS = """
.s2s-banner { position: fixed; top: 10px; left: 60px; z-index: 1000; max-width: 60%; padding: 6px 10px;
  background: rgba(255, 255, 255, 0.92); border-radius: 4px; font: 13px/1.4 sans-serif;
  box-shadow: 0 1px 5px rgba(0, 0, 0, 0.4); }
.s2s-title { font-weight: bold; }
.leaflet-control-layers-expanded { font: 12px/1.4 sans-serif; }
.s2s-warning { color: #b00020; font-weight: bold; }
.s2s-note { color: #444; font-style: italic; }
.s2s-legend { background: rgba(255, 255, 255, 0.92); padding: 6px 10px; border-radius: 4px;
  font: 12px/1.4 sans-serif; box-shadow: 0 1px 5px rgba(0, 0, 0, 0.4); width: 300px; }
.s2s-meaning { font-style: italic; }
.s2s-legend-entry { margin-top: 4px; }
.s2s-caption { font-weight: bold; }
.s2s-bar { height: 12px; border: 1px solid #555; }
.s2s-ticks { display: flex; justify-content: space-between; }
.s2s-swatch { display: inline-block; width: 12px; height: 12px; margin-right: 5px; border: 1px solid #555;
  vertical-align: middle; }
.leaflet-image-layer.s2s-imagery { image-rendering: auto; }
.s2s-place div { width: 20px; height: 20px; border: 1px solid #fff; border-radius: 50%; color: #fff;
  font: bold 11px/20px sans-serif; text-align: center; box-shadow: 0 0 3px rgba(0, 0, 0, 0.8); }
.s2s-popup { font: 12px/1.4 sans-serif; }
.s2s-popup table { border-collapse: collapse; margin-top: 4px; }
.s2s-popup th, .s2s-popup td { padding: 1px 6px; text-align: left; }
.s2s-where { color: #444; }
.s2s-sounds { margin-top: 6px; }
.s2s-sounds ol { margin: 2px 0 0 18px; padding: 0; }
.s2s-sound audio { width: 280px; height: 28px; margin-top: 2px; }
.s2s-credit { color: #666; font-size: 11px; }
.s2s-time { color: #444; font-style: italic; }
.s2s-time-slider { background: rgba(255, 255, 255, 0.92); padding: 6px 10px; border-radius: 4px;
  font: 12px/1.4 sans-serif; box-shadow: 0 1px 5px rgba(0, 0, 0, 0.4); width: 220px; }
.s2s-time-slider input { width: 100%; }
"""

"""`project.qgz`: a QGIS project that opens with every map of a build styled, the imagery underneath and the top
places on top.

The build needs no QGIS: the project is QGIS's XML (`.qgs`, as QGIS 3.22 writes it, trimmed to what it needs),
zipped into a `.qgz`. Layers, top to bottom (QGIS draws the layer tree's order):

- Top places: per query its top places (tile squares in the query's colour, labelled with their rank) and its
  merged areas (dashed outlines), from `top_places.gpkg`; the first query's places are shown.
- Zones, when the build has `zones.gpkg`: filled in classes of the first query's mean raw cosine and labelled with
  their names (hidden at first: they would cover the maps; zones without a valid tile are not drawn).
- Dominant sound: `cog/dominant.tif` (hidden at first: it would cover the percentile map).
- Percentile within this region: one `cog/<id>_percentile.tif` per query, the first shown.
- Raw cosine: one `cog/<id>.tif` per query (hidden), and the codebook concepts (hidden).
- A build of several times: each query layer is drawn from its COG's first band, the build's first time (the
  other times are the COG's other bands, named by their time, in the layer's properties).
- Imagery: a local raster source is the raster itself, with the bands and stretch the build reads it with; an
  XYZ source (or Esri) is an XYZ tile layer of its URL template; a STAC source, or a tile server whose template
  needs an API key (a project file must not hold the key), is the build's `imagery.tif` (the imagery at a
  modest resolution, see pipeline.export.underlay).

Every raster takes the style of the `.qml` beside it, with the opacity of a map over imagery. Paths are relative
to the project (`./cog/...`) so the build folder can be moved or zipped whole; a local imagery raster is named
relative too when it lies in the build folder or in this repository alongside the build, else absolutely.
"""

from __future__ import annotations

import copy
import os
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote, urlencode

import geopandas as gpd
import numpy as np
import rasterio
from pyogrio.errors import DataLayerError, DataSourceError
from rasterio.crs import CRS
from rasterio.errors import RasterioError

from common.atomic import atomic_path
from pipeline.config import ImagerySettings, Query
from pipeline.errors import ExportError
from pipeline.export.cog import CONCEPTS_NAME, DOMINANT_NAME, FILE_SUFFIXES
from pipeline.export.places import AREAS_LAYER, PLACES_CRS, PLACES_LAYER
from pipeline.export.qgis_style import (
    DOCTYPE,
    OVERLAY_OPACITY,
    areas_renderer,
    colour_data_renderer,
    graduated_renderer,
    places_renderer,
    query_colours,
    rank_labels,
    raster_pipe,
    rgb_renderer,
)
from pipeline.export.zones import ZONES_CRS, ZONES_LAYER
from pipeline.geometry import WEB_MERCATOR
from pipeline.imagery.base import RasterLayer, TileLayer
from pipeline.store.read import SoundscapeStore

# The project file format written: QGIS 3.22's (Debian 12), which newer QGIS versions read as well.
FORMAT_VERSION = "3.22.0"
REPOSITORY = Path(__file__).resolve().parents[2]
UINT8_RANGE = (0.0, 255.0)
RGB = (1, 2, 3)
IMAGERY_ID = "sat2sound_imagery"


class BuildFiles(NamedTuple):
    """The build's files a project shows: the COG folder, the top places, the imagery underlay and, when the build
    has them, the zone statistics."""

    cog_dir: Path
    places: Path
    underlay: Path
    zones: Path | None = None


class Layer(NamedTuple):
    """A map layer of the project: its `<maplayer>` element and whether it is shown when the project opens."""

    element: ET.Element
    visible: bool

    @property
    def id(self) -> str:
        return str(self.element.findtext("id"))

    @property
    def name(self) -> str:
        return str(self.element.findtext("layername"))


class Group(NamedTuple):
    """A folder of the layer tree, shown (ticked) or not."""

    name: str
    layers: list[Layer]
    visible: bool = True


Node = Layer | Group


class ProjectReport(NamedTuple):
    layers: int
    imagery: str


def write_qgis_project(store: Path, files: BuildFiles, imagery: ImagerySettings, out: Path) -> ProjectReport:
    """Write `out` (a .qgz) showing the build's files (see the module's note); say how many layers and which
    imagery it holds."""
    soundscape = SoundscapeStore(store)
    queries = soundscape.queries
    home = out.parent.resolve()
    crs, extent = _raster_frame(files.cog_dir / f"{DOMINANT_NAME}.tif")
    imagery_layer, imagery_words = _imagery_layer(imagery, files.underlay, home)
    zones = [] if files.zones is None else [_zones_layer(files.zones, queries[0], home)]
    tree: list[Node] = [
        Group("Top places", _places_layers(queries, files.places, home)),
        *zones,
        _cog_layer(files.cog_dir / f"{DOMINANT_NAME}.tif", "Dominant sound (which query fits best)", home, False),
        Group(
            "Percentile within this region",
            [
                _cog_layer(_cog(files, query, "score_percentile"), f"{query.label} — percentile", home, index == 0)
                for index, query in enumerate(queries)
            ],
        ),
        Group(
            "Raw cosine similarity",
            [_cog_layer(_cog(files, query, "score"), f"{query.label} — raw cosine", home, False) for query in queries],
            visible=False,
        ),
        _cog_layer(files.cog_dir / f"{CONCEPTS_NAME}.tif", "Codebook concepts", home, False),
        imagery_layer,
    ]
    title = "Sat2Sound soundscape map"
    if soundscape.provenance["untrained"] is True:
        title += " (untrained model weights: not predictions)"
    document = _project(title, tree, crs, extent)
    try:
        with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(f"{out.stem}.qgs", document)
    except OSError as exc:
        raise ExportError(f"cannot write {out} ({exc}); check that the build folder is writable") from exc
    return ProjectReport(len(_layers(tree)), imagery_words)


def _cog(files: BuildFiles, query: Query, variable: str) -> Path:
    return files.cog_dir / f"{query.id}{FILE_SUFFIXES[variable]}.tif"


def _raster_frame(path: Path) -> tuple[CRS, tuple[float, float, float, float]]:
    """The CRS and bounds of one of the build's COGs: the project's CRS and first view."""
    try:
        with rasterio.open(path) as dataset:
            return dataset.crs, tuple(dataset.bounds)
    except RasterioError as exc:
        raise ExportError(f"cannot read {path} ({exc}); run the build's COG steps first") from exc


def _cog_layer(path: Path, name: str, home: Path, visible: bool) -> Layer:
    """A COG with the style of the `.qml` beside it, drawn see-through over the imagery."""
    qml = path.with_suffix(".qml")
    try:
        pipe = ET.parse(qml).getroot().find("pipe")
    except (OSError, ET.ParseError) as exc:
        raise ExportError(f"cannot read the style {qml} ({exc}); run the build's COG steps first") from exc
    if pipe is None:
        raise ExportError(f"the style {qml} has no raster pipe; run the build's COG steps again")
    styled = copy.deepcopy(pipe)
    renderer = styled.find("rasterrenderer")
    if renderer is not None:
        renderer.set("opacity", str(OVERLAY_OPACITY))
    crs, _ = _raster_frame(path)
    element = _map_layer("raster", f"sat2sound_{path.stem}", name, project_path(path, home), "gdal", crs, styled)
    return Layer(element, visible)


def _places_layers(queries: Sequence[Query], places: Path, home: Path) -> list[Layer]:
    crs = CRS.from_user_input(PLACES_CRS)
    layers = []
    for index, (query, colour) in enumerate(zip(queries, query_colours(len(queries)), strict=True)):
        for template, words, renderer, labels in (
            (PLACES_LAYER, "top places", places_renderer(colour), rank_labels("rank")),
            (AREAS_LAYER, "merged areas", areas_renderer(colour), None),
        ):
            table = template.format(query=query.id)
            source = f"{project_path(places, home)}|layername={table}"
            element = _map_layer("vector", f"sat2sound_{table}", f"{query.label} — {words}", source, "ogr", crs)
            element.set("geometry", "Polygon")
            element.set("labelsEnabled", "1" if labels is not None else "0")
            element.append(renderer)
            if labels is not None:
                element.append(labels)
            ET.SubElement(element, "layerOpacity").text = "1"
            ET.SubElement(element, "blendMode").text = "0"
            ET.SubElement(element, "featureBlendMode").text = "0"
            layers.append(Layer(element, index == 0 and template == PLACES_LAYER))
    return layers


def _zones_layer(zones: Path, query: Query, home: Path) -> Layer:
    """The zones, hidden at first (they would cover the maps), coloured by the first query's mean raw cosine in
    classes and labelled with their names."""
    field = f"{query.id}_mean"
    try:
        values = gpd.read_file(zones, layer=ZONES_LAYER, columns=[field], ignore_geometry=True)[field]
    except (DataSourceError, DataLayerError, KeyError) as exc:
        raise ExportError(f"cannot read {field} of {zones} ({exc}); run the build's zones step again") from exc
    source = f"{project_path(zones, home)}|layername={ZONES_LAYER}"
    name = f"Zones: mean raw cosine for '{query.label}'"
    element = _map_layer("vector", "sat2sound_zones", name, source, "ogr", CRS.from_user_input(ZONES_CRS))
    element.set("geometry", "Polygon")
    element.set("labelsEnabled", "1")
    element.append(graduated_renderer(field, values.to_numpy(dtype=np.float64, na_value=np.nan)))
    element.append(rank_labels("zone"))
    ET.SubElement(element, "layerOpacity").text = str(OVERLAY_OPACITY)
    ET.SubElement(element, "blendMode").text = "0"
    ET.SubElement(element, "featureBlendMode").text = "0"
    return Layer(element, False)


def _imagery_layer(imagery: ImagerySettings, underlay: Path, home: Path) -> tuple[Layer, str]:
    """The imagery at the bottom of the project, and what it is in words."""
    with imagery.open_reader() as reader:
        source = reader.gis_layer()
    match source:
        case RasterLayer():
            return _raster_imagery(source, home), f"the raster {source.path}"
        case TileLayer():
            return _tile_imagery(source), "an XYZ layer of the tile server"
    return _underlay_layer(underlay, home), f"{underlay.name} (the source cannot be a QGIS layer)"


def _raster_imagery(raster: RasterLayer, home: Path) -> Layer:
    """The raster itself, drawn with the bands and the stretch the build reads it with."""
    pipe = raster_pipe(rgb_renderer(raster.bands, *raster.value_range), smooth=True)
    name = f"Imagery: {raster.path.name}"
    element = _map_layer("raster", IMAGERY_ID, name, project_path(raster.path, home), "gdal", raster.crs, pipe)
    return _with_rights(Layer(element, True), raster.attribution)


def _tile_imagery(tiles: TileLayer) -> Layer:
    """An XYZ layer of the tile server's URL template and zoom range."""
    zmin, zmax = tiles.zoom_range
    query = {"type": "xyz", "url": tiles.url_template, "zmin": zmin, "zmax": zmax}
    source = urlencode(query, quote_via=quote, safe=":/")
    pipe = raster_pipe(colour_data_renderer(), smooth=True)
    crs = CRS.from_user_input(WEB_MERCATOR)
    element = _map_layer("raster", IMAGERY_ID, "Imagery: tile server", source, "wms", crs, pipe)
    return _with_rights(Layer(element, True), tiles.attribution)


def _underlay_layer(underlay: Path, home: Path) -> Layer:
    crs, _ = _raster_frame(underlay)
    with rasterio.open(underlay) as dataset:
        attribution = dataset.tags().get("IMAGERY_ATTRIBUTION", "")
    pipe = raster_pipe(rgb_renderer(RGB, *UINT8_RANGE), smooth=True)
    name = "Imagery (the build's, at preview resolution)"
    element = _map_layer("raster", IMAGERY_ID, name, project_path(underlay, home), "gdal", crs, pipe)
    return _with_rights(Layer(element, True), attribution)


def _with_rights(layer: Layer, attribution: str) -> Layer:
    """The imagery's attribution as the layer's rights (QGIS: Layer Properties ▸ Metadata)."""
    if attribution:
        ET.SubElement(ET.SubElement(layer.element, "resourceMetadata"), "rights").text = attribution
    return layer


def project_path(path: Path, home: Path) -> str:
    """How the project names a file: relative to the project when it lies in the build folder, or in this
    repository with the build; else its absolute path."""
    target = path.resolve()
    inside = target.is_relative_to(home) or (target.is_relative_to(REPOSITORY) and home.is_relative_to(REPOSITORY))
    if not inside:
        return target.as_posix()
    relative = Path(os.path.relpath(target, home)).as_posix()
    return relative if relative.startswith("../") else f"./{relative}"


def _map_layer(
    kind: str, layer_id: str, name: str, source: str, provider: str, crs: CRS, pipe: ET.Element | None = None
) -> ET.Element:
    element = ET.Element("maplayer", type=kind)
    ET.SubElement(element, "id").text = layer_id
    ET.SubElement(element, "datasource").text = source
    ET.SubElement(element, "layername").text = name
    ET.SubElement(element, "srs").append(_spatialrefsys(crs))
    ET.SubElement(element, "provider", encoding="UTF-8").text = provider
    if pipe is not None:
        element.append(pipe)
        ET.SubElement(element, "blendMode").text = "0"
    return element


def _spatialrefsys(crs: CRS) -> ET.Element:
    element = ET.Element("spatialrefsys")
    ET.SubElement(element, "wkt").text = crs.to_wkt()
    authority = crs.to_authority()
    if authority is not None:
        ET.SubElement(element, "authid").text = ":".join(authority)
    return element


def _layers(tree: Sequence[Node]) -> list[Layer]:
    """Every layer of the tree, top first."""
    return [layer for node in tree for layer in (node.layers if isinstance(node, Group) else [node])]


def _project(title: str, tree: Sequence[Node], crs: CRS, extent: tuple[float, float, float, float]) -> str:
    root = ET.Element("qgis", version=FORMAT_VERSION, projectname=title)
    ET.SubElement(root, "homePath", path="")
    ET.SubElement(root, "title").text = title
    ET.SubElement(root, "projectCrs").append(_spatialrefsys(crs))
    layer_tree = ET.SubElement(root, "layer-tree-group")
    for node in tree:
        if isinstance(node, Group):
            group = ET.SubElement(
                layer_tree, "layer-tree-group", name=node.name, checked=_checked(node.visible), expanded="1"
            )
            for layer in node.layers:
                _tree_layer(group, layer)
        else:
            _tree_layer(layer_tree, node)
    layers = _layers(tree)
    project_layers = ET.SubElement(root, "projectlayers")
    order = ET.SubElement(root, "layerorder")
    for layer in layers:
        project_layers.append(layer.element)
        ET.SubElement(order, "layer", id=layer.id)
    _first_view(root, crs, extent)
    properties = ET.SubElement(root, "properties")
    ET.SubElement(ET.SubElement(properties, "Paths"), "Absolute", type="bool").text = "false"
    # QGIS reads `projectCrs` only when this (older) switch is on.
    ET.SubElement(ET.SubElement(properties, "SpatialRefSys"), "ProjectionsEnabled", type="int").text = "1"
    ET.indent(root)
    return f"{DOCTYPE}\n{ET.tostring(root, encoding='unicode')}\n"


def _tree_layer(parent: ET.Element, layer: Layer) -> None:
    source, provider = layer.element.findtext("datasource"), layer.element.findtext("provider")
    ET.SubElement(
        parent,
        "layer-tree-layer",
        id=layer.id,
        name=layer.name,
        source=str(source),
        providerKey=str(provider),
        checked=_checked(layer.visible),
        expanded="0",
    )


def _checked(visible: bool) -> str:
    return "Qt::Checked" if visible else "Qt::Unchecked"


def _first_view(root: ET.Element, crs: CRS, extent: tuple[float, float, float, float]) -> None:
    """What QGIS shows when the project opens: the build's grid, in the project's CRS."""
    canvas = ET.SubElement(root, "mapcanvas", name="theMapCanvas", annotationsVisible="1")
    ET.SubElement(canvas, "units").text = "degrees" if crs.is_geographic else "meters"
    box = ET.SubElement(canvas, "extent")
    for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), extent, strict=True):
        ET.SubElement(box, tag).text = repr(float(value))
    ET.SubElement(canvas, "rotation").text = "0"
    ET.SubElement(canvas, "destinationsrs").append(_spatialrefsys(crs))
    view = ET.SubElement(root, "ProjectViewSettings", UseProjectScales="0")
    corners = dict(zip(("xmin", "ymin", "xmax", "ymax"), (repr(float(value)) for value in extent), strict=True))
    ET.SubElement(view, "DefaultViewExtent", corners).append(_spatialrefsys(crs))

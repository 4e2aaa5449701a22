"""`project.qgz` opened by Debian 12's QGIS 3.22, headless, as a GIS user opens it: every layer valid and styled as
its `.qml` says, in the right order, with the imagery underneath (the local raster, an XYZ layer of a tile server,
or the build's underlay), and rendered to a PNG whose pixels show the maps over the imagery."""

from __future__ import annotations

import json
import math
import shutil
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pytest
from rasterio.io import MemoryFile
from support.imagery_servers import SceneTiles, TileServer, served_raster
from support.synthetic_store import (
    IMAGERY_TILE_PX,
    SyntheticStore,
    checker_colour,
    grid_rectangle,
    needs_debian_qgis,
    run_debian_qgis,
    write_synthetic_imagery,
    write_synthetic_store,
)

from pipeline.config import ImagerySettings, OutputSettings
from pipeline.export.cog import write_concept_cog, write_dominant_cog, write_query_cogs
from pipeline.export.places import write_top_places
from pipeline.export.qgis_project import REPOSITORY, BuildFiles, _imagery_layer, project_path, write_qgis_project
from pipeline.export.qgis_style import OVERLAY_OPACITY, percentile_classes, query_colours, value_classes
from pipeline.export.underlay import write_underlay
from pipeline.export.zones import write_zones
from pipeline.imagery import LocalRasterReader, Stretch

TOP_K = 6
RASTER_SCALE = 10
ATTRIBUTION = "Synthetic test imagery"
RENDER_WIDTH = 480  # 10 px per tile of the 48-tile-wide grid
# Zooms of the loopback tile server: coarse enough that a few tiles cover the 117 km wide grid.
SERVER_ZOOMS = (8, 9, 10)
# Zones as (top row, left column, bottom row, right column) of the grid: the grid's west and east halves.
ZONES = {"west": (0, 0, 32, 24), "east": (0, 24, 32, 48)}
ZONES_NAME = "Zones: mean raw cosine for 'birds chirping in a park'"
# Layers shown when the project opens, top first.
SHOWN = ["sat2sound_birds_places", "sat2sound_birds_percentile", "sat2sound_imagery"]

_LOAD_SCRIPT = """
import json, sys
from qgis.core import (QgsApplication, QgsMapRendererParallelJob, QgsMapSettings, QgsProject,
                       QgsProviderRegistry, QgsRasterLayer, QgsRectangle)
from qgis.PyQt.QtCore import QSize
from qgis.PyQt.QtGui import QColor

def layer_facts(node):
    layer = node.layer()
    facts = {"id": layer.id(), "name": layer.name(), "valid": layer.isValid(), "shown": node.isVisible(),
             "provider": layer.providerType(), "source": layer.source(), "crs": layer.crs().authid(),
             "rights": layer.metadata().rights()}
    renderer = layer.renderer()
    facts["renderer"] = renderer.type()
    if isinstance(layer, QgsRasterLayer):
        facts["opacity"] = renderer.opacity()
        facts["legend"] = [[label, colour.name()] for label, colour in renderer.legendSymbologyItems()]
        if renderer.type() == "multibandcolor":
            enhancement = renderer.redContrastEnhancement()
            facts["bands"] = [renderer.redBand(), renderer.greenBand(), renderer.blueBand()]
            facts["stretch"] = [enhancement.minimumValue(), enhancement.maximumValue()]
        if layer.providerType() == "wms":
            uri = QgsProviderRegistry.instance().decodeUri("wms", layer.source())
            facts["uri"] = {key: str(uri.get(key)) for key in ("type", "url", "zmin", "zmax")}
    else:
        if renderer.type() == "graduatedSymbol":
            facts["field"] = renderer.classAttribute()
            facts["ranges"] = [[item.lowerValue(), item.upperValue(), item.label(), item.symbol().color().name()]
                               for item in renderer.ranges()]
            facts["opacity"] = layer.opacity()
        else:
            symbol = renderer.symbol().symbolLayer(0)
            facts["fill"] = symbol.color().name(QColor.HexArgb)
            facts["outline"] = symbol.strokeColor().name()
        facts["features"] = layer.featureCount()
        facts["labels"] = layer.labeling().settings().fieldName if layer.labelsEnabled() else None
    return facts

def render(project, layers, extent, path, width):
    settings = QgsMapSettings()
    settings.setLayers(layers)
    settings.setDestinationCrs(project.crs())
    settings.setExtent(extent)
    settings.setOutputSize(QSize(width, round(width * extent.height() / extent.width())))
    settings.setBackgroundColor(QColor(255, 255, 255))
    job = QgsMapRendererParallelJob(settings)
    job.start()
    job.waitForFinished()
    job.renderedImage().save(path)

def facts(path, render_dir, width):
    project = QgsProject.instance()
    read = project.read(path)
    root = project.layerTreeRoot()
    view = QgsRectangle(project.viewSettings().defaultViewExtent())
    if render_dir:
        shown = root.checkedLayers()
        imagery = [layer for layer in shown if layer.id() == "sat2sound_imagery"]
        render(project, shown, view, render_dir + "/full.png", width)
        render(project, imagery, view, render_dir + "/imagery.png", width)
        render(project, [layer for layer in shown if layer not in imagery], view, render_dir + "/maps.png", width)
        render(project, project.mapLayersByName(ZONES_NAME), view, render_dir + "/zones.png", width)
    result = {"read": read, "title": project.title(), "crs": project.crs().authid(),
              "order": [layer.id() for layer in root.layerOrder()],
              "view": [view.xMinimum(), view.yMinimum(), view.xMaximum(), view.yMaximum()],
              "layers": [layer_facts(node) for node in root.findLayers()]}
    project.clear()
    return result

app = QgsApplication([], False)
app.initQgis()
width = int(sys.argv[1])
ZONES_NAME = sys.argv[3]
print(json.dumps([facts(path, render_dir, width) for path, render_dir in json.loads(sys.argv[2])]))
app.exitQgis()
"""


def local_imagery(raster: Path | str, cache: Path) -> ImagerySettings:
    return ImagerySettings(str(raster), {"bands": [3, 2, 1], "attribution": ATTRIBUTION}, str(cache), False, None, 0.5)


def make_build(store: SyntheticStore, imagery: ImagerySettings, folder: Path, dst_crs: str | None = None) -> Path:
    """A build folder with every file a project shows, and the project; returns the project."""
    cog = folder / "cog"
    write_query_cogs(store.path, cog, dst_crs=dst_crs)
    write_query_cogs(store.path, cog, variable="score_percentile", dst_crs=dst_crs)
    write_concept_cog(store.path, cog, dst_crs=dst_crs)
    write_dominant_cog(store.path, cog, dst_crs=dst_crs)
    write_top_places(store.path, TOP_K, folder / "top_places.gpkg", folder / "top_places.csv")
    zones = gpd.GeoDataFrame(
        {"name": list(ZONES)}, geometry=[grid_rectangle(store, *bounds) for bounds in ZONES.values()], crs=4326
    )
    zones.to_file(folder / "districts.geojson")
    outputs = OutputSettings(3, None, TOP_K, 128, str(folder / "districts.geojson"), None)
    write_zones(store.path, outputs, folder / "zones.gpkg", folder / "zones.csv")
    latitude = store.plan.latitude
    native_gsd_m = store.plan.grid.pixel_m / IMAGERY_TILE_PX * math.cos(math.radians(latitude))
    write_underlay(imagery, store.plan.grid.bounds, native_gsd_m, latitude, folder / "imagery.tif")
    files = BuildFiles(cog, folder / "top_places.gpkg", folder / "imagery.tif", folder / "zones.gpkg")
    write_qgis_project(store.path, files, imagery, folder / "project.qgz")
    return folder / "project.qgz"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStore:
    return write_synthetic_store(tmp_path_factory.mktemp("store") / "soundscape.zarr")


@pytest.fixture(scope="module")
def raster(store: SyntheticStore, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16-bit imagery in blue, green, red band order, like the Landsat scene of the default build."""
    scene = tmp_path_factory.mktemp("scene") / "scene.tif"
    return write_synthetic_imagery(store, scene, dtype="uint16", scale=RASTER_SCALE)


@pytest.fixture(scope="module")
def stretch(raster: Path, tmp_path_factory: pytest.TempPathFactory) -> Stretch:
    """The stretch the build reads the raster with."""
    with local_imagery(raster, tmp_path_factory.mktemp("cache")).open_reader() as reader:
        assert isinstance(reader, LocalRasterReader) and reader.stretch is not None
        return reader.stretch


def as_read(row: float, col: float, stretch: Stretch) -> np.ndarray:
    """The raster's colour at a grid position as the build reads it: its values (colour x 10) stretched."""
    values = np.array(checker_colour(row, col)) * RASTER_SCALE
    return np.clip(np.round((values - stretch.low) * 255 / (stretch.high - stretch.low)), 0, 255)


@pytest.fixture(scope="module")
def server(store: SyntheticStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TileServer]:
    scene = write_synthetic_imagery(store, tmp_path_factory.mktemp("served") / "scene.tif", bgr=False)
    with TileServer(SceneTiles.from_raster(scene, zooms=SERVER_ZOOMS, formats=("PNG",))) as running:
        yield running


@pytest.fixture(scope="module")
def projects(
    store: SyntheticStore, raster: Path, server: TileServer, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Projects of builds whose imagery is the local raster, a tile server or a STAC API, one reprojected, and the
    first build's folder moved elsewhere."""
    root = tmp_path_factory.mktemp("builds")
    cache = root / "tiles"
    template = f"xyz:{server.url}/png/{{z}}/{{x}}/{{y}}.png"
    tiles = ImagerySettings(template, {"max_zoom": SERVER_ZOOMS[-1]}, str(cache), False, None, 0.5)
    stac = ImagerySettings("stac:http://127.0.0.1:9/", {}, str(cache), False, None, 0.5)
    built = {
        "local": make_build(store, local_imagery(raster, cache), root / "local"),
        "xyz": make_build(store, tiles, root / "xyz"),
        "utm": make_build(store, local_imagery(raster, cache), root / "utm", dst_crs="EPSG:32631"),
    }
    # A STAC source is not read for the project: its underlay comes from the local raster here.
    shutil.copytree(root / "local", root / "stac")
    # This build has no zones: the project has no zones layer.
    files = BuildFiles(root / "stac" / "cog", root / "stac" / "top_places.gpkg", root / "stac" / "imagery.tif")
    write_qgis_project(store.path, files, stac, root / "stac" / "project.qgz")
    built["stac"] = root / "stac" / "project.qgz"
    shutil.copytree(root / "local", root / "moved" / "elsewhere")
    built["moved"] = root / "moved" / "elsewhere" / "project.qgz"
    return built


@pytest.fixture(scope="module")
def qgis(projects: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """What QGIS 3.22 makes of each project; the local and XYZ ones are also rendered (full.png: the layers shown
    when it opens; imagery.png: the imagery alone; maps.png: the layers shown without the imagery)."""
    renders = tmp_path_factory.mktemp("renders")
    jobs = []
    for name, project in projects.items():
        folder = renders / name
        folder.mkdir()
        jobs.append([str(project), str(folder) if name in ("local", "xyz", "stac") else ""])
    results = run_debian_qgis(_LOAD_SCRIPT, str(RENDER_WIDTH), json.dumps(jobs), ZONES_NAME, timeout=240)
    return {name: {**result, "renders": renders / name} for name, result in zip(projects, results, strict=True)}


def _png(path: Path) -> np.ndarray:
    """RGB (height, width, 3) of a PNG."""
    with MemoryFile(path.read_bytes()) as memory, memory.open() as image:
        return np.moveaxis(image.read()[:3], 0, -1).astype(int)


def _layers(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {layer["id"]: layer for layer in result["layers"]}


def _pixel(image: np.ndarray, store: SyntheticStore, row: float, col: float) -> np.ndarray:
    """The rendered pixel at a (fractional) grid position: the render spans the grid exactly."""
    scale = image.shape[1] / store.width
    return image[int(row * scale), int(col * scale)]


def test_the_build_needs_no_qgis_the_project_is_a_zip_of_one_qgs(projects: dict[str, Path], raster: Path) -> None:
    with zipfile.ZipFile(projects["local"]) as archive:
        assert archive.namelist() == ["project.qgs"]
        root = ET.fromstring(archive.read("project.qgs"))
    sources = [str(layer.findtext("datasource")) for layer in root.iter("maplayer")]
    assert all(source.startswith("./") for source in sources[:-1]), "the build's files, relative to the project"
    assert sources[-1] == str(raster), "imagery outside the build and the repository, named absolutely"


def test_paths_are_relative_inside_the_build_or_the_repository() -> None:
    home = REPOSITORY / "outputs" / "demo"
    assert project_path(home / "cog" / "birds.tif", home) == "./cog/birds.tif"
    assert project_path(REPOSITORY / "examples" / "scene.tif", home) == "../../examples/scene.tif"
    assert project_path(Path("/data/scene.tif"), home) == "/data/scene.tif"
    assert project_path(REPOSITORY / "examples" / "scene.tif", Path("/data/maps/demo")) == str(
        REPOSITORY / "examples" / "scene.tif"
    )


@needs_debian_qgis
def test_qgis_opens_every_layer_valid_in_the_order_planners_read_it(
    qgis: dict[str, dict[str, Any]], store: SyntheticStore
) -> None:
    result = qgis["local"]
    assert result["read"] and result["crs"] == "EPSG:3857"
    assert "untrained model weights" in result["title"]
    ids = [f"sat2sound_{query.id}_{kind}" for query in store.queries for kind in ("places", "areas")]
    ids += ["sat2sound_zones", "sat2sound_dominant"]
    ids += [f"sat2sound_{query.id}_percentile" for query in store.queries]
    ids += [f"sat2sound_{query.id}" for query in store.queries]
    ids += ["sat2sound_concepts", "sat2sound_imagery"]
    assert result["order"] == ids, "top places on top, then the dominant and percentile maps, imagery at the bottom"
    layers = _layers(result)
    assert all(layer["valid"] for layer in layers.values())
    assert [layer_id for layer_id in ids if layers[layer_id]["shown"]] == SHOWN
    np.testing.assert_allclose(result["view"], store.plan.grid.bounds, rtol=0, atol=1e-3)
    places = layers["sat2sound_birds_places"]
    assert (places["crs"], places["features"]) == ("EPSG:4326", TOP_K)


@needs_debian_qgis
def test_every_layer_has_the_style_of_its_qml(qgis: dict[str, dict[str, Any]], store: SyntheticStore) -> None:
    layers = _layers(qgis["local"])
    colours = query_colours(len(store.queries))
    for query, colour in zip(store.queries, colours, strict=True):
        percentile = layers[f"sat2sound_{query.id}_percentile"]
        assert percentile["renderer"] == "singlebandpseudocolor"
        assert percentile["legend"] == [[item.label, item.colour.hex] for item in percentile_classes(query.label)]
        assert layers[f"sat2sound_{query.id}"]["renderer"] == "singlebandpseudocolor"
        places, areas = layers[f"sat2sound_{query.id}_places"], layers[f"sat2sound_{query.id}_areas"]
        assert (places["renderer"], places["outline"], places["labels"]) == ("singleSymbol", colour.hex, "rank")
        assert places["fill"].endswith(colour.hex[1:]) and places["fill"] != f"#ff{colour.hex[1:]}"
        assert (areas["outline"], areas["fill"][:3], areas["labels"]) == (colour.hex, "#00", None)
    dominant = layers["sat2sound_dominant"]
    assert dominant["renderer"] == "paletted"
    assert [label.split(" (")[0] for label, _ in dominant["legend"]] == [
        f"{query.id}: {query.label}" for query in store.queries
    ]
    assert [colour for _, colour in dominant["legend"]] == [colour.hex for colour in colours]
    assert layers["sat2sound_concepts"]["renderer"] == "paletted"
    assert {layers[f"sat2sound_{query.id}_percentile"]["opacity"] for query in store.queries} == {OVERLAY_OPACITY}


@needs_debian_qgis
def test_local_imagery_is_the_raster_with_the_builds_bands_and_stretch(
    qgis: dict[str, dict[str, Any]], raster: Path, stretch: Stretch
) -> None:
    imagery = _layers(qgis["local"])["sat2sound_imagery"]
    assert (imagery["provider"], imagery["source"], imagery["crs"]) == ("gdal", str(raster), "EPSG:3857")
    assert (imagery["renderer"], imagery["bands"]) == ("multibandcolor", [3, 2, 1])
    assert imagery["stretch"] == pytest.approx([stretch.low, stretch.high])
    assert imagery["rights"] == [ATTRIBUTION]


@needs_debian_qgis
def test_the_rendered_project_shows_the_maps_over_the_imagery(
    qgis: dict[str, dict[str, Any]], store: SyntheticStore, stretch: Stretch
) -> None:
    renders = qgis["local"]["renders"]
    full, imagery, maps = (_png(renders / f"{name}.png") for name in ("full", "imagery", "maps"))
    assert full.shape == (store.height * 10, RENDER_WIDTH, 3)
    assert len(np.unique(full.reshape(-1, 3), axis=0)) > 50, "not blank"
    white = np.array([255, 255, 255])
    # Where the map has no value (the block without imagery), the imagery shows as it is.
    hole = (store.height // 4 + 2.5, store.width // 2 + 3.5)
    assert not store.valid[int(hole[0]), int(hole[1])]
    np.testing.assert_allclose(_pixel(full, store, *hole), _pixel(imagery, store, *hole), atol=2)
    assert np.abs(_pixel(imagery, store, *hole) - as_read(*hole, stretch)).max() <= 3
    # Elsewhere the percentile map is drawn over the imagery, which shows through it.
    row, col = (int(value) for value in np.argwhere(store.valid)[40])
    centre = (row + 0.5, col + 0.5)
    on_map, alone, below = (_pixel(image, store, *centre) for image in (full, maps, imagery))
    assert np.abs(on_map - alone).max() > 15 and np.abs(on_map - below).max() > 15
    # maps.png has the map over white: swap the white for the imagery.
    np.testing.assert_allclose(on_map, alone + (1 - OVERLAY_OPACITY) * (below - white), atol=6)


@needs_debian_qgis
def test_the_top_places_are_drawn_on_top_in_the_querys_colour(
    qgis: dict[str, dict[str, Any]], store: SyntheticStore, projects: dict[str, Path]
) -> None:
    full = _png(qgis["local"]["renders"] / "full.png")
    places = gpd.read_file(projects["local"].parent / "top_places.gpkg", layer="birds_places").to_crs(3857)
    colour = np.array(query_colours(len(store.queries))[0])
    left, _, _, top = store.plan.grid.bounds
    pixel_m = store.plan.grid.pixel_m
    scale = full.shape[1] / store.width
    for outline in places.geometry:
        x0, _, x1, y1 = outline.bounds
        col, row = (x0 - left) / pixel_m * scale, (top - y1) / pixel_m * scale
        side = (x1 - x0) / pixel_m * scale
        # The tile with a pixel's margin: its outline shows around the rank label's halo.
        box = full[round(row) - 1 : round(row + side) + 1, round(col) - 1 : round(col + side) + 1]
        assert (np.abs(box - colour).max(axis=-1) <= 40).sum() >= 4


@needs_debian_qgis
def test_the_zones_are_drawn_in_classes_of_the_first_querys_mean(
    qgis: dict[str, dict[str, Any]], store: SyntheticStore, projects: dict[str, Path]
) -> None:
    zones = _layers(qgis["local"])["sat2sound_zones"]
    assert zones["valid"] and not zones["shown"] and zones["name"] == ZONES_NAME
    assert (zones["crs"], zones["features"], zones["labels"]) == ("EPSG:4326", len(ZONES), "zone")
    assert (zones["renderer"], zones["field"], zones["opacity"]) == ("graduatedSymbol", "birds_mean", OVERLAY_OPACITY)
    table = gpd.read_file(projects["local"].parent / "zones.gpkg").set_index("zone")
    classes = value_classes(table["birds_mean"].to_numpy())
    assert [[label, colour] for _, _, label, colour in zones["ranges"]] == [
        [item.label, item.colour.hex] for item in classes
    ]
    # Each half of the grid in the colour of its class, see-through over white, away from its name in its centre.
    rendered = _png(qgis["local"]["renders"] / "zones.png")
    white = np.array([255, 255, 255])
    for name, (top, left, bottom, right) in ZONES.items():
        value = table.loc[name, "birds_mean"]
        colour = next(hex_colour for low, high, _, hex_colour in zones["ranges"] if low <= value <= high)
        drawn = _pixel(rendered, store, (top + bottom) / 4, left + (right - left) / 4)
        expected = (
            OVERLAY_OPACITY * np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)]) + (1 - OVERLAY_OPACITY) * white
        )
        np.testing.assert_allclose(drawn, expected, atol=3)


@needs_debian_qgis
def test_a_moved_build_folder_opens_with_every_layer(qgis: dict[str, dict[str, Any]]) -> None:
    moved = qgis["moved"]
    assert moved["read"] and all(layer["valid"] for layer in moved["layers"])
    assert all("/moved/elsewhere/" in layer["source"] for layer in moved["layers"][:-1])


@needs_debian_qgis
def test_a_tile_server_is_an_xyz_layer_that_renders(
    qgis: dict[str, dict[str, Any]], store: SyntheticStore, server: TileServer
) -> None:
    imagery = _layers(qgis["xyz"])["sat2sound_imagery"]
    assert imagery["valid"] and (imagery["provider"], imagery["crs"]) == ("wms", "EPSG:3857")
    uri = imagery["uri"]
    assert (uri["type"], uri["url"]) == ("xyz", f"{server.url}/png/{{z}}/{{x}}/{{y}}.png")
    assert (uri["zmin"], uri["zmax"]) == ("0", str(SERVER_ZOOMS[-1]))
    rendered = _png(qgis["xyz"]["renders"] / "imagery.png")
    for row, col in ((4.0, 4.0), (4.0, 12.0), (20.0, 36.0)):
        assert np.abs(_pixel(rendered, store, row, col) - checker_colour(row, col)).max() <= 12


@needs_debian_qgis
def test_a_stac_source_shows_the_builds_underlay(
    qgis: dict[str, dict[str, Any]], store: SyntheticStore, stretch: Stretch
) -> None:
    imagery = _layers(qgis["stac"])["sat2sound_imagery"]
    assert "sat2sound_zones" not in _layers(qgis["stac"])
    assert imagery["valid"] and imagery["source"].endswith("/stac/imagery.tif")
    assert (imagery["renderer"], imagery["bands"], imagery["rights"]) == ("multibandcolor", [1, 2, 3], [ATTRIBUTION])
    rendered = _png(qgis["stac"]["renders"] / "imagery.png")
    for row, col in ((4.0, 4.0), (4.0, 12.0)):
        assert np.abs(_pixel(rendered, store, row, col) - as_read(row, col, stretch)).max() <= 12


def test_a_raster_over_the_network_shows_the_builds_underlay(raster: Path, tmp_path: Path) -> None:
    underlay = Path(shutil.copy(raster, tmp_path / "imagery.tif"))  # a raster where the build's underlay would be
    with served_raster(raster, tmp_path / "served") as served:
        remote = local_imagery(served, tmp_path / "cache")
        layer, described = _imagery_layer(remote, underlay, tmp_path)
    assert described == "imagery.tif (the source cannot be a QGIS layer)"
    assert layer.element.findtext("datasource") == "./imagery.tif"


def test_a_tile_server_that_needs_a_key_shows_the_builds_underlay(
    raster: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    underlay = Path(shutil.copy(raster, tmp_path / "imagery.tif"))
    monkeypatch.setenv("TILES_KEY", "s3cret")
    template = "xyz:https://tiles.example/{z}/{x}/{y}.png?key={api_key}"
    tiles = ImagerySettings(template, {"api_key_env": "TILES_KEY"}, str(tmp_path / "cache"), False, None, 0.5)
    layer, described = _imagery_layer(tiles, underlay, tmp_path)
    assert described == "imagery.tif (the source cannot be a QGIS layer)"
    assert layer.element.findtext("datasource") == "./imagery.tif"
    assert "s3cret" not in ET.tostring(layer.element, encoding="unicode")


@needs_debian_qgis
def test_a_reprojected_build_opens_in_its_crs(qgis: dict[str, dict[str, Any]]) -> None:
    utm = qgis["utm"]
    assert utm["crs"] == "EPSG:32631"
    layers = _layers(utm)
    assert layers["sat2sound_birds_percentile"]["crs"] == "EPSG:32631" and layers["sat2sound_birds_percentile"]["valid"]
    left, bottom, right, top = utm["view"]
    assert 300_000 < left < right < 700_000 and 5_000_000 < bottom < top < 6_000_000, "UTM 31N metres near Paris"

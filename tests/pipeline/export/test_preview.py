"""The HTML preview, opened in headless Chromium with no network: it loads cleanly, its layers render over the
build's imagery, a click on a tile shows every query's score and percentile, and the top places are markers."""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import soundfile
import xarray as xr
from affine import Affine
from pyproj import Transformer
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait
from support.gallery import DEMO_DIM, vector_gallery
from support.synthetic_store import (
    IMAGERY_TILE_PX,
    SyntheticStore,
    checker_colour,
    write_synthetic_imagery,
    write_synthetic_store,
)

from pipeline.config import ImagerySettings, Times
from pipeline.errors import ExportError
from pipeline.export import preview as preview_module
from pipeline.export import preview_sounds as preview_sounds_module
from pipeline.export.places import write_top_places
from pipeline.export.preview import colourise, lnglat_corners, paint, preview_lattice, write_preview
from pipeline.export.preview_sounds import PREVIEW_CLIP_SECONDS, PREVIEW_SOUND_RANKS, preview_sounds
from pipeline.export.qgis_style import (
    OVERLAY_OPACITY,
    PERCENTILE_CLASSES,
    Colour,
    DisplayRange,
    percentile_class,
    percentile_classes,
    query_colours,
)
from pipeline.export.underlay import write_underlay
from pipeline.store.read import SoundscapeStore, StoreGrid

CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1000,800",
    "--force-device-scale-factor=1",
)
LABELS = ["birds chirping in a park", "rain_on_roof.flac", "harbour.wav + with seagulls"]
UNDERLAY_NAME = "Imagery (this build's, offline)"
BASEMAP_HOST = "tile.openstreetmap.org"
PAGE_LOAD_S = 20
TOP_K = 6
# Pixels around a point that must be free of controls (and their shadows) for the point to count as on the map.
CLEARANCE_PX = 8


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStore:
    return write_synthetic_store(tmp_path_factory.mktemp("store") / "soundscape.zarr")


@pytest.fixture(scope="module")
def build(store: SyntheticStore, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A build folder with the imagery underlay (a checkerboard read with bands [3, 2, 1]) and the top places."""
    folder = tmp_path_factory.mktemp("build")
    scene = write_synthetic_imagery(store, folder / "scene.tif")
    imagery = ImagerySettings(str(scene), {"bands": [3, 2, 1]}, str(folder / "tiles"), False, None, 0.5)
    latitude = store.plan.latitude
    native_gsd_m = store.plan.grid.pixel_m / IMAGERY_TILE_PX * math.cos(math.radians(latitude))
    write_underlay(imagery, store.plan.grid.bounds, native_gsd_m, latitude, folder / "imagery.tif")
    write_top_places(store.path, TOP_K, folder / "top_places.gpkg", folder / "top_places.csv")
    return folder


@pytest.fixture(scope="module")
def preview(store: SyntheticStore, build: Path) -> Path:
    return write_preview(
        store.path, store.region, build / "preview.html", build / "imagery.tif", build / "top_places.gpkg"
    )


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    chromium = shutil.which("chromium")
    if chromium is None or not CHROMEDRIVER.exists():
        pytest.fail("headless Chromium is missing; install it with `apt-get install chromium chromium-driver`")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def load(browser: webdriver.Chrome, page: Path) -> webdriver.Chrome:
    """`page` freshly loaded with every shown image decoded; the console log holds this load only."""
    browser.get_log("browser")
    browser.get(page.as_uri())
    WebDriverWait(browser, PAGE_LOAD_S).until(
        lambda driver: driver.execute_script(
            "const images = Array.from(document.querySelectorAll('img.leaflet-image-layer'));"
            "return images.length > 0 && images.every(img => img.complete && img.naturalWidth > 0);"
        )
    )
    return browser


@pytest.fixture
def page(browser: webdriver.Chrome, preview: Path) -> webdriver.Chrome:
    return load(browser, preview)


def _map_variable(driver: webdriver.Chrome) -> str:
    return str(driver.execute_script("return document.querySelector('.folium-map').id;"))


def _screen_point(driver: webdriver.Chrome, lat: float, lon: float) -> tuple[int, int]:
    """Page pixel of a location, from the Leaflet map's own projection."""
    x, y = driver.execute_script(
        f"const map = window[{_map_variable(driver)!r}];"
        "const point = map.latLngToContainerPoint(L.latLng(arguments[0], arguments[1]));"
        "const box = map.getContainer().getBoundingClientRect();"
        "return [box.left + point.x, box.top + point.y];",
        lat,
        lon,
    )
    return round(x), round(y)


def _tile_centre_lnglat(store: SyntheticStore, row: Any, col: Any) -> tuple[Any, Any]:
    """Longitude and latitude of (fractional) grid positions."""
    left, _, _, top = store.plan.grid.bounds
    pixel = store.plan.grid.pixel_m
    return Transformer.from_crs(3857, 4326, always_xy=True).transform(left + col * pixel, top - row * pixel)


def _tile_point(driver: webdriver.Chrome, store: SyntheticStore, row: int, col: int) -> tuple[int, int]:
    lon, lat = _tile_centre_lnglat(store, row + 0.5, col + 0.5)
    return _screen_point(driver, lat, lon)


def _reachable(driver: webdriver.Chrome, points: list[tuple[int, int]]) -> list[bool]:
    """Whether a click at each page pixel (x, y), and at CLEARANCE_PX around it, reaches the map: not a control
    (nor its shadow), marker or popup over it."""
    return list(
        driver.execute_script(
            "const container = document.querySelector('.folium-map');"
            "function onMap(x, y) {"
            "  const element = document.elementFromPoint(x, y);"
            "  return element !== null && (element === container || element.closest('.leaflet-map-pane') !== null"
            "    && element.closest('.leaflet-marker-pane, .leaflet-popup-pane') === null);"
            "}"
            "const d = arguments[1];"
            "return arguments[0].map(([x, y]) =>"
            "  [[0, 0], [-d, 0], [d, 0], [0, -d], [0, d]].every(([dx, dy]) => onMap(x + dx, y + dy)));",
            [list(point) for point in points],
            CLEARANCE_PX,
        )
    )


def _click(driver: webdriver.Chrome, x: int, y: int) -> None:
    container = driver.find_element(By.CSS_SELECTOR, ".folium-map")
    box = container.rect
    offset_x, offset_y = x - box["x"] - box["width"] // 2, y - box["y"] - box["height"] // 2
    ActionChains(driver).move_to_element_with_offset(container, int(offset_x), int(offset_y)).click().perform()


def _popup(driver: webdriver.Chrome) -> WebElement:
    """The open popup's content, once it has faded in and the map has panned it whole into view: until then the
    map clips its top lines, and a reader (and Selenium's visible text) misses them."""
    inside = (
        "const popup = arguments[0].closest('.leaflet-popup').getBoundingClientRect();"
        "const map = document.querySelector('.folium-map').getBoundingClientRect();"
        "return popup.top >= map.top && popup.bottom <= map.bottom"
        "  && popup.left >= map.left && popup.right <= map.right;"
    )

    def shown(found: webdriver.Chrome) -> WebElement | bool:
        popups = found.find_elements(By.CSS_SELECTOR, ".leaflet-popup-content .s2s-popup")
        return popups[0] if popups and found.execute_script(inside, popups[0]) and popups[0].text else False

    return WebDriverWait(driver, PAGE_LOAD_S).until(shown)


def _screenshot(driver: webdriver.Chrome) -> np.ndarray:
    """RGB (height, width, 3) of the page."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with MemoryFile(driver.get_screenshot_as_png()) as memory, memory.open() as image:
            return np.moveaxis(image.read()[:3], 0, -1).astype(int)


def _css_colour(driver: webdriver.Chrome, element: WebElement) -> str:
    return str(driver.execute_script("return getComputedStyle(arguments[0]).backgroundColor;", element))


def _overlay_boxes(driver: webdriver.Chrome) -> list[WebElement]:
    return driver.find_elements(By.CSS_SELECTOR, ".leaflet-control-layers-overlays input[type=checkbox]")


def _overlay_names(driver: webdriver.Chrome) -> list[str]:
    labels = driver.find_elements(By.CSS_SELECTOR, ".leaflet-control-layers-overlays label")
    return [label.text.strip() for label in labels]


def _toggle(driver: webdriver.Chrome, name: str) -> None:
    _overlay_boxes(driver)[_overlay_names(driver).index(name)].click()


def _stored(store: SyntheticStore, variable: str) -> np.ndarray:
    return xr.open_zarr(store.path)[variable].to_numpy()


def _clickable_tiles(
    driver: webdriver.Chrome, store: SyntheticStore, wanted: np.ndarray
) -> list[tuple[int, int, int, int]]:
    """(row, col, x, y) of the tiles where `wanted` holds (row-major) whose centre (x, y) a click reaches."""
    tiles = [(int(row), int(col)) for row, col in np.argwhere(wanted)]
    lon, lat = _tile_centre_lnglat(store, np.array(tiles)[:, 0] + 0.5, np.array(tiles)[:, 1] + 0.5)
    points = driver.execute_script(
        f"const map = window[{_map_variable(driver)!r}];"
        "const box = map.getContainer().getBoundingClientRect();"
        "return arguments[0].map(([lat, lon]) => {"
        "  const point = map.latLngToContainerPoint(L.latLng(lat, lon));"
        "  return [Math.round(box.left + point.x), Math.round(box.top + point.y)];"
        "});",
        np.column_stack([lat, lon]).tolist(),
    )
    reached = _reachable(driver, points)
    return [(*tile, *point) for tile, point, ok in zip(tiles, points, reached, strict=True) if ok]


def test_page_needs_nothing_but_basemap_tiles_from_the_network(preview: Path) -> None:
    page = preview.read_text(encoding="utf-8")
    assert not re.findall(r"<(?:script|link)[^>]+(?:src|href)=\"https?:", page)
    assert "data:image/png;base64," in page and "data:image/webp;base64," in page


def test_page_loads_without_errors_offline(page: webdriver.Chrome) -> None:
    entries = page.get_log("browser")
    errors = [
        entry
        for entry in entries
        if entry["level"] == "SEVERE" and not (entry["source"] == "network" and BASEMAP_HOST in entry["message"])
    ]
    assert errors == []


def test_layer_control_lists_imagery_percentiles_scores_dominant_and_places(page: webdriver.Chrome) -> None:
    expected = [
        UNDERLAY_NAME,
        *(f"{label} — percentile" for label in LABELS),
        *(f"{label} — raw cosine" for label in LABELS),
        "Dominant sound",
        *(f"{label} — top places" for label in LABELS),
    ]
    assert _overlay_names(page) == expected
    shown = [box.is_selected() for box in _overlay_boxes(page)]
    assert [name for name, on in zip(expected, shown, strict=True) if on] == [
        UNDERLAY_NAME,
        f"{LABELS[0]} — percentile",
        f"{LABELS[0]} — top places",
    ]
    bases = page.find_elements(By.CSS_SELECTOR, ".leaflet-control-layers-base label")
    assert [base.text.strip() for base in bases] == ["OpenStreetMap (online)"]


def test_every_overlay_renders_the_whole_grid_over_the_underlay(
    page: webdriver.Chrome, store: SyntheticStore, build: Path
) -> None:
    for name, box in zip(_overlay_names(page), _overlay_boxes(page), strict=True):
        if not box.is_selected() and "top places" not in name:
            box.click()
    sizes = page.execute_script(
        "return Array.from(document.querySelectorAll('img.leaflet-image-layer'))"
        ".map(img => [img.complete, img.naturalWidth, img.naturalHeight, getComputedStyle(img).zIndex]);"
    )
    with rasterio.open(build / "imagery.tif") as underlay:
        assert sizes[0][:3] == [True, underlay.width, underlay.height]
    assert [size[:3] for size in sizes[1:]] == [[True, store.width, store.height]] * (2 * len(LABELS) + 1)
    z_order = [int(size[3]) for size in sizes]
    assert z_order == sorted(z_order) and z_order[0] < z_order[1], "the underlay stays under every map"


def test_legend_shows_only_the_layers_on_the_map(page: webdriver.Chrome) -> None:
    def shown() -> list[str]:
        legends = page.find_elements(By.CSS_SELECTOR, ".s2s-legend-entry")
        return [str(legend.get_attribute("id")) for legend in legends if legend.is_displayed()]

    assert shown() == ["percentile-birds"]
    _toggle(page, f"{LABELS[1]} — raw cosine")
    assert shown() == ["percentile-birds", "score-rain"]
    _toggle(page, f"{LABELS[0]} — percentile")
    _toggle(page, "Dominant sound")
    assert shown() == ["score-rain", "dominant"]


def test_legends_say_the_classes_in_plain_words_and_the_dominant_colours(page: webdriver.Chrome) -> None:
    _toggle(page, "Dominant sound")
    legend = page.find_element(By.ID, "percentile-birds").text
    assert "top 10 % of this region for 'birds chirping in a park'" in legend
    assert legend.index("top 1 %") < legend.index("bottom half"), "best class first"
    swatches = page.find_elements(By.CSS_SELECTOR, "#dominant .s2s-swatch")
    colours = [
        page.execute_script("return getComputedStyle(arguments[0]).backgroundColor;", swatch) for swatch in swatches
    ]
    assert colours == [f"rgb({colour.red}, {colour.green}, {colour.blue})" for colour in query_colours(len(LABELS))]
    assert page.find_element(By.ID, "dominant").text.splitlines()[2:] == LABELS


def test_screenshot_shows_the_percentile_map_over_the_builds_imagery(
    page: webdriver.Chrome, store: SyntheticStore
) -> None:
    _toggle(page, f"{LABELS[0]} — top places")
    percentile = _stored(store, "score_percentile")[0]
    classes = percentile_classes(LABELS[0])
    pixels = _screenshot(page)
    # Tiles away from the region's outline (drawn over the maps) and from the controls.
    inner = store.valid.copy()
    for step in ((-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1)):
        inner &= np.roll(store.in_chunk, step, axis=(0, 1))
    tiles = _clickable_tiles(page, store, inner)
    _toggle(page, f"{LABELS[0]} — percentile")
    imagery = _screenshot(page)
    # The block without imagery lies inside the region: the map is transparent there and the imagery shows.
    hole = (store.height // 4 + 2, store.width // 2 + 3)
    assert not store.valid[hole]
    x, y = _tile_point(page, store, *hole)
    assert np.abs(pixels[y, x] - checker_colour(*hole)).max() <= 12
    assert np.abs(pixels[y, x] - imagery[y, x]).max() <= 1
    # Elsewhere each tile has its class's colour, see-through over the imagery.
    checked, under = 0, 0
    for row, col, x, y in tiles:
        colour = np.array(classes[int(percentile_class(percentile[row, col]))].colour)
        expected = OVERLAY_OPACITY * colour + (1 - OVERLAY_OPACITY) * imagery[y, x]
        assert np.abs(pixels[y, x] - expected).max() <= 2, (row, col)
        checked += 1
        under += np.abs(imagery[y, x] - checker_colour(row + 0.5, col + 0.5)).max() <= 16
    assert checked > inner.sum() / 2
    assert under > 0.9 * checked, "the imagery under the map is the build's"


def test_the_dominant_sound_layer_has_the_colours_of_the_dominant_cog(
    page: webdriver.Chrome, store: SyntheticStore
) -> None:
    for name in (UNDERLAY_NAME, f"{LABELS[0]} — percentile", f"{LABELS[0]} — top places", "Dominant sound"):
        _toggle(page, name)
    dominant = np.argmax(_stored(store, "score_softmax"), axis=0)
    colours = np.array(query_colours(len(LABELS)))
    inner = store.valid.copy()
    for step in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        inner &= np.roll(store.in_chunk, step, axis=(0, 1))
    tiles = _clickable_tiles(page, store, inner)
    pixels = _screenshot(page)
    hole = (store.height // 4 + 2, store.width // 2 + 3)
    x, y = _tile_point(page, store, *hole)
    background = pixels[y, x]
    for row, col, x, y in tiles:
        expected = OVERLAY_OPACITY * colours[dominant[row, col]] + (1 - OVERLAY_OPACITY) * background
        assert np.abs(pixels[y, x] - expected).max() <= 2, (row, col)
    assert len({int(dominant[row, col]) for row, col, _, _ in tiles}) == len(LABELS), "every query wins somewhere"


def test_clicking_a_tile_shows_every_querys_score_and_percentile(page: webdriver.Chrome, store: SyntheticStore) -> None:
    score, percentile, softmax = (_stored(store, name) for name in ("score", "score_percentile", "score_softmax"))
    row, col, x, y = _clickable_tiles(page, store, store.valid)[0]
    _click(page, x, y)
    popup = _popup(page)
    dominant = LABELS[int(np.argmax(softmax[:, row, col]))]
    first, second = np.sort(softmax[:, row, col])[::-1][:2]
    margin = round((first - second) * 100)
    assert f"Dominant sound: {dominant} ({margin} points ahead of the runner-up in the softmax across queries)" in (
        popup.text
    )
    lon, lat = _tile_centre_lnglat(store, row + 0.5, col + 0.5)
    assert f"Tile at {lat:.5f}, {lon:.5f}" in popup.text
    rows = popup.find_elements(By.CSS_SELECTOR, "tr.s2s-query")
    assert [item.get_attribute("data-query") for item in rows] == [query.id for query in store.queries]
    for index, (label, item) in enumerate(zip(LABELS, rows, strict=True)):
        value = float(percentile[index, row, col])
        words = PERCENTILE_CLASSES[int(percentile_class(np.array(value)))][1]
        assert item.text == f"{label} {score[index, row, col]:.4f} {value:.2f} ({words})"
    assert not popup.find_elements(By.CSS_SELECTOR, ".s2s-sounds"), "a build without a gallery lists no recordings"


@pytest.fixture(scope="module")
def gallery_store(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStore:
    """A store of the demo model's width holding each tile's best items of a 12-item gallery of the shipped
    recordings."""
    root = tmp_path_factory.mktemp("gallery-store")
    vector_gallery(root / "gallery", 12)
    return write_synthetic_store(root / "soundscape.zarr", dim=DEMO_DIM, gallery=root / "gallery")


def test_clicking_a_tile_lists_its_best_recordings_with_players(
    browser: webdriver.Chrome, gallery_store: SyntheticStore, tmp_path: Path
) -> None:
    page = load(browser, write_preview(gallery_store.path, gallery_store.region, tmp_path / "preview.html"))
    items = json.loads((gallery_store.path.parent / "gallery" / "items.json").read_text())
    best = xr.open_zarr(gallery_store.path).gallery_item.values
    row, col, x, y = _clickable_tiles(page, gallery_store, gallery_store.valid)[0]
    _click(page, x, y)
    sounds = _popup(page).find_elements(By.CSS_SELECTOR, ".s2s-sounds li.s2s-sound")
    shown = best[:PREVIEW_SOUND_RANKS, row, col]
    assert [sound.text.splitlines()[0] for sound in sounds] == [items[index]["caption"] for index in shown]
    first = items[shown[0]]
    assert sounds[0].find_element(By.CSS_SELECTOR, ".s2s-credit").text == f"{first['licence']} · {first['attribution']}"
    audio = sounds[0].find_element(By.TAG_NAME, "audio")
    assert str(audio.get_attribute("src")).startswith("data:audio/mpeg;base64,")
    page.execute_script("arguments[0].preload = 'auto'; arguments[0].load();", audio)
    loaded = "return arguments[0].readyState > 0;"
    WebDriverWait(page, PAGE_LOAD_S).until(lambda driver: driver.execute_script(loaded, audio))
    expected = min(PREVIEW_CLIP_SECONDS, soundfile.info(first["audio"]).duration)
    assert page.execute_script("return arguments[0].duration;", audio) == pytest.approx(expected, abs=0.1)


def test_the_page_holds_clips_of_the_recordings_best_for_the_most_tiles(
    gallery_store: SyntheticStore, store: SyntheticStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(preview_sounds_module, "PREVIEW_MAX_CLIPS", 2)
    rows, cols = np.arange(gallery_store.height), np.arange(gallery_store.width)
    sounds = preview_sounds(SoundscapeStore(gallery_store.path), rows, cols)
    assert sounds is not None
    best = xr.open_zarr(gallery_store.path).gallery_item.values[:PREVIEW_SOUND_RANKS]
    found = best >= 0
    used, counts = np.unique(best[found], return_counts=True)
    assert len(sounds.sounds) == len(used)
    np.testing.assert_array_equal(used[sounds.best[0][found]], best[found])
    assert (sounds.best[0][~found] == -1).all()
    playable = np.array([sound["src"] is not None for sound in sounds.sounds])
    assert playable.sum() == 2 and counts[playable].min() >= counts[~playable].max()
    assert preview_sounds(SoundscapeStore(store.path), rows, cols) is None


def test_clicking_where_there_is_no_prediction_says_so(page: webdriver.Chrome, store: SyntheticStore) -> None:
    hole = (store.height // 4 + 2, store.width // 2 + 3)
    _click(page, *_tile_point(page, store, *hole))
    assert "No prediction here" in _popup(page).text


def test_top_places_are_numbered_markers_with_their_numbers(
    page: webdriver.Chrome, store: SyntheticStore, build: Path
) -> None:
    places = gpd.read_file(build / "top_places.gpkg", layer="birds_places")
    markers = page.find_elements(By.CSS_SELECTOR, ".leaflet-marker-pane .s2s-place")
    assert [marker.text for marker in markers] == [str(rank) for rank in places["rank"]]
    colour = query_colours(len(LABELS))[0]
    first = markers[0].find_element(By.TAG_NAME, "div")
    assert _css_colour(page, first) == f"rgb({colour.red}, {colour.green}, {colour.blue})"
    best = places.iloc[0]
    box = markers[0].rect
    centre = (box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    assert np.allclose(centre, _screen_point(page, best["lat"], best["lon"]), atol=1.5)
    markers[0].click()
    text = _popup(page).text
    assert f"#1 for {LABELS[0]}" in text
    assert f"cosine {best['score']:.4f} · percentile {best['percentile']:.2f} (top 1 % of this region)" in text
    _toggle(page, f"{LABELS[1]} — top places")
    assert len(page.find_elements(By.CSS_SELECTOR, ".leaflet-marker-pane .s2s-place")) == 2 * TOP_K


def test_a_coarse_lattice_says_which_tile_a_popup_reads(
    browser: webdriver.Chrome, store: SyntheticStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(preview_module, "PREVIEW_MAX_PX", 16)
    page = load(browser, write_preview(store.path, store.region, tmp_path / "preview.html"))
    score = _stored(store, "score")
    # Stride 3: a click anywhere in a 3 x 3 block reads the block's centre tile.
    centres = np.zeros_like(store.valid)
    centres[1::3, 1::3] = store.valid[1::3, 1::3]
    row, col, _, _ = _clickable_tiles(page, store, centres)[0]
    _click(page, *_tile_point(page, store, row - 1, col + 1))
    text = _popup(page).text
    assert "one tile in 3 x 3" in text
    lon, lat = _tile_centre_lnglat(store, row + 0.5, col + 0.5)
    assert f"Tile at {lat:.5f}, {lon:.5f}" in text
    assert f"{LABELS[0]} {score[0, row, col]:.4f}" in text


def test_the_page_size_is_bounded_by_tiles_times_queries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preview_module, "PREVIEW_MAX_VALUES", 3 * 8 * 8)
    grid = StoreGrid(96, 48, Affine(10.0, 0.0, 0.0, 0.0, -10.0, 0.0), CRS.from_epsg(3857))
    lattice = preview_lattice(grid, 3)
    assert (lattice.stride, len(lattice.cols), len(lattice.rows)) == (12, 8, 4)
    assert preview_lattice(grid, 1).stride == 8, "13 x 13 tiles at most: 8 x 8 blocks"
    monkeypatch.setattr(preview_module, "PREVIEW_MAX_VALUES", 2**30)
    assert preview_lattice(grid, 3).stride == 1


def test_unreadable_region_is_an_export_error(store: SyntheticStore, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="cannot read the region GeoJSON"):
        write_preview(store.path, tmp_path / "absent.geojson", tmp_path / "preview.html")
    assert not (tmp_path / "preview.html").exists()


def test_missing_places_layer_is_an_export_error(store: SyntheticStore, build: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="cannot read layer birds_places of"):
        write_preview(store.path, store.region, tmp_path / "preview.html", places=tmp_path / "absent.gpkg")


def test_large_grids_are_shown_by_the_centres_of_whole_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preview_module, "PREVIEW_MAX_PX", 16)
    grid = StoreGrid(48, 32, Affine(10.0, 0.0, 1000.0, 0.0, -10.0, 5000.0), CRS.from_epsg(3857))
    lattice = preview_lattice(grid)
    # Stride 3: block centres; the last row block (rows 30..32) reaches one row past the grid.
    assert lattice.cols.tolist() == list(range(1, 48, 3))
    assert lattice.rows.tolist() == list(range(1, 32, 3))
    assert lattice.bounds == (1000.0, 5000.0 - 33 * 10.0, 1000.0 + 48 * 10.0, 5000.0)


def test_colours_clamp_to_the_ramp_ends_and_nan_is_transparent() -> None:
    rgba = colourise(np.array([[np.nan, -5.0, 0.0, 1.0, 7.0]]), DisplayRange(0.0, 1.0, 2, 98))
    assert rgba[0, :, 3].tolist() == [0, 255, 255, 255, 255]
    assert rgba[0, 1, :3].tolist() == rgba[0, 2, :3].tolist() == [0x44, 0x01, 0x54]
    assert rgba[0, 3, :3].tolist() == rgba[0, 4, :3].tolist() == [0xFD, 0xE7, 0x25]


def test_categories_take_their_colours_and_none_is_transparent() -> None:
    colours = [Colour(1, 2, 3), Colour(40, 50, 60)]
    rgba = paint(np.array([[1, -1, 0]]), colours)
    assert rgba[0].tolist() == [[40, 50, 60, 255], [0, 0, 0, 0], [1, 2, 3, 255]]


def test_percentiles_fall_in_the_classes_qgis_draws() -> None:
    values = np.array([0.0, 50.0, 50.01, 75.0, 90.0, 94.9, 95.0, 99.5, 100.0, np.nan])
    assert percentile_class(values).tolist() == [0, 0, 1, 1, 2, 3, 3, 5, 5, -1]


def test_a_grid_across_the_antimeridian_keeps_east_beyond_180() -> None:
    half_world = 20037508.342789244
    (south, west), (north, east) = lnglat_corners((half_world - 1000.0, 0.0, half_world + 1000.0, 1000.0))
    assert west == pytest.approx(180.0 - 0.008983, abs=1e-5)
    assert east == pytest.approx(180.0 + 0.008983, abs=1e-5)
    assert south == pytest.approx(0.0, abs=1e-9)
    assert north > south


@pytest.mark.parametrize("untrained", [True, False])
def test_banner_says_plainly_whether_the_weights_are_untrained(tmp_path: Path, untrained: bool) -> None:
    store = write_synthetic_store(tmp_path / "soundscape.zarr", 8, 6, untrained=untrained)
    page = write_preview(store.path, store.region, tmp_path / "preview.html").read_text(encoding="utf-8")
    assert ("Untrained model weights" in page) is untrained


def test_banner_says_how_many_tiles_were_left_empty_for_unavailable_imagery(tmp_path: Path) -> None:
    store = write_synthetic_store(tmp_path / "soundscape.zarr", 8, 6, unavailable=True)
    empty = int((store.in_chunk & ~store.valid).sum())
    page = write_preview(store.path, store.region, tmp_path / "preview.html").read_text(encoding="utf-8")
    assert f"{empty} tiles left empty: imagery unavailable (2 source tiles failed or corrupt); rerun to retry" in page
    clean = write_synthetic_store(tmp_path / "clean" / "soundscape.zarr", 8, 6)
    page = write_preview(clean.path, clean.region, tmp_path / "clean.html").read_text(encoding="utf-8")
    assert "left empty" not in page and empty > 0


# --- several times: a slider switches every query layer, the dominant sound and the popups ------------------------

TIMES = Times((6, 12), (8,))
TIME_LABELS = ["month 6, hour 8", "month 12, hour 8"]


@pytest.fixture(scope="module")
def timed_store(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStore:
    return write_synthetic_store(tmp_path_factory.mktemp("timed") / "soundscape.zarr", times=TIMES)


@pytest.fixture(scope="module")
def timed_preview(timed_store: SyntheticStore, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("timed-build")
    return write_preview(timed_store.path, timed_store.region, folder / "preview.html")


def _slide_to(driver: webdriver.Chrome, time: int) -> None:
    """Move the time slider as a keyboard user does: to its start, then `time` steps right."""
    slider = driver.find_element(By.ID, "s2s-time")
    slider.send_keys(Keys.HOME, *([Keys.ARROW_RIGHT] * time))


def _per_time(store: SyntheticStore, variable: str) -> np.ndarray:
    """(T, Q, H, W) of a store with month and hour dimensions."""
    values = xr.open_zarr(store.path)[variable].to_numpy()
    return values.reshape(-1, *values.shape[2:])


def _overlay_sources(driver: webdriver.Chrome) -> list[str]:
    return list(
        driver.execute_script(
            "return Array.from(document.querySelectorAll('img.leaflet-image-layer')).map(img => img.src);"
        )
    )


def test_a_preview_of_one_time_has_no_time_slider(page: webdriver.Chrome) -> None:
    assert page.find_elements(By.ID, "s2s-time") == []


def test_the_time_slider_switches_the_maps_to_each_time(
    browser: webdriver.Chrome, timed_store: SyntheticStore, timed_preview: Path
) -> None:
    page = load(browser, timed_preview)
    slider = page.find_element(By.ID, "s2s-time")
    assert (slider.get_attribute("min"), slider.get_attribute("max")) == ("0", str(len(TIME_LABELS) - 1))
    percentile = _per_time(timed_store, "score_percentile")[:, 0]
    classes = percentile_classes(LABELS[0])
    inner = timed_store.valid.copy()
    for step in ((-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1)):
        inner &= np.roll(timed_store.in_chunk, step, axis=(0, 1))
    tiles = _clickable_tiles(page, timed_store, inner)
    _toggle(page, f"{LABELS[0]} — percentile")
    background = _screenshot(page)
    _toggle(page, f"{LABELS[0]} — percentile")
    changed = 0
    for time, label in enumerate(TIME_LABELS):
        _slide_to(page, time)
        assert page.find_element(By.ID, "s2s-time-label").text == label
        pixels = _screenshot(page)
        for row, col, x, y in tiles:
            colour = np.array(classes[int(percentile_class(percentile[time, row, col]))].colour)
            expected = OVERLAY_OPACITY * colour + (1 - OVERLAY_OPACITY) * background[y, x]
            assert np.abs(pixels[y, x] - expected).max() <= 2, (time, row, col)
        changed += time > 0 and bool(
            (percentile_class(percentile[time][inner]) != percentile_class(percentile[0][inner])).any()
        )
    assert changed, "the fixture's times differ in the tiles checked"


def test_the_time_slider_switches_every_query_layer_the_dominant_sound_and_the_popups(
    browser: webdriver.Chrome, timed_store: SyntheticStore, timed_preview: Path
) -> None:
    page = load(browser, timed_preview)
    for box in _overlay_boxes(page):
        if not box.is_selected():
            box.click()
    first = _overlay_sources(page)
    _slide_to(page, 1)
    second = _overlay_sources(page)
    assert len(first) == 2 * len(LABELS) + 1
    assert all(a != b for a, b in zip(first, second, strict=True)), "every map shows the slider's time"
    _slide_to(page, 0)
    assert _overlay_sources(page) == first
    for box in _overlay_boxes(page):
        if box.is_selected():
            box.click()
    score = _per_time(timed_store, "score")
    tiles = _clickable_tiles(page, timed_store, timed_store.valid)
    row, col, _, _ = tiles[len(tiles) // 2]  # near the middle: where the map is after a popup pans it
    for time, label in enumerate(TIME_LABELS):
        _slide_to(page, time)
        _click(page, *_tile_point(page, timed_store, row, col))
        popup = _popup(page)
        assert label in popup.text
        rows = popup.find_elements(By.CSS_SELECTOR, "tr.s2s-query")
        for label_of_query, item, value in zip(LABELS, rows, score[time, :, row, col], strict=True):
            assert item.text.startswith(f"{label_of_query} {value:.4f} "), (time, item.text)

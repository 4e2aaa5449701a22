"""The HTML preview, opened in headless Chromium with no network: it loads cleanly and its layers render."""

from __future__ import annotations

import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import mercantile
import numpy as np
import pytest
from affine import Affine
from pyproj import Transformer
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from support.synthetic_store import SyntheticStore, write_synthetic_store

from pipeline.errors import ExportError
from pipeline.export import preview as preview_module
from pipeline.export.preview import colourise, lnglat_corners, preview_lattice, write_preview
from pipeline.export.qgis_style import DisplayRange
from pipeline.store import StoreGrid

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
BASEMAP_HOST = "tile.openstreetmap.org"
PAGE_LOAD_S = 20


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStore:
    return write_synthetic_store(tmp_path_factory.mktemp("store") / "soundscape.zarr")


@pytest.fixture(scope="module")
def preview(store: SyntheticStore, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_preview(store.path, store.region, tmp_path_factory.mktemp("preview") / "preview.html")


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


@pytest.fixture
def page(browser: webdriver.Chrome, preview: Path) -> webdriver.Chrome:
    """The preview freshly loaded with its first overlay's image decoded; the console log holds this load only."""
    browser.get_log("browser")
    browser.get(preview.as_uri())
    WebDriverWait(browser, PAGE_LOAD_S).until(
        lambda driver: driver.execute_script(
            "const img = document.querySelector('img.leaflet-image-layer');"
            "return img !== null && img.complete && img.naturalWidth > 0;"
        )
    )
    return browser


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


def _tile_centre_lnglat(store: SyntheticStore, row: int, col: int) -> tuple[float, float]:
    left, bottom, right, top = mercantile.xy_bounds(store.top_left.x + col, store.top_left.y + row, store.zoom)
    lon, lat = Transformer.from_crs(3857, 4326, always_xy=True).transform((left + right) / 2, (bottom + top) / 2)
    return lon, lat


def _screenshot(driver: webdriver.Chrome) -> np.ndarray:
    """RGB (height, width, 3) of the page."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with MemoryFile(driver.get_screenshot_as_png()) as memory, memory.open() as image:
            return np.moveaxis(image.read()[:3], 0, -1).astype(int)


def _overlay_checkboxes(driver: webdriver.Chrome) -> list:
    return driver.find_elements(By.CSS_SELECTOR, ".leaflet-control-layers-overlays input[type=checkbox]")


def test_page_needs_nothing_but_basemap_tiles_from_the_network(preview: Path) -> None:
    page = preview.read_text(encoding="utf-8")
    assert not re.findall(r"<(?:script|link)[^>]+(?:src|href)=\"https?:", page)
    assert "data:image/png;base64," in page


def test_page_loads_without_errors_offline(page: webdriver.Chrome) -> None:
    entries = page.get_log("browser")
    errors = [
        entry
        for entry in entries
        if entry["level"] == "SEVERE" and not (entry["source"] == "network" and BASEMAP_HOST in entry["message"])
    ]
    assert errors == []


def test_layer_control_lists_one_layer_per_query(page: webdriver.Chrome) -> None:
    names = page.find_elements(By.CSS_SELECTOR, ".leaflet-control-layers-overlays label")
    assert [name.text.strip() for name in names] == LABELS
    assert [box.is_selected() for box in _overlay_checkboxes(page)] == [True, False, False]


def test_every_overlay_renders_the_whole_grid(page: webdriver.Chrome, store: SyntheticStore) -> None:
    for box in _overlay_checkboxes(page)[1:]:
        box.click()
    sizes = page.execute_script(
        "return Array.from(document.querySelectorAll('img.leaflet-image-layer'))"
        ".map(img => [img.complete, img.naturalWidth, img.naturalHeight]);"
    )
    assert sizes == [[True, store.width, store.height]] * len(LABELS)


def test_legend_shows_only_the_layers_on_the_map(page: webdriver.Chrome) -> None:
    def shown() -> list[bool]:
        legends = page.find_elements(By.CSS_SELECTOR, ".s2s-legend-entry")
        return [legend.is_displayed() for legend in legends]

    assert shown() == [True, False, False]
    _overlay_checkboxes(page)[1].click()
    assert shown() == [True, True, False]
    _overlay_checkboxes(page)[0].click()
    assert shown() == [False, True, False]


def test_overlay_colours_scores_and_leaves_nodata_transparent(page: webdriver.Chrome, store: SyntheticStore) -> None:
    scores = np.where(store.valid, store.score[0], np.nan)
    high = tuple(int(index) for index in np.unravel_index(np.nanargmax(scores), scores.shape))
    low = tuple(int(index) for index in np.unravel_index(np.nanargmin(scores), scores.shape))
    # The block without imagery lies inside the region, a quarter down the grid and right of its middle.
    hole = (store.height // 4 + store.height // 16, store.width // 2 + store.width // 16)
    assert not store.valid[hole]
    middle_lon, middle_lat = _tile_centre_lnglat(store, store.height // 2, 0)
    outside = _screen_point(page, middle_lat, middle_lon)
    outside = (outside[0] - 30, outside[1])

    pixels = _screenshot(page)

    def colour(row: int, col: int) -> np.ndarray:
        lon, lat = _tile_centre_lnglat(store, row, col)
        x, y = _screen_point(page, lat, lon)
        return pixels[y, x]

    background = pixels[outside[1], outside[0]]
    assert np.abs(colour(*hole) - background).max() <= 2, "nodata tiles are transparent"
    assert np.abs(colour(*high) - background).max() > 40
    assert np.abs(colour(*low) - background).max() > 40
    assert colour(*high).sum() > colour(*low).sum() + 150, "viridis: the highest score is the lightest"


def test_unreadable_region_is_an_export_error(store: SyntheticStore, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="cannot read the region GeoJSON"):
        write_preview(store.path, tmp_path / "absent.geojson", tmp_path / "preview.html")
    assert not (tmp_path / "preview.html").exists()


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

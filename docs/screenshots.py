"""Remake the README's screenshots from a finished build: `preview.png` (its HTML preview in headless Chromium, with
the popup of a tile near the map's centre open) and `qgis_project.png` (its QGIS project in a print layout with the
legend of the shown layers, rendered by Debian's PyQGIS through docs/qgis_render.py).

    .venv/bin/python docs/screenshots.py outputs/itaipu-demo [--out docs]

A folder that is not a finished build is refused in one line (exit status 2).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from common.errors import Sat2SoundError
from pipeline.build import ERROR_STATUS, MODEL_NAME, PREVIEW_NAME, PROJECT_NAME, check_build_folder
from pipeline.model_setup import read_model_record

DOCS = Path(__file__).resolve().parent
QGIS_RENDER = DOCS / "qgis_render.py"
PREVIEW_PNG = "preview.png"
PROJECT_PNG = "qgis_project.png"
DEBIAN_PYTHON = "/usr/bin/python3"
CHROMEDRIVER = "/usr/bin/chromedriver"
DEBIAN_PACKAGES = "chromium chromium-driver python3-qgis"
VIEWPORT = (1400, 900)
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
PAGE_LOAD_S = 20
POPUP_S = 2
# The clicks tried, outward from the map's centre, until a tile's popup opens clear of the controls.
CLICK_STEP_PX = 24
CLICK_RINGS = 8

# The page opens with the whole region in view; one zoom step in, the region fills it, as a user would look.
_ZOOM_IN_JS = "window[document.querySelector('.folium-map').id].zoomIn(1, {animate: false});"
_IMAGES_DECODED_JS = """
const images = Array.from(document.querySelectorAll('img.leaflet-image-layer'));
return images.length > 0 && images.every(img => img.complete && img.naturalWidth > 0);
"""
# Whether a click at page pixel (x, y) reaches the map itself: no control, banner, marker or popup over it.
_ON_MAP_JS = """
const element = document.elementFromPoint(arguments[0], arguments[1]);
return element !== null && element.closest('.folium-map') !== null
  && element.closest('.leaflet-control, .s2s-banner, .leaflet-marker-pane, .leaflet-popup-pane') === null;
"""
# The popup last opened (one closing lingers a moment in the page).
_POPUP_JS = "const popup = Array.from(document.querySelectorAll('.leaflet-popup')).at(-1) ?? null;"
_POPUP_OPEN_JS = _POPUP_JS + "return popup !== null;"
# Whether `popup` is a tile's (with every query's values) and overlaps no control or banner.
_TILE_POPUP_CLEAR_JS = """
if (popup.querySelector('tr.s2s-query') === null) return false;
const box = popup.getBoundingClientRect();
return Array.from(document.querySelectorAll('.leaflet-control, .s2s-banner')).every(element => {
  const other = element.getBoundingClientRect();
  return other.right <= box.left || other.left >= box.right || other.bottom <= box.top || other.top >= box.bottom;
});
"""
# Popups appear and go at once, so that the screenshot never catches one fading.
_NO_FADE_JS = (
    "document.head.insertAdjacentHTML('beforeend', '<style>.leaflet-popup { transition: none !important; }</style>');"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("build", type=Path, help="a finished build folder (<output_dir>/<name>)")
    parser.add_argument("--out", type=Path, default=DOCS, help="where to write the PNGs (default: docs/)")
    args = parser.parse_args(argv)
    try:
        check_build_folder(args.build, (MODEL_NAME, PREVIEW_NAME, PROJECT_NAME))
    except Sat2SoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ERROR_STATUS
    if missing := _missing_tools():
        print(f"error: no {', '.join(missing)}; install the Debian packages {DEBIAN_PACKAGES}", file=sys.stderr)
        return ERROR_STATUS
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = read_model_record(args.build / MODEL_NAME).checkpoint
    written = [
        shoot_preview(args.build / PREVIEW_NAME, args.out / PREVIEW_PNG),
        render_project(args.build / PROJECT_NAME, checkpoint, args.out / PROJECT_PNG),
    ]
    for path in written:
        print(f"wrote {path} ({path.stat().st_size / 1000:.0f} kB)")
    return 0


def _missing_tools() -> list[str]:
    return [tool for tool in ("chromium", CHROMEDRIVER, DEBIAN_PYTHON) if shutil.which(tool) is None]


def shoot_preview(page: Path, out: Path) -> Path:
    """The preview as it opens, with a tile's popup open; saved as a small PNG."""
    with _chromium() as driver:
        driver.get(page.resolve().as_uri())
        WebDriverWait(driver, PAGE_LOAD_S).until(lambda found: found.execute_script(_IMAGES_DECODED_JS))
        driver.execute_script(_ZOOM_IN_JS + _NO_FADE_JS)
        _open_tile_popup(driver)
        with tempfile.TemporaryDirectory() as folder:
            raw = Path(folder) / out.name
            raw.write_bytes(driver.get_screenshot_as_png())
            _debian_python("shrink", str(raw), str(out))
    return out


@contextmanager
def _chromium() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or ""
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    with tempfile.TemporaryDirectory(prefix="sat2sound-chromium-") as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            # The page's own size, whatever room the headless window's frame takes.
            width, height = VIEWPORT
            metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
            yield driver
        finally:
            driver.quit()


def _open_tile_popup(driver: webdriver.Chrome) -> None:
    """Click the map near its centre, outward, until a tile with predictions answers with a popup that no control
    hides."""
    container = driver.find_element(By.CSS_SELECTOR, ".folium-map")
    box = container.rect
    centre = (box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    rings = range(-CLICK_RINGS, CLICK_RINGS + 1)
    offsets = sorted(
        ((dx * CLICK_STEP_PX, dy * CLICK_STEP_PX) for dx in rings for dy in rings),
        key=lambda offset: math.hypot(*offset),
    )
    for dx, dy in offsets:
        if not driver.execute_script(_ON_MAP_JS, centre[0] + dx, centre[1] + dy):
            continue
        ActionChains(driver).move_to_element_with_offset(container, dx, dy).click().perform()
        try:
            WebDriverWait(driver, POPUP_S).until(lambda found: found.execute_script(_POPUP_OPEN_JS))
        except TimeoutException:
            continue
        if driver.execute_script(_POPUP_JS + _TILE_POPUP_CLEAR_JS):
            return
    raise SystemExit("error: no tile near the preview's centre opens a popup clear of the controls")


def render_project(project: Path, checkpoint: str, out: Path) -> Path:
    _debian_python("layout", str(project), checkpoint, str(out))
    return out


def _debian_python(*args: str) -> None:
    """docs/qgis_render.py run by Debian's Python; its messages (GDAL's warnings among them) only if it fails."""
    # Debian's PyQGIS must not pick up the virtualenv's Python, GDAL or PROJ settings.
    env = {key: value for key, value in os.environ.items() if not key.startswith(("GDAL_", "PROJ_", "PYTHON"))}
    with tempfile.TemporaryDirectory(prefix="sat2sound-qt-runtime-") as runtime:
        env |= {"QT_QPA_PLATFORM": "offscreen", "XDG_RUNTIME_DIR": runtime}
        result = subprocess.run([DEBIAN_PYTHON, str(QGIS_RENDER), *args], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr.strip() or f"error: {QGIS_RENDER.name} {args[0]} failed")


if __name__ == "__main__":
    sys.exit(main())

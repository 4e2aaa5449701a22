"""Imagery sources behind one reader interface: XYZ/TMS tile servers, local rasters and STAC APIs.

`open_reader` turns a source spec into a reader:

    with open_reader("esri", cache_dir=Path("tiles_cache")) as src:
        image = src.part(view, 224, 224)
        src.native_gsd_m(latitude), src.fetches_ahead, src.prefetch(views, 224), src.estimate(views, 224)

`reader_class(spec)` tells which reader a spec opens without opening it (e.g. `.fetches_ahead`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import ImageryError
from pipeline.imagery.base import FetchEstimate, ImageData, ImageryReader, PrefetchReport
from pipeline.imagery.cache import CacheStats, TileCache, check_cache_dir
from pipeline.imagery.http import RetryPolicy, redact
from pipeline.imagery.local import LocalRasterReader, Stretch, is_remote
from pipeline.imagery.stac import StacReader
from pipeline.imagery.xyz import XYZReader

__all__ = [
    "CacheStats",
    "FetchEstimate",
    "ImageData",
    "ImageryReader",
    "LocalRasterReader",
    "PrefetchReport",
    "RetryPolicy",
    "StacReader",
    "Stretch",
    "TileCache",
    "XYZReader",
    "open_reader",
    "reader_class",
]

_RASTER_SUFFIXES = frozenset({".tif", ".tiff", ".vrt", ".jp2", ".img"})


def reader_class(spec: str) -> type[ImageryReader]:
    """The reader class `open_reader(spec)` would build, without opening anything."""
    spec = spec.strip()
    if spec in ("", "esri") or spec.startswith("xyz:"):
        return XYZReader
    if spec.startswith("stac:"):
        return StacReader
    path = Path(spec.removeprefix("file:"))
    if is_remote(spec) or spec.startswith("file:") or path.suffix.lower() in _RASTER_SUFFIXES or path.exists():
        return LocalRasterReader
    raise ImageryError(
        f"unknown imagery source {redact(spec)!r}; use esri, xyz:URL_TEMPLATE, stac:URL, a raster path or URL"
    )


def open_reader(
    spec: str, *, cache_dir: Path, offline: bool = False, on_missing: str = "fail", **options: Any
) -> ImageryReader:
    """Reader for `spec`: 'esri' (Esri World Imagery), 'xyz:URL_TEMPLATE', 'stac:URL', or a raster: a PATH
    ('file:PATH' forces a path), an http(s) URL or a GDAL /vsi path (a COG on a server or in a bucket).
    `options`, checked against the reader's `OPTIONS`, go to its constructor; `on_missing` (what a tile that
    cannot be had does) to the readers that fetch (tile servers, STAC)."""
    spec = spec.strip()
    kind = reader_class(spec)
    kind.check_options(options)
    if kind.fetches_ahead:
        check_cache_dir(cache_dir, "imagery.cache_dir", "set imagery.cache_dir to a folder (one not there yet is made)")
    fetching: dict[str, Any] = {"cache": TileCache(cache_dir), "offline": offline, "on_missing": on_missing}
    if kind is XYZReader:
        if spec.startswith("xyz:"):
            return XYZReader(spec.removeprefix("xyz:"), **fetching, **options)
        return XYZReader.esri(**fetching, **options)
    if kind is StacReader:
        return StacReader(spec.removeprefix("stac:"), **fetching, **options)
    if is_remote(spec):
        return LocalRasterReader(spec, **options)
    path = Path(spec.removeprefix("file:"))
    if not path.exists():
        raise ImageryError(f"raster {path} does not exist; check the path")
    return LocalRasterReader(path, **options)

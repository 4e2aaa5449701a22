"""Imagery sources behind one reader interface: XYZ/TMS tile servers, local rasters and STAC APIs.

`open_reader` turns a source spec into a reader:

    with open_reader("esri", cache_dir=Path("tiles_cache")) as src:
        image = src.part(view, 224, 224)
        src.native_gsd_m(latitude), src.fetches_ahead, src.prefetch(views, 224), src.estimate(views, 224)

`reader_class(spec)` tells which reader a spec opens without opening it (e.g. `.fetches_ahead`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.errors import ImageryError
from pipeline.imagery.base import FetchEstimate, ImageData, ImageryReader, PrefetchReport
from pipeline.imagery.cache import CacheStats, TileCache
from pipeline.imagery.http import RetryPolicy, redact
from pipeline.imagery.local import LocalRasterReader, Stretch
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
    if spec.startswith("file:") or path.suffix.lower() in _RASTER_SUFFIXES or path.exists():
        return LocalRasterReader
    raise ImageryError(
        f"unknown imagery source {redact(spec)!r}; use esri, xyz:URL_TEMPLATE, stac:URL or a raster path"
    )


def open_reader(
    spec: str, *, cache_dir: Path, offline: bool = False, on_missing: str = "fail", **options: Any
) -> ImageryReader:
    """Reader for `spec`: 'esri' (Esri World Imagery), 'xyz:URL_TEMPLATE', 'stac:URL', or a raster
    PATH ('file:PATH' forces a path). `options` go to the reader's constructor; `on_missing` (what a tile
    that cannot be had does) to the readers that fetch (tile servers, STAC)."""
    spec = spec.strip()
    kind = reader_class(spec)
    cache_options: dict[str, Any] = {"cache": TileCache(cache_dir), "offline": offline}
    if kind is XYZReader:
        cache_options["on_missing"] = on_missing
        if spec.startswith("xyz:"):
            return _build(XYZReader, options, spec.removeprefix("xyz:"), **cache_options)
        return _build(XYZReader.esri, options, **cache_options)
    if kind is StacReader:
        return _build(StacReader, options, spec.removeprefix("stac:"), **cache_options, on_missing=on_missing)
    path = Path(spec.removeprefix("file:"))
    if not path.exists():
        raise ImageryError(f"raster {path} does not exist; check the path")
    return _build(LocalRasterReader, options, path)


def _build(factory: Callable[..., ImageryReader], options: dict[str, Any], *args: Any, **fixed: Any) -> ImageryReader:
    """Call `factory`, turning unknown option names into one clear ImageryError."""
    reader_class = XYZReader if factory == XYZReader.esri else factory
    accepted = set(inspect.signature(reader_class).parameters)
    unknown = sorted(set(options) - accepted)
    if unknown:
        valid = ", ".join(sorted(accepted - set(fixed) - {"url_template", "url", "path"}))
        raise ImageryError(f"option {unknown[0]!r} does not apply to this imagery source; valid options: {valid}")
    return factory(*args, **fixed, **options)

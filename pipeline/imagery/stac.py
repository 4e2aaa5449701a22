"""Sentinel-2 L2A true colour from a STAC API: search, least-cloudy-first mosaic of COGs over HTTP.

Searches run once per search cell (a Web Mercator tile at `search_zoom`, about the size of a
Sentinel-2 granule) and are remembered, so reading many footprints does not search again. Each
footprint is filled from the least cloudy item first; more cloudy items only fill what is still
missing. Assets are read with GDAL's /vsicurl/ (HTTP range requests) through LocalRasterReader.
Finished footprints are stored in the TileCache, so reruns and offline runs reuse them.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar, NamedTuple

import mercantile
import numpy as np
import pystac_client
from pystac_client.exceptions import APIError
from rasterio.warp import transform_bounds
from requests import RequestException
from urllib3.util.retry import Retry

from common.errors import first_line
from pipeline.errors import FetchError, ImageryError, ImageryWarning, TileDecodeError
from pipeline.geometry import WEB_MERCATOR, WGS84, Bounds, strip_grid
from pipeline.imagery.base import (
    COMMON_OPTIONS,
    RGB_BANDS,
    ImageData,
    ImageryReader,
    OnMissing,
    OptionSchema,
    PrefetchReport,
    SourcePixels,
    Unavailable,
    check_on_missing,
    check_read_size,
    empty_image,
    mercator_pixels,
    read_strips,
    resampling_method,
    true_gsd_m,
    unavailable_error,
    view_array,
)
from pipeline.imagery.cache import TileCache, part_key
from pipeline.imagery.codec import decode_tile, encode_png
from pipeline.imagery.http import DEFAULT_RETRY, RETRY_OPTION, RetryPolicy, is_http_url, redact, retry_policy
from pipeline.imagery.local import LocalRasterReader, Stretch, apply_stretch, stretch_range

SENTINEL2_L2A = "sentinel-2-l2a"
# Ground sample distance of Sentinel-2's true-colour bands (B04, B03, B02) and of its visual asset.
SENTINEL2_TRUE_COLOUR_GSD_M = 10.0
SENTINEL2_ATTRIBUTION = "Contains modified Copernicus Sentinel data"
VISUAL_ASSET = "visual"
# Per-band asset names of the main STAC APIs (Element 84 Earth Search, then Planetary Computer).
BAND_ASSET_SETS = (("red", "green", "blue"), ("B04", "B03", "B02"))
REFLECTANCE_STRETCH = Stretch(0.0, 0.3)
DIGITAL_NUMBER_STRETCH = Stretch(0.0, 3000.0)
# From processing baseline 04.00 (January 2022) L2A digital numbers carry a +1000 offset.
BOA_OFFSET_BASELINE = "04.00"
BOA_ADD_OFFSET = 1000.0
_OPEN_ITEMS = 8
# HTTP statuses of an asset that does not exist: no imagery, unlike a server failing every retry.
ABSENT_STATUSES = (404, 410)


class StacItem(NamedTuple):
    """What the reader needs of one search hit."""

    id: str
    cloud_cover: float
    datetime: str
    bbox: tuple[float, float, float, float]
    hrefs: tuple[str, ...]  # one RGB asset, or red, green, blue
    scales: tuple[float, ...]
    offsets: tuple[float, ...]


class StacReader(ImageryReader):
    """Least-cloudy mosaic of a STAC collection's true-colour assets.

    `datetime` is a STAC range such as '2023-06-01/2023-08-31'; items with `eo:cloud_cover` above
    `max_cloud_cover` percent are skipped. `band_stretch` overrides the stretch used for per-band
    assets (reflectance 0-0.3, or digital numbers 0-3000 without scale metadata). Like
    LocalRasterReader, whose datasets it keeps open, it is meant for one thread.
    """

    fetches_ahead = True
    OPTIONS: ClassVar[Mapping[str, OptionSchema]] = {
        **COMMON_OPTIONS,
        "collection": {"type": "string", "minLength": 1, "description": "name the STAC collection to search"},
        "datetime": {
            "type": ["string", "null"],
            "description": "give a STAC date range such as 2023-06-01/2023-08-31, or null for any date",
        },
        "max_cloud_cover": {
            "type": "number",
            "minimum": 0,
            "maximum": 100,
            "description": "give the cloud cover in percent (0-100) above which scenes are skipped",
        },
        "max_items": {"type": "integer", "minimum": 1, "description": "give how many scenes a search keeps, from 1"},
        "search_zoom": {
            "type": "integer",
            "minimum": 0,
            "description": "give the Web Mercator zoom (from 0) of the cells the catalogue is searched by",
        },
        "band_stretch": {
            "type": ["array", "null"],
            "items": {"type": "number"},
            "minItems": 2,
            "maxItems": 2,
            "description": "give [min, max] of the per-band assets' values, or null for their own scale",
        },
        "retry": RETRY_OPTION,
    }

    def __init__(
        self,
        url: str,
        *,
        cache: TileCache,
        collection: str = SENTINEL2_L2A,
        datetime: str | None = None,
        max_cloud_cover: float = 20.0,
        offline: bool = False,
        max_items: int = 50,
        search_zoom: int = 9,
        band_stretch: Sequence[float] | None = None,
        resampling: str = "bilinear",
        retry: RetryPolicy | Mapping[str, float] = DEFAULT_RETRY,
        source_id: str | None = None,
        attribution: str = SENTINEL2_ATTRIBUTION,
        on_missing: OnMissing = "fail",
    ) -> None:
        if not is_http_url(url):
            raise ImageryError(
                f"STAC API URL {redact(url)!r} is not http(s) with a valid host and port; write e.g."
                " stac:https://earth-search.aws.element84.com/v1"
            )
        self.url = url
        self.cache = cache
        self.collection = collection
        _check_datetime(url, datetime)
        self.datetime = datetime
        self.max_cloud_cover = max_cloud_cover
        self.offline = offline
        check_on_missing(on_missing)
        self.on_missing = on_missing
        self.max_items = max_items
        self.search_zoom = search_zoom
        self.attribution = attribution
        self.source_id = source_id or self._default_source_id()
        self._band_stretch = None if band_stretch is None else stretch_range(band_stretch)
        resampling_method(resampling)  # refused here, not at the first asset read
        self._resampling = resampling
        self._retry = retry_policy(retry)
        self._client: pystac_client.Client | None = None
        self._cells: dict[mercantile.Tile, list[str]] = {}
        self._items: dict[str, StacItem] = {}
        self._open: OrderedDict[str, list[LocalRasterReader]] = OrderedDict()

    def native_gsd_m(self, latitude: float) -> float:
        if self.collection == SENTINEL2_L2A:
            return SENTINEL2_TRUE_COLOUR_GSD_M
        return super().native_gsd_m(latitude)

    def prefetch(self, views: Sequence[Bounds] | np.ndarray, width: int) -> PrefetchReport:
        """Mosaic the strips the views are read in (`source_pixels`) and keep them in the tile cache."""
        views = view_array(views)
        strips = [self.source_pixels(views[strip.start : strip.stop], width) for strip in read_strips(views, width)]
        with_imagery = sum(bool(pixels.valid.any()) for pixels in strips)
        unavailable = tuple(item for pixels in strips for item in pixels.unavailable_tiles)
        return PrefetchReport("view strips into the tile cache", len(views), len(strips), with_imagery, unavailable)

    def source_pixels(self, views: np.ndarray, width: int) -> SourcePixels:
        """The strip's least-cloudy mosaic in EPSG:3857 (cached). Imagery that cannot be had stops the read
        (on_missing: fail) or marks the whole strip unavailable, named by the smallest Web Mercator tile holding it."""
        bounds, columns, rows = strip_grid(views, width)
        read = self._read(bounds, columns, rows, WEB_MERCATOR)
        if not isinstance(read, Unavailable):
            return mercator_pixels(read, self._resampling)
        self._check_missing(read)
        cell = mercantile.bounding_tile(*transform_bounds(WEB_MERCATOR, WGS84, *bounds, densify_pts=21))
        empty = mercator_pixels(empty_image(bounds, columns, rows, WEB_MERCATOR), self._resampling)
        return replace(empty, unavailable=np.ones((rows, columns), bool), unavailable_tiles=((cell.z, cell.x, cell.y),))

    def part(self, bounds: Bounds, width: int, height: int, dst_crs: str = WEB_MERCATOR) -> ImageData:
        check_read_size(bounds, width, height)
        read = self._read(bounds, width, height, dst_crs)
        if isinstance(read, Unavailable):
            self._check_missing(read)
            return empty_image(bounds, width, height, dst_crs)
        return read

    def search(self, lnglat_bbox: tuple[float, float, float, float]) -> list[StacItem]:
        """Items over `lnglat_bbox` passing the date and cloud filters, least cloudy first."""
        west, south, east, north = lnglat_bbox
        ids: dict[str, None] = {}
        for cell in mercantile.tiles(west, south, east, north, self.search_zoom):
            if cell not in self._cells:
                self._cells[cell] = self._search_cell(cell)
            ids.update(dict.fromkeys(self._cells[cell]))
        hits = [self._items[item_id] for item_id in ids if _bboxes_overlap(self._items[item_id].bbox, lnglat_bbox)]
        return sorted(hits, key=lambda item: (item.cloud_cover, item.datetime, item.id))

    def close(self) -> None:
        for readers in self._open.values():
            for reader in readers:
                reader.close()
        self._open.clear()

    def _read(self, bounds: Bounds, width: int, height: int, dst_crs: str) -> ImageData | Unavailable:
        """The cached mosaic of `bounds`, or a new one (cached); Unavailable when it cannot be had: its cached
        copy is corrupt while offline (the file is kept), a search or an asset failed every retry."""
        key = self._part_key(bounds, width, height, dst_crs)
        cached = self.cache.get(key)
        if cached is not None:
            try:
                image = decode_tile(cached)
            except TileDecodeError:
                if self.offline:
                    return Unavailable(f"its cached mosaic {key} is corrupt")
                self.cache.discard(key)
            else:
                mask = np.broadcast_to(~image.valid, image.rgb.shape).copy()
                return ImageData(
                    np.ma.MaskedArray(image.rgb, mask=mask), bounds, dst_crs, true_gsd_m(bounds, width, dst_crs)
                )
        if self.offline:
            return empty_image(bounds, width, height, dst_crs)
        try:
            result = self._mosaic(bounds, width, height, dst_crs)
        except FetchError as exc:
            return Unavailable(first_line(exc))
        valid = np.asarray(~np.ma.getmaskarray(result.array).any(axis=0))
        self.cache.put(key, encode_png(np.ma.getdata(result.array), valid))
        return result

    def _check_missing(self, missing: Unavailable) -> None:
        if self.on_missing == "fail":
            raise unavailable_error(1, "view strip(s)", self.source_id, missing.reason, self.offline)

    def _mosaic(self, bounds: Bounds, width: int, height: int, dst_crs: str) -> ImageData:
        lnglat = transform_bounds(dst_crs, WGS84, *bounds, densify_pts=21)
        pixels = np.ma.MaskedArray(np.zeros((RGB_BANDS, height, width), np.uint8), mask=True)
        for item in self.search(lnglat):
            try:
                layer = self._read_item(item, bounds, width, height, dst_crs)
            except ImageryError as exc:
                if not _is_absent(exc):  # the server failed every retry: this imagery cannot be had
                    raise FetchError(f"STAC item {item.id} could not be read ({first_line(exc)})") from None
                # An asset the server does not have is no imagery: the next least cloudy item fills in.
                warnings.warn(f"skipping STAC item {item.id}: {exc}", ImageryWarning, stacklevel=3)
                continue
            fill = np.ma.getmaskarray(pixels) & ~np.ma.getmaskarray(layer)
            pixels[fill] = layer[fill]
            if not np.ma.getmaskarray(pixels).any():
                break
        return ImageData(pixels, bounds, dst_crs, true_gsd_m(bounds, width, dst_crs))

    def _read_item(self, item: StacItem, bounds: Bounds, width: int, height: int, dst_crs: str) -> np.ma.MaskedArray:
        readers = self._readers(item)
        if len(readers) == 1:
            return readers[0].part(bounds, width, height, dst_crs).array
        values = np.ma.concatenate([reader.read_values(bounds, width, height, dst_crs) for reader in readers])
        scales = np.asarray(item.scales, np.float32)[:, None, None]
        offsets = np.asarray(item.offsets, np.float32)[:, None, None]
        reflectance = values * scales + offsets
        default = REFLECTANCE_STRETCH if item.scales != (1.0, 1.0, 1.0) else DIGITAL_NUMBER_STRETCH
        pixels = apply_stretch(reflectance, self._band_stretch or default)
        pixels[:, np.ma.getmaskarray(pixels).any(axis=0)] = np.ma.masked
        return pixels

    def _readers(self, item: StacItem) -> list[LocalRasterReader]:
        if item.id in self._open:
            self._open.move_to_end(item.id)
            return self._open[item.id]
        options: dict[str, Any] = {"resampling": self._resampling}  # assets over HTTP get COG_HTTP_ENV
        if len(item.hrefs) == 1:
            readers = [LocalRasterReader(item.hrefs[0], bands=(1, 2, 3), stretch="none", **options)]
        else:
            readers = [LocalRasterReader(href, bands=(1,), stretch="none", **options) for href in item.hrefs]
        self._open[item.id] = readers
        if len(self._open) > _OPEN_ITEMS:
            for reader in self._open.popitem(last=False)[1]:
                reader.close()
        return readers

    def _search_cell(self, cell: mercantile.Tile) -> list[str]:
        west, south, east, north = mercantile.bounds(cell)
        client = self._open_client()
        query = (
            {"eo:cloud_cover": {"lte": self.max_cloud_cover}}
            if client.conforms_to(pystac_client.ConformanceClasses.QUERY)
            else None
        )
        try:
            search = client.search(
                collections=[self.collection],
                bbox=(west, south, east, north),
                datetime=self.datetime,
                query=query,
                max_items=self.max_items,
            )
            found = [_stac_item(feature) for feature in search.items_as_dicts()]
        except (APIError, RequestException) as exc:
            raise FetchError(
                f"STAC search at {redact(self.url)} failed ({type(exc).__name__}); check the URL or retry later"
            ) from None
        ids = []
        for item in found:
            if item is not None and item.cloud_cover <= self.max_cloud_cover:
                self._items[item.id] = item
                ids.append(item.id)
        return ids

    def _open_client(self) -> pystac_client.Client:
        if self._client is None:
            retries = Retry(
                total=self._retry.attempts - 1,
                backoff_factor=self._retry.backoff_s,
                status_forcelist=(429, 500, 502, 503, 504),
                allowed_methods=None,
                respect_retry_after_header=True,
            )
            stac_io = pystac_client.stac_api_io.StacApiIO(
                timeout=(self._retry.connect_timeout_s, self._retry.read_timeout_s), max_retries=retries
            )
            try:
                self._client = pystac_client.Client.open(self.url, stac_io=stac_io)
            except (APIError, RequestException) as exc:
                raise FetchError(
                    f"cannot open the STAC API at {redact(self.url)} ({type(exc).__name__}); check the URL"
                ) from None
        return self._client

    def _part_key(self, bounds: Bounds, width: int, height: int, dst_crs: str) -> str:
        request = json.dumps([dst_crs, [round(value, 3) for value in bounds], width, height])
        return part_key(self.source_id, hashlib.sha256(request.encode()).hexdigest()[:24])

    def _default_source_id(self) -> str:
        settings = json.dumps([self.url, self.collection, self.datetime, self.max_cloud_cover])
        return f"stac-{self.collection}-{hashlib.sha256(settings.encode()).hexdigest()[:10]}"


def _check_datetime(url: str, value: str | None) -> None:
    """Refuse a `datetime` the search would reject, by pystac-client's own parsing (no request is made)."""
    if value is None:
        return
    try:
        pystac_client.ItemSearch(url, datetime=value)
    except Exception as exc:  # a bare Exception for some malformed values, ValueError for others
        raise ImageryError(
            f"datetime {value!r} is not a STAC date range ({first_line(exc)}); give e.g. 2023-06-01/2023-08-31"
        ) from None


def _stac_item(feature: dict[str, Any]) -> StacItem | None:
    """The reader's view of a STAC item; None when it has no true-colour asset."""
    assets = feature.get("assets", {})
    properties = feature.get("properties", {})
    raw_bbox: list[float] = list(feature.get("bbox") or [])
    if len(raw_bbox) not in (4, 6):
        return None
    east_index = len(raw_bbox) // 2  # a 3-D bbox is (west, south, bottom, east, north, top)
    bbox = (float(raw_bbox[0]), float(raw_bbox[1]), float(raw_bbox[east_index]), float(raw_bbox[east_index + 1]))
    common = (str(feature["id"]), float(properties.get("eo:cloud_cover", 100.0)), str(properties.get("datetime")))
    if VISUAL_ASSET in assets:
        return StacItem(*common, bbox, (assets[VISUAL_ASSET]["href"],), (1.0,) * 3, (0.0,) * 3)
    for names in BAND_ASSET_SETS:
        if all(name in assets for name in names):
            scales, offsets = zip(*(_scale_offset(assets[name], properties) for name in names), strict=True)
            return StacItem(*common, bbox, tuple(assets[name]["href"] for name in names), scales, offsets)
    return None


def _scale_offset(asset: dict[str, Any], properties: dict[str, Any]) -> tuple[float, float]:
    """Scale and offset that turn an asset's digital numbers into reflectance (or DN without metadata)."""
    bands = asset.get("raster:bands") or [{}]
    if "scale" in bands[0]:
        return float(bands[0]["scale"]), float(bands[0].get("offset", 0.0))
    baseline = str(properties.get("s2:processing_baseline", "00.00"))
    return 1.0, -BOA_ADD_OFFSET if baseline >= BOA_OFFSET_BASELINE else 0.0


def _is_absent(exc: BaseException) -> bool:
    """Whether a failed asset read was the server saying the asset does not exist (HTTP 404 or 410)."""
    cause = str(exc.__cause__ or "")
    return any(f"HTTP response code: {status}" in cause for status in ABSENT_STATUSES)


def _bboxes_overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

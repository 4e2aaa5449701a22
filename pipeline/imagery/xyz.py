"""XYZ/TMS tile servers: fetch the server tiles under a read, mosaic them, crop and resample.

Server tiles go through the TileCache; a 204/404 or a blank tile (fully transparent or one flat
colour) means "no imagery here" and is masked, not an error. A tile that cannot be had (it failed every
retry, or its cached copy is corrupt while offline) is *unavailable*: with `on_missing="fail"` a read
raises one FetchError counting them, with "leave_empty" its pixels are left empty and marked unavailable
(`SourcePixels.unavailable`), so that no model view touching them is scored. The mosaic keeps its exact EPSG:3857
transform and is warped to the requested grid with GDAL, using the tiles' alpha so that missing
tiles never bleed into their neighbours.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import re
import string
import threading
import warnings
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from enum import Enum
from pathlib import PurePosixPath
from typing import ClassVar, Literal, NamedTuple
from urllib.parse import urlsplit

import mercantile
import numpy as np
from rasterio.warp import reproject, transform_bounds

from common.cores import usable_cores
from pipeline.errors import ImageryError, ImageryWarning, RetriesExhausted, TileDecodeError
from pipeline.geometry import (
    WEB_MERCATOR,
    Bounds,
    TileBlock,
    finest_pixel_m,
    ground_resolution_m,
    imagery_zoom,
    union_bounds,
)
from pipeline.imagery.base import (
    COMMON_OPTIONS,
    RGB_BANDS,
    FetchEstimate,
    ImageData,
    ImageryReader,
    OnMissing,
    OptionSchema,
    PrefetchReport,
    SourcePixels,
    TileLayer,
    Unavailable,
    check_on_missing,
    check_read_size,
    empty_image,
    read_strips,
    resampling_method,
    true_gsd_m,
    unavailable_error,
    view_array,
)
from pipeline.imagery.cache import TileCache, tile_key
from pipeline.imagery.codec import TileImage, decode_tile
from pipeline.imagery.http import (
    DEFAULT_RETRY,
    RETRY_OPTION,
    HttpClient,
    RetryPolicy,
    is_http_url,
    redact,
    retry_policy,
)

LOGGER = logging.getLogger(__name__)

ESRI_WORLD_IMAGERY_URL = "https://server.arcgisonline.com/ArcGIS/rest/services/World_Imagery/MapServer/tile/{z}/{y}/{x}"
ESRI_WORLD_IMAGERY_ID = "esri-world-imagery"
ESRI_ATTRIBUTION = "Tiles © Esri — Source: Esri, Maxar, Earthstar Geographics, and the GIS User Community"
ESRI_MAX_ZOOM = 19
ESRI_TYPICAL_TILE_BYTES = 25_000
# Requests per second a reader starts at most unless told otherwise ("auto"). Neither Esri nor most public
# tile servers publish a number; 20 req/s is our conservative choice, well below what a browser panning a
# map asks for, and it holds for generic `xyz:` servers too. Loopback servers (your own, or tests') are not
# capped by default.
DEFAULT_MAX_REQUESTS_PER_S = 20.0
ESRI_MAX_REQUESTS_PER_S = DEFAULT_MAX_REQUESTS_PER_S
# Tiles to fetch above which a plan shows ESRI_BULK_TERMS. Our conservative reading of Esri's terms for
# bulk and offline use of World Imagery (tiles are for display, not for harvesting), not a legal statement.
ESRI_BULK_TILE_LIMIT = 100_000
ESRI_BULK_TERMS = (
    "Esri World Imagery's terms do not cover bulk or offline download, and this plan fetches more tiles than "
    "we consider ordinary use (our conservative reading, not legal advice); for a region this large use "
    "Sentinel-2 L2A open data with a sentinel checkpoint and `imagery.source: stac:URL`, or your own mosaic "
    "with `imagery.source: path/to/mosaic.tif`"
)
AUTO: Literal["auto"] = "auto"

API_KEY_FIELD = "api_key"
_TEMPLATE_FIELDS = frozenset({"x", "y", "-y", "z", "q", API_KEY_FIELD})
_KNOWN_FORMATS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
# log2 values this close to an integer count as that integer (same rule as pipeline.geometry).
_ZOOM_EPSILON = 1e-9
_OPAQUE = 255
_MISSING_SUFFIX = "missing"


class _NotCached(Enum):
    """The cache's answer for a tile it lacks: the server must be asked."""

    NOT_CACHED = "not cached"


_NOT_CACHED = _NotCached.NOT_CACHED


class TileTemplate(NamedTuple):
    """A validated tile URL template: `{z}` with `{x}` and `{y}` (or TMS `{-y}`), or a `{q}` quadkey."""

    url: str

    @classmethod
    def parse(cls, url: str) -> TileTemplate:
        shown = redact(url)
        if not is_http_url(url):
            raise ImageryError(
                f"tile URL template {shown} is not http(s) with a valid host and port;"
                " write https://host/{z}/{x}/{y}"
            )
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(url) if name is not None}
        except ValueError:
            raise ImageryError(f"tile URL template {shown} has unbalanced braces; write {{z}}, {{x}}, {{y}}") from None
        unknown = sorted(fields - _TEMPLATE_FIELDS)
        if unknown:
            raise ImageryError(
                f"tile URL template {shown} has unknown placeholder {{{unknown[0]}}}; "
                "use {z} {x} {y} {-y} {q} {api_key}"
            )
        if "q" not in fields:
            if "z" not in fields:
                raise ImageryError(
                    f"tile URL template {shown} lacks {{z}}; use e.g. https://host/{{z}}/{{x}}/{{y}}.png"
                )
            if "x" not in fields or not fields & {"y", "-y"}:
                raise ImageryError(
                    f"tile URL template {shown} lacks {{x}} or {{y}}; use https://host/{{z}}/{{x}}/{{y}}.png"
                )
        return cls(url)

    @property
    def needs_api_key(self) -> bool:
        return "{" + API_KEY_FIELD + "}" in self.url

    @property
    def tile_format(self) -> str:
        """File extension the server's tiles probably have (cache file names only; decoding sniffs)."""
        suffix = PurePosixPath(urlsplit(self.url).path).suffix.lower()
        return _KNOWN_FORMATS.get(suffix, "img")

    def url_for(self, tile: mercantile.Tile, api_key: str = "") -> str:
        values = {
            "x": tile.x,
            "y": tile.y,
            "-y": 2**tile.z - 1 - tile.y,
            "z": tile.z,
            "q": mercantile.quadkey(tile),
            API_KEY_FIELD: api_key,
        }
        return self.url.format_map(values)

    def default_source_id(self) -> str:
        """Stable cache namespace from the host and a hash of the template (which holds no key)."""
        host = re.sub(r"[^a-z0-9.-]+", "-", (urlsplit(self.url).hostname or "host").lower())
        digest = hashlib.sha256(self.url.encode()).hexdigest()[:10]
        return f"xyz-{host}-{digest}"


class XYZReader(ImageryReader):
    """Imagery from an XYZ/TMS tile server, cached in a TileCache.

    `api_key_env` names an environment variable whose value fills the template's `{api_key}`; the
    value is never logged nor shown in errors. With `offline=True` only cached tiles are read and
    uncached ones count as no imagery.

    `max_requests_per_s` caps how fast requests start, across all `concurrency` threads and retries
    included: "auto" (the default) means DEFAULT_MAX_REQUESTS_PER_S (20) for any server not on the loopback
    interface and no cap for a loopback one; a number sets the cap; None or 0 turns it off, which only
    makes sense for a server you run or one whose terms allow it. Set it in `imagery.options`.
    `bulk_tile_limit` and `bulk_terms` describe the provider's published limit on bulk download (the
    estimate shows `bulk_terms` when more than `bulk_tile_limit` tiles are to be fetched); `esri()` sets them.

    `on_missing` says what a tile that cannot be had does (one that fails every retry, or a corrupt cached
    tile read offline): "fail" raises one FetchError counting them, "leave_empty" leaves its pixels empty and
    marks them unavailable; `unavailable` holds every such tile this reader met.
    """

    fetches_ahead = True
    OPTIONS: ClassVar[Mapping[str, OptionSchema]] = {
        **COMMON_OPTIONS,
        "min_zoom": {"type": "integer", "minimum": 0, "description": "give the server's coarsest zoom, from 0"},
        "max_zoom": {"type": "integer", "minimum": 0, "description": "give the server's finest zoom, from 0"},
        "tile_size": {"type": "integer", "minimum": 1, "description": "give the server's tile width in px, e.g. 256"},
        "tile_format": {
            "type": ["string", "null"],
            "pattern": "^[A-Za-z0-9]+$",
            "description": "give the tiles' file extension in the cache (e.g. jpg), or null to take the URL's",
        },
        "api_key_env": {
            "type": ["string", "null"],
            "pattern": "^[A-Za-z_][A-Za-z0-9_]*$",
            "description": "name the environment variable that holds the key for the template's {api_key}",
        },
        "concurrency": {"type": "integer", "minimum": 1, "description": "give the parallel downloads, from 1"},
        "retry": RETRY_OPTION,
        "typical_tile_bytes": {
            "type": "integer",
            "minimum": 1,
            "description": "give a tile's usual size in bytes (download estimates), e.g. 20000",
        },
        "max_source_tiles": {
            "type": "integer",
            "minimum": 1,
            "description": "give the most server tiles one read may take, from 1",
        },
        "max_requests_per_s": {
            "anyOf": [{"type": "number", "minimum": 0}, {"const": AUTO}, {"type": "null"}],
            "description": f"give a request rate cap such as 10, {AUTO}, or 0 for none",
        },
        "bulk_tile_limit": {
            "type": ["integer", "null"],
            "minimum": 0,
            "description": "give the tile count past which the provider's bulk terms apply, or null",
        },
        "bulk_terms": {"type": ["string", "null"], "description": "give the provider's bulk-download terms in words"},
    }

    def __init__(
        self,
        url_template: str,
        *,
        cache: TileCache,
        source_id: str | None = None,
        attribution: str = "",
        min_zoom: int = 0,
        max_zoom: int = ESRI_MAX_ZOOM,
        tile_size: int = 256,
        tile_format: str | None = None,
        api_key_env: str | None = None,
        offline: bool = False,
        concurrency: int = 8,
        retry: RetryPolicy | Mapping[str, float] = DEFAULT_RETRY,
        resampling: str = "bilinear",
        typical_tile_bytes: int = 20_000,
        max_source_tiles: int = 1024,
        max_requests_per_s: float | Literal["auto"] | None = AUTO,
        bulk_tile_limit: int | None = None,
        bulk_terms: str | None = None,
        on_missing: OnMissing = "fail",
    ) -> None:
        self.template = TileTemplate.parse(url_template)
        if not 0 <= min_zoom <= max_zoom:
            raise ImageryError(f"zoom range {min_zoom}..{max_zoom} is empty or negative; use 0 <= min <= max")
        self.cache = cache
        self.source_id = source_id or self.template.default_source_id()
        self.attribution = attribution
        self.min_zoom = min_zoom
        self.max_zoom = max_zoom
        self.tile_size = tile_size
        self.tile_format = tile_format or self.template.tile_format
        self.offline = offline
        check_on_missing(on_missing)
        self.on_missing = on_missing
        self.unavailable: set[mercantile.Tile] = set()
        self.typical_tile_bytes = typical_tile_bytes
        self.max_source_tiles = max_source_tiles
        self._resampling = resampling_method(resampling)
        self._api_key = _read_api_key(self.template, api_key_env)
        self.bulk_tile_limit = bulk_tile_limit
        self.bulk_terms = bulk_terms
        self._http = HttpClient(
            concurrency=concurrency,
            policy=retry_policy(retry),
            secrets=(self._api_key,),
            max_requests_per_s=_request_cap(max_requests_per_s, self.template),
            shared_cap=cache.request_slots(self.source_id),
        )
        # Tiles in the cache only need decoding, CPU work that threads beyond the cores slow down (GIL hand-offs:
        # 8 threads on 2 cores took 10-20 % more CPU and 15-20 % more time a view than 2); tiles to fetch wait on
        # servers, `concurrency` at a time.
        self._decode_threads = min(concurrency, usable_cores())
        self._pools: dict[int, ThreadPoolExecutor] = {}
        self._pool_lock = threading.Lock()
        self._warned_max_zoom = False

    @property
    def max_requests_per_s(self) -> float | None:
        """The request cap in force (None: uncapped)."""
        return self._http.max_requests_per_s

    @classmethod
    def esri(cls, *, cache: TileCache, **options: object) -> XYZReader:
        """Esri World Imagery, with its attribution, a 20 req/s cap and its bulk-download terms."""
        defaults: dict[str, object] = {
            "source_id": ESRI_WORLD_IMAGERY_ID,
            "attribution": ESRI_ATTRIBUTION,
            "max_zoom": ESRI_MAX_ZOOM,
            "tile_format": "jpg",
            "typical_tile_bytes": ESRI_TYPICAL_TILE_BYTES,
            "max_requests_per_s": ESRI_MAX_REQUESTS_PER_S,
            "bulk_tile_limit": ESRI_BULK_TILE_LIMIT,
            "bulk_terms": ESRI_BULK_TERMS,
        }
        return cls(ESRI_WORLD_IMAGERY_URL, cache=cache, **{**defaults, **options})  # type: ignore[arg-type]

    def zoom_for(self, bounds: Bounds, width: int) -> int:
        """Coarsest server zoom at least as fine as `width` pixels across EPSG:3857 `bounds`, within the
        source's zoom range (warns once when the source stops short of it)."""
        return self._zoom_for_pixel((bounds.right - bounds.left) / width)

    def _zoom_for_pixel(self, pixel_m: float) -> int:
        wanted = imagery_zoom(pixel_m, self.tile_size)
        if wanted > self.max_zoom and not self._warned_max_zoom:
            self._warned_max_zoom = True
            warnings.warn(
                f"{self.source_id} stops at zoom {self.max_zoom}, coarser than the zoom {wanted} this read needs; "
                "imagery will be upsampled",
                ImageryWarning,
                stacklevel=3,
            )
        return self._clamp_zoom(wanted)

    def gis_layer(self) -> TileLayer | None:
        """The tile server itself; None when its template needs an API key (the project would hold it)."""
        if self.template.needs_api_key:
            return None
        return TileLayer(self.template.url, (self.min_zoom, self.max_zoom), self.attribution)

    def native_gsd_m(self, latitude: float) -> float:
        return ground_resolution_m(self.max_zoom, latitude, self.tile_size)

    def prefetch(self, views: Sequence[Bounds] | np.ndarray, width: int) -> PrefetchReport:
        """Fetch the server tiles under `views` into the tile cache, in parallel."""
        views = view_array(views)
        tiles = sorted(self._tiles_under(views, width, zoom_of=self._zoom_for_pixel))
        images, unavailable = self._load_checked(tiles)
        return PrefetchReport(
            "server tiles into the tile cache",
            len(views),
            len(tiles),
            sum(image is not None for image in images),
            tuple(tuple(tile) for tile in sorted(unavailable)),  # type: ignore[misc]
        )

    def estimate(self, views: Sequence[Bounds] | np.ndarray, width: int) -> FetchEstimate:
        """The distinct server tiles under `views` and how many the cache holds, the request cap and the
        provider's bulk terms; with no views, nothing to fetch and the source's zoom range."""
        zooms: set[int] = set()

        def zoom_of(pixel_m: float) -> int:
            zoom = self._clamp_zoom(imagery_zoom(pixel_m, self.tile_size))
            zooms.add(zoom)
            return zoom

        tiles = self._tiles_under(view_array(views), width, zoom_of)
        cached = sum(self.cached(tiles))
        return FetchEstimate(
            min_zoom=min(zooms, default=self.min_zoom),
            max_zoom=max(zooms, default=self.max_zoom),
            source_max_zoom=self.max_zoom,
            tiles=len(tiles),
            cached=cached,
            bytes_to_fetch=(len(tiles) - cached) * self.typical_tile_bytes,
            max_requests_per_s=self.max_requests_per_s,
            bulk_tile_limit=self.bulk_tile_limit,
            bulk_terms=self.bulk_terms,
        )

    def source_tiles(self, bounds: Bounds, zoom: int) -> list[mercantile.Tile]:
        """Server tiles at `zoom` that a read of EPSG:3857 `bounds` needs."""
        return list(dict.fromkeys(TileBlock.covering(bounds, zoom).tiles()))

    def cache_key(self, tile: mercantile.Tile) -> str:
        return tile_key(self.source_id, tile.z, tile.x, tile.y, self.tile_format)

    def cached(self, tiles: Collection[mercantile.Tile]) -> list[bool]:
        """Whether the cache answers for each tile: with its imagery, or with the server's word that it has none."""
        held = self.cache.held(key for tile in tiles for key in (self.cache_key(tile), self._missing_key(tile)))
        return [self.cache_key(tile) in held or self._missing_key(tile) in held for tile in tiles]

    def fetch_tiles(self, tiles: Iterable[mercantile.Tile]) -> int:
        """Fetch `tiles` into the cache in parallel; returns how many hold imagery (unavailable ones: none)."""
        return sum(image is not None for image in self._load_checked(list(tiles))[0])

    def source_pixels(self, views: np.ndarray, width: int) -> SourcePixels:
        """The server tiles under `views`, each decoded once, side by side at the zoom of the finest view."""
        zoom = self._zoom_for_pixel(finest_pixel_m(views, width))
        grid = TileBlock.covering(union_bounds(views), zoom)
        if grid.rows == 0:
            return SourcePixels.empty()
        wanted = self._strip_tiles(views, zoom)
        block = grid.tiles()
        images, unavailable = self._load_checked(list(wanted))
        loaded = dict(zip(wanted, images, strict=True))
        rgba = self._mosaic(grid, [loaded.get(tile) for tile in block])
        pixels = SourcePixels(
            rgba[:RGB_BANDS],
            rgba[RGB_BANDS] > 0,
            grid.transform(self.tile_size),
            WEB_MERCATOR,
            resampling=self._resampling.name,
        )
        if not unavailable:
            return pixels
        mask = self._mosaic_mask(grid, [tile in unavailable for tile in block])
        return replace(
            pixels,
            unavailable=mask,
            unavailable_tiles=tuple(tuple(tile) for tile in sorted(unavailable)),  # type: ignore[misc]
        )

    def part(self, bounds: Bounds, width: int, height: int, dst_crs: str = WEB_MERCATOR) -> ImageData:
        dst_transform = check_read_size(bounds, width, height)
        mercator_bounds = (
            bounds
            if dst_crs == WEB_MERCATOR
            else Bounds(*transform_bounds(dst_crs, WEB_MERCATOR, *bounds, densify_pts=21))
        )
        grid = TileBlock.covering(mercator_bounds, self.zoom_for(mercator_bounds, width))
        if grid.rows == 0:
            return empty_image(bounds, width, height, dst_crs)
        if grid.rows * grid.columns > self.max_source_tiles:
            raise ImageryError(
                f"a {width}x{height} px read needs {grid.rows * grid.columns} server tiles "
                f"(limit {self.max_source_tiles}); read smaller parts"
            )
        images = self._load_checked(grid.tiles())[0]
        if all(image is None for image in images):
            return empty_image(bounds, width, height, dst_crs)
        rgba = self._mosaic(grid, images)
        warped = np.zeros((RGB_BANDS + 1, height, width), np.uint8)
        reproject(
            rgba,
            warped,
            src_transform=grid.transform(self.tile_size),
            src_crs=WEB_MERCATOR,
            dst_transform=dst_transform,
            dst_crs=dst_crs,
            src_alpha=RGB_BANDS + 1,
            dst_alpha=RGB_BANDS + 1,
            resampling=self._resampling,
        )
        invalid = np.broadcast_to(warped[RGB_BANDS] == 0, (RGB_BANDS, height, width))
        pixels = np.ma.MaskedArray(warped[:RGB_BANDS], mask=invalid.copy())
        return ImageData(pixels, bounds, dst_crs, true_gsd_m(bounds, width, dst_crs))

    def close(self) -> None:
        with self._pool_lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.shutdown(wait=True)
        self._http.close()

    def _clamp_zoom(self, zoom: int) -> int:
        return min(max(zoom, self.min_zoom), self.max_zoom)

    def _tiles_under(self, views: np.ndarray, width: int, zoom_of: Callable[[float], int]) -> set[mercantile.Tile]:
        """The server tiles `source_pixels` loads for `views`: per read strip, those under each view at the
        strip's zoom."""
        tiles: set[mercantile.Tile] = set()
        for strip in read_strips(views, width):
            group = views[strip.start : strip.stop]
            tiles |= self._strip_tiles(group, zoom_of(finest_pixel_m(group, width)))
        return tiles

    def _strip_tiles(self, views: np.ndarray, zoom: int) -> set[mercantile.Tile]:
        return {tile for view in views.tolist() for tile in self.source_tiles(Bounds(*view), zoom)}

    def _mosaic(self, grid: TileBlock, images: list[TileImage | None]) -> np.ndarray:
        size = self.tile_size
        rgba = np.zeros((RGB_BANDS + 1, grid.rows * size, grid.columns * size), np.uint8)
        for index, image in enumerate(images):
            if image is None:
                continue
            if image.rgb.shape[1:] != (size, size):
                raise ImageryError(
                    f"{self.source_id} served a {image.rgb.shape[2]}x{image.rgb.shape[1]} px tile; "
                    f"set tile_size to {image.rgb.shape[2]}"
                )
            row, column = divmod(index, grid.columns)
            window = np.s_[row * size : (row + 1) * size, column * size : (column + 1) * size]
            rgba[(slice(0, RGB_BANDS), *window)] = image.rgb
            rgba[(RGB_BANDS, *window)] = np.where(image.valid, _OPAQUE, 0)
        return rgba

    def _mosaic_mask(self, grid: TileBlock, flags: list[bool]) -> np.ndarray:
        """(rows, columns) tile flags of `grid` as a pixel mask."""
        cells = np.asarray(flags, bool).reshape(grid.rows, grid.columns)
        return np.kron(cells, np.ones((self.tile_size, self.tile_size), bool))

    def _load_checked(self, tiles: list[mercantile.Tile]) -> tuple[list[TileImage | None], set[mercantile.Tile]]:
        """`_load_all` with unavailable tiles as None, and the set of them; with on_missing="fail", one
        FetchError counting them instead."""
        loaded = self._load_all(tiles)
        missing = {tile: image for tile, image in zip(tiles, loaded, strict=True) if isinstance(image, Unavailable)}
        if missing and self.on_missing == "fail":
            first = next(iter(missing.values())).reason
            raise unavailable_error(len(missing), "tile(s)", self.source_id, first, self.offline)
        self.unavailable |= set(missing)
        return [None if isinstance(image, Unavailable) else image for image in loaded], set(missing)

    def _load_all(self, tiles: list[mercantile.Tile]) -> list[TileImage | Unavailable | None]:
        """Each of `tiles` (in order, repeats allowed), loading every distinct tile once: a block wider than
        the world holds a tile twice, and two parallel loads of one tile would fetch it twice. The cache is read
        and decoded first, then the server asked for what it lacks."""
        distinct = list(dict.fromkeys(tiles))
        from_cache = self._pool(self._decode_threads).map(self._from_cache, distinct)
        loaded = {
            tile: image for tile, image in zip(distinct, from_cache, strict=True) if not isinstance(image, _NotCached)
        }
        to_fetch = [tile for tile in distinct if tile not in loaded]
        loaded |= dict(zip(to_fetch, self._pool(self._http.concurrency).map(self._fetch, to_fetch), strict=True))
        return [loaded[tile] for tile in tiles]

    def _pool(self, threads: int) -> ThreadPoolExecutor:
        with self._pool_lock:
            if threads not in self._pools:
                self._pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix=f"tiles-{self.source_id}")
            return self._pools[threads]

    def _from_cache(self, tile: mercantile.Tile) -> TileImage | Unavailable | _NotCached | None:
        """One server tile as the cache has it: None where there is no imagery (offline, or the server said so),
        Unavailable where its cached copy is corrupt while offline (kept: a read online fetches it again), and
        `_NOT_CACHED` where the server must be asked."""
        key = self.cache_key(tile)
        cached = self.cache.get(key)
        if cached is not None:
            try:
                return _imagery_or_none(decode_tile(cached))
            except TileDecodeError:
                if self.offline:
                    LOGGER.warning("cached tile %s is corrupt and imagery is offline; it is unavailable", key)
                    return Unavailable(f"cached tile {key} is corrupt and imagery.offline is set")
                LOGGER.warning("cached tile %s is corrupt; fetching it again", key)
                self.cache.discard(key)
        if self.offline or self._missing_key(tile) in self.cache:
            return None
        return _NOT_CACHED

    def _fetch(self, tile: mercantile.Tile) -> TileImage | Unavailable | None:
        """One server tile from the server, into the cache; None where there is no imagery, Unavailable where it
        failed every retry."""
        try:
            fetched = self._http.fetch(self.template.url_for(tile, self._api_key), _decode_keeping_body)
        except RetriesExhausted as exc:
            return Unavailable(str(exc).split(";")[0])
        if fetched is None:
            self.cache.put(self._missing_key(tile), b"")
            return None
        body, image = fetched
        self.cache.put(self.cache_key(tile), body)
        return _imagery_or_none(image)

    def _missing_key(self, tile: mercantile.Tile) -> str:
        """Empty marker file: the server said there is no tile here (204/404)."""
        return tile_key(self.source_id, tile.z, tile.x, tile.y, _MISSING_SUFFIX)


def _request_cap(value: float | str | None, template: TileTemplate) -> float | None:
    """The request cap for `value` ("auto", a number, None/0 for none; `OPTIONS` checks it) and a server at
    `template`."""
    if value == AUTO:
        return None if _is_loopback(urlsplit(template.url).hostname or "") else DEFAULT_MAX_REQUESTS_PER_S
    if value is None:
        return None
    return float(value) or None


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_api_key(template: TileTemplate, env_name: str | None) -> str:
    if env_name is None:
        if template.needs_api_key:
            raise ImageryError("the tile URL template has {api_key} but no api_key_env; name the variable holding it")
        return ""
    if not template.needs_api_key:
        raise ImageryError(
            f"api_key_env={env_name} is set but the URL template has no {{api_key}}; add e.g. ?key={{api_key}}"
        )
    value = os.environ.get(env_name, "")
    if not value:
        raise ImageryError(f"environment variable {env_name} is empty or unset; export the tile server's API key in it")
    return value


def _decode_keeping_body(body: bytes) -> tuple[bytes, TileImage]:
    return body, decode_tile(body)


def _imagery_or_none(image: TileImage) -> TileImage | None:
    return None if image.is_blank else image

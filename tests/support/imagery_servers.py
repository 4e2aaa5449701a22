"""Loopback stand-ins for imagery servers: an XYZ tile server with injectable faults and a static STAC API.

Both bind 127.0.0.1 on a free port and run in a daemon thread; use them as context managers.
Tiles are cut from a real georeferenced scene with rasterio/GDAL directly (not with the code under
test), so reads through the pipeline can be checked against them. Faults apply per path substring
and to the first `times` matching requests:

    with TileServer(SceneTiles.from_raster(SCENE_PATH, zooms=(15, 16))) as server:
        server.add_fault(Fault("status", path="/16/", status=429, retry_after=1, times=1))
        url = server.url + "/png/{z}/{x}/{y}.png"
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, TypeVar
from urllib.parse import parse_qs, urlsplit

import mercantile
import numpy as np
import rasterio
import shapely
from pyproj import Transformer
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile
from rasterio.transform import from_bounds
from rasterio.warp import calculate_default_transform, reproject, transform_bounds
from shapely.geometry import Polygon

SCENE_PATH = Path(__file__).resolve().parents[1] / "data" / "imagery" / "rgb_5m_utm18n.tif"
TILE_PX = 256
FAULT_KINDS = frozenset({"status", "slow", "truncate", "short_body", "blank"})
SERVED_DRIVERS = ("PNG", "JPEG", "WEBP")
STAC_CONFORMANCE = [
    "https://api.stacspec.org/v1.0.0/core",
    "https://api.stacspec.org/v1.0.0/item-search",
    "https://api.stacspec.org/v1.0.0/item-search#query",
    "http://www.opengis.net/spec/ogcapi-features-1/conf/core",
    "http://www.opengis.net/spec/ogcapi-features-1/conf/geojson",
]


def warp_to_web_mercator(source: Path, target: Path) -> Path:
    """`source` warped to EPSG:3857 at about its own resolution (bilinear), all bands, its profile kept."""
    with rasterio.open(source) as scene:
        transform, width, height = calculate_default_transform(
            scene.crs, "EPSG:3857", scene.width, scene.height, *scene.bounds
        )
        profile = {**scene.profile, "crs": "EPSG:3857", "transform": transform, "width": width, "height": height}
        with rasterio.open(target, "w", **profile) as warped:
            for band in range(1, scene.count + 1):
                reproject(rasterio.band(scene, band), rasterio.band(warped, band), resampling=Resampling.bilinear)
    return target


@dataclass
class Fault:
    """A misbehaviour for requests whose path contains `path` (any path when None).

    kind: 'status' answers `status` (with `retry_after` seconds if set); 'slow' waits `delay_s` before
    answering normally; 'truncate' announces the full length but closes after half the body;
    'short_body' sends a complete response holding only the first half of the image; 'blank' serves
    a flat grey tile. `times` limits the fault to that many matching requests (None: all of them).
    """

    kind: str
    path: str | None = None
    times: int | None = None
    status: int = 500
    retry_after: float | None = None
    delay_s: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; use one of {sorted(FAULT_KINDS)}")


_Server = TypeVar("_Server", bound="LoopbackServer")


class RequestRecord(NamedTuple):
    """One request as the server saw it: `time` (time.monotonic) when its handler took it, and the client's
    TCP port, which tells connections apart (requests on one keep-alive connection share it)."""

    method: str
    path: str
    time: float
    client_port: int = 0


class Request(NamedTuple):
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Mapping[str, str]
    body: bytes


class Response(NamedTuple):
    status: int
    body: bytes
    content_type: str = "application/octet-stream"
    headers: Mapping[str, str] = {}


class _QuickServer(ThreadingHTTPServer):
    # socketserver's default listen backlog is 5: with more parallel clients the kernel drops their SYNs,
    # and each retransmits only after a second (a connect timeout in tests with short timeouts).
    request_queue_size = 128


class LoopbackServer:
    """Threaded HTTP server on 127.0.0.1 with a request log, injected latency and faults."""

    def __init__(self, latency_s: float = 0.0) -> None:
        self.latency_s = latency_s
        self.requests: list[RequestRecord] = []
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._httpd = _QuickServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        port = self._httpd.server_address[1]
        return f"http://127.0.0.1:{port}"

    def add_fault(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def clear(self) -> None:
        """Drop all faults and forget logged requests."""
        with self._lock:
            self._faults.clear()
            self.requests.clear()

    def requests_to(self, path_part: str) -> list[RequestRecord]:
        with self._lock:
            return [record for record in self.requests if path_part in record.path]

    def __enter__(self: _Server) -> _Server:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def route(self, request: Request) -> Response:
        """The answer to a request without faults; subclasses serve their content here."""
        return Response(404, b"not found", "text/plain")

    def blank_body(self) -> bytes:
        return encode_image(np.full((3, TILE_PX, TILE_PX), 200, np.uint8), "PNG")

    def client_ports(self) -> set[int]:
        """The client ports of the logged requests: one per TCP connection."""
        with self._lock:
            return {record.client_port for record in self.requests}

    def _take_fault(self, path: str, method: str = "GET", client_port: int = 0) -> Fault | None:
        with self._lock:
            self.requests.append(RequestRecord(method, path, time.monotonic(), client_port))
            for fault in self._faults:
                if (fault.path is None or fault.path in path) and (fault.times is None or fault.times > 0):
                    if fault.times is not None:
                        fault.times -= 1
                    return fault
        return None


def _handler_for(server: LoopbackServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body leave in separate writes; with Nagle's algorithm on, the client's delayed ACK
        # would add ~40 ms to every response.
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            self._answer("GET")

        def do_POST(self) -> None:
            self._answer("POST")

        def do_HEAD(self) -> None:
            self._answer("HEAD")

        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            return

        def _answer(self, method: str) -> None:
            split = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            if server.latency_s:
                time.sleep(server.latency_s)
            fault = server._take_fault(self.path, method, self.client_address[1])
            if fault is not None and fault.kind == "status":
                headers = {} if fault.retry_after is None else {"Retry-After": f"{fault.retry_after:g}"}
                self._send(Response(fault.status, b"injected fault", "text/plain", headers), method)
                return
            if fault is not None and fault.kind == "slow":
                time.sleep(fault.delay_s)
            if fault is not None and fault.kind == "blank":
                self._send(Response(200, server.blank_body(), "image/png"), method)
                return
            headers = {name.title(): value for name, value in self.headers.items()}
            request = Request(method, split.path, parse_qs(split.query), headers, body)
            response = server.route(request)
            if fault is not None and fault.kind == "short_body" and response.status == 200:
                response = response._replace(body=response.body[: len(response.body) // 2])
            if fault is not None and fault.kind == "truncate" and response.status == 200:
                self._send_truncated(response)
                return
            self._send(response, method)

        def _send(self, response: Response, method: str) -> None:
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(response.body)

        def _send_truncated(self, response: Response) -> None:
            self.send_response(200)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
            self.end_headers()
            self.wfile.write(response.body[: len(response.body) // 2])
            self.wfile.flush()
            self.close_connection = True

    return Handler


def footprint(path: Path, crs: str = "EPSG:3857") -> Polygon:
    """A raster's footprint (its pixel grid's outline, densified) in `crs`, computed without GDAL's warper."""
    with rasterio.open(path) as dataset:
        corners = [(0, 0), (dataset.width, 0), (dataset.width, dataset.height), (0, dataset.height)]
        outline = Polygon([dataset.transform @ corner for corner in corners])
        outline = shapely.segmentize(outline, outline.length / 400)
        to_crs = Transformer.from_crs(dataset.crs, crs, always_xy=True)
    return Polygon(zip(*to_crs.transform(*outline.exterior.xy), strict=True))


def overlap_fraction(footprint: Polygon, bounds: Sequence[float]) -> float:
    """Share of the box `bounds` (left, bottom, right, top) that `footprint` covers."""
    box = shapely.box(*bounds)
    return float(footprint.intersection(box).area / box.area)


def outside_pixels(footprint: Polygon, bounds: Sequence[float], width: int, height: int) -> np.ndarray:
    """(height, width) bool: pixels of a `width` x `height` grid on `bounds` whose centre lies outside `footprint`."""
    left, bottom, right, top = bounds
    columns, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    x = left + columns * (right - left) / width
    y = top - rows * (top - bottom) / height
    return np.asarray(~shapely.contains_xy(footprint, x, y))


def mask_errors(footprint: Polygon, bounds: Sequence[float], mask: np.ndarray) -> np.ndarray:
    """Distances (CRS units) to the footprint's boundary of the pixels whose mask disagrees with `outside_pixels`."""
    height, width = mask.shape
    left, bottom, right, top = bounds
    wrong = mask != outside_pixels(footprint, bounds, width, height)
    rows, columns = np.nonzero(wrong)
    x = left + (columns + 0.5) * (right - left) / width
    y = top - (rows + 0.5) * (top - bottom) / height
    return np.asarray(shapely.distance(footprint.exterior, shapely.points(x, y)))


def encode_image(rgb_or_rgba: np.ndarray, driver: str) -> bytes:
    """PNG/JPEG/WEBP bytes of a (bands, H, W) uint8 array, written by GDAL."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with MemoryFile() as memfile:
            bands, height, width = rgb_or_rgba.shape
            # zlib level 1: a quarter of the default level's time per PNG tile, for a few percent more bytes.
            options = {"zlevel": 1} if driver == "PNG" else {}
            with memfile.open(
                driver=driver, width=width, height=height, count=bands, dtype="uint8", **options
            ) as dataset:
                dataset.write(rgb_or_rgba)
            return bytes(memfile.read())


@dataclass
class SceneTiles:
    """Web Mercator tiles (RGBA, alpha 0 outside the scene) cut from a georeferenced RGB raster.

    `from_raster` encodes every tile up front in the formats asked for, so that serving a tile costs no CPU:
    a server that encodes on the request path answers parallel first requests late, and a client with a
    short read timeout then asks again (one tile, two requests). Other formats are encoded on first use.
    """

    rgba: dict[mercantile.Tile, np.ndarray]
    _encoded: dict[tuple[mercantile.Tile, str], bytes] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_raster(cls, path: Path, zooms: Sequence[int], formats: Sequence[str] = SERVED_DRIVERS) -> SceneTiles:
        with rasterio.open(path) as scene:
            rgb = scene.read((1, 2, 3))
            src_crs, src_transform = scene.crs, scene.transform
            west, south, east, north = transform_bounds(scene.crs, "EPSG:4326", *scene.bounds)
        source = np.concatenate([rgb, np.full((1, *rgb.shape[1:]), 255, np.uint8)])
        tiles: dict[mercantile.Tile, np.ndarray] = {}
        for tile in (tile for zoom in zooms for tile in mercantile.tiles(west, south, east, north, zoom)):
            rgba = np.zeros((4, TILE_PX, TILE_PX), np.uint8)
            reproject(
                source,
                rgba,
                src_transform=src_transform,
                src_crs=src_crs,
                dst_transform=from_bounds(*mercantile.xy_bounds(tile), TILE_PX, TILE_PX),
                dst_crs="EPSG:3857",
                src_alpha=4,
                dst_alpha=4,
                resampling=Resampling.bilinear,
            )
            if rgba[3].any():
                tiles[tile] = rgba
        scene_tiles = cls(tiles)
        for tile in tiles:
            for driver in formats:
                scene_tiles.encoded(tile, driver)
        return scene_tiles

    def encoded(self, tile: mercantile.Tile, driver: str) -> bytes | None:
        """The tile as PNG (with alpha) or JPEG/WEBP (RGB); None where the scene has no pixels."""
        if tile not in self.rgba:
            return None
        key = (tile, driver)
        with self._lock:
            data = self._encoded.get(key)
        if data is None:
            # Encoded outside the lock, so that parallel requests for different tiles do not queue.
            bands = self.rgba[tile] if driver == "PNG" else self.rgba[tile][:3]
            encoded = encode_image(bands, driver)
            with self._lock:
                data = self._encoded.setdefault(key, encoded)
        return data


_RANGE = re.compile(r"^bytes=(?P<first>\d+)-(?P<last>\d*)$")
_TILE_PATH = re.compile(r"^/(?P<scheme>png|jpg|webp|tms)/(?P<z>\d+)/(?P<x>\d+)/(?P<y>\d+)\.\w+$")
_QUADKEY_PATH = re.compile(r"^/q/(?P<quadkey>[0-3]*)\.png$")
_DRIVERS = {"png": "PNG", "tms": "PNG", "jpg": "JPEG", "webp": "WEBP"}


class TileServer(LoopbackServer):
    """XYZ tiles of a scene at `/png|jpg|webp/{z}/{x}/{y}.ext`, TMS at `/tms/{z}/{x}/{-y}.png` and
    quadkeys at `/q/{q}.png`; tiles outside the scene are 404. With `api_key` set, requests must carry
    `?key=<api_key>` or get 403."""

    def __init__(self, tiles: SceneTiles, latency_s: float = 0.0, api_key: str | None = None) -> None:
        super().__init__(latency_s)
        self.tiles = tiles
        self.api_key = api_key

    def route(self, request: Request) -> Response:
        if self.api_key is not None and request.query.get("key") != [self.api_key]:
            return Response(403, b"missing or wrong key", "text/plain")
        tile, driver = self._parse(request.path)
        data = None if tile is None else self.tiles.encoded(tile, driver)
        if data is None:
            return Response(404, b"no tile", "text/plain")
        return Response(200, data, f"image/{driver.lower()}")

    @staticmethod
    def _parse(path: str) -> tuple[mercantile.Tile | None, str]:
        match = _TILE_PATH.match(path)
        if match:
            z, x, y = int(match["z"]), int(match["x"]), int(match["y"])
            if match["scheme"] == "tms":
                y = 2**z - 1 - y
            return mercantile.Tile(x, y, z), _DRIVERS[match["scheme"]]
        match = _QUADKEY_PATH.match(path)
        if match:
            return mercantile.quadkey_to_tile(match["quadkey"]), "PNG"
        return None, "PNG"


def stac_item(
    item_id: str,
    bbox: Sequence[float],
    when: str,
    cloud_cover: float,
    assets: Mapping[str, str],
    collection: str = "sentinel-2-l2a",
) -> dict[str, Any]:
    """A minimal STAC 1.0 item with the eo extension; `assets` maps asset keys to hrefs."""
    west, south, east, north = bbox
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": ["https://stac-extensions.github.io/eo/v1.1.0/schema.json"],
        "id": item_id,
        "collection": collection,
        "bbox": [west, south, east, north],
        "geometry": {
            "type": "Polygon",
            "coordinates": [[[west, south], [east, south], [east, north], [west, north], [west, south]]],
        },
        "properties": {"datetime": when, "eo:cloud_cover": cloud_cover},
        "assets": {
            key: {"href": href, "type": "image/tiff; application=geotiff; profile=cloud-optimized", "roles": ["data"]}
            for key, href in assets.items()
        },
        "links": [],
    }


class StacServer(LoopbackServer):
    """A static STAC API: landing page, /conformance, /collections, GET and POST /search (collections,
    bbox, datetime, limit, `query` on eo:cloud_cover) and files under /assets/ with HTTP Range support.

    Asset hrefs in `items` may use the placeholder `{server}` for this server's URL. GDAL clients in
    the same process must set GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR (as pipeline.imagery.stac does):
    a directory listing issued from inside GDALOpen never reaches this in-process server and hangs.
    """

    def __init__(self, items: Sequence[dict[str, Any]], asset_dir: Path, latency_s: float = 0.0) -> None:
        super().__init__(latency_s)
        self.asset_dir = asset_dir
        self._items = items

    @property
    def items(self) -> list[dict[str, Any]]:
        return json.loads(json.dumps(self._items).replace("{server}", self.url))

    def route(self, request: Request) -> Response:
        path = request.path
        if path.startswith("/assets/"):
            return self._asset(path.removeprefix("/assets/"), request.headers)
        if path in ("", "/"):
            return _json(self._landing())
        if path == "/conformance":
            return _json({"conformsTo": STAC_CONFORMANCE})
        if path == "/collections":
            return _json({"collections": [self._collection(name) for name in self._collection_names()], "links": []})
        if path.startswith("/collections/") and path.count("/") == 2:
            name = path.rsplit("/", 1)[1]
            return _json(self._collection(name)) if name in self._collection_names() else _json({}, 404)
        if path == "/search":
            params = (
                json.loads(request.body or b"{}")
                if request.method == "POST"
                else _search_params_from_query(request.query)
            )
            features = list(self._search(params))
            return _json({"type": "FeatureCollection", "features": features, "links": []}, 200, "application/geo+json")
        return Response(404, b"not found", "text/plain")

    def _landing(self) -> dict[str, Any]:
        return {
            "type": "Catalog",
            "id": "loopback-stac",
            "stac_version": "1.0.0",
            "description": "Static STAC API for tests",
            "conformsTo": STAC_CONFORMANCE,
            "links": [
                {"rel": "self", "href": self.url + "/", "type": "application/json"},
                {"rel": "root", "href": self.url + "/", "type": "application/json"},
                {"rel": "conformance", "href": self.url + "/conformance", "type": "application/json"},
                {"rel": "data", "href": self.url + "/collections", "type": "application/json"},
                {"rel": "search", "href": self.url + "/search", "type": "application/geo+json", "method": "GET"},
                {"rel": "search", "href": self.url + "/search", "type": "application/geo+json", "method": "POST"},
            ],
        }

    def _collection_names(self) -> list[str]:
        return sorted({item["collection"] for item in self._items})

    def _collection(self, name: str) -> dict[str, Any]:
        return {
            "type": "Collection",
            "id": name,
            "stac_version": "1.0.0",
            "description": name,
            "license": "proprietary",
            "extent": {"spatial": {"bbox": [[-180, -90, 180, 90]]}, "temporal": {"interval": [[None, None]]}},
            "links": [],
        }

    def _search(self, params: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        collections = params.get("collections")
        bbox = params.get("bbox")
        start, end = _datetime_range(params.get("datetime"))
        cloud_rules = (params.get("query") or {}).get("eo:cloud_cover", {})
        limit = int(params.get("limit") or 100)
        count = 0
        for item in self.items:
            if count >= limit:
                return
            properties = item["properties"]
            when = _parse_time(properties["datetime"])
            if collections and item["collection"] not in collections:
                continue
            if bbox and not _bboxes_overlap(bbox, item["bbox"]):
                continue
            if (start and when < start) or (end and when > end):
                continue
            if not _passes(properties["eo:cloud_cover"], cloud_rules):
                continue
            count += 1
            yield item

    def _asset(self, name: str, headers: Mapping[str, str]) -> Response:
        path = self.asset_dir / name
        if "/" in name or not path.is_file():
            return Response(404, b"no asset", "text/plain")
        data = path.read_bytes()
        match = _RANGE.match(headers.get("Range", ""))
        if match is None:
            return Response(200, data, "image/tiff", {"Accept-Ranges": "bytes"})
        first = int(match["first"])
        last = min(int(match["last"]) if match["last"] else len(data) - 1, len(data) - 1)
        if first >= len(data):
            return Response(416, b"", "text/plain", {"Content-Range": f"bytes */{len(data)}"})
        content_range = {"Content-Range": f"bytes {first}-{last}/{len(data)}", "Accept-Ranges": "bytes"}
        return Response(206, data[first : last + 1], "image/tiff", content_range)


def _json(payload: Any, status: int = 200, content_type: str = "application/json") -> Response:
    return Response(status, json.dumps(payload).encode(), content_type)


def _search_params_from_query(query: dict[str, list[str]]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if "collections" in query:
        params["collections"] = query["collections"][0].split(",")
    if "bbox" in query:
        params["bbox"] = [float(value) for value in query["bbox"][0].split(",")]
    for name in ("datetime", "limit"):
        if name in query:
            params[name] = query[name][0]
    if "query" in query:
        params["query"] = json.loads(query["query"][0])
    return params


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _datetime_range(text: str | None) -> tuple[datetime | None, datetime | None]:
    if not text:
        return None, None
    start, _, end = text.partition("/")
    end = end or start
    return (None if start in ("", "..") else _parse_time(start)), (None if end in ("", "..") else _parse_time(end))


def _bboxes_overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


def _passes(value: float, rules: Mapping[str, float]) -> bool:
    checks = {"lt": value < rules.get("lt", float("inf")), "lte": value <= rules.get("lte", float("inf"))}
    checks["gt"] = value > rules.get("gt", float("-inf"))
    checks["gte"] = value >= rules.get("gte", float("-inf"))
    return all(checks.values())


@contextmanager
def served_raster(raster: Path, folder: Path) -> Iterator[str]:
    """The URL of a copy of `raster` (kept in `folder`) served with HTTP range requests, as a COG on a web server."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(raster, folder / raster.name)
    with StacServer([], folder) as server:
        yield f"{server.url}/assets/{raster.name}"

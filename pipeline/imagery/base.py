"""The one interface every imagery source offers, plus the georeferencing helpers they share.

Callers never ask what kind of reader they hold: each reader answers for itself what its imagery's
resolution is (`native_gsd_m`), whether it is fetched ahead of the model (`fetches_ahead`, `prefetch`)
and what a run would download (`estimate`).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Literal, NamedTuple, TypeVar

import mercantile
import numpy as np
from jsonschema import validators
from jsonschema.exceptions import best_match
from pyproj import Geod, Transformer
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.transform import Affine
from rasterio.transform import from_bounds as transform_from_bounds

from common.schema import SettingsValidator
from pipeline.errors import FetchError, ImageryError
from pipeline.geometry import (
    WEB_MERCATOR,
    WGS84,
    Bounds,
    ViewStrip,
    strip_grid,
    tile_bounds,
    view_strips,
)

RGB_BANDS = 3
# How readers resample: GDAL's kernels that `pipeline.views` cuts model views with too, so that a view cut from
# a strip equals the reader's own warp of it.
RESAMPLINGS = ("bilinear", "cubic")
# Views read together as one strip hold at most about this many pixels at the views' resolution (2048 x 2048);
# it bounds an embed job's memory whatever the chunk size.
STRIP_PIXELS = 2048 * 2048
# ... and at most this many views (150 kB each as uint8 at 224 px: ~150 MB of views per strip).
STRIP_VIEWS = 1024
_Reader = TypeVar("_Reader", bound="ImageryReader")
# What imagery that cannot be had (failed every retry, or corrupt in the cache offline) does: stop the build,
# or leave every tile whose view touches it empty.
ON_MISSING = ("fail", "leave_empty")
OnMissing = Literal["fail", "leave_empty"]
_WGS84_GEOD = Geod(ellps="WGS84")
# A keyword option of a reader, as JSON Schema; its "description" is the fix an error about it names.
OptionSchema = Mapping[str, Any]
# Options are checked as a config writes them, or as Python code passes them: tuples count as lists.
_OptionsValidator = validators.extend(
    SettingsValidator,
    type_checker=SettingsValidator.TYPE_CHECKER.redefine("array", lambda _, value: isinstance(value, (list, tuple))),
)
# The options every reader takes.
COMMON_OPTIONS: dict[str, OptionSchema] = {
    "source_id": {
        "type": ["string", "null"],
        "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        "description": "name the source with letters, digits, '.', '_' and '-' (the tile cache's folder for it)",
    },
    "attribution": {"type": "string", "description": "give the text a map made from the source must show"},
    "resampling": {"enum": list(RESAMPLINGS), "description": f"use {' or '.join(RESAMPLINGS)}"},
}


@dataclass(frozen=True)
class ImageData:
    """One read from an imagery source: masked RGB pixels plus their georeferencing.

    `array` is a masked uint8 array shaped (bands, height, width); masked pixels had no imagery.
    `gsd_m` is the true ground sample distance in metres at the centre of the read (Mercator
    scale factor applied), not the nominal one of the source's zoom level.
    """

    array: np.ma.MaskedArray
    bounds: Bounds
    crs: str
    gsd_m: float

    @property
    def width(self) -> int:
        return int(self.array.shape[-1])

    @property
    def height(self) -> int:
        return int(self.array.shape[-2])

    @property
    def coverage(self) -> float:
        """Fraction of pixels that hold imagery (0 means 'no imagery here')."""
        mask = np.ma.getmaskarray(self.array)
        return float(1.0 - mask.all(axis=0).mean())


class Stretch(NamedTuple):
    """Linear map of raw values: `low` -> 0 and `high` -> 255, clipped. One range for all bands keeps
    the colour balance."""

    low: float
    high: float


@dataclass(frozen=True)
class SourcePixels:
    """A source's own pixels under a group of model views, before any resampling: what views are cut from.

    `values` (bands, H, W) are display values (uint8) or raw values that `stretch` maps to 0-255 after
    resampling; one band is grey. `valid` (H, W) is False where there is no imagery. `transform` maps pixel
    (column, row) to `crs`, the source's own CRS (EPSG:3857 for tile pyramids). `extent` (first column,
    first row, end column, end row) is the part of the array the source itself spans (None: all of it); as
    in a GDAL warp, only output pixels whose centres fall on a valid pixel inside it hold imagery. `resampling`
    is the reader's kernel (one of RESAMPLINGS), which views are cut with.

    `unavailable` (H, W) is True where the source has imagery that could not be had (a tile that failed every
    retry, or a corrupt cached tile read offline) and the reader was told to leave it empty: such pixels are
    invalid too, but a view touching them must not be scored at all (its score would change). None: none.
    `unavailable_tiles` names those source items (z, x, y).
    """

    values: np.ndarray
    valid: np.ndarray
    transform: Affine
    crs: str
    stretch: Stretch | None = None
    extent: tuple[int, int, int, int] | None = None
    resampling: str = "bilinear"
    unavailable: np.ndarray | None = None
    unavailable_tiles: tuple[tuple[int, int, int], ...] = ()

    @property
    def spanned(self) -> tuple[int, int, int, int]:
        """`extent`, or the whole array where it is None."""
        height, width = self.valid.shape
        return self.extent or (0, 0, width, height)

    @classmethod
    def empty(cls, bands: int = RGB_BANDS) -> SourcePixels:
        """'No imagery under these views': one invalid pixel."""
        return cls(np.zeros((bands, 1, 1), np.uint8), np.zeros((1, 1), bool), Affine.identity(), WEB_MERCATOR)


class RasterLayer(NamedTuple):
    """A raster file on this machine that a GIS can draw itself: its CRS, and the bands and value range (drawn
    as 0-255) the build reads it with."""

    path: Path
    crs: CRS
    bands: tuple[int, ...]
    value_range: tuple[float, float]
    attribution: str


class TileLayer(NamedTuple):
    """An XYZ tile service (Web Mercator) that a GIS can draw itself, by URL template and zoom range."""

    url_template: str
    zoom_range: tuple[int, int]
    attribution: str


class Unavailable(NamedTuple):
    """Source imagery that could not be had, and why (one clause)."""

    reason: str


class PrefetchReport(NamedTuple):
    """What `ImageryReader.prefetch` did: `method` in words, the `views` asked for, the `source_items` fetched
    or found in the cache (server tiles, or mosaics of view strips), how many of them hold imagery, and the
    ones that could not be had (failed every retry, or corrupt in the cache offline) and were left empty, as
    (z, x, y)."""

    method: str
    views: int
    source_items: int
    with_imagery: int
    unavailable: tuple[tuple[int, int, int], ...] = ()


class FetchEstimate(NamedTuple):
    """What reading some views would download, from a reader backed by a tile pyramid: the zoom range of the
    views' source tiles, the source's finest zoom, the distinct source tiles, how many of them the tile cache
    already holds, and the bytes still to fetch (at the source's typical tile size).

    The last fields say how politely the source is fetched: `max_requests_per_s` is the reader's request cap
    (None: uncapped); where the provider publishes terms on bulk download, `bulk_tile_limit` is the number of
    tiles to fetch above which `terms_note` (from `bulk_terms`) applies. These are properties of the source,
    not of the count, so scaling `tiles`/`cached`/`bytes_to_fetch` with `_replace` keeps the note right.
    """

    min_zoom: int
    max_zoom: int
    source_max_zoom: int
    tiles: int
    cached: int
    bytes_to_fetch: int
    max_requests_per_s: float | None = None
    bulk_tile_limit: int | None = None
    bulk_terms: str | None = None

    @property
    def tiles_to_fetch(self) -> int:
        return max(0, self.tiles - self.cached)

    @property
    def seconds_at_cap(self) -> float | None:
        """Shortest time fetching the missing tiles takes at the request cap (no retries); None if uncapped."""
        if not self.max_requests_per_s:
            return None
        return self.tiles_to_fetch / self.max_requests_per_s

    @property
    def terms_note(self) -> str | None:
        """The provider's bulk-download terms in words, when the tiles to fetch exceed `bulk_tile_limit`."""
        if self.bulk_terms is None or self.bulk_tile_limit is None or self.tiles_to_fetch <= self.bulk_tile_limit:
            return None
        return self.bulk_terms


class ImageryReader(abc.ABC):
    """An imagery source read rio-tiler style: `with Reader(...) as src: src.part(bounds, 224, 224)`.

    `source_id` names the source stably (it is the tile-cache namespace); `attribution` is the text a
    map made from the source must show. `fetches_ahead` is True for remote sources whose imagery a build
    fetches into the tile cache (`prefetch`) before the model reads it.
    """

    source_id: str
    attribution: str
    fetches_ahead: ClassVar[bool] = False
    # The keyword options a config may give the reader (`imagery.options`), by name.
    OPTIONS: ClassVar[Mapping[str, OptionSchema]]

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        """Refuse, in one line, an option the reader does not take or a value of the wrong type or range."""
        unknown = sorted(set(options) - set(cls.OPTIONS))
        if unknown:
            valid = ", ".join(sorted(cls.OPTIONS))
            raise ImageryError(f"option {unknown[0]!r} does not apply to this imagery source; valid options: {valid}")
        error = best_match(_OptionsValidator({"properties": cls.OPTIONS}).iter_errors(dict(options)))
        if error is not None:
            name = str(error.absolute_path[0])
            where = ".".join(str(part) for part in error.absolute_path)
            message = " ".join(error.message.split())
            raise ImageryError(f"imagery option {where}: {message}; {cls.OPTIONS[name]['description']}")

    def gis_layer(self) -> RasterLayer | TileLayer | None:
        """The source as a GIS can draw it itself, with no copy; None where it cannot (the build's underlay
        stands in)."""
        return None

    def native_gsd_m(self, latitude: float) -> float:
        """Ground metres per pixel of the source's finest imagery around `latitude`."""
        raise ImageryError(f"cannot tell the resolution of imagery {self.source_id}; set imagery.native_gsd_m (m/px)")

    def footprint_lnglat(self) -> Bounds | None:
        """The EPSG:4326 box (west, south, east, north; west > east across the antimeridian) outside which the
        source holds no imagery; None for sources that cover the world."""
        return None

    def coverage_bound(self, views: np.ndarray) -> np.ndarray | None:
        """The most of each view ((N, 4) EPSG:3857 bounds) the source can cover, a share in [0, 1]; None where
        only reading would tell (sources of the whole world, remote rasters)."""
        return None

    def holds_imagery(self, bounds: Bounds) -> bool | None:
        """Whether the source has a valid pixel in `bounds` (EPSG:3857); None where telling would mean
        fetching or reading more than a build's start should (the build then finds out as it reads)."""
        return None

    def prefetch(self, views: Sequence[Bounds] | np.ndarray, width: int) -> PrefetchReport:
        """Fetch what reading `views` (EPSG:3857) at `width` px would need into the tile cache.

        Sources read on demand (local rasters) fetch nothing."""
        return PrefetchReport("read on demand", len(views), 0, 0)

    def estimate(self, views: Sequence[Bounds] | np.ndarray, width: int) -> FetchEstimate | None:
        """What reading `views` (EPSG:3857) at `width` px would download, without downloading; None for
        sources that are not a tile pyramid."""
        return None

    def source_pixels(self, views: np.ndarray, width: int) -> SourcePixels:
        """The source's pixels under `views` ((N, 4) EPSG:3857 bounds, read at `width` px square), each source
        pixel read once: model views are then cut from them (`pipeline.views`).

        This default reads the views' union once, in EPSG:3857 at the finest view's resolution; readers with
        a grid of their own override it to hand over their pixels unresampled."""
        return mercator_pixels(self.part(*strip_grid(views, width)))

    @abc.abstractmethod
    def part(self, bounds: Bounds, width: int, height: int, dst_crs: str = WEB_MERCATOR) -> ImageData:
        """RGB pixels of `bounds` (in `dst_crs`) resampled to `width` x `height`; masked where no imagery."""

    def tile(self, x: int, y: int, z: int, tilesize: int = 256) -> ImageData:
        """The Web Mercator tile x/y/z at `tilesize` pixels."""
        return self.part(tile_bounds(mercantile.Tile(x, y, z)), tilesize, tilesize)

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections, thread pools and open datasets."""

    def __enter__(self: _Reader) -> _Reader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def view_array(views: Sequence[Bounds] | np.ndarray) -> np.ndarray:
    """Views as an (N, 4) float64 array of EPSG:3857 bounds."""
    return np.asarray(views, dtype=np.float64).reshape(-1, 4)


def read_strips(views: np.ndarray, width: int) -> list[ViewStrip]:
    """How views are read: strips of consecutive rows, STRIP_PIXELS and STRIP_VIEWS at most
    (`pipeline.geometry.view_strips`)."""
    return view_strips(views, width, STRIP_PIXELS, STRIP_VIEWS)


def check_on_missing(value: str) -> None:
    if value not in ON_MISSING:
        raise ImageryError(f"on_missing {value!r} is unknown; use fail or leave_empty")


def unavailable_error(count: int, items: str, source_id: str, example: str, offline: bool) -> FetchError:
    """The one line a build stops with when `count` source `items` could not be had (on_missing: fail)."""
    retry = "turn imagery.offline off and rerun to fetch them again" if offline else "rerun to retry"
    return FetchError(
        f"{count} {items} of {source_id} could not be had (e.g. {example}); "
        f"{retry}, or set imagery.on_missing: leave_empty to leave their tiles empty"
    )


def mercator_pixels(image: ImageData, resampling: str = "bilinear") -> SourcePixels:
    """An EPSG:3857 read as the source pixels views are cut from (with `resampling`)."""
    valid = np.asarray(~np.ma.getmaskarray(image.array).any(axis=0))
    transform = transform_from_bounds(*image.bounds, image.width, image.height)
    return SourcePixels(np.ma.getdata(image.array), valid, transform, WEB_MERCATOR, resampling=resampling)


def check_read_size(bounds: Bounds, width: int, height: int) -> Affine:
    """Validate a read request and return its output grid's affine transform."""
    if width < 1 or height < 1:
        raise ImageryError(f"read size {width}x{height} px is empty; ask for at least 1x1 pixels")
    if not (bounds.right > bounds.left and bounds.top > bounds.bottom):
        raise ImageryError(f"read bounds {tuple(bounds)} are empty or inverted; pass (left, bottom, right, top)")
    return transform_from_bounds(*bounds, width, height)


def empty_image(bounds: Bounds, width: int, height: int, crs: str) -> ImageData:
    """A fully masked RGB read: 'no imagery here'."""
    pixels = np.ma.MaskedArray(np.zeros((RGB_BANDS, height, width), np.uint8), mask=True)
    return ImageData(pixels, bounds, crs, true_gsd_m(bounds, width, crs))


def resampling_method(name: str) -> Resampling:
    if name not in RESAMPLINGS:
        raise ImageryError(
            f"unknown resampling {name!r}; use {' or '.join(RESAMPLINGS)} (both antialias when shrinking)"
        )
    return Resampling[name]


@lru_cache(maxsize=32)
def _to_lnglat(crs: str) -> Transformer:
    return Transformer.from_crs(crs, WGS84, always_xy=True)


def true_gsd_m(bounds: Bounds, width: int, crs: str) -> float:
    """Ground metres spanned by one pixel across the centre of `bounds` (geodesic, scale factor included)."""
    pixel = (bounds.right - bounds.left) / width
    centre_x = (bounds.left + bounds.right) / 2.0
    centre_y = (bounds.bottom + bounds.top) / 2.0
    distance = ground_distance_m((centre_x - pixel / 2.0, centre_y), (centre_x + pixel / 2.0, centre_y), crs)
    if not math.isfinite(distance):
        raise ImageryError(f"bounds {tuple(bounds)} do not lie on the Earth in {crs}; check the CRS")
    return distance


def ground_distance_m(a: tuple[float, float], b: tuple[float, float], crs: str) -> float:
    """Geodesic metres between points `a` and `b` given in `crs` (inf where they are not on the Earth)."""
    lons, lats = _to_lnglat(crs).transform([a[0], b[0]], [a[1], b[1]])
    _, _, distance = _WGS84_GEOD.inv(lons[0], lats[0], lons[1], lats[1])
    return float(distance) if math.isfinite(distance) else math.inf

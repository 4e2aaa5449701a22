"""Rasters in any CRS, local or over the network (http(s) URLs, GDAL /vsi paths): GeoTIFF, COG, VRT, read as
windows warped to the request.

Each read builds a WarpedVRT on exactly the requested grid, so GDAL resamples straight from the
source (using its overviews when shrinking). Band selection picks the RGB bands; data that is not
8-bit is stretched linearly to 0-255 with ONE range per dataset, computed once from a decimated read,
so that neighbouring tiles match.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import rasterio
import shapely
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.transform import Affine
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform, transform_bounds
from rasterio.windows import Window, from_bounds

from pipeline.errors import ImageryError
from pipeline.geometry import WEB_MERCATOR, WGS84, Bounds, union_bounds
from pipeline.imagery.base import (
    COMMON_OPTIONS,
    RGB_BANDS,
    ImageData,
    ImageryReader,
    OptionSchema,
    RasterLayer,
    SourcePixels,
    Stretch,
    check_read_size,
    empty_image,
    ground_distance_m,
    resampling_method,
    true_gsd_m,
)
from pipeline.imagery.http import is_http_url, redact

# Rasters GDAL reads over the network: http(s) URLs and its virtual file systems (/vsis3/, /vsicurl/, /vsiaz/...).
REMOTE_PREFIXES = ("http://", "https://", "/vsi")
# GDAL settings for COGs over HTTP: no directory listing or sidecar probing, merged range requests.
COG_HTTP_ENV: dict[str, object] = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MAX_RETRY": 4,
    "GDAL_HTTP_RETRY_DELAY": 1,
    "VSI_CACHE": "TRUE",
}
DEFAULT_PERCENTILES = (2.0, 98.0)
# The stretch is estimated from a read no larger than this many pixels on its long side.
STRETCH_SAMPLE_PX = 1024
# Rasters more than this many times finer than the model's views are read decimated for cutting views.
DECIMATE_ABOVE = 4.0
# `holds_imagery` reads the raster's own pixels under the bounds it is asked about up to this many.
HOLDS_IMAGERY_MAX_PX = 4096 * 4096
# Source pixels read around a strip of views beyond its footprint: room for the resampling kernel.
KERNEL_MARGIN_PX = 3
# `coverage_bound` follows the footprint's edges, curved in EPSG:3857, through a point every this many pixels.
FOOTPRINT_SEGMENT_PX = 64
_UINT8_MAX = 255


def is_remote(path: str) -> bool:
    """Whether GDAL reads `path` over the network."""
    return path.startswith(REMOTE_PREFIXES)


def percentile_stretch(sample: np.ma.MaskedArray, percentiles: tuple[float, float] = DEFAULT_PERCENTILES) -> Stretch:
    """Stretch from the `percentiles` of the valid values in `sample` (all bands pooled; at least one)."""
    low, high = np.percentile(sample.compressed(), percentiles)
    return Stretch(float(low), float(high) if high > low else float(low) + 1.0)


def apply_stretch(values: np.ma.MaskedArray, stretch: Stretch | None) -> np.ma.MaskedArray:
    """uint8 pixels from raw `values`; with no stretch, values are clipped to 0-255."""
    data = np.ma.MaskedArray(values, dtype=np.float32).filled(0.0)  # masked values may be NaN
    if stretch is not None:
        data = (data - stretch.low) * (_UINT8_MAX / (stretch.high - stretch.low))
    pixels = np.clip(np.rint(data), 0, _UINT8_MAX).astype(np.uint8)
    return np.ma.MaskedArray(pixels, mask=np.ma.getmaskarray(values).copy())


def resolve_stretch(option: str | Sequence[float] | Stretch, dtype: str) -> Stretch | str | None:
    """Turn the `stretch` option into a fixed Stretch, 'percentile' (computed later) or None (as is).

    'auto' keeps 8-bit data as is and percentile-stretches anything else.
    """
    if isinstance(option, str):
        if option == "auto":
            return None if dtype == "uint8" else "percentile"
        if option == "none":
            return None
        if option == "percentile":
            return option
        raise ImageryError(f"unknown stretch {option!r}; use auto, none, percentile or (min, max)")
    return stretch_range(option)


def stretch_range(values: Sequence[float]) -> Stretch:
    """A fixed Stretch from (min, max); an empty or inverted range is refused."""
    low, high = (float(value) for value in values)
    if not high > low:
        raise ImageryError(f"stretch ({low:g}, {high:g}) is empty or inverted; pass (min, max) with min < max")
    return Stretch(low, high)


class LocalRasterReader(ImageryReader):
    """A raster GDAL can open, in any CRS, read as RGB uint8.

    `bands` are 1-based indexes in RGB order (default: the bands tagged red/green/blue, else the first three
    not tagged alpha; a single band is shown as grey). `nodata` overrides the file's nodata value. `gdal_env` holds GDAL
    config options for every open and read, over COG_HTTP_ENV for a raster read over the network. A reader
    holds an open GDAL dataset: use one per thread, and open it after forking worker processes.
    """

    OPTIONS: ClassVar[Mapping[str, OptionSchema]] = {
        **COMMON_OPTIONS,
        "bands": {
            "type": ["array", "null"],
            "items": {"type": "integer", "minimum": 1},
            "description": "give three 1-based band indexes in RGB order, or one for grey, e.g. [3, 2, 1]",
        },
        "stretch": {
            "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}],
            "description": "use auto, none, percentile or [min, max]",
        },
        "percentiles": {
            "type": "array",
            "items": {"type": "number", "minimum": 0, "maximum": 100},
            "minItems": 2,
            "maxItems": 2,
            "description": "give [low, high] percentiles between 0 and 100 for the stretch, e.g. [2, 98]",
        },
        "nodata": {"type": ["number", "null"], "description": "give the pixel value that means no data, or null"},
        "gdal_env": {
            "type": ["object", "null"],
            # rasterio takes the cache size only as a number (of MB, or bytes above 100,000).
            "patternProperties": {"(?i)^GDAL_CACHEMAX$": {"type": "integer", "minimum": 0}},
            "additionalProperties": {"type": ["string", "number", "boolean"]},
            "description": "give GDAL config options as a mapping of names to values (GDAL_CACHEMAX in whole MB)",
        },
    }

    def __init__(
        self,
        path: str | Path,
        *,
        bands: Sequence[int] | None = None,
        stretch: str | Sequence[float] | Stretch = "auto",
        percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
        nodata: float | None = None,
        resampling: str = "bilinear",
        source_id: str | None = None,
        attribution: str = "",
        gdal_env: Mapping[str, object] | None = None,
    ) -> None:
        self.path = str(path)
        # The path as messages show it: a URL's credential-like query parameters hidden.
        self.name = redact(self.path)
        self.attribution = attribution
        self._gdal_env = {**(COG_HTTP_ENV if is_remote(self.path) else {}), **(gdal_env or {})}
        self._resampling = resampling_method(resampling)
        if not percentiles[0] < percentiles[1]:
            raise ImageryError(f"percentiles {tuple(percentiles)} are empty or inverted; give [low, high] like [2, 98]")
        self._percentiles = percentiles
        self._dataset = _open_raster(self.path, self.name, self._gdal_env)
        try:
            _check_grid(self._dataset, self.name)
            self.bands = _colour_bands(self._dataset, self.name, bands)
        except ImageryError:
            self._dataset.close()
            raise
        self.nodata = nodata if nodata is not None else self._dataset.nodata
        self.source_id = source_id or _path_source_id(self.path)
        self._stretch_rule = resolve_stretch(stretch, self._dataset.dtypes[self.bands[0] - 1])
        self._stretch: Stretch | None = None

    @property
    def crs(self) -> str:
        return self._dataset.crs.to_string()

    @property
    def stretch(self) -> Stretch | None:
        """The dataset's stretch (computed on first use and then fixed), or None for 8-bit pass-through."""
        if self._stretch_rule is None or isinstance(self._stretch_rule, Stretch):
            return self._stretch_rule
        if self._stretch is None:
            sample = self._decimated_sample()
            if not sample.count():
                raise ImageryError(
                    f"raster {self.name} has no valid pixel in a {max(sample.shape[1:])}-px read of it (each is"
                    f" nodata ({self.nodata}), NaN or masked); check the file and imagery.options.nodata, or give"
                    " imagery.options.stretch: [min, max]"
                )
            self._stretch = percentile_stretch(sample, self._percentiles)
        return self._stretch

    def gis_layer(self) -> RasterLayer | None:
        """The raster itself, drawn with the bands and stretch the build reads it with; None over the network."""
        if is_remote(self.path):
            return None
        stretch = self.stretch
        value_range = (0.0, float(_UINT8_MAX)) if stretch is None else (stretch.low, stretch.high)
        path = Path(self.path).resolve()
        return RasterLayer(path, self._dataset.crs, self.bands, value_range, self.attribution)

    def native_gsd_m(self, latitude: float) -> float:
        """The raster's own pixel size on the ground at its centre (geodesic, projection scale included): the
        longer of a pixel's two sides, so a rotated or non-square grid is not credited with its finer axis."""
        dataset = self._dataset
        transform, crs = dataset.transform, dataset.crs.to_string()
        column, row = dataset.width / 2.0, dataset.height / 2.0
        centre = transform @ (column, row)
        sides = (
            ground_distance_m(centre, transform @ (column + 1.0, row), crs),
            ground_distance_m(centre, transform @ (column, row + 1.0), crs),
        )
        if not all(math.isfinite(side) for side in sides):
            raise ImageryError(f"cannot tell the pixel size of {self.name} on the ground; set imagery.native_gsd_m")
        return max(sides)

    def footprint_lnglat(self) -> Bounds:
        return Bounds(*transform_bounds(self._dataset.crs, WGS84, *self._dataset.bounds, densify_pts=21))

    def coverage_bound(self, views: np.ndarray) -> np.ndarray | None:
        """The share of each view ((N, 4) EPSG:3857 bounds) that the raster's footprint covers, from its corners
        alone (nodata inside is not looked at): the most imagery each view can hold; None for a remote raster or
        one across the antimeridian."""
        west, _, east, _ = self.footprint_lnglat()
        if is_remote(self.path) or west > east:  # across the antimeridian its footprint is two shapes in EPSG:3857
            return None
        dataset = self._dataset
        corners = [
            dataset.transform @ corner
            for corner in ((0, 0), (dataset.width, 0), dataset.shape[::-1], (0, dataset.height))
        ]
        edges = shapely.segmentize(shapely.Polygon(corners), max_segment_length=max(dataset.res) * FOOTPRINT_SEGMENT_PX)
        x, y = shapely.get_coordinates(edges).T
        footprint = shapely.Polygon(np.column_stack(transform(dataset.crs, WEB_MERCATOR, x, y)))
        boxes = shapely.box(*views.T)
        return shapely.area(shapely.intersection(boxes, footprint)) / shapely.area(boxes)

    def holds_imagery(self, bounds: Bounds) -> bool | None:
        """Whether a pixel of the raster under `bounds` is valid, from its own pixels (mask, nodata, NaN);
        None above HOLDS_IMAGERY_MAX_PX and for a raster read over the network."""
        if is_remote(self.path):
            return None
        dataset = self._dataset
        left, bottom, right, top = transform_bounds(dataset.crs, WEB_MERCATOR, *dataset.bounds, densify_pts=21)
        inside = Bounds(
            max(bounds.left, left), max(bounds.bottom, bottom), min(bounds.right, right), min(bounds.top, top)
        )
        if inside.left >= inside.right or inside.bottom >= inside.top:
            return False
        window = from_bounds(
            *transform_bounds(WEB_MERCATOR, dataset.crs, *inside, densify_pts=21), transform=dataset.transform
        )
        if window.width * window.height > HOLDS_IMAGERY_MAX_PX:
            return None
        # One view of the box, as many pixels across as the raster has there: read without decimating.
        _, valid, _, _ = self._native_read(np.array([inside]), max(1, math.ceil(window.width)))
        return bool(valid.any())

    def read_values(self, bounds: Bounds, width: int, height: int, dst_crs: str = WEB_MERCATOR) -> np.ma.MaskedArray:
        """Raw float32 values of the selected bands on the requested grid; masked per pixel where the source
        has no data: outside its footprint, at its nodata value, NaN, or transparent in its alpha or mask."""
        dst_transform = check_read_size(bounds, width, height)
        shape = (len(self.bands), height, width)
        if not self._overlaps(bounds, dst_crs):
            return np.ma.MaskedArray(np.zeros(shape, np.float32), mask=True)
        # The warped alpha band is GDAL's per-pixel validity: 0 outside the footprint and where every source
        # pixel under it is nodata, transparent or masked. A masked read alone does not always consult it
        # (float rasters without nodata, sources with an alpha or mask band of their own report all-valid).
        # A source with an alpha band of its own gets it warped into the view; others get one added.
        options: dict[str, object] = {"add_alpha": ColorInterp.alpha not in self._dataset.colorinterp}
        if self.nodata is not None:
            options["src_nodata"] = self.nodata
        try:
            with (
                rasterio.Env(**self._gdal_env),
                WarpedVRT(
                    self._dataset,
                    crs=dst_crs,
                    transform=dst_transform,
                    width=width,
                    height=height,
                    resampling=self._resampling,
                    tolerance=0.001,
                    **options,
                ) as vrt,
            ):
                alpha_band = _alpha_band(vrt)
                stack = vrt.read(indexes=[*self.bands, alpha_band], out_dtype="float32")
        except RasterioError as exc:
            raise ImageryError(f"cannot read {self.name} ({type(exc).__name__}); check the file or URL") from exc
        values = stack[:-1]
        invalid = (stack[-1] == 0) | ~np.isfinite(values).all(axis=0)
        return np.ma.MaskedArray(values, mask=np.broadcast_to(invalid, shape).copy())

    def source_pixels(self, views: np.ndarray, width: int) -> SourcePixels:
        """The raster's own pixels under `views`, read natively (no warp), with a margin for the kernel.

        A raster over DECIMATE_ABOVE times finer than the views is read at an integer fraction of its
        resolution (GDAL's average, or its overviews), which keeps a strip's memory bounded."""
        if not self._overlaps(union_bounds(views), WEB_MERCATOR):
            return SourcePixels.empty(len(self.bands))
        values, valid, transform, extent = self._native_read(views, width)
        pixels = values.astype(np.uint8, copy=False) if self.stretch is None else values
        return SourcePixels(pixels, valid, transform, self.crs, self.stretch, extent, self._resampling.name)

    def _native_read(
        self, views: np.ndarray, width: int
    ) -> tuple[np.ndarray, np.ndarray, Affine, tuple[int, int, int, int]]:
        """`source_pixels`' read, before the stretch: raw values (bands, rows, columns), validity, the grid's
        transform and the part of it inside the raster."""
        union = union_bounds(views)
        dataset = self._dataset
        source_bounds = transform_bounds(WEB_MERCATOR, dataset.crs, *union, densify_pts=21)
        window = from_bounds(*source_bounds, transform=dataset.transform)
        view_px = window.width / ((union.right - union.left) / float(np.min(views[:, 2] - views[:, 0])) * width)
        factor = max(1, int(view_px // 2)) if view_px >= DECIMATE_ABOVE else 1
        margin = KERNEL_MARGIN_PX + math.ceil(view_px)
        left = math.floor(window.col_off) - margin
        top = math.floor(window.row_off) - margin
        columns = math.ceil((math.ceil(window.col_off + window.width) + margin - left) / factor)
        rows = math.ceil((math.ceil(window.row_off + window.height) + margin - top) / factor)
        # Read as stored where nothing is averaged: a copy of a quarter the size for 8-bit and half for 16-bit data.
        dtype = np.dtype(dataset.dtypes[0]) if factor == 1 and _holds_integers(dataset) else np.dtype(np.float32)
        values = np.zeros((len(self.bands), rows, columns), dtype)
        valid = np.zeros((rows, columns), bool)
        # The part of the padded window inside the raster, in output (decimated) pixels.
        first_column, first_row = max(0, -left // factor), max(0, -top // factor)
        last_column = min(columns, (dataset.width - left) // factor)
        last_row = min(rows, (dataset.height - top) // factor)
        if last_column > first_column and last_row > first_row:
            inside = Window(
                left + first_column * factor,
                top + first_row * factor,
                (last_column - first_column) * factor,
                (last_row - first_row) * factor,
            )
            target = np.s_[first_row:last_row, first_column:last_column]
            read = values[(slice(None), *target)]
            try:
                with rasterio.Env(**self._gdal_env):
                    dataset.read(indexes=list(self.bands), window=inside, out=read, resampling=Resampling.average)
                    masks = dataset.read_masks(indexes=list(self.bands), window=inside, out_shape=read.shape)
            except RasterioError as exc:
                raise ImageryError(f"cannot read {self.name} ({type(exc).__name__}); check the file or URL") from exc
            has_data = masks.all(axis=0)
            if dtype.kind == "f":
                has_data &= np.isfinite(read).all(axis=0)
            if self.nodata is not None:
                has_data &= (read != self.nodata).any(axis=0)
            valid[target] = has_data
        transform = dataset.transform @ Affine.translation(left, top) @ Affine.scale(factor)
        extent = (first_column, first_row, max(first_column, last_column), max(first_row, last_row))
        return values, valid, transform, extent

    def part(self, bounds: Bounds, width: int, height: int, dst_crs: str = WEB_MERCATOR) -> ImageData:
        values = self.read_values(bounds, width, height, dst_crs)
        if np.ma.getmaskarray(values).all():
            return empty_image(bounds, width, height, dst_crs)
        pixels = apply_stretch(values, self.stretch)
        if pixels.shape[0] == 1:
            pixels = np.ma.concatenate([pixels] * RGB_BANDS)
        return ImageData(pixels, bounds, dst_crs, true_gsd_m(bounds, width, dst_crs))

    def close(self) -> None:
        self._dataset.close()

    def _overlaps(self, bounds: Bounds, dst_crs: str) -> bool:
        left, bottom, right, top = transform_bounds(self._dataset.crs, dst_crs, *self._dataset.bounds, densify_pts=21)
        return left < bounds.right and bounds.left < right and bottom < bounds.top and bounds.bottom < top

    def _decimated_sample(self) -> np.ma.MaskedArray:
        dataset = self._dataset
        scale = max(1.0, max(dataset.width, dataset.height) / STRETCH_SAMPLE_PX)
        shape = (len(self.bands), max(1, round(dataset.height / scale)), max(1, round(dataset.width / scale)))
        with rasterio.Env(**self._gdal_env):
            sample = dataset.read(indexes=list(self.bands), out_shape=shape, masked=True, out_dtype="float32")
        if self.nodata is not None:
            sample = np.ma.masked_where(sample.data == self.nodata, sample)
        return np.ma.masked_invalid(sample)


def _open_raster(path: str, name: str, gdal_env: Mapping[str, object]) -> rasterio.io.DatasetReader:
    """The raster at `path` opened, or refused in one line."""
    if path.startswith(("http://", "https://")) and not is_http_url(path):
        raise ImageryError(f"raster URL {name} is not http(s) with a valid host and port; check the URL")
    try:
        # A raster without georeferencing is refused by `_check_grid`, in one line, not with rasterio's warning.
        with rasterio.Env(**gdal_env), warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioError as exc:
        raise ImageryError(f"cannot open raster {name} ({type(exc).__name__}); check the path or URL") from exc


def _check_grid(dataset: rasterio.io.DatasetReader, name: str) -> None:
    """Refuse a raster without a CRS, or whose columns do not run east and rows south (as rasterio's windows from
    bounds need)."""
    if dataset.crs is None:
        raise ImageryError(f"raster {name} has no CRS; georeference it (e.g. gdal_edit.py -a_srs)")
    width, height = dataset.transform.a, dataset.transform.e
    if not width > 0 > height:
        raise ImageryError(
            f"raster {name} is stored south-up, mirrored or turned past 90 degrees (geotransform pixel width"
            f" {width:g}, height {height:g}); warp it north-up, e.g. gdalwarp {name} north_up.tif"
        )


def _colour_bands(dataset: rasterio.io.DatasetReader, name: str, bands: Sequence[int] | None) -> tuple[int, ...]:
    """`bands`, else the default ones; refused where they do not fit the raster or hold palette indexes."""
    chosen = tuple(bands) if bands is not None else _default_bands(dataset, name)
    if len(chosen) not in (1, RGB_BANDS) or any(not 1 <= band <= dataset.count for band in chosen):
        raise ImageryError(
            f"bands {chosen} do not fit {name} ({dataset.count} bands); "
            "pass three 1-based indexes in RGB order, or one for grey"
        )
    if any(dataset.colorinterp[band - 1] == ColorInterp.palette for band in chosen):
        raise ImageryError(
            f"raster {name} holds palette indexes, not colours; expand it to RGB: gdal_translate -expand rgb {name}"
            " rgb.tif"
        )
    return chosen


def _holds_integers(dataset: rasterio.io.DatasetReader) -> bool:
    """Whether every band holds integers of one type."""
    return len(set(dataset.dtypes)) == 1 and np.dtype(dataset.dtypes[0]).kind in "ui"


def _alpha_band(vrt: WarpedVRT) -> int:
    """1-based index of the warped dataset's alpha band (the last one tagged alpha)."""
    tagged = [index for index, colour in enumerate(vrt.colorinterp, start=1) if colour == ColorInterp.alpha]
    if not tagged:
        raise ImageryError("GDAL's warped view of the raster lacks an alpha band; check the GDAL version")
    return tagged[-1]


def _default_bands(dataset: rasterio.io.DatasetReader, name: str) -> tuple[int, ...]:
    """The bands tagged red, green and blue, else the first three (or the one) not tagged alpha."""
    interpretation = list(dataset.colorinterp)
    wanted = (ColorInterp.red, ColorInterp.green, ColorInterp.blue)
    if all(colour in interpretation for colour in wanted):
        return tuple(interpretation.index(colour) + 1 for colour in wanted)
    colour_bands = [band for band, colour in enumerate(interpretation, start=1) if colour != ColorInterp.alpha]
    if 1 < len(colour_bands) < RGB_BANDS:
        raise ImageryError(
            f"raster {name} has {len(colour_bands)} bands not tagged alpha, too many for grey and too few for RGB;"
            " name the bands to use in imagery.options.bands, e.g. [1] for grey"
        )
    return tuple(colour_bands[:RGB_BANDS])


def _path_source_id(path: str) -> str:
    digest = hashlib.sha256(path.encode()).hexdigest()[:10]
    stem = Path(path.split("?")[0]).stem.lower() or "raster"
    return f"file-{stem}-{digest}"

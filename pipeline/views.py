"""Model views cut from a source's own pixels, in batches, on the model's device.

A reader hands over the pixels under a strip of views once (`ImageryReader.source_pixels`); every view is then
resampled from them to `size` x `size` px with GDAL's warp kernel, so a view matches a GDAL warp of that view
alone (`ImageryReader.part`) to within rounding: each output pixel centre is mapped into the source grid, the
kernel (bilinear by default) is stretched by the shrink factor when the view has coarser pixels than the source
(below GDAL's 0.95 threshold), weights of pixels without imagery are dropped and the rest renormalised, and
a pixel holds imagery only where its centre falls on a valid source pixel.

Sources on the EPSG:3857 grid (tile pyramids, Web Mercator rasters) resample separably: two sparse products
per row of views (rows, then columns). Other CRSs map every output pixel through the projection (exact at a
9 x 9 grid of points per view and interpolated between them, well under 0.01 px off) and weigh a 2-D
neighbourhood: a compiled (numba) kernel on a CPU, a sparse product on other devices.
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache
from typing import NamedTuple

import numba
import numpy as np
import torch
import torch.nn.functional as F
from pyproj import Transformer
from rasterio.transform import Affine
from torch import Tensor

from pipeline.geometry import WEB_MERCATOR, view_rows
from pipeline.imagery.base import RGB_BANDS, SourcePixels, view_array

# GDAL keeps the unstretched kernel while a view shrinks the source by less than this (its 4-sample formula).
UNSCALED_KERNEL_ABOVE = 0.95
# Views of one row resampled together (their pass down the source is shared): about 50 MB of results.
SEPARABLE_BATCH = 64
# Views of a projected source resampled together (more only thrash the cache: ~25 MB of taps each).
PROJECTED_BATCH = 2
# Readers hand over pixels at most ~4x finer than the views (local rasters decimate, tile pyramids pick their
# zoom): a smaller output/source ratio only comes from degenerate views, and would make kernels huge.
MIN_KERNEL_SCALE = 1.0 / 32.0
# Points per view axis mapped exactly through the projection; the rest are interpolated between them.
PROJECTED_GRID_POINTS = 9
_UINT8_MAX = 255.0


class Kernel(NamedTuple):
    """A resampling kernel as GDAL defines it: a cubic polynomial in |x| on each unit interval 0-1, 1-2, ...
    (coefficients of 1, t, t^2, t^3 per row), zero beyond; its radius is the number of rows. One table serves
    the sparse products on any device and the compiled CPU kernel."""

    pieces: np.ndarray

    @property
    def radius(self) -> int:
        return len(self.pieces)

    def weight(self, x: Tensor) -> Tensor:
        t = x.abs()
        piece = t.floor().long().clamp(max=self.radius - 1)
        c = torch.as_tensor(self.pieces, dtype=x.dtype, device=x.device)[piece]
        value = c[..., 0] + t * (c[..., 1] + t * (c[..., 2] + t * c[..., 3]))
        return torch.where(t < self.radius, value, 0.0)


# One per reader resampling (`pipeline.imagery.base.RESAMPLINGS`).
KERNELS = {
    "bilinear": Kernel(np.array([[1.0, -1.0, 0.0, 0.0]])),
    # Keys' cubic convolution with a = -0.5, GDAL's "cubic".
    "cubic": Kernel(np.array([[1.0, 0.0, -2.5, 1.5], [2.0, -4.0, 2.5, -0.5]])),
}


class ViewBatch(NamedTuple):
    """Views as uint8 RGB (N, 3, size, size), black where there is no imagery, and the share of each view's
    pixels that hold imagery (N,)."""

    pixels: Tensor
    coverage: Tensor


def cut_views(
    source: SourcePixels,
    views: np.ndarray,
    size: int,
    *,
    device: torch.device | str = "cpu",
    compiled: bool | None = None,
) -> ViewBatch:
    """Resample each of `views` ((N, 4) EPSG:3857 bounds) from `source` to `size` x `size` pixels, with the
    source's own kernel (`source.resampling`).

    Sources in another CRS than EPSG:3857 are resampled by a `compiled` kernel (numba) on a CPU, by sparse
    products elsewhere (None: whichever fits the device; both give the same views)."""
    kernel = KERNELS[source.resampling]
    device = torch.device(device)
    compiled = device.type == "cpu" if compiled is None else compiled
    views = view_array(views)
    values, valid = _on_device(source.values, device), _on_device(source.valid, device)
    if values.is_floating_point():
        finite = torch.isfinite(values).all(dim=0)
        valid = valid & finite
        values = torch.where(finite, values, 0.0)
    landing = _landing(source, valid)
    if _on_mercator_grid(source):
        parts = [
            _finish(*_resample_separable(values, valid, landing, source.transform, views[rows], size, kernel), source)
            for rows in _same_rows(views)
        ]
    else:
        # Values premultiplied by validity, validity last: one pass resamples both.
        stack = torch.cat([values.float() * valid, valid[None].float()])
        by_pixel = stack.reshape(len(stack), -1).T.contiguous()
        batches = (views[start : start + PROJECTED_BATCH] for start in range(0, len(views), PROJECTED_BATCH))
        parts = [
            _finish(*_resample_projected(by_pixel, landing, source, batch, size, kernel, compiled), source)
            for batch in batches
        ]
    if not parts:
        return ViewBatch(torch.zeros((0, RGB_BANDS, size, size), dtype=torch.uint8, device=device), torch.zeros(0))
    return ViewBatch(torch.cat([part.pixels for part in parts]), torch.cat([part.coverage for part in parts]))


def _on_device(array: np.ndarray, device: torch.device) -> Tensor:
    """`array` on `device`; to a GPU from pinned host memory, without waiting for the copy."""
    tensor = torch.as_tensor(np.ascontiguousarray(array))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _same_rows(views: np.ndarray) -> list[slice]:
    """Rows of views (`pipeline.geometry.view_rows`) cut into runs of SEPARABLE_BATCH at most."""
    return [
        slice(first, min(first + SEPARABLE_BATCH, row.stop))
        for row in view_rows(views)
        for first in range(row.start, row.stop, SEPARABLE_BATCH)
    ]


def _on_mercator_grid(source: SourcePixels) -> bool:
    transform = source.transform
    return source.crs == WEB_MERCATOR and transform.b == 0.0 and transform.d == 0.0 and transform.e < 0.0


def _finish(resampled: Tensor, landed: Tensor, source: SourcePixels) -> ViewBatch:
    """uint8 views and their coverage from (N, bands + 1, S, S) values premultiplied by validity plus the
    valid weight, and where (N, S, S) the views hold imagery. Few passes over the values: memory, not
    arithmetic, sets the pace here."""
    low, gain = (
        (0.0, 1.0)
        if source.stretch is None
        else (source.stretch.low, _UINT8_MAX / (source.stretch.high - source.stretch.low))
    )
    # One factor per pixel: the kernel's renormalisation, the stretch's gain, and 0 where there is no imagery.
    factor = torch.where(landed, gain / resampled[:, -1].clamp(min=1e-12), 0.0)[:, None]
    # Adding 0.5 before truncating rounds halves up, as GDAL does.
    offset = 0.5 - low * gain
    values = resampled[:, :-1].mul_(factor).add_(offset * landed[:, None]).clamp_(0.0, _UINT8_MAX)
    pixels = values.to(torch.uint8)
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, RGB_BANDS, -1, -1).contiguous()
    return ViewBatch(pixels, landed.float().mean(dim=(1, 2)).cpu())


def _taps(coords: Tensor, scale: Tensor, kernel: Kernel, length: int) -> tuple[Tensor, Tensor]:
    """GDAL's kernel taps along one axis: source indexes (..., K) and their weights, zero off the source.
    `coords` are continuous source pixel coordinates of output pixel centres (pixel j spans j..j+1), `scale`
    the output/source pixel ratio (< 1 shrinks), broadcast to coords."""
    reach = math.ceil(kernel.radius / float(scale.min()))
    offsets = torch.arange(1 - reach, reach + 1, device=coords.device, dtype=coords.dtype)
    base = torch.floor(coords - 0.5)
    delta = coords - 0.5 - base
    weights = kernel.weight((offsets - delta[..., None]) * scale[..., None])
    index = base[..., None].long() + offsets.long()
    inside = (index >= 0) & (index < length)
    return index.clamp(0, length - 1), weights * inside


def _landing(source: SourcePixels, valid: Tensor) -> Tensor:
    """(H, W): source pixels on which an output pixel's centre may fall and hold imagery. Like GDAL, an output
    pixel holds imagery only where its centre falls on a valid pixel of the source (however much imagery the
    rest of its kernel sees)."""
    height, width = valid.shape
    first_column, first_row, end_column, end_row = source.extent or (0, 0, width, height)
    landing = torch.zeros_like(valid, dtype=torch.bool)
    landing[first_row:end_row, first_column:end_column] = True
    return landing & valid


def _landed(landing: Tensor, rows: Tensor, columns: Tensor) -> Tensor:
    """Whether output pixel centres at source coordinates `rows`, `columns` (broadcast) land on `landing`."""
    height, width = landing.shape
    row, column = torch.floor(rows).long(), torch.floor(columns).long()
    inside = (row >= 0) & (row < height) & (column >= 0) & (column < width)
    return inside & landing[row.clamp(0, height - 1), column.clamp(0, width - 1)]


def _kernel_scale(shrink: Tensor) -> Tensor:
    """Output/source pixel ratios per view, set to 1 (unstretched kernel) where GDAL would not stretch, and
    kept above MIN_KERNEL_SCALE (degenerate views)."""
    shrink = shrink.nan_to_num(nan=1.0).clamp(min=MIN_KERNEL_SCALE)
    return torch.where(shrink >= UNSCALED_KERNEL_ABOVE, torch.ones_like(shrink), shrink)


def _tap_matrix(index: Tensor, weight: Tensor, length: int) -> Tensor:
    """Sparse (outputs, `length`) matrix of (..., K) taps: output i sums weight[i, k] x input index[i, k]."""
    index, weight = index.reshape(-1, index.shape[-1]), weight.reshape(-1, weight.shape[-1])
    rows, taps = index.shape
    pointers = torch.arange(0, rows * taps + 1, taps, device=index.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        return torch.sparse_csr_tensor(
            pointers, index.reshape(-1), weight.reshape(-1).float(), size=(rows, length), check_invariants=False
        )


def _resample_separable(
    values: Tensor, valid: Tensor, landing: Tensor, transform: Affine, views: np.ndarray, size: int, kernel: Kernel
) -> tuple[Tensor, Tensor]:
    """Views that share their rows: one pass down the source's columns under all of them, then one across
    per view."""
    device = values.device
    bands, height, width = values.shape
    pixel_x, pixel_y = transform.a, -transform.e
    steps = torch.arange(size, device=device, dtype=torch.float64) + 0.5
    bounds = torch.as_tensor(views, device=device)
    step_x = (bounds[:, 2] - bounds[:, 0]) / size
    step_y = (bounds[:, 3] - bounds[:, 1]) / size
    columns = (bounds[:, :1] + steps * step_x[:, None] - transform.c) / pixel_x
    rows = (transform.f - (bounds[:, 3:] - steps * step_y[:, None])) / pixel_y
    # GDAL takes one kernel for both axes: unstretched only when neither shrinks past the threshold.
    shrink = torch.minimum(pixel_x / step_x, pixel_y / step_y).clamp(max=1.0)
    scale = _kernel_scale(shrink)
    column_index, column_weight = _taps(columns, scale[:, None], kernel, width)
    row_index, row_weight = _taps(rows[:1], scale[:1, None], kernel, height)
    count = len(views)
    first_row, end_row = int(row_index.min()), int(row_index.max()) + 1
    first_column, end_column = int(column_index.min()), int(column_index.max()) + 1
    window = np.s_[first_row:end_row, first_column:end_column]
    window_valid = valid[window].float()
    stack = torch.cat([values[(slice(None), *window)].float() * window_valid, window_valid[None]])
    # Down the columns once for every view of the row, then across per view: each pass one sparse product
    # (a row of the matrix per output pixel, a weight per kernel tap).
    down = _tap_matrix(row_index[0] - first_row, row_weight[0], end_row - first_row)
    down_pass = (down @ stack.permute(1, 0, 2).reshape(end_row - first_row, -1)).reshape(size, bands + 1, -1)
    across = _tap_matrix(column_index - first_column, column_weight, end_column - first_column)
    across_pass = across @ down_pass.permute(2, 1, 0).reshape(end_column - first_column, -1)
    out = across_pass.reshape(count, size, bands + 1, size).permute(0, 2, 3, 1)  # (N, bands + 1, rows, columns)
    return out, _landed(landing, rows[:, :, None], columns[:, None, :])


@numba.njit(cache=True, nogil=True)
def _tap_weight(x: float, pieces: np.ndarray) -> float:
    t = abs(x)
    piece = int(t)
    if piece >= pieces.shape[0]:
        return 0.0
    c = pieces[piece]
    return c[0] + t * (c[1] + t * (c[2] + t * c[3]))


@numba.njit(cache=True, nogil=True)
def _resample_points(
    by_pixel: np.ndarray, width: int, columns: np.ndarray, rows: np.ndarray, scales: np.ndarray, pieces: np.ndarray
) -> np.ndarray:
    """The compiled CPU twin of the sparse product: for each output pixel (its source coordinates and kernel
    scale), the kernel-weighted sum of the source rows of `by_pixel` ((H x W, C) float32) under it."""
    height, bands = by_pixel.shape[0] // width, by_pixel.shape[1]
    out = np.zeros((len(columns), bands), np.float32)
    if len(columns) == 0:
        return out
    most = 2 * math.ceil(pieces.shape[0] / scales.min())
    across = np.empty(most)
    down = np.empty(most)
    for point in range(len(columns)):
        scale = scales[point]
        reach = math.ceil(pieces.shape[0] / scale)
        if not (math.isfinite(columns[point]) and math.isfinite(rows[point])):
            continue
        column, row = columns[point] - 0.5, rows[point] - 0.5
        first_column, first_row = math.floor(column), math.floor(row)
        for tap in range(2 * reach):
            across[tap] = _tap_weight((1 - reach + tap - (column - first_column)) * scale, pieces)
            down[tap] = _tap_weight((1 - reach + tap - (row - first_row)) * scale, pieces)
        for row_tap in range(2 * reach):
            source_row = first_row + 1 - reach + row_tap
            if source_row < 0 or source_row >= height or down[row_tap] == 0.0:
                continue
            for column_tap in range(2 * reach):
                source_column = first_column + 1 - reach + column_tap
                if source_column < 0 or source_column >= width or across[column_tap] == 0.0:
                    continue
                weight = down[row_tap] * across[column_tap]
                source = source_row * width + source_column
                for band in range(bands):
                    out[point, band] += weight * by_pixel[source, band]
    return out


@lru_cache(maxsize=8)
def _from_mercator(crs: str) -> Transformer:
    return Transformer.from_crs(WEB_MERCATOR, crs, always_xy=True)


def _resample_projected(
    by_pixel: Tensor,
    landing: Tensor,
    source: SourcePixels,
    views: np.ndarray,
    size: int,
    kernel: Kernel,
    compiled: bool,
) -> tuple[Tensor, Tensor]:
    """Views from (H x W, bands + 1) values premultiplied by validity plus the valid weight, a source pixel a
    row: one sparse product with a row of 2-D kernel taps per output pixel, or its `compiled` CPU twin."""
    device = by_pixel.device
    (height, width), bands, count = landing.shape, by_pixel.shape[1], len(views)
    # Output pixel centres on a coarse grid per view, mapped exactly into source pixel coordinates.
    points = (np.linspace(0.5, size - 0.5, PROJECTED_GRID_POINTS) / size)[None, :]
    left, bottom, right, top = (views[:, index : index + 1] for index in range(4))
    x = np.broadcast_to(
        (left + points * (right - left))[:, None, :], (count, PROJECTED_GRID_POINTS, PROJECTED_GRID_POINTS)
    )
    y = np.broadcast_to((top - points * (top - bottom))[:, :, None], x.shape)
    source_x, source_y = _from_mercator(source.crs).transform(x, y)
    columns, rows = ~source.transform @ (np.asarray(source_x), np.asarray(source_y))
    coarse = torch.as_tensor(np.stack([columns, rows], axis=1), device=device, dtype=torch.float64)
    fine = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)
    # float32 from here: coordinates of a strip's pixels need no more than 1e-4 px.
    column_coords, row_coords = fine[:, 0].float(), fine[:, 1].float()
    # The output/source pixel ratio of each view, from its extent in source pixels (GDAL: its source window).
    centres_to_edges = size / (size - 1.0)
    extent_x = (column_coords.amax(dim=(1, 2)) - column_coords.amin(dim=(1, 2))) * centres_to_edges
    extent_y = (row_coords.amax(dim=(1, 2)) - row_coords.amin(dim=(1, 2))) * centres_to_edges
    scale = _kernel_scale((size / torch.maximum(extent_x, extent_y)).clamp(max=1.0))[:, None, None]
    if compiled:
        scales = scale.expand_as(column_coords).reshape(-1).numpy()
        points = _resample_points(
            by_pixel.numpy(),
            width,
            column_coords.reshape(-1).numpy(),
            row_coords.reshape(-1).numpy(),
            scales,
            kernel.pieces,
        )
        out = torch.from_numpy(points).reshape(count, size, size, bands).permute(0, 3, 1, 2)
    else:
        column_index, column_weight = _taps(column_coords, scale, kernel, width)
        row_index, row_weight = _taps(row_coords, scale, kernel, height)
        flat = row_index[..., :, None] * width + column_index[..., None, :]  # (N, S, S, K, K)
        weights = row_weight[..., :, None] * column_weight[..., None, :]
        pixels = count * size * size
        taps = _tap_matrix(flat.reshape(pixels, -1), weights.reshape(pixels, -1), height * width)
        out = (taps @ by_pixel).reshape(count, size, size, bands).permute(0, 3, 1, 2)
    return out, _landed(landing, row_coords, column_coords)

"""Model views cut from a source's own pixels, in batches, on the model's device.

A reader hands over the pixels under a strip of views once (`ImageryReader.source_pixels`); every view is then
resampled from them to `size` x `size` px with GDAL's warp kernel, so a view matches a GDAL warp of that view
alone (`ImageryReader.part`) to within rounding: each output pixel centre is mapped into the source grid, the
kernel (bilinear by default) is stretched by the shrink factor when the view has coarser pixels than the source
(below GDAL's 0.95 threshold), weights of pixels without imagery are dropped and the rest renormalised, and
a pixel holds imagery only where its centre falls on a valid source pixel.

Map views of one row sit on one pixel lattice (`pipeline.geometry.on_pixel_lattice`): where they overlap, the
row is resampled once as blocks side by side and each view is a slice of them, which saves as many times the
work as views overlap (~4x at `tile_zoom_offset` 2, ~20x at 5).

Sources on the EPSG:3857 grid (tile pyramids, Web Mercator rasters) resample separably: one pass down the
source shared by a row of views, then one across per view. Other CRSs map every output pixel through the
projection (exact at a 9 x 9 grid of points per view and interpolated between them, well under 0.01 px off) and
weigh a 2-D neighbourhood. On a CPU, compiled (numba) kernels go through each view's pixels once (kernel,
renormalisation and stretch together), views spread over torch's threads; on other devices, sparse products
do, then a pass that renormalises and stretches.
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

from pipeline.geometry import WEB_MERCATOR, LatticeBlocks, lattice_blocks, view_rows
from pipeline.imagery.base import RGB_BANDS, SourcePixels, view_array

# Embed jobs fork loader processes after views were cut in parallel: GNU OpenMP's thread pool does not survive
# a fork, numba's own (workqueue) does, and views are cut from one thread at a time.
numba.config.THREADING_LAYER = "forksafe"  # type: ignore[attr-defined]  # set from the environment at import

# GDAL keeps the unstretched kernel while a view shrinks the source by less than this (its 4-sample formula).
UNSCALED_KERNEL_ABOVE = 0.95
# Views of one row resampled together (their pass down the source is shared): about 50 MB of results.
SEPARABLE_BATCH = 64
# Views of a projected source resampled together by sparse products (more only thrash the cache: ~25 MB of taps
# each).
PROJECTED_BATCH = 2
# Readers hand over pixels at most ~4x finer than the views (local rasters decimate, tile pyramids pick their
# zoom): a smaller output/source ratio only comes from degenerate views, and would make kernels huge.
MIN_KERNEL_SCALE = 1.0 / 32.0
# Points per view axis mapped exactly through the projection; the rest are interpolated between them.
PROJECTED_GRID_POINTS = 9
_UINT8_MAX = 255.0
# A kernel weight sum below this holds no imagery (renormalising by it would blow up rounding noise).
_MIN_WEIGHT = 1e-12


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

    Overlapping views of a row on one pixel lattice (`pipeline.geometry.lattice_blocks`) are sliced from blocks
    resampled once. Blocks are resampled and sliced by `compiled` kernels (numba) on a CPU, by sparse products
    and a gather elsewhere (None: whichever fits the device; both give the same views)."""
    device = torch.device(device)
    compiled = device.type == "cpu" if compiled is None else compiled
    lattice = lattice_blocks(view_array(views), size)
    if compiled:
        pixels, landed = _cut_compiled(source, lattice, size)
    else:
        blocks = _cut_sparse(source, lattice.bounds, size, device)
        pixels, landed = _sliced(blocks, lattice, size) if lattice.shared else blocks
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, RGB_BANDS, -1, -1).contiguous()
    return ViewBatch(pixels, _coverage(landed))


def _coverage(landed: Tensor) -> Tensor:
    """The share of each of (N, S, S) squares' pixels that hold imagery, (N,) float32 on the CPU: counted where
    the squares are (numpy on a CPU, a tenth of the time of torch's), divided on the host, so every device gives
    the same shares."""
    count, height, width = landed.shape
    if landed.device.type == "cpu":
        counts = np.count_nonzero(landed.numpy().reshape(count, height * width), axis=1)
    else:
        counts = landed.reshape(count, height * width).sum(dim=1).cpu().numpy()
    return torch.from_numpy((counts / (height * width)).astype(np.float32))


class _Cut(NamedTuple):
    """Squares resampled from a source: (N, bands, S, S) uint8, black where there is no imagery, and (N, S, S)
    where they hold imagery."""

    pixels: Tensor
    landed: Tensor


def _cut_sparse(source: SourcePixels, views: np.ndarray, size: int, device: torch.device) -> _Cut:
    """Each of `views` resampled on its own on `device`: sparse products, then `_finish`."""
    kernel = KERNELS[source.resampling]
    values, valid = (
        to_device(torch.from_numpy(np.ascontiguousarray(array)), device) for array in (source.values, source.valid)
    )
    if values.is_floating_point():
        finite = torch.isfinite(values).all(dim=0)
        valid = valid & finite
        values = torch.where(finite, values, 0.0)
    if not len(views):
        empty = torch.zeros((0, values.shape[0], size, size), dtype=torch.uint8, device=device)
        return _Cut(empty, torch.zeros((0, size, size), dtype=torch.bool, device=device))
    landing = _landing(source, valid)
    if _on_mercator_grid(source):
        shape = (valid.shape[0], valid.shape[1])
        parts = []
        for rows in _same_rows(views):
            taps = _separable_taps(source.transform, views[rows], size, kernel, shape)
            parts.append(_finish(*_resample_separable(values, valid, landing, taps), source))
    else:
        by_pixel = _premultiplied(values, valid).reshape(values.shape[0] + 1, -1).T.contiguous()
        grid = _projected_grid(source, views, size)
        parts = [
            _finish(*_resample_projected(by_pixel, landing, grid.of(rows), size, kernel), source)
            for rows in _batches(len(views), PROJECTED_BATCH)
        ]
    return _Cut(torch.cat([part.pixels for part in parts]), torch.cat([part.landed for part in parts]))


def _sliced(blocks: _Cut, lattice: LatticeBlocks, size: int) -> _Cut:
    """Views taken from the blocks that hold them (`lattice`), on the blocks' device: the blocks laid side by
    side, every `size`-wide window over them a strided view, the views' windows copied out once (a tenth of the
    time an index on four axes takes on a CPU)."""
    count = len(blocks.pixels)
    starts = torch.as_tensor(lattice.block * size + lattice.shift, device=blocks.pixels.device)

    def windows(squares: Tensor) -> Tensor:
        """(M, ..., S, S) squares -> (M*S - S + 1, ..., S, S): the window starting at each column of the row."""
        row = squares.movedim(0, -2).reshape(*squares.shape[1:-1], count * size)
        return row.unfold(-1, size, 1).movedim(-2, 0)

    return _Cut(windows(blocks.pixels).index_select(0, starts), windows(blocks.landed).index_select(0, starts))


def _cut_compiled(source: SourcePixels, lattice: LatticeBlocks, size: int) -> _Cut:
    """The compiled CPU twin of `_cut_sparse` and `_sliced`: per group of three bands, one pass over the source
    to lay it out as the kernels read it and one over each block's pixels (kernel, renormalisation and stretch
    together); then one copy per sliced view. Views are spread over torch's threads."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))  # type: ignore[attr-defined]
    blocks, bands = lattice.bounds, source.values.shape[0]
    firsts = range(0, bands, RGB_BANDS)
    groups = np.zeros((len(firsts), len(blocks), RGB_BANDS, size, size), np.uint8)
    landed = np.zeros((len(blocks), size, size), np.bool_)
    if len(blocks):
        laid_out = [_channels_last(source.values, source.valid, first, source.spanned) for first in firsts]
        stacks, landing = [stack for stack, _ in laid_out], laid_out[0][1]
        kernel = KERNELS[source.resampling]
        low, gain = _stretch_gain(source)
        if _on_mercator_grid(source):
            for rows in _same_rows(blocks):
                taps = _separable_taps(source.transform, blocks[rows], size, kernel, landing.shape)
                window_columns = taps.window[1]
                row_index, row_weight = taps.row_index.numpy(), taps.row_weight.float().numpy()
                column_index = (taps.column_index - window_columns.start).numpy()
                column_weight = taps.column_weight.float().numpy()
                tap_rows, tap_columns = taps.rows.numpy(), taps.columns.numpy()
                for stack, pixels in zip(stacks, groups, strict=True):
                    _cut_rows(
                        stack,
                        (window_columns.start, window_columns.stop),
                        landing,
                        row_index,
                        row_weight,
                        column_index,
                        column_weight,
                        tap_rows,
                        tap_columns,
                        low,
                        gain,
                        pixels[rows],
                        landed[rows],
                    )
        else:
            grid = _projected_grid(source, blocks, size)
            for stack, pixels in zip(stacks, groups, strict=True):
                _cut_points(
                    stack, landing, grid.columns, grid.rows, grid.scale, kernel.pieces, low, gain, pixels, landed
                )
    # A grey source's one group is already RGB (`_channels_last`); else the last group's repeats are dropped.
    channels = RGB_BANDS if bands == 1 else bands
    block_pixels = (groups[0] if len(firsts) == 1 else np.concatenate(list(groups), axis=1))[:, :channels]
    if not lattice.shared:
        return _Cut(torch.from_numpy(block_pixels), torch.from_numpy(landed))
    pixels = np.empty((len(lattice.block), channels, size, size), np.uint8)
    views_landed = np.empty((len(lattice.block), size, size), np.bool_)
    _slice_blocks(block_pixels, landed, lattice.block, lattice.shift, pixels, views_landed)
    return _Cut(torch.from_numpy(pixels), torch.from_numpy(views_landed))


def _premultiplied(values: Tensor, valid: Tensor) -> Tensor:
    """(bands + 1, H, W) float32: the values premultiplied by validity, then the validity, so that one pass of a
    kernel resamples both (the second sum renormalises the first)."""
    weight = valid.float()
    return torch.cat([values.float() * weight, weight[None]])


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """`tensor` on `device`; to a GPU from pinned host memory, without waiting for the copy."""
    if device.type == "cuda":
        return (tensor if tensor.is_pinned() else tensor.pin_memory()).to(device, non_blocking=True)
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


def _finish(resampled: Tensor, landed: Tensor, source: SourcePixels) -> _Cut:
    """uint8 squares from (N, bands + 1, S, S) values premultiplied by validity plus the valid weight, and where
    (N, S, S) they hold imagery. Few passes over the values: memory, not arithmetic, sets the pace here."""
    low, gain = _stretch_gain(source)
    # One factor per pixel: the kernel's renormalisation, the stretch's gain, and 0 where there is no imagery.
    factor = torch.where(landed, gain / resampled[:, -1].clamp(min=_MIN_WEIGHT), 0.0)[:, None]
    # Adding 0.5 before truncating rounds halves up, as GDAL does.
    offset = 0.5 - low * gain
    values = resampled[:, :-1].mul_(factor).add_(offset * landed[:, None]).clamp_(0.0, _UINT8_MAX)
    return _Cut(values.to(torch.uint8), landed)


def _stretch_gain(source: SourcePixels) -> tuple[float, float]:
    """The source's stretch as (low, gain): a display value is (value - low) x gain."""
    if source.stretch is None:
        return 0.0, 1.0
    return source.stretch.low, _UINT8_MAX / (source.stretch.high - source.stretch.low)


def _taps(coords: Tensor, scale: Tensor, kernel: Kernel, length: int) -> tuple[Tensor, Tensor]:
    """GDAL's kernel taps along one axis: source indexes (..., K) and their weights, zero off the source.
    `coords` are continuous source pixel coordinates of output pixel centres (pixel j spans j..j+1), `scale`
    the output/source pixel ratio (< 1 shrinks), broadcast to coords."""
    # Taps lie strictly within `reach` of the centre: ceil(2 x reach) of them from the first one past its left
    # end cover them all (3 where a shrinking bilinear kernel, from a window fixed around the centre, takes 4).
    reach = kernel.radius / scale[..., None]
    taps = math.ceil(2.0 * kernel.radius / float(scale.min()))
    centre = coords[..., None] - 0.5
    index = torch.floor(centre - reach) + 1.0 + torch.arange(taps, device=coords.device, dtype=coords.dtype)
    weights = kernel.weight((index - centre) * scale[..., None])
    index = index.long()
    inside = (index >= 0) & (index < length)
    return index.clamp(0, length - 1), weights * inside


def _landing(source: SourcePixels, valid: Tensor) -> Tensor:
    """(H, W): source pixels on which an output pixel's centre may fall and hold imagery. Like GDAL, an output
    pixel holds imagery only where its centre falls on a valid pixel of the source (however much imagery the
    rest of its kernel sees)."""
    first_column, first_row, end_column, end_row = source.spanned
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


class SeparableTaps(NamedTuple):
    """Kernel taps of views that share their rows, on a source on the EPSG:3857 grid: down the source (S, K),
    the same for every view, and across it (N, S, K) per view, as source indexes and weights (zero off the
    source); and the source coordinates of output pixel centres, `rows` (S,) and `columns` (N, S)."""

    row_index: Tensor
    row_weight: Tensor
    column_index: Tensor
    column_weight: Tensor
    rows: Tensor
    columns: Tensor

    @property
    def window(self) -> tuple[slice, slice]:
        """The part of the source under every tap."""
        rows = slice(int(self.row_index.min()), int(self.row_index.max()) + 1)
        return rows, slice(int(self.column_index.min()), int(self.column_index.max()) + 1)


def _separable_taps(
    transform: Affine, views: np.ndarray, size: int, kernel: Kernel, shape: tuple[int, int]
) -> SeparableTaps:
    bounds = torch.as_tensor(views)
    pixel_x, pixel_y = transform.a, -transform.e
    steps = torch.arange(size, device=bounds.device, dtype=torch.float64) + 0.5
    step_x = (bounds[:, 2] - bounds[:, 0]) / size
    step_y = (bounds[:, 3] - bounds[:, 1]) / size
    columns = (bounds[:, :1] + steps * step_x[:, None] - transform.c) / pixel_x
    rows = (transform.f - (bounds[:, 3:] - steps * step_y[:, None])) / pixel_y
    # GDAL takes one kernel for both axes: unstretched only when neither shrinks past the threshold.
    shrink = torch.minimum(pixel_x / step_x, pixel_y / step_y).clamp(max=1.0)
    scale = _kernel_scale(shrink)
    column_index, column_weight = _taps(columns, scale[:, None], kernel, shape[1])
    row_index, row_weight = _taps(rows[:1], scale[:1, None], kernel, shape[0])
    return SeparableTaps(row_index[0], row_weight[0], column_index, column_weight, rows[0], columns)


def _resample_separable(values: Tensor, valid: Tensor, landing: Tensor, taps: SeparableTaps) -> tuple[Tensor, Tensor]:
    """Views that share their rows: one pass down the source's columns under all of them, then one across
    per view."""
    device = values.device
    bands = values.shape[0]
    count, size = taps.columns.shape
    rows, columns = taps.window
    stack = _premultiplied(values[:, rows, columns], valid[rows, columns])
    # Down the columns once for every view of the row, then across per view: each pass one sparse product
    # (a row of the matrix per output pixel, a weight per kernel tap).
    down = _tap_matrix(taps.row_index.to(device) - rows.start, taps.row_weight.to(device), rows.stop - rows.start)
    down_pass = (down @ stack.permute(1, 0, 2).reshape(rows.stop - rows.start, -1)).reshape(size, bands + 1, -1)
    column_index = taps.column_index.to(device) - columns.start
    across = _tap_matrix(column_index, taps.column_weight.to(device), columns.stop - columns.start)
    across_pass = across @ down_pass.permute(2, 1, 0).reshape(columns.stop - columns.start, -1)
    out = across_pass.reshape(count, size, bands + 1, size).permute(0, 2, 3, 1)  # (N, bands + 1, rows, columns)
    return out, _landed(landing, taps.rows.to(device)[None, :, None], taps.columns.to(device)[:, None, :])


class ProjectedGrid(NamedTuple):
    """Where views' output pixel centres fall in a source in another CRS: source pixel coordinates (column,
    row) at PROJECTED_GRID_POINTS x PROJECTED_GRID_POINTS points per view, (N, G, G) each, mapped exactly
    (the pixels between are interpolated bilinearly); and each view's kernel scale (N,)."""

    columns: np.ndarray
    rows: np.ndarray
    scale: np.ndarray

    def of(self, views: slice) -> ProjectedGrid:
        return ProjectedGrid(self.columns[views], self.rows[views], self.scale[views])


@lru_cache(maxsize=8)
def _from_mercator(crs: str) -> Transformer:
    return Transformer.from_crs(WEB_MERCATOR, crs, always_xy=True)


def _projected_grid(source: SourcePixels, views: np.ndarray, size: int) -> ProjectedGrid:
    count = len(views)
    points = (np.linspace(0.5, size - 0.5, PROJECTED_GRID_POINTS) / size)[None, :]
    left, bottom, right, top = (views[:, index : index + 1] for index in range(4))
    x = np.broadcast_to(
        (left + points * (right - left))[:, None, :], (count, PROJECTED_GRID_POINTS, PROJECTED_GRID_POINTS)
    )
    y = np.broadcast_to((top - points * (top - bottom))[:, :, None], x.shape)
    source_x, source_y = _from_mercator(source.crs).transform(x, y)
    columns, rows = ~source.transform @ (np.asarray(source_x), np.asarray(source_y))
    # The output/source pixel ratio of each view, from its extent in source pixels (GDAL: its source window).
    # Bilinear interpolation between the points keeps the extremes at the points.
    centres_to_edges = size / (size - 1.0)
    extent_x = (columns.max(axis=(1, 2)) - columns.min(axis=(1, 2))) * centres_to_edges
    extent_y = (rows.max(axis=(1, 2)) - rows.min(axis=(1, 2))) * centres_to_edges
    shrink = torch.from_numpy(size / np.maximum(extent_x, extent_y)).clamp(max=1.0)
    return ProjectedGrid(columns, rows, _kernel_scale(shrink).numpy())


def _batches(count: int, most: int) -> list[slice]:
    return [slice(start, min(start + most, count)) for start in range(0, count, most)]


def _resample_projected(
    by_pixel: Tensor, landing: Tensor, grid: ProjectedGrid, size: int, kernel: Kernel
) -> tuple[Tensor, Tensor]:
    """Views from (H x W, bands + 1) values premultiplied by validity plus the valid weight, a source pixel a
    row: one sparse product with a row of 2-D kernel taps per output pixel."""
    device = by_pixel.device
    (height, width), bands, count = landing.shape, by_pixel.shape[1], len(grid.scale)
    coarse = torch.as_tensor(np.stack([grid.columns, grid.rows], axis=1), device=device, dtype=torch.float64)
    fine = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)
    # float32 from here: coordinates of a strip's pixels need no more than 1e-4 px.
    column_coords, row_coords = fine[:, 0].float(), fine[:, 1].float()
    scale = torch.as_tensor(grid.scale, device=device, dtype=torch.float32)[:, None, None]
    column_index, column_weight = _taps(column_coords, scale, kernel, width)
    row_index, row_weight = _taps(row_coords, scale, kernel, height)
    flat = row_index[..., :, None] * width + column_index[..., None, :]  # (N, S, S, K, K)
    weights = row_weight[..., :, None] * column_weight[..., None, :]
    pixels = count * size * size
    taps = _tap_matrix(flat.reshape(pixels, -1), weights.reshape(pixels, -1), height * width)
    out = (taps @ by_pixel).reshape(count, size, size, bands).permute(0, 3, 1, 2)
    return out, _landed(landing, row_coords, column_coords)


@numba.njit(cache=True, nogil=True, inline="always")
def _tap_weight(x: float, pieces: np.ndarray) -> float:
    t = abs(x)
    piece = int(t)
    if piece >= pieces.shape[0]:
        return 0.0
    return pieces[piece, 0] + t * (pieces[piece, 1] + t * (pieces[piece, 2] + t * pieces[piece, 3]))


@numba.njit(cache=True, nogil=True, inline="always")
def _store(
    pixels: np.ndarray,
    at: tuple[int, int, int],
    red: np.float32,
    green: np.float32,
    blue: np.float32,
    valid: np.float32,
    gain: np.float32,
    offset: np.float32,
) -> None:
    """Renormalise kernel sums by their valid weight, stretch, round and store them at (view, row, column).
    float32 throughout, as the sparse products on other devices take them: float64 sums cost a conversion a tap."""
    view, row, column = at
    factor = gain / max(valid, np.float32(_MIN_WEIGHT))
    lowest, highest = np.float32(0.0), np.float32(_UINT8_MAX)
    pixels[view, 0, row, column] = np.uint8(min(max(red * factor + offset, lowest), highest))
    pixels[view, 1, row, column] = np.uint8(min(max(green * factor + offset, lowest), highest))
    pixels[view, 2, row, column] = np.uint8(min(max(blue * factor + offset, lowest), highest))


@numba.njit(cache=True, nogil=True)
def _interpolation_taps(size: int, points: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each of `size` outputs spread over `points` inputs (align_corners, as torch's bilinear): the first
    input, the next one and the weight of the next."""
    first = np.empty(size, np.int64)
    second = np.empty(size, np.int64)
    weight = np.empty(size)
    step = (points - 1.0) / (size - 1.0)
    for index in range(size):
        position = step * index
        first[index] = int(position)
        second[index] = first[index] + 1 if first[index] < points - 1 else first[index]
        weight[index] = position - first[index]
    return first, second, weight


@numba.njit(cache=True, nogil=True, parallel=True)
def _cut_points(
    stack: np.ndarray,
    landing: np.ndarray,
    coarse_columns: np.ndarray,
    coarse_rows: np.ndarray,
    scales: np.ndarray,
    pieces: np.ndarray,
    low: float,
    gain: float,
    pixels: np.ndarray,
    landed: np.ndarray,
) -> None:
    """Views into `pixels` (N, 3, S, S) uint8 and where they hold imagery into `landed` (N, S, S): for each
    output pixel, its source coordinates interpolated from the view's grid, whether its centre lands on
    `landing`, and the kernel-weighted sum of the pixels of `stack` ((H, W, 4) float32: three values
    premultiplied by validity, then the validity) under it, renormalised and stretched. The channels are
    spelled out: loops over them run at half the speed."""
    height, width = landing.shape
    count, points, size = coarse_columns.shape[0], coarse_columns.shape[1], pixels.shape[-1]
    first, second, weight = _interpolation_taps(size, points)
    flat = stack.reshape(-1)
    gain32, offset = np.float32(gain), np.float32(0.5 - low * gain)
    radius = pieces.shape[0]
    for view in numba.prange(count):
        scale = scales[view]
        # Source pixels further than this from an output pixel centre have no weight.
        span = radius / scale
        across = np.empty(2 * math.ceil(span) + 1, np.float32)
        line_columns = np.empty(points)
        line_rows = np.empty(points)
        for out_row in range(size):
            top, bottom, lower = first[out_row], second[out_row], weight[out_row]
            for point in range(points):
                line_columns[point] = (1.0 - lower) * coarse_columns[view, top, point] + lower * coarse_columns[
                    view, bottom, point
                ]
                line_rows[point] = (1.0 - lower) * coarse_rows[view, top, point] + lower * coarse_rows[
                    view, bottom, point
                ]
            for out_column in range(size):
                left, right, share = first[out_column], second[out_column], weight[out_column]
                # float32, as the sparse products on other devices take them.
                column = np.float32((1.0 - share) * line_columns[left] + share * line_columns[right])
                row = np.float32((1.0 - share) * line_rows[left] + share * line_rows[right])
                if not (math.isfinite(column) and math.isfinite(row)):
                    continue
                land_row, land_column = math.floor(row), math.floor(column)
                if not (0 <= land_row < height and 0 <= land_column < width and landing[land_row, land_column]):
                    continue
                landed[view, out_row, out_column] = True
                # Pixel j spans j..j+1: kernel positions are measured from centres.
                at_column, at_row = column - 0.5, row - 0.5
                first_column = max(math.floor(at_column - span) + 1, 0)
                last_column = min(math.ceil(at_column + span) - 1, width - 1)
                first_row = max(math.floor(at_row - span) + 1, 0)
                last_row = min(math.ceil(at_row + span) - 1, height - 1)
                for tap in range(last_column - first_column + 1):
                    across[tap] = _tap_weight((first_column + tap - at_column) * scale, pieces)
                red = green = blue = valid = np.float32(0.0)
                for source_row in range(first_row, last_row + 1):
                    down = np.float32(_tap_weight((source_row - at_row) * scale, pieces))
                    row_red = row_green = row_blue = row_valid = np.float32(0.0)
                    at = (source_row * width + first_column) * 4
                    for tap in range(last_column - first_column + 1):
                        tap_weight = across[tap]
                        row_red += tap_weight * flat[at]
                        row_green += tap_weight * flat[at + 1]
                        row_blue += tap_weight * flat[at + 2]
                        row_valid += tap_weight * flat[at + 3]
                        at += 4
                    red += down * row_red
                    green += down * row_green
                    blue += down * row_blue
                    valid += down * row_valid
                _store(pixels, (view, out_row, out_column), red, green, blue, valid, gain32, offset)


@numba.njit(cache=True, nogil=True, parallel=True)
def _cut_rows(
    stack: np.ndarray,
    window: tuple[int, int],
    landing: np.ndarray,
    row_index: np.ndarray,
    row_weight: np.ndarray,
    column_index: np.ndarray,
    column_weight: np.ndarray,
    rows: np.ndarray,
    columns: np.ndarray,
    low: float,
    gain: float,
    pixels: np.ndarray,
    landed: np.ndarray,
) -> None:
    """Views into `pixels` (N, 3, S, S) uint8 and where they hold imagery into `landed` (N, S, S), from the
    source's `stack` ((H, W, 4) float32: three values premultiplied by validity, then the validity), for views
    that share their rows: taps down (S, K) as source rows and across (N, S, K) as columns of the `window`
    (first and end column) under them, with their weights; `rows` (S,) and `columns` (N, S) are output pixel
    centres in source coordinates, which decide where a view holds imagery on `landing`."""
    height, width = landing.shape
    size, count = rows.shape[0], columns.shape[0]
    channels = stack.shape[2]
    first_value, end_value = window[0] * channels, window[1] * channels
    # Down the window with each line's channels flattened: one contiguous loop per tap, which vectorises. Lines
    # are sliced before the loops: indexes that start at 0 spare numba's check for negative ones, which would
    # keep LLVM from vectorising (2-3x slower).
    source_lines = stack.reshape(height, width * channels)
    down_lines = np.zeros((size, end_value - first_value), np.float32)
    for out_row in numba.prange(size):
        line = down_lines[out_row]
        for tap in range(row_index.shape[1]):
            weight = row_weight[out_row, tap]
            if weight == 0.0:
                continue
            source = source_lines[row_index[out_row, tap], first_value:end_value]
            for at in range(end_value - first_value):
                line[at] += weight * source[at]
    gain32, offset = np.float32(gain), np.float32(0.5 - low * gain)
    for view in numba.prange(count):
        view_columns, view_index, view_weight = columns[view], column_index[view], column_weight[view]
        for out_row in range(size):
            land_row = math.floor(rows[out_row])
            if not 0 <= land_row < height:
                continue
            line, landing_line = down_lines[out_row], landing[land_row]
            for out_column in range(size):
                land_column = math.floor(view_columns[out_column])
                if not (0 <= land_column < width and landing_line[land_column]):
                    continue
                landed[view, out_row, out_column] = True
                red = green = blue = valid = np.float32(0.0)
                index, weights = view_index[out_column], view_weight[out_column]
                for tap in range(index.shape[0]):
                    weight, at = weights[tap], index[tap] * channels
                    red += weight * line[at]
                    green += weight * line[at + 1]
                    blue += weight * line[at + 2]
                    valid += weight * line[at + 3]
                _store(pixels, (view, out_row, out_column), red, green, blue, valid, gain32, offset)


@numba.njit(cache=True, nogil=True, parallel=True)
def _channels_last(
    values: np.ndarray, valid: np.ndarray, first: int, extent: tuple[int, int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 4) float32 from `values` (bands, H, W) and `valid` (H, W): bands `first` to `first + 2` of each
    pixel (the last band repeated past the end: grey becomes RGB) premultiplied by its validity, then its
    validity, which is 0 also where any band is not finite; and, in the same pass, `_landing`'s (H, W) mask
    for `extent` (first column, first row, end column, end row). Selects, not branches: the pass runs at the
    speed of memory."""
    bands, height, width = values.shape
    first_column, first_row, end_column, end_row = extent
    stack = np.empty((height, width, RGB_BANDS + 1), np.float32)
    landing = np.empty((height, width), np.bool_)
    last = bands - 1
    red, green, blue = min(first, last), min(first + 1, last), min(first + 2, last)
    zero = np.float32(0.0)
    for row in numba.prange(height):
        row_inside = first_row <= row < end_row
        for column in range(width):
            holds = valid[row, column]
            for band in range(bands):
                holds &= math.isfinite(values[band, row, column])
            stack[row, column, 0] = np.float32(values[red, row, column]) if holds else zero
            stack[row, column, 1] = np.float32(values[green, row, column]) if holds else zero
            stack[row, column, 2] = np.float32(values[blue, row, column]) if holds else zero
            stack[row, column, RGB_BANDS] = np.float32(1.0) if holds else zero
            landing[row, column] = holds and row_inside and first_column <= column < end_column
    return stack, landing


@numba.njit(cache=True, nogil=True, parallel=True)
def _slice_blocks(
    block_pixels: np.ndarray,
    block_landed: np.ndarray,
    block: np.ndarray,
    shift: np.ndarray,
    pixels: np.ndarray,
    landed: np.ndarray,
) -> None:
    """Views into `pixels` (N, bands, S, S) and `landed` (N, S, S), copied from blocks side by side: view i
    starts `shift[i]` columns into block `block[i]` and runs on into the next."""
    size = pixels.shape[-1]
    for view in numba.prange(pixels.shape[0]):
        first, at = block[view], shift[view]
        rest = size - at
        for row in range(size):
            for band in range(pixels.shape[1]):
                pixels[view, band, row, :rest] = block_pixels[first, band, row, at:]
            landed[view, row, :rest] = block_landed[first, row, at:]
            if at:
                for band in range(pixels.shape[1]):
                    pixels[view, band, row, rest:] = block_pixels[first + 1, band, row, :at]
                landed[view, row, rest:] = block_landed[first + 1, row, :at]

"""Embed chunks' tiles: one long-lived process per job loops over many chunks, reading the next strips of
imagery in loader processes while the model runs.

Each output tile is scored by the model's view centred on it, to within half a pixel
(`pipeline.geometry.view_bounds`). A chunk's views are read in strips (`pipeline.imagery.base.read_strips`):
each source pixel once, then every view is cut from the strip on the model's device (`pipeline.views.cut_views`;
overlapping views share their resampled pixels too), or by the loader processes on their CPUs
(`EmbedOptions.cut_in_loaders`: `benchmarks/bench_embed.py` measures both; jobs cut on the device). A tile whose
view holds imagery on less than `min_coverage` of its pixels is invalid: the model does not see it and its
outputs are empty. So is a tile whose view touches imagery that could not be had (`imagery.on_missing:
leave_empty`): its score would change.
chunks/<chunk>.npz holds, per tile of the chunk (row by row):

    x, y                     output tile coordinates (int64)
    row, col                 grid position (int32)
    coverage                 fraction of the view with imagery (float32)
    valid                    coverage >= min_coverage and not unavailable (bool)
    unavailable              the view touches source imagery that could not be had, so the tile is empty (bool)
    unavailable_source_tiles (K, 3) int64 z, x, y of the source tiles that could not be had
    month, hour              (T,) int64 the build's times (`model.month` x `model.hour`, month-major), -1 unknown
    embedding                (T, N, D) float16, L2-normalised, zero where invalid
    concept_index            (T, N, k) int32 top-k codebook concepts, -1 where invalid or weight 0
    concept_weight           (T, N, k) float32 their sparse codebook weights, 0 where invalid
    stamp                    what the chunk was made from (settings, times, weights, tiles): a rerun keeps a
                             chunk whose stamp matches and that lacks no imagery, so a killed job resumes chunk
                             by chunk and a rerun retries the imagery that could not be had

Times: only the metadata tokens change from one time to the next, so a strip is read and cut once, and per batch
the ViT runs once; each time then runs only the fusion transformer and the codebook pooling
(`Sat2SoundEncoder.image_concepts`). `TimeCosts` measures the first time step (ViT included) against the
extra ones.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from rasterio.warp import transform_bounds
from torch.utils.data import DataLoader, Dataset

from common.atomic import atomic_save_npz
from model import MODEL_INPUT_PX, Metadata, Sat2SoundEncoder
from pipeline.config import ImagerySettings, Time
from pipeline.geometry import WEB_MERCATOR, ViewStrip
from pipeline.imagery import ImageryReader
from pipeline.imagery.base import SourcePixels, read_strips
from pipeline.plan import ChunkTiles
from pipeline.store.layout import time_coordinate
from pipeline.views import KERNELS, ViewBatch, cut_views, to_device

# `batch_size: auto` on a GPU tries batches from AUTO_BATCH_START up to AUTO_BATCH_LIMIT (doubling), and keeps
# the largest whose forward pass peaks within AUTO_BATCH_MEMORY_SHARE of the device's memory: the rest holds the
# views cut on the device and the allocator's fragments (an H200 ran out of memory at a batch that had fit).
AUTO_BATCH_START = 64
AUTO_BATCH_LIMIT = 4096
AUTO_BATCH_MEMORY_SHARE = 0.5
CPU_BATCH_SIZE = 64
# Progress lines go to the job log: one every this many seconds at most.
PROGRESS_SECONDS = 10.0


class EmbedOptions(NamedTuple):
    """How chunks are embedded: the times for withmeta models, batching, loader processes, concepts kept, and
    whether views are cut in the loader processes (on their CPUs) rather than where the model runs."""

    times: tuple[Time, ...]
    batch_size: int
    loader_workers: int
    top_k: int
    cut_in_loaders: bool = False


class CutStrip(NamedTuple):
    """A strip's views, cut: which chunk (its position in the job), which views, the views (`ViewBatch`),
    whether each touches source imagery that could not be had, and those source items (z, x, y)."""

    chunk: int
    strip: ViewStrip
    batch: ViewBatch
    touched: np.ndarray
    unavailable_tiles: tuple[tuple[int, int, int], ...]

    def cut(self, device: torch.device) -> CutStrip:
        """The views on `device` (from pinned memory on a GPU, without waiting for the copy)."""
        return self._replace(batch=self.batch._replace(pixels=to_device(self.batch.pixels, device)))


class StripRead(NamedTuple):
    """One strip of one chunk: which chunk (its position in the job), which views, and their source pixels."""

    chunk: int
    strip: ViewStrip
    views: np.ndarray
    pixels: SourcePixels

    def cut(self, device: torch.device) -> CutStrip:
        """The strip's views cut on `device` (`pipeline.views.cut_views`)."""
        pixels = self.pixels
        return CutStrip(
            self.chunk,
            self.strip,
            cut_views(pixels, self.views, MODEL_INPUT_PX, device=device),
            touches_unavailable(pixels, self.views, MODEL_INPUT_PX),
            pixels.unavailable_tiles,
        )


class StripReads(Dataset[StripRead | CutStrip]):
    """The strips of a job's chunks in order, each read in whichever process asks (loader workers open their
    own reader on first use), and cut there too when `cut_here` (on that process's CPU)."""

    def __init__(self, chunks: Sequence[ChunkTiles], imagery: ImagerySettings, *, cut_here: bool = False) -> None:
        self._chunks = chunks
        self._imagery = imagery
        self.cut_here = cut_here
        self.strips = [strips_of(chunk) for chunk in chunks]
        self._items = [(position, strip) for position, strips in enumerate(self.strips) for strip in strips]
        self._reader: ImageryReader | None = None

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> StripRead | CutStrip:
        if self._reader is None:
            self._reader = self._imagery.open_reader()
        position, strip = self._items[index]
        views = self._chunks[position].views[strip.start : strip.stop]
        read = StripRead(position, strip, views, self._reader.source_pixels(views, MODEL_INPUT_PX))
        return read.cut(torch.device("cpu")) if self.cut_here else read

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


def as_read(read: StripRead | CutStrip) -> StripRead | CutStrip:
    """The loader's collate function: reads pass as they are (its default would make their arrays tensors)."""
    return read


def strips_of(chunk: ChunkTiles) -> list[ViewStrip]:
    return read_strips(chunk.views, MODEL_INPUT_PX)


def tile_metadata(lat: np.ndarray, lon: np.ndarray, time: Time) -> Metadata:
    """Each tile's own centre, with one month and hour (unknown where None)."""
    count = len(lat)
    month = None if time.month is None else np.full(count, time.month)
    hour = None if time.hour is None else np.full(count, time.hour)
    return Metadata.from_values(lat, lon, month=month, hour=hour)


def chunk_stamp(chunk: ChunkTiles, settings_digest: str, model_sha256: str, times: Sequence[Time]) -> str:
    """What a chunk's embeddings depend on: the embed step's settings, the times, the weights and the chunk's
    tiles."""
    digest = hashlib.sha256(f"{settings_digest}/{model_sha256}/{[tuple(time) for time in times]}".encode())
    digest.update(np.ascontiguousarray(chunk.x).tobytes())
    digest.update(np.ascontiguousarray(chunk.y).tobytes())
    return digest.hexdigest()[:24]


def is_done(path: Path, stamp: str) -> bool:
    """Whether `path` holds a finished chunk made from the same inputs, none of which was unavailable."""
    try:
        with np.load(path) as archive:
            lacking = "unavailable_source_tiles" in archive.files and len(archive["unavailable_source_tiles"]) > 0
            return str(archive["stamp"]) == stamp and not lacking
    except (OSError, ValueError, KeyError):
        return False


class TimeCosts:
    """Model seconds of the first time step of each batch (the ViT included) and of the extra ones, and the tiles
    they embedded."""

    def __init__(self) -> None:
        self.first_s = 0.0
        self.extra_s = 0.0
        self.tiles = 0
        self.extra_steps = 0

    def record(self, step: int, seconds: float) -> None:
        if step == 0:
            self.first_s += seconds
        else:
            self.extra_s += seconds

    def count(self, tiles: int, steps: int) -> None:
        self.tiles += tiles
        self.extra_steps = steps - 1

    @classmethod
    def of_job(cls, reports: Sequence[ChunkReport], steps: int) -> TimeCosts:
        """The costs of the chunks a job made (not those kept from an earlier run), each with `steps` times."""
        costs = cls()
        for report in reports:
            if not report.reused:
                costs.first_s += report.first_time_s
                costs.extra_s += report.extra_times_s
                costs.count(report.valid or 0, steps)
        return costs

    def line(self) -> str | None:
        """The log line "first time step X ms/tile, each extra time step Y ms/tile (ratio ...)", or None without
        tiles or extra steps."""
        if not self.tiles or not self.extra_steps:
            return None
        first = self.first_s / self.tiles
        extra = self.extra_s / (self.tiles * self.extra_steps)
        return (
            f"first time step {first * 1000:,.2f} ms/tile, each extra time step {extra * 1000:,.2f} ms/tile"
            f" ({extra / max(first, 1e-12):.2f} of the first; {self.extra_steps + 1} times)"
        )


def stage_line(reports: Sequence[ChunkReport]) -> str | None:
    """Where the chunks a job made spent their time: "waited X s for imagery, cut views Y s, model Z s"
    (None when it made none)."""
    made = [report for report in reports if not report.reused]
    if not made:
        return None
    wait, cut = sum(r.imagery_wait_s for r in made), sum(r.cut_s for r in made)
    model = sum(r.first_time_s + r.extra_times_s for r in made)
    return f"waited {wait:,.1f} s for imagery, cut views {cut:,.1f} s, model {model:,.1f} s"


class ChunkResult:
    """A chunk's outputs as they fill in, strip by strip."""

    def __init__(self, chunk: ChunkTiles, codebook_dim: int, options: EmbedOptions, strips: int) -> None:
        count, times, top_k = chunk.tile_count, len(options.times), options.top_k
        self.chunk = chunk
        self.times = options.times
        self.embedding = np.zeros((times, count, codebook_dim), np.float16)
        self.concept_index = np.full((times, count, top_k), -1, np.int32)
        self.concept_weight = np.zeros((times, count, top_k), np.float32)
        self.costs = TimeCosts()
        self.imagery_wait_s = 0.0
        self.cut_s = 0.0
        self.coverage = np.zeros(count, np.float32)
        self.unavailable = np.zeros(count, bool)
        self.unavailable_tiles: set[tuple[int, int, int]] = set()
        self.strips_left = strips

    def save(self, out: Path, min_coverage: float, stamp: str) -> int:
        chunk, valid = self.chunk, (self.coverage >= min_coverage) & ~self.unavailable
        source_tiles = np.array(sorted(self.unavailable_tiles), np.int64).reshape(-1, 3)
        arrays = {
            "x": chunk.x,
            "y": chunk.y,
            "row": chunk.row,
            "col": chunk.col,
            "coverage": self.coverage,
            "valid": valid,
            "unavailable": self.unavailable,
            "unavailable_source_tiles": source_tiles,
            "month": time_coordinate([moment.month for moment in self.times]),
            "hour": time_coordinate([moment.hour for moment in self.times]),
            "embedding": self.embedding,
            "concept_index": self.concept_index,
            "concept_weight": self.concept_weight,
            "stamp": np.array(stamp),
        }
        atomic_save_npz(out, arrays)
        return int(valid.sum())


class ChunkReport(NamedTuple):
    """What a chunk got: its tiles, how many are valid (None: kept from an earlier run, not read again), how
    many were left empty because their imagery could not be had, out of how many distinct source tiles, the
    model seconds of its first and of its extra time steps (`TimeCosts`), the seconds the job waited for its
    strips from the loader processes and those it spent cutting their views."""

    chunk: str
    tiles: int
    valid: int | None
    reused: bool
    empty_unavailable: int = 0
    unavailable_source_tiles: int = 0
    first_time_s: float = 0.0
    extra_times_s: float = 0.0
    imagery_wait_s: float = 0.0
    cut_s: float = 0.0


def embed_chunks(
    chunks: Sequence[ChunkTiles],
    zoom_level: int,
    encoder: Sat2SoundEncoder,
    imagery: ImagerySettings,
    options: EmbedOptions,
    out_dir: Path,
    stamp_of: Callable[[ChunkTiles], str],
) -> list[ChunkReport]:
    """Write chunks/<chunk>.npz for every chunk whose file is missing or stale; returns what each chunk got."""
    stamps = {chunk.id: stamp_of(chunk) for chunk in chunks}
    reports = {}
    pending = []
    for chunk in chunks:
        if is_done(out_dir / f"{chunk.id}.npz", stamps[chunk.id]):
            reports[chunk.id] = ChunkReport(chunk.id, chunk.tile_count, None, reused=True)
        else:
            pending.append(chunk)
    reads = StripReads(pending, imagery, cut_here=options.cut_in_loaders and options.loader_workers > 0)
    loader = DataLoader(
        reads,
        batch_size=None,
        num_workers=options.loader_workers,
        prefetch_factor=2 if options.loader_workers else None,
        collate_fn=as_read,  # type: ignore[arg-type]  # torch's stub types the batching collate, not batch_size=None's
        pin_memory=reads.cut_here and encoder.device.type == "cuda",
    )
    results: dict[int, ChunkResult] = {}
    progress = Progress(sum(chunk.tile_count for chunk in pending))
    asked = time.perf_counter()
    for read in loader:
        waited = time.perf_counter() - asked
        chunk = pending[read.chunk]
        if read.chunk not in results:
            strips = len(reads.strips[read.chunk])
            results[read.chunk] = ChunkResult(chunk, encoder.cfg.codebook_dim, options, strips)
        result = results[read.chunk]
        result.imagery_wait_s += waited
        _embed_strip(read, result, zoom_level, encoder, imagery, options)
        progress.advance(read.strip.stop - read.strip.start)
        result.strips_left -= 1
        if result.strips_left == 0:
            valid = result.save(out_dir / f"{chunk.id}.npz", imagery.min_coverage, stamps[chunk.id])
            reports[chunk.id] = ChunkReport(
                chunk.id,
                chunk.tile_count,
                valid,
                reused=False,
                empty_unavailable=int(result.unavailable.sum()),
                unavailable_source_tiles=len(result.unavailable_tiles),
                first_time_s=round(result.costs.first_s, 6),
                extra_times_s=round(result.costs.extra_s, 6),
                imagery_wait_s=round(result.imagery_wait_s, 6),
                cut_s=round(result.cut_s, 6),
            )
            del results[read.chunk]
        asked = time.perf_counter()
    reads.close()
    progress.close()
    return [reports[chunk.id] for chunk in chunks]


def _embed_strip(
    read: StripRead | CutStrip,
    result: ChunkResult,
    zoom_level: int,
    encoder: Sat2SoundEncoder,
    imagery: ImagerySettings,
    options: EmbedOptions,
) -> None:
    chunk, strip = result.chunk, read.strip
    start = time.perf_counter()
    cut = read.cut(encoder.device)
    batch, touched = cut.batch, cut.touched
    coverage = batch.coverage.cpu().numpy()  # on the host: the cut is done
    result.cut_s += time.perf_counter() - start
    result.coverage[strip.start : strip.stop] = coverage
    result.unavailable[strip.start : strip.stop] = touched
    result.unavailable_tiles.update(cut.unavailable_tiles)
    chosen = np.flatnonzero((coverage >= imagery.min_coverage) & ~touched)
    for first in range(0, len(chosen), options.batch_size):
        local = chosen[first : first + options.batch_size]
        rows = strip.start + local
        metas = [
            tile_metadata(chunk.lat[rows], chunk.lon[rows], moment) if encoder.cfg.metadata else None
            for moment in options.times
        ]
        images = batch.pixels[torch.as_tensor(local, device=batch.pixels.device)]
        outputs = encoder.image_concepts(images, zoom_level, metas, options.top_k)
        for step in range(len(metas)):
            start = time.perf_counter()
            out = next(outputs)  # on the CPU already: the step's work is done when it comes
            result.costs.record(step, time.perf_counter() - start)
            result.embedding[step, rows] = out.embedding.numpy().astype(np.float16)
            result.concept_index[step, rows] = out.concept_index.numpy()
            result.concept_weight[step, rows] = out.concept_weight.numpy()
        result.costs.count(len(rows), len(metas))


def touches_unavailable(source: SourcePixels, views: np.ndarray, size: int) -> np.ndarray:
    """(N,) whether each of `views` ((N, 4) EPSG:3857 bounds, cut at `size` px) would take any weight from a
    source pixel marked unavailable: the view's footprint in source pixels, widened by the resampling kernel's
    reach (scaled when the view shrinks the source) and one pixel for the centre rule."""
    views = np.asarray(views, dtype=np.float64).reshape(-1, 4)
    if source.unavailable is None or not source.unavailable.any():
        return np.zeros(len(views), bool)
    if source.crs != WEB_MERCATOR:
        views = np.array([transform_bounds(WEB_MERCATOR, source.crs, *view, densify_pts=21) for view in views])
    mask = np.asarray(source.unavailable, bool)
    height, width = mask.shape
    table = np.zeros((height + 1, width + 1), np.int64)
    table[1:, 1:] = mask.cumsum(0).cumsum(1)
    inverse = ~source.transform
    columns_a, rows_a = inverse @ (views[:, 0], views[:, 3])
    columns_b, rows_b = inverse @ (views[:, 2], views[:, 1])
    first_column, last_column = np.minimum(columns_a, columns_b), np.maximum(columns_a, columns_b)
    first_row, last_row = np.minimum(rows_a, rows_b), np.maximum(rows_a, rows_b)
    shrink = np.maximum(1.0, np.maximum(last_column - first_column, last_row - first_row) / size)
    reach = KERNELS[source.resampling].radius * shrink + 1.0
    c0 = np.clip(np.floor(first_column - reach), 0, width).astype(np.int64)
    c1 = np.clip(np.ceil(last_column + reach), 0, width).astype(np.int64)
    r0 = np.clip(np.floor(first_row - reach), 0, height).astype(np.int64)
    r1 = np.clip(np.ceil(last_row + reach), 0, height).astype(np.int64)
    counts = table[r1, c1] - table[r0, c1] - table[r1, c0] + table[r0, c0]
    return np.asarray(counts > 0)


class Progress:
    """Tiles done, with rate and time left, in the job log at most every PROGRESS_SECONDS, and once more at the end
    for tiles done since the last line. Each line's rate is that since the line before: the first strip also
    pays for the first reads and, after an install, for compiling the view kernels, and a rate since the start
    would overstate the time left all job long (the job's summary line gives its whole rate)."""

    def __init__(self, total: int, clock: Callable[[], float] = time.perf_counter) -> None:
        self.total = total
        self.done = 0
        self._clock = clock
        self._last = clock()
        self._done_at_last = 0

    def advance(self, tiles: int) -> None:
        self.done += tiles
        if self._clock() - self._last >= PROGRESS_SECONDS:
            self._report()

    def close(self) -> None:
        if self.done > self._done_at_last:
            self._report()

    def _report(self) -> None:
        now = self._clock()
        print(self._line(self.done - self._done_at_last, now - self._last), flush=True)
        self._last, self._done_at_last = now, self.done

    def _line(self, tiles: int, seconds: float) -> str:
        rate = tiles / max(seconds, 1e-9)
        left = (self.total - self.done) / rate if rate else float("inf")
        return f"embed: {self.done:,}/{self.total:,} tiles, {rate:,.1f} tiles/s, {left:,.0f} s left"


def largest_batch(fits: Callable[[int], bool], start: int = AUTO_BATCH_START, limit: int = AUTO_BATCH_LIMIT) -> int:
    """The largest batch size, doubling from `start` up to `limit`, for which `fits` holds (at least `start`)."""
    size = start
    while size * 2 <= limit and fits(size * 2):
        size *= 2
    return size


def auto_batch_size(encoder: Sat2SoundEncoder, zoom_level: int) -> int:
    """`batch_size: auto`: CPU_BATCH_SIZE on a CPU (larger batches gain nothing there); on a GPU the largest
    batch whose forward pass peaks within AUTO_BATCH_MEMORY_SHARE of its memory."""
    if encoder.device.type != "cuda":
        return CPU_BATCH_SIZE
    budget = AUTO_BATCH_MEMORY_SHARE * torch.cuda.get_device_properties(encoder.device).total_memory

    def fits(size: int) -> bool:
        images = torch.zeros((size, 3, MODEL_INPUT_PX, MODEL_INPUT_PX), dtype=torch.uint8, device=encoder.device)
        meta = tile_metadata(np.zeros(size), np.zeros(size), Time(None, None))
        torch.cuda.reset_peak_memory_stats(encoder.device)
        try:
            encoder.embed_images(images, zoom_level, meta if encoder.cfg.metadata else None)
        except torch.OutOfMemoryError:
            return False
        finally:
            del images
            torch.cuda.empty_cache()
        return torch.cuda.max_memory_allocated(encoder.device) <= budget

    return largest_batch(fits)

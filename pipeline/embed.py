"""Embed one chunk's tiles: batched inference with imagery read in loader processes while the model runs.

Each output tile is scored by the model's view centred on it (`pipeline.geometry.footprint`). A tile whose
view holds imagery on less than `min_coverage` of its pixels is invalid: the model does not see it and
its outputs are empty. chunks/<chunk>.npz holds, per tile of the chunk (row by row):

    x, y                     output tile coordinates (int64)
    row, col                 grid position (int32)
    coverage                 fraction of the view with imagery (float32)
    valid                    coverage >= min_coverage (bool)
    embedding                (N, D) float16, L2-normalised, zero where invalid
    concept_index            (N, k) int32 top-k codebook concepts, -1 where invalid or weight 0
    concept_weight           (N, k) float32 their sparse codebook weights, 0 where invalid
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from common.atomic import atomic_save_npz
from model import MODEL_INPUT_PX, Metadata, Sat2SoundEncoder
from pipeline.config import ImagerySettings
from pipeline.geometry import Bounds
from pipeline.imagery import ImageryReader
from pipeline.plan import ChunkTiles

LOADER_BATCH = 8
# Progress lines go to the job log: one every this many seconds at most.
PROGRESS_SECONDS = 10.0


class ViewImages(Dataset):
    """Model views as uint8 RGB (3, 224, 224) (no-imagery pixels black) plus their imagery coverage.

    The reader opens lazily inside whichever process reads, so each loader worker has its own.
    """

    def __init__(self, views: list[Bounds], imagery: ImagerySettings) -> None:
        self._views = views
        self._imagery = imagery
        self._reader: ImageryReader | None = None

    def __len__(self) -> int:
        return len(self._views)

    def __getitem__(self, index: int) -> tuple[np.ndarray, float]:
        if self._reader is None:
            self._reader = self._imagery.open_reader()
        image = self._reader.part(self._views[index], MODEL_INPUT_PX, MODEL_INPUT_PX)
        return np.ma.filled(image.array, 0), image.coverage

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


def top_concepts(weights: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (int32, -1 where the weight is 0) and weights of the k largest codebook weights per row."""
    values, indices = torch.topk(weights, k, dim=1)
    values_np = values.numpy().astype(np.float32)
    return np.where(values_np > 0, indices.numpy(), -1).astype(np.int32), values_np


class EmbedOptions(NamedTuple):
    """How a chunk is embedded: metadata for withmeta models, batching, loader processes, concepts kept."""

    month: int | None
    hour: int | None
    batch_size: int
    loader_workers: int
    top_k: int


def tile_metadata(lat: np.ndarray, lon: np.ndarray, options: EmbedOptions) -> Metadata:
    """Each tile's own centre, with the build's month and hour (unknown where None)."""
    count = len(lat)
    month = None if options.month is None else np.full(count, options.month)
    hour = None if options.hour is None else np.full(count, options.hour)
    return Metadata.from_values(lat, lon, month=month, hour=hour)


def model_batches(loader: Iterable[tuple[Tensor, Tensor]], size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Regroup the loader's small batches into batches of `size` (the last one may be smaller)."""
    pixels: list[Tensor] = []
    coverage: list[Tensor] = []
    held = 0
    for batch_pixels, batch_coverage in loader:
        pixels.append(batch_pixels)
        coverage.append(batch_coverage)
        held += len(batch_pixels)
        while held >= size:
            all_pixels, all_coverage = torch.cat(pixels), torch.cat(coverage)
            yield all_pixels[:size], all_coverage[:size]
            pixels, coverage, held = [all_pixels[size:]], [all_coverage[size:]], held - size
    if held:
        yield torch.cat(pixels), torch.cat(coverage)


def embed_chunk(
    chunk: ChunkTiles,
    zoom_level: int,
    encoder: Sat2SoundEncoder,
    imagery: ImagerySettings,
    options: EmbedOptions,
    out: Path,
) -> int:
    """Write chunks/<chunk>.npz; returns the number of valid tiles."""
    count, top_k = len(chunk), options.top_k
    embedding = np.zeros((count, encoder.cfg.codebook_dim), np.float16)
    concept_index = np.full((count, top_k), -1, np.int32)
    concept_weight = np.zeros((count, top_k), np.float32)
    coverage = np.zeros(count, np.float32)
    images = ViewImages(chunk.view_bounds(), imagery)
    # Workers hand over a few views at a time, so that all of them stay busy whatever the model batch.
    loader = DataLoader(images, batch_size=LOADER_BATCH, num_workers=options.loader_workers)
    start = 0
    progress = tqdm(total=count, unit="tile", desc=f"embed {chunk.id}", mininterval=PROGRESS_SECONDS)
    for pixels, batch_coverage in model_batches(loader, options.batch_size):
        progress.update(len(pixels))
        stop = start + len(pixels)
        coverage[start:stop] = batch_coverage.numpy()
        rows = start + np.flatnonzero(coverage[start:stop] >= imagery.min_coverage)
        if len(rows):
            meta = tile_metadata(chunk.lat[rows], chunk.lon[rows], options) if encoder.cfg.metadata else None
            chosen = torch.from_numpy(rows - start)
            result = encoder.embed_images(pixels[chosen], zoom_level=zoom_level, metadata=meta)
            embedding[rows] = result.embedding.numpy().astype(np.float16)
            concept_index[rows], concept_weight[rows] = top_concepts(result.weights, top_k)
        start = stop
    progress.close()
    images.close()
    valid = coverage >= imagery.min_coverage
    atomic_save_npz(
        out,
        {
            "x": chunk.x,
            "y": chunk.y,
            "row": chunk.row,
            "col": chunk.col,
            "coverage": coverage,
            "valid": valid,
            "embedding": embedding,
            "concept_index": concept_index,
            "concept_weight": concept_weight,
        },
    )
    return int(valid.sum())

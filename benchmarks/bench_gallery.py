"""Top-k gallery retrieval for every tile of a build: 100,000 tiles against a 10,000-item gallery.

    python benchmarks/bench_gallery.py [--tiles 100000] [--items 10000] [--dims 64 1024] [--top-k 10]
                                       [--cores 2] [--block 10000] [--torch-device cuda]

The gallery is written and searched with `pipeline.gallery` exactly as `gallery build` writes and `listen` searches
one (random unit audio and caption embeddings, the demo model's logit scales); tiles are random unit vectors.
Printed per width: the seconds to write the gallery (embeddings, three indexes) and to open it, then per
direction (composed, audio, caption) the seconds to find the top-k items of every tile, in blocks of `--block`
tiles, with tiles/s, and the share of 500 sampled tiles whose top-k equals numpy's brute-force ranking (1.000 for
the exact index the rule picks at these sizes). With `--torch-device`, the same composed search as one matrix
product and `torch.topk` per block on that device (e.g. a GPU when faiss has none), with its agreement too.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np

from pipeline.gallery import (
    AUDIO,
    CAPTION,
    COMPOSED,
    DIRECTIONS,
    Gallery,
    composed_vectors,
    open_gallery,
    write_gallery,
)
from pipeline.gallery_sources import GalleryItem

SEED = 0
SAMPLED = 500
LOGIT_SCALES = {AUDIO: 2.63, CAPTION: 2.62}  # the demo model's, rounded


def unit_rows(count: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    rows = rng.standard_normal((count, dim), dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def blocks(tiles: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(tiles), size):
        yield tiles[start : start + size]


def written_gallery(folder: Path, items: int, dim: int, rng: np.random.Generator) -> tuple[Gallery, float, float]:
    embeddings = {AUDIO: unit_rows(items, dim, rng), CAPTION: unit_rows(items, dim, rng)}
    listed = [
        GalleryItem(f"item-{i}", f"caption {i}", f"/sounds/{i}.flac", None, 10.0, "CC0-1.0", "", None, None)
        for i in range(items)
    ]
    start = time.perf_counter()
    write_gallery(folder, listed, embeddings, "benchmark", "0" * 64, LOGIT_SCALES)
    written = time.perf_counter()
    gallery = open_gallery(folder)
    return gallery, written - start, time.perf_counter() - written


def brute_force(gallery: Gallery, tiles: np.ndarray, direction: str, k: int) -> np.ndarray:
    if direction == COMPOSED:
        matrix = composed_vectors(gallery.embeddings, LOGIT_SCALES)
    else:
        matrix = gallery.embeddings[direction]
    return np.argsort(-(tiles @ matrix.T), axis=1, kind="stable")[:, :k]


def agreement(found: np.ndarray, expected: np.ndarray) -> float:
    return float(np.mean([np.array_equal(a, b) for a, b in zip(found, expected, strict=True)]))


def faiss_run(gallery: Gallery, tiles: np.ndarray, args: argparse.Namespace) -> None:
    sample = tiles[:SAMPLED]
    for direction in DIRECTIONS:
        start = time.perf_counter()
        for block in blocks(tiles, args.block):
            gallery.search(block, args.top_k, direction)
        seconds = time.perf_counter() - start
        _, found = gallery.search(sample, args.top_k, direction)
        same = agreement(found, brute_force(gallery, sample, direction, args.top_k))
        print(
            f"  faiss {direction:8} {seconds:8.2f} s  {len(tiles) / seconds:12,.0f} tiles/s"
            f"  top-{args.top_k} identical to brute force {same:.3f}",
            flush=True,
        )


def torch_run(gallery: Gallery, tiles: np.ndarray, args: argparse.Namespace) -> None:
    import torch

    device = torch.device(args.torch_device)
    matrix = composed_vectors(gallery.embeddings, LOGIT_SCALES)
    items = torch.from_numpy(np.ascontiguousarray(matrix)).to(device)
    on_device = torch.from_numpy(tiles).to(device)
    start = time.perf_counter()
    for first in range(0, len(tiles), args.block):
        torch.topk(on_device[first : first + args.block] @ items.T, args.top_k, dim=1).indices.cpu()
    seconds = time.perf_counter() - start
    found = torch.topk(on_device[:SAMPLED] @ items.T, args.top_k, dim=1).indices.cpu().numpy()
    same = agreement(found, brute_force(gallery, tiles[:SAMPLED], COMPOSED, args.top_k))
    print(
        f"  torch {COMPOSED:8} {seconds:8.2f} s  {len(tiles) / seconds:12,.0f} tiles/s on {device}"
        f"  (tiles already there)  top-{args.top_k} identical to brute force {same:.3f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--block", type=int, default=10_000)
    parser.add_argument("--torch-device", help="also search with torch on this device, e.g. cuda")
    args = parser.parse_args()
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
    faiss.omp_set_num_threads(args.cores)
    print(
        f"{platform.processor() or platform.machine()}, {args.cores} cores, faiss {faiss.__version__}"
        f" ({faiss.get_num_gpus()} GPUs)",
        flush=True,
    )
    rng = np.random.default_rng(SEED)
    for dim in args.dims:
        with tempfile.TemporaryDirectory() as scratch:
            gallery, write_s, open_s = written_gallery(Path(scratch), args.items, dim, rng)
            print(
                f"{args.tiles:,} tiles x {args.items:,} items of width {dim} ({gallery.record.index_kind} index):"
                f" gallery written in {write_s:.2f} s, opened in {open_s:.2f} s",
                flush=True,
            )
            tiles = unit_rows(args.tiles, dim, rng)
            faiss_run(gallery, tiles, args)
            if args.torch_device:
                torch_run(gallery, tiles, args)


if __name__ == "__main__":
    main()

"""New queries on a built map: how long the tile index takes to make (once per build) and to answer a query, for
10,000, 100,000 and 1,000,000 tiles.

    python benchmarks/bench_query.py [--tiles 10000 100000 1000000] [--dims 64 1024] [--cores 2]
                                     [--queries 50] [--top-k 50] [--hnsw-max-values 2e9] [--keep DIR]

Tiles are random unit vectors (the worst case for an approximate index: no structure to exploit) of the small
untrained model's width (64) and the full model's (1,024), indexed with `pipeline.search` exactly as
`python -m pipeline query` indexes a store. Printed per size and width, for the exact index (`IndexFlatIP`) and
HNSW: the one-off build seconds, the seconds to read the kept index back (warm page cache), the p50 and p95 of
one query's search over `--queries` random queries, HNSW's recall@k against exact search on the same queries,
and the p50 of scoring every tile (one matrix product over the index's vectors: what percentiles and `--map`
need). `rule` names the kind `pipeline.vectors.index_kind` picks. HNSW builds with more than `--hnsw-max-values`
values (tiles x width) are skipped (1 M tiles of width 1,024 take ~20 min on 2 cores). With `--keep DIR` the
indexes and their build seconds are kept in DIR and read back by the next run (to measure queries again without
building again: the 1 M-tile indexes take 4 GB each).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from pipeline.search import IndexRecord, TileIndex
from pipeline.vectors import FLAT, HNSW, index_kind, new_index

BLOCK = 50_000
SEED = 0


def unit_blocks(tiles: int, dim: int, seed: int) -> Iterator[np.ndarray]:
    """The same random unit vectors every time for a seed, block by block (memory: one block)."""
    rng = np.random.default_rng(seed)
    for start in range(0, tiles, BLOCK):
        block = rng.standard_normal((min(BLOCK, tiles - start), dim), dtype=np.float32)
        yield block / np.linalg.norm(block, axis=1, keepdims=True)


def build(kind: str, tiles: int, dim: int) -> tuple[Any, float]:
    index = new_index(kind, dim)
    start = time.perf_counter()
    for block in unit_blocks(tiles, dim, SEED):
        index.add(block)
    return index, time.perf_counter() - start


def kept_or_built(kind: str, tiles: int, dim: int, folder: Path) -> tuple[Any, float, float]:
    """The index, its build seconds and the seconds to read it back from `folder` (built and written if absent)."""
    path = folder / f"{kind}_{tiles}_{dim}.faiss"
    record = path.with_suffix(".json")
    if path.is_file() and record.is_file():
        build_s = json.loads(record.read_text())["build_s"]
    else:
        index, build_s = build(kind, tiles, dim)
        faiss.write_index(index, str(path))
        record.write_text(json.dumps({"build_s": build_s}))
        del index
    start = time.perf_counter()
    index = faiss.read_index(str(path))
    return index, build_s, time.perf_counter() - start


def measure(tile_index: TileIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[float], list[float]]:
    """Each query's found ids and the search and score-every-tile seconds of each."""
    found, search_s, score_s = [], [], []
    for query in queries:
        start = time.perf_counter()
        positions, _ = tile_index.search(query, k)
        search_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        tile_index.score_grid(query)
        score_s.append(time.perf_counter() - start)
        found.append(positions)
    return np.array(found), search_s, score_s


def report(name: str, seconds: tuple[float, float], times: tuple[list[float], list[float]], extra: str = "") -> None:
    build_s, load_s = seconds
    search_s, score_s = times
    print(
        f"  {name:5} build {build_s:8.2f} s  read {load_s:6.2f} s  search p50 {np.median(search_s) * 1e3:8.2f} ms"
        f"  p95 {np.percentile(search_s, 95) * 1e3:8.2f} ms  score every tile p50 {np.median(score_s) * 1e3:8.2f} ms"
        f"{extra}",
        flush=True,
    )


def run(tiles: int, dim: int, args: argparse.Namespace, folder: Path) -> None:
    print(f"{tiles:,} tiles of width {dim} (rule: {index_kind(tiles, dim)})", flush=True)
    queries = next(unit_blocks(args.queries, dim, SEED + 1))
    positions = np.arange(tiles, dtype=np.int64)
    exact = None
    for kind in (FLAT, HNSW):
        if kind == HNSW and tiles * dim > args.hnsw_max_values:
            print(f"  {kind:5} skipped: {tiles * dim:,} values > --hnsw-max-values", flush=True)
            continue
        index, build_s, read_s = kept_or_built(kind, tiles, dim, folder)
        tile_index = TileIndex(index, positions, (1, tiles), IndexRecord(kind, tiles, dim, "", faiss.__version__))
        found, *times = measure(tile_index, queries, args.top_k)
        extra = ""
        if exact is None:
            exact = found
        else:
            recall = np.mean([len(np.intersect1d(a, b)) / args.top_k for a, b in zip(found, exact, strict=True)])
            extra = f"  recall@{args.top_k} {recall:.3f}"
        report(kind, (build_s, read_s), (times[0], times[1]), extra)
        del tile_index, index
        if args.keep is None:
            (folder / f"{kind}_{tiles}_{dim}.faiss").unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--hnsw-max-values", type=float, default=2e9)
    parser.add_argument("--keep", type=Path, help="keep the indexes here and read them back on the next run")
    args = parser.parse_args()
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
    faiss.omp_set_num_threads(args.cores)
    print(f"{platform.processor() or platform.machine()}, {args.cores} cores, faiss {faiss.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.keep or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        for dim in args.dims:
            for tiles in args.tiles:
                run(tiles, dim, args, folder)


if __name__ == "__main__":
    main()

"""Tile fetch throughput: XYZReader.fetch_tiles against the loopback tile server with injected latency.

Each concurrency level runs in a fresh process with a cold cache, so its peak RSS is its own; the
server runs in this process. Run from the repository root:

    .venv/bin/python -m benchmarks.bench_fetch --tiles 256 --latency-ms 20 --concurrency 1 8 32
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

import mercantile

from pipeline.imagery import TileCache, XYZReader
from tests.support.imagery_servers import SCENE_PATH, SceneTiles, TileServer

KIB_PER_MIB = 1024


class Result(NamedTuple):
    concurrency: int
    tiles: int
    with_imagery: int
    seconds: float
    baseline_rss_mb: float
    peak_rss_mb: float


def _peak_rss_mb() -> float:
    """This process's own RSS high-water mark (VmHWM); ru_maxrss would include the parent's peak, which a
    spawned child inherits on Linux."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / KIB_PER_MIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB_PER_MIB  # not Linux: KiB on most systems


def fetch(template: str, tiles: list[mercantile.Tile], concurrency: int) -> Result:
    """Fetch `tiles` into an empty cache at `concurrency`; runs in its own process."""
    baseline = _peak_rss_mb()
    with (
        tempfile.TemporaryDirectory() as cache_dir,
        XYZReader(template, cache=TileCache(Path(cache_dir)), concurrency=concurrency) as reader,
    ):
        start = time.perf_counter()
        with_imagery = reader.fetch_tiles(tiles)
        seconds = time.perf_counter() - start
    return Result(concurrency, len(tiles), with_imagery, seconds, baseline, _peak_rss_mb())


def scene_tiles(count: int, driver: str) -> SceneTiles:
    """At least `count` tiles of the test scene, from the coarsest zoom that has that many, encoded as `driver`."""
    for zoom in range(15, 23):
        tiles = SceneTiles.from_raster(SCENE_PATH, zooms=(zoom,), formats=(driver,))
        if len(tiles.rgba) >= count:
            return tiles
    raise SystemExit(f"the test scene has fewer than {count} tiles up to zoom 22; ask for fewer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=256, help="tiles fetched per run")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="server latency added to every request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--format", choices=["jpg", "png"], default="jpg", help="tile encoding served")
    args = parser.parse_args()

    driver = "JPEG" if args.format == "jpg" else "PNG"
    tiles = scene_tiles(args.tiles, driver)  # encoded before timing
    chosen = sorted(tiles.rgba)[: args.tiles]
    sizes = [len(tiles.encoded(tile, driver) or b"") for tile in chosen]
    print(f"{len(chosen)} tiles at zoom {chosen[0].z}, {args.format}, mean {sum(sizes) / len(sizes) / 1024:.1f} KiB")
    print(f"server latency {args.latency_ms:g} ms per request; cold cache per run; each run in a fresh process")
    print(f"{'concurrency':>11} {'tiles/s':>9} {'seconds':>8} {'base RSS MB':>12} {'peak RSS MB':>12}")
    context = multiprocessing.get_context("spawn")
    with TileServer(tiles, latency_s=args.latency_ms / 1000.0) as server:
        template = f"{server.url}/{args.format}/{{z}}/{{x}}/{{y}}.{args.format}"
        for concurrency in args.concurrency:
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                result = pool.submit(fetch, template, chosen, concurrency).result()
            if result.with_imagery != len(chosen):
                raise SystemExit(f"only {result.with_imagery} of {len(chosen)} tiles came back with imagery")
            print(
                f"{result.concurrency:>11} {result.tiles / result.seconds:>9.1f} {result.seconds:>8.2f} "
                f"{result.baseline_rss_mb:>12.0f} {result.peak_rss_mb:>12.0f}"
            )


if __name__ == "__main__":
    main()

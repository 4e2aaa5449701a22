"""Tile fetch throughput: XYZReader.fetch_tiles against the loopback tile server with injected latency.

Each concurrency level runs in a fresh process with a cold cache, so its peak RSS is its own; the
server runs in this process. Run from the repository root:

    .venv/bin/python -m benchmarks.bench_fetch --tiles 256 --latency-ms 20 --concurrency 1 8 32
    .venv/bin/python -m benchmarks.bench_fetch --tiles 100 --concurrency 8 32 --max-rps 20

`--max-rps` caps the reader's requests per second (XYZReader's max_requests_per_s; the loopback server is
otherwise uncapped) and the table shows the request rate the server saw against it.
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

from pipeline.errors import ImageryError
from pipeline.imagery import TileCache, XYZReader
from tests.support.imagery_servers import SCENE_PATH, SceneTiles, TileServer

KIB_PER_MIB = 1024


class Result(NamedTuple):
    concurrency: int
    max_rps: float | None
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


def fetch(template: str, tiles: list[mercantile.Tile], concurrency: int, max_rps: float | None) -> Result:
    """Fetch `tiles` into an empty cache at `concurrency` under a `max_rps` cap; runs in its own process."""
    baseline = _peak_rss_mb()
    with (
        tempfile.TemporaryDirectory() as cache_dir,
        XYZReader(
            template, cache=TileCache(Path(cache_dir)), concurrency=concurrency, max_requests_per_s=max_rps
        ) as reader,
    ):
        start = time.perf_counter()
        with_imagery = reader.fetch_tiles(tiles)
        seconds = time.perf_counter() - start
    return Result(concurrency, max_rps, len(tiles), with_imagery, seconds, baseline, _peak_rss_mb())


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
    parser.add_argument("--max-rps", type=float, default=None, help="request cap per second (default: none)")
    args = parser.parse_args()
    try:
        for concurrency in args.concurrency:
            XYZReader.check_options({"concurrency": concurrency, "max_requests_per_s": args.max_rps})
    except ImageryError as exc:
        parser.error(str(exc))

    driver = "JPEG" if args.format == "jpg" else "PNG"
    tiles = scene_tiles(args.tiles, driver)  # encoded before timing
    chosen = sorted(tiles.rgba)[: args.tiles]
    sizes = [len(tiles.encoded(tile, driver) or b"") for tile in chosen]
    print(f"{len(chosen)} tiles at zoom {chosen[0].z}, {args.format}, mean {sum(sizes) / len(sizes) / 1024:.1f} KiB")
    print(f"server latency {args.latency_ms:g} ms per request; cold cache per run; each run in a fresh process")
    cap = f"{args.max_rps:g} req/s" if args.max_rps else "none"
    print(f"request cap {cap}; 'req/s' is the rate the server saw, first to last request start")
    print(
        f"{'concurrency':>11} {'tiles/s':>9} {'seconds':>8} {'req/s':>8} {'cap':>6} {'of cap':>7} "
        f"{'base RSS MB':>12} {'peak RSS MB':>12}"
    )
    context = multiprocessing.get_context("spawn")
    with TileServer(tiles, latency_s=args.latency_ms / 1000.0) as server:
        template = f"{server.url}/{args.format}/{{z}}/{{x}}/{{y}}.{args.format}"
        for concurrency in args.concurrency:
            server.clear()
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                result = pool.submit(fetch, template, chosen, concurrency, args.max_rps).result()
            starts = sorted(record.time for record in server.requests)
            span = starts[-1] - starts[0] if len(starts) > 1 else 0.0
            # n starts at the cap span (n - 1) / cap seconds: that is the rate to compare with the cap.
            rate = (len(starts) - 1) / span if span > 0 else float("nan")
            cap_column = f"{args.max_rps:>6g} {rate / args.max_rps:>7.1%}" if args.max_rps else f"{'-':>6} {'-':>7}"
            if result.with_imagery != len(chosen):
                raise SystemExit(f"only {result.with_imagery} of {len(chosen)} tiles came back with imagery")
            print(
                f"{result.concurrency:>11} {result.tiles / result.seconds:>9.1f} {result.seconds:>8.2f} "
                f"{rate:>8.1f} {cap_column} {result.baseline_rss_mb:>12.0f} {result.peak_rss_mb:>12.0f}"
            )


if __name__ == "__main__":
    main()

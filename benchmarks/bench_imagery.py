"""The imagery stage alone (no model): model views per second per CPU core, strip path against per-view reads.

    python -m benchmarks.bench_imagery [--offsets 0 2 5] [--per-view 96] [--cuda]

For each `tile_zoom_offset` it plans the default build's region (the bundled Landsat scene, sentinel views of 7.68
km at zoom_level 3) and times, in CPU seconds of the process (one torch thread; the XYZ reader's decoding threads
counted too), what an embed job does before the model: read every strip of a chunk once
(`ImageryReader.source_pixels`) and cut its views (`pipeline.views.cut_views`); then the old path, one GDAL warp
per view (`ImageryReader.part`), on the first `--per-view` views. Sources: the scene as it is (UTM, a projected
raster), the scene warped to EPSG:3857 (a Web Mercator raster), and warm tile caches of 256-px PNG and JPEG tiles
made from it (XYZ, read offline; imagery servers send photos as JPEG). Printed: views/s per core for both paths and
their ratio, the strip path's CPU milliseconds per view reading the strips and cutting the views, source pixels read
per view, and the peak memory of the process. Like the embed jobs, it keeps freed
memory (`common.memory`). Strips are timed in a job's steady state: after one untimed pass over the chunk (the
first chunk of a job also pays the stretch, page faults and loading the compiled kernels), the best of three passes
or more. With `--cuda` it also times cutting the same views on the GPU (wall seconds, strips read beforehand), the
path embed jobs on GPUs take, against the CPU kernels loader processes could run (`EmbedOptions.cut_in_loaders`).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import NamedTuple

import mercantile
import numpy as np
import torch

from common.memory import keep_freed_memory
from model import MODEL_INPUT_PX
from pipeline.build import plan_build
from pipeline.config import load_plan_inputs
from pipeline.errors import ImageryWarning
from pipeline.geometry import Bounds
from pipeline.imagery import ImageryReader, LocalRasterReader, TileCache, XYZReader
from pipeline.imagery.base import read_strips
from pipeline.imagery.codec import encode_png
from pipeline.plan import ChunkTiles, all_chunks
from pipeline.views import cut_views
from tests.support.imagery_servers import encode_image, warp_to_web_mercator

REPO = Path(__file__).resolve().parents[1]
SCENE = REPO / "examples" / "landsat8_itaipu_30m.tif"
REGION = "-54.664,-25.489,-54.354,-25.208"
BANDS = (3, 2, 1)
# 38.2 m pixels (EPSG:3857 metres), about one tile a view at offset 0: a hair coarser than the views' 37.9 m
# (34 m on the ground at 25.4°S), so reads are upsampled by 1 % and the reader says so (filtered below).
TILE_ZOOM = 12
TILE_PX = 256
# The tile caches: their formats (file extension: name), source id and URL (never fetched: read offline).
TILE_FORMATS = {"png": "PNG", "jpg": "JPEG"}
XYZ_SOURCE_ID = "bench"
# Each chunk is timed over this many passes at least, and more while they hold fewer than MIN_VIEWS views: the
# best pass counts.
MIN_PASSES = 3
MIN_VIEWS = 200


def largest_chunk(offset: int) -> ChunkTiles:
    inputs = load_plan_inputs(
        {
            "region": REGION,
            "imagery": {"source": str(SCENE), "options": {"bands": list(BANDS)}},
            "model": {"checkpoint": "untrained", "sat_type": "sentinel", "zoom_level": 3},
            "tiling": {"tile_zoom_offset": offset, "max_tiles": 10_000_000},
        }
    )
    planned = plan_build(inputs)
    return max(all_chunks(planned.plan, planned.blocks), key=len)


def xyz_url(tile_format: str) -> str:
    return f"https://tiles.invalid/{{z}}/{{x}}/{{y}}.{tile_format}"


def tile_cache(folder: Path, tile_format: str) -> Path:
    """Tiles of the scene at TILE_ZOOM (and the zoom above), stretched to 8 bits as the local reader does: PNG
    with transparency, or JPEG (`tile_format` "jpg", as imagery servers send photos: black off the scene)."""
    cache = TileCache(folder / f"tiles-{tile_format}")
    with LocalRasterReader(SCENE, bands=BANDS) as reader:
        west, south, east, north = reader.footprint_lnglat()
        for tile in mercantile.tiles(west, south, east, north, [TILE_ZOOM - 1, TILE_ZOOM]):
            image = reader.tile(tile.x, tile.y, tile.z, TILE_PX)
            rgb, valid = np.ma.getdata(image.array), ~np.ma.getmaskarray(image.array).any(axis=0)
            if valid.any():
                body = encode_png(rgb, valid) if tile_format == "png" else encode_image(rgb, "JPEG")
                cache.put(f"{XYZ_SOURCE_ID}/{tile.z}/{tile.x}/{tile.y}.{tile_format}", body)
    return cache.root


def xyz_reader(cache_root: Path, tile_format: str) -> XYZReader:
    """A reader of the tiles `tile_cache` wrote under `cache_root`, offline."""
    return XYZReader(
        xyz_url(tile_format),
        cache=TileCache(cache_root),
        source_id=XYZ_SOURCE_ID,
        offline=True,
        max_zoom=TILE_ZOOM,
    )


class StripTimes(NamedTuple):
    """CPU seconds reading the strips of a chunk's views and cutting the views from them, and the source pixels
    read."""

    read_s: float
    cut_s: float
    source_px: int

    @property
    def seconds(self) -> float:
        return self.read_s + self.cut_s


def time_strips(reader: ImageryReader, views: np.ndarray) -> StripTimes:
    read_s = cut_s = 0.0
    source_px = 0
    for strip in read_strips(views, MODEL_INPUT_PX):
        group = views[strip.start : strip.stop]
        start = time.process_time()
        pixels = reader.source_pixels(group, MODEL_INPUT_PX)
        read = time.process_time()
        cut_views(pixels, group, MODEL_INPUT_PX)
        read_s, cut_s = read_s + read - start, cut_s + time.process_time() - read
        source_px += pixels.valid.size
    return StripTimes(read_s, cut_s, source_px)


def time_device_cuts(reader: ImageryReader, views: np.ndarray, device: torch.device) -> float:
    """Wall seconds to cut all `views` on `device` from strips read beforehand (the best of MIN_PASSES passes after
    one untimed pass), waiting for the device to finish."""
    strips = [views[strip.start : strip.stop] for strip in read_strips(views, MODEL_INPUT_PX)]
    pixels = [reader.source_pixels(group, MODEL_INPUT_PX) for group in strips]

    def one_pass() -> float:
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for source, group in zip(pixels, strips, strict=True):
            cut_views(source, group, MODEL_INPUT_PX, device=device)
        torch.cuda.synchronize(device)
        return time.perf_counter() - start

    one_pass()
    return min(one_pass() for _ in range(MIN_PASSES))


def time_per_view(reader: ImageryReader, views: np.ndarray) -> float:
    start = time.process_time()
    for view in views:
        reader.part(Bounds(*view), MODEL_INPUT_PX, MODEL_INPUT_PX)
    return time.process_time() - start


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give 0 or more")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offsets", type=int, nargs="+", default=[0, 2, 5])
    parser.add_argument(
        "--per-view", type=_count, default=96, help="views timed through one GDAL warp each (0: none, no comparison)"
    )
    parser.add_argument("--cuda", action="store_true", help="also time cutting the views on the GPU (sparse products)")
    args = parser.parse_args()
    device = torch.device("cuda") if args.cuda else None
    torch.set_num_threads(1)
    keep_freed_memory()  # as every embed job does
    warnings.filterwarnings("ignore", "bench stops at zoom", ImageryWarning)
    with tempfile.TemporaryDirectory(prefix="bench-imagery-") as scratch:
        folder = Path(scratch)
        # Made once, read at every offset.
        mosaic = warp_to_web_mercator(SCENE, folder / "landsat_3857.tif")
        caches = {tile_format: tile_cache(folder, tile_format) for tile_format in TILE_FORMATS}
        sources: dict[str, Callable[[], ImageryReader]] = {
            "projected raster (UTM)": lambda: LocalRasterReader(SCENE, bands=BANDS),
            "Web Mercator raster": lambda: LocalRasterReader(mosaic, bands=BANDS),
            **{
                f"XYZ tile cache ({label})": partial(xyz_reader, caches[tile_format], tile_format)
                for tile_format, label in TILE_FORMATS.items()
            },
        }
        print(
            f"{'source':<24} {'offset':>6} {'views':>6} {'strip views/s':>13} {'read ms':>7} {'cut ms':>7}"
            f" {'per-view views/s':>16}"
            f" {'ratio':>6} {'source px/view':>14}" + ("  cut on GPU views/s" if device else "")
        )
        for offset in args.offsets:
            chunk = largest_chunk(offset)
            views = chunk.tile_count
            for name, make in sources.items():
                with make() as reader:
                    # A job's steady state: the first pass also pays the stretch, page faults and kernel loads.
                    time_strips(reader, chunk.views)
                    best = min(
                        (time_strips(reader, chunk.views) for _ in range(max(MIN_PASSES, MIN_VIEWS // views))),
                        key=lambda times: times.seconds,
                    )
                    sample = chunk.views[: args.per_view]
                    per_view = len(sample) / time_per_view(reader, sample) if len(sample) else None
                    on_device = f"  {views / time_device_cuts(reader, chunk.views, device):>19,.0f}" if device else ""
                strip_rate = views / best.seconds
                against = f"{per_view:>16,.0f} {strip_rate / per_view:>6.1f}" if per_view else f"{'-':>16} {'-':>6}"
                read_ms, cut_ms = (seconds / views * 1e3 for seconds in (best.read_s, best.cut_s))
                print(
                    f"{name:<24} {offset:>6} {views:>6} {strip_rate:>13,.0f} {read_ms:>7.3f} {cut_ms:>7.3f}"
                    f" {against} {best.source_px / views:>14,.0f}{on_device}",
                    flush=True,
                )
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n1 torch thread, {torch.__version__}, peak RSS {peak_mb:,.0f} MB; {sys.platform}")


if __name__ == "__main__":
    main()

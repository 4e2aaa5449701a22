"""The embed stage end to end against the model alone, on one device: what an embed job delivers.

    python -m benchmarks.bench_embed [--tiles 25000] [--model full] [--device auto] [--loader-workers N]
                                     [--sources mosaic xyz xyz-jpeg] [--cut-in device loaders] [--tile-zoom-offset 6]
                                     [--compile]

Plans a square of about `--tiles` output tiles in the middle of the bundled Landsat scene (30 m pixels) for
Sentinel views of 7.68 km (`--sat-type sentinel --zoom-level 3`, as `bench_imagery`; the scene is too coarse for
the reference's bingmap views) at `--tile-zoom-offset 6` (the offset at which 25,000 tiles fit the scene), then
runs what an embed job runs after its start-up (`pipeline.embed.embed_chunks`: loader processes read strips, views
are cut on the model's device, batches embedded, chunk files written) from three sources: the scene warped to a Web
Mercator mosaic (a local raster) and warm caches of 256-px PNG and JPEG tiles made from it (XYZ, offline;
`--sources mosaic xyz xyz-jpeg`). Each source runs twice (`--cut-in`): views cut on the model's device, as embed
jobs cut them, and views cut on the loader processes' CPUs (`EmbedOptions.cut_in_loaders`), which takes the cutting
off the job's own process. Model-only is the same encoder on random uint8 batches of the same size, timed just
before and just after each run (their mean).

Printed per source: tiles, end-to-end tiles/s, model-only tiles/s, their ratio, the device's utilisation while
embedding (mean of NVML samples every 0.2 s, CUDA only), peak device memory (CUDA allocator), where the time went
(`pipeline.embed.stage_line`: waiting for imagery, cutting views, the model), and the peak RSS of this process and
of its loader processes. Weights are random (`--model full`: the reference's size, as
`bench_model.py`; `small`: the demo's): speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_build import SCENE_CENTRE, model_only_tiles_per_s, square_region
from benchmarks.bench_imagery import BANDS, SCENE, TILE_FORMATS, TILE_ZOOM, XYZ_SOURCE_ID, tile_cache, xyz_url
from benchmarks.bench_imagery import REGION as SCENE_REGION
from common.memory import keep_freed_memory
from model import Sat2Sound, Sat2SoundConfig, Sat2SoundEncoder
from pipeline.build import plan_build
from pipeline.config import ImagerySettings, Time, load_plan_inputs
from pipeline.embed import EmbedOptions, auto_batch_size, embed_chunks, stage_line
from pipeline.geometry import output_zoom
from pipeline.model_setup import untrained_config
from pipeline.plan import ChunkTiles, ModelView, all_chunks
from tests.support.imagery_servers import warp_to_web_mercator

SAMPLE_SECONDS = 0.2
CUT_PLACES = ("device", "loaders")
XYZ_FORMATS = {"xyz": "png", "xyz-jpeg": "jpg"}


def plan(args: argparse.Namespace) -> tuple[list[ChunkTiles], int]:
    """The chunks of the square region, and the concepts a build keeps per tile (the config's default)."""
    view = ModelView.of(args.sat_type, args.zoom_level)
    zoom = output_zoom(view.size_m, SCENE_CENTRE[1]) + args.tile_zoom_offset
    inputs = load_plan_inputs(
        {
            "region": square_region(args.tiles, zoom),
            "imagery": {"source": str(SCENE), "options": {"bands": list(BANDS)}},
            "model": {"checkpoint": "untrained", "sat_type": args.sat_type, "zoom_level": args.zoom_level},
            "tiling": {"tile_zoom_offset": args.tile_zoom_offset, "max_tiles": 10_000_000},
        }
    )
    planned = plan_build(inputs)
    return all_chunks(planned.plan, planned.blocks), inputs.concepts_top_k


def imagery_sources(folder: Path, names: list[str]) -> dict[str, ImagerySettings]:
    """The sources, as a build's config would name them (the schema's defaults filled in), read offline."""
    specs = {}
    for name in names:
        if name == "mosaic":
            mosaic = warp_to_web_mercator(SCENE, folder / "landsat_3857.tif")
            specs["Web Mercator mosaic"] = {"source": str(mosaic), "options": {"bands": list(BANDS)}}
        else:
            tile_format = XYZ_FORMATS[name]
            specs[f"XYZ cache ({TILE_FORMATS[tile_format]})"] = {
                "source": f"xyz:{xyz_url(tile_format)}",
                "options": {"source_id": XYZ_SOURCE_ID, "max_zoom": TILE_ZOOM},
                "cache_dir": str(tile_cache(folder, tile_format)),
            }
    return {
        name: load_plan_inputs({"region": SCENE_REGION, "imagery": {**spec, "offline": True}}).imagery
        for name, spec in specs.items()
    }


def make_encoder(args: argparse.Namespace) -> Sat2SoundEncoder:
    torch.manual_seed(0)
    cfg = (
        Sat2SoundConfig(sat_type=args.sat_type, metadata_type="none")
        if args.model == "full"
        else untrained_config(args.sat_type, "none")
    )
    return Sat2SoundEncoder(Sat2Sound(cfg), device=args.device, precision=args.precision, compiled=args.compile)


@contextmanager
def utilisation(device: torch.device) -> Iterator[list[float]]:
    """Samples of the device's utilisation (%) every SAMPLE_SECONDS while the block runs (none on a CPU)."""
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(SAMPLE_SECONDS):
            samples.append(float(torch.cuda.utilization(device)))

    thread = threading.Thread(target=sample, daemon=True) if device.type == "cuda" else None
    if thread:
        thread.start()
    try:
        yield samples
    finally:
        stop.set()
        if thread:
            thread.join()


def run(
    chunks: list[ChunkTiles],
    zoom_level: int,
    encoder: Sat2SoundEncoder,
    imagery: ImagerySettings,
    options: EmbedOptions,
    out: Path,
) -> dict[str, Any]:
    if encoder.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(encoder.device)
    with utilisation(encoder.device) as samples:
        start = time.perf_counter()
        reports = embed_chunks(chunks, zoom_level, encoder, imagery, options, out, lambda chunk: "bench")
        seconds = time.perf_counter() - start
    return {
        "tiles": sum(report.tiles for report in reports),
        "valid": sum(report.valid or 0 for report in reports),
        "seconds": seconds,
        "busy": sum(samples) / len(samples) if samples else None,
        "device_mb": torch.cuda.max_memory_allocated(encoder.device) / 2**20 if encoder.device.type == "cuda" else None,
        "stages": stage_line(reports),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=25_000)
    parser.add_argument("--model", choices=("full", "small"), default="full")
    parser.add_argument("--sat-type", default="sentinel")
    parser.add_argument("--zoom-level", type=int, default=3)
    parser.add_argument("--tile-zoom-offset", type=int, default=6)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile the image path (`compiled=True`)")
    parser.add_argument("--batch-size", default="auto", help="auto (the largest that fits on a GPU) or a number")
    parser.add_argument("--loader-workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--sources", nargs="+", choices=("mosaic", *XYZ_FORMATS), default=["mosaic", *XYZ_FORMATS])
    parser.add_argument(
        "--cut-in",
        nargs="+",
        choices=CUT_PLACES,
        default=list(CUT_PLACES),
        help="where views are cut: on the model's device (as embed jobs do) or on the loader processes' CPUs",
    )
    args = parser.parse_args()
    keep_freed_memory()  # as every embed job does

    encoder = make_encoder(args)
    zoom_level = args.zoom_level
    batch_size = auto_batch_size(encoder, zoom_level) if args.batch_size == "auto" else int(args.batch_size)
    chunks, top_k = plan(args)
    options = EmbedOptions((Time(None, None),), batch_size, args.loader_workers, top_k)
    tiles = sum(chunk.tile_count for chunk in chunks)
    print(
        f"{tiles:,} tiles in {len(chunks)} chunks; {encoder.cfg.size} model on {encoder.device}, {encoder.dtype}"
        f"{' compiled' if args.compile else ''},"
        f" batch {batch_size}, {args.loader_workers} loader workers, {torch.get_num_threads()} torch threads",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as scratch:
        folder = Path(scratch)
        runs = [
            (f"{name}, cut in {place}", imagery, options._replace(cut_in_loaders=place == "loaders"))
            for name, imagery in imagery_sources(folder, args.sources).items()
            for place in args.cut_in
        ]
        for name, imagery, run_options in runs:
            before = model_only_tiles_per_s(encoder, zoom_level, batch_size, tiles)
            out = folder / f"chunks-{len(rows)}"
            out.mkdir()
            result = run(chunks, zoom_level, encoder, imagery, run_options, out)
            after = model_only_tiles_per_s(encoder, zoom_level, batch_size, tiles)
            rows.append((name, result, (before + after) / 2))
            print(f"{name}: {result['tiles']:,} tiles in {result['seconds']:.1f} s", flush=True)
    print(
        f"\n{'source':<36} {'tiles':>7} {'valid':>7} {'end-to-end tiles/s':>18} {'model-only tiles/s':>18}"
        f" {'ratio':>5} {'device busy %':>13} {'device peak MB':>14}"
    )
    for name, result, model_rate in rows:
        rate = result["tiles"] / result["seconds"]
        busy = "—" if result["busy"] is None else f"{result['busy']:.0f}"
        device_mb = "—" if result["device_mb"] is None else f"{result['device_mb']:,.0f}"
        print(
            f"{name:<36} {result['tiles']:>7,} {result['valid']:>7,} {rate:>18,.1f} {model_rate:>18,.1f}"
            f" {rate / model_rate:>5.2f} {busy:>13} {device_mb:>14}"
        )
    for name, result, _ in rows:
        print(f"{name}: {result['stages']}")
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    name = torch.cuda.get_device_name(encoder.device) if encoder.device.type == "cuda" else f"{os.cpu_count()}-core CPU"
    print(f"\n{name}, torch {torch.__version__}; peak RSS {own:,.0f} MB (loader processes {workers:,.0f} MB)")


if __name__ == "__main__":
    main()

"""End-to-end map builds of about 100, 1,000 and 10,000 tiles against model-only throughput.

    python benchmarks/bench_build.py [--tiles 100 1000 10000] [--cores 2] [--checkpoint CKPT] [--write-rates]

Each build runs the whole Snakemake workflow (plan, embed, score, Zarr, COGs, preview) in a fresh folder on
a square of output tiles in the middle of the bundled Landsat scene (local-raster source; the default
config's model, or `--checkpoint`: `untrained`, a file, an hf:// URI; the default config's view;
`--tile-zoom-offset 5` makes tiles small enough for 10,000 of them to fit the scene; `--chunk-depth` sizes the
chunks, 4**D tiles each, 4,096 as a build's by default). Printed per build:
end-to-end tiles/s, the model's own tiles/s on the same device in the same run (random uint8 tiles through
`embed_images` at the build's batch size; the mean of a timing just before and one just after the build, as a
shared host's speed drifts within minutes), their ratio, the embed jobs' fixed cost (process start,
imports, model load: embedded/<job>.json) and their tiles/s after it, and the peak resident memory of the
largest process of the build, which stays flat as regions grow because every step works chunk by chunk. After
each build, where its CPU time went: every rule's jobs (each job's log ends with its process's CPU time, imports
included), Snakemake's own process with the jobs' exits, and on a CPU the ratio the build's CPU time allows at
best (the model's own CPU seconds against all of them spread perfectly over the cores).

`--write-rates` records in benchmarks/rates.json (the rates `python -m pipeline plan` times builds by; schema
in `pipeline.rates`) the line through the smallest and the largest build: tiles/s and the fixed seconds every
build spends (`start_s`), replacing the entry of the same device kind (cpu/gpu) and model size (small or
full, `Sat2SoundConfig.size`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import mercantile
import torch
import yaml

from common.memory import keep_freed_memory
from model import Sat2Sound, Sat2SoundEncoder
from pipeline.build import PLAN_NAME
from pipeline.config import default_config_from_anywhere, load_build_config
from pipeline.geometry import DEFAULT_CHUNK_DEPTH, output_zoom
from pipeline.model_setup import untrained_config
from pipeline.plan import ModelView, read_plan
from pipeline.rates import RATES_PATH, Rate, update_rates
from pipeline.steps import JOB_TIMES

REPO = Path(__file__).resolve().parents[1]
SCENE = REPO / "examples" / "landsat8_itaipu_30m.tif"
SCENE_CENTRE = (-54.509, -25.348)
# Shrinks the region a little inside its block of tiles, so that no neighbouring tile is touched.
INSET = 0.01


def square_region(tiles: int, zoom: int) -> str:
    """A bbox covering exactly side x side tiles at `zoom` around the scene's centre (side = sqrt(tiles))."""
    side = max(1, round(math.sqrt(tiles)))
    centre = mercantile.tile(*SCENE_CENTRE, zoom)
    first = mercantile.Tile(centre.x - side // 2, centre.y - side // 2, zoom)
    last = mercantile.Tile(first.x + side - 1, first.y + side - 1, zoom)
    west, north = mercantile.ul(first)
    east, south = mercantile.ul(mercantile.Tile(last.x + 1, last.y + 1, zoom))
    dx, dy = (east - west) * INSET / side, (north - south) * INSET / side
    return f"{west + dx},{south + dy},{east - dx},{north - dy}"


def build_config(
    name: str, region: str, args: argparse.Namespace, output_dir: Path, tile_zoom: int | None = None
) -> dict[str, Any]:
    """The build's config; `tile_zoom` (the output zoom, where known) places its chunks `args.chunk_depth` above."""
    defaults = default_config_from_anywhere()
    if args.audio_queries_only:
        defaults["queries"] = [query for query in defaults["queries"] if "text" not in query]
        defaults["outputs"]["gallery"] = None
    return {
        **defaults,
        "name": name,
        "output_dir": str(output_dir),
        "region": region,
        "imagery": {**defaults["imagery"], "source": str(SCENE), "cache_dir": str(output_dir / "tiles")},
        "model": {
            **defaults["model"],
            "checkpoint": args.checkpoint,
            "device": args.device,
            "batch_size": args.batch_size,
        },
        "tiling": {
            "tile_zoom_offset": args.tile_zoom_offset,
            "chunk_zoom": None if tile_zoom is None else max(0, tile_zoom - args.chunk_depth),
        },
    }


class BuildRun(NamedTuple):
    seconds: float
    cpu_s: float  # user + system, the whole process tree
    peak_mb: float  # the largest process's resident memory


def run_build(config_path: Path, workdir: Path, cores: int) -> BuildRun:
    """One `snakemake` build, timed."""
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "--profile",
        str(REPO / "profiles" / "local"),
        "--configfile",
        str(config_path),
        "--cores",
        str(cores),
    ]
    start = time.perf_counter()
    with open(config_path.with_suffix(".log"), "w") as log:
        process = subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    # wait4's usage covers the build's whole process tree; ru_maxrss is its largest process, in KiB.
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"build {config_path} failed; see {config_path.with_suffix('.log')} and the build's logs/")
    return BuildRun(seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)


def jobs_cpu(build: Path) -> dict[str, float]:
    """CPU seconds per rule, summed over its jobs, from the last line of each job's log (`pipeline.steps`)."""
    cpu: dict[str, float] = {}
    for log in sorted((build / "logs").rglob("*.log")):
        lines = log.read_text().splitlines()
        if lines and (times := JOB_TIMES.match(lines[-1])):
            cpu[times["step"]] = cpu.get(times["step"], 0.0) + float(times["cpu"])
    return cpu


def embed_jobs_record(build: Path, tiles: int) -> tuple[float, float]:
    """The embed jobs' summed start-up seconds and their tiles/s after start-up (embedded/<job>.json)."""
    records = [json.loads(path.read_text()) for path in sorted((build / "embedded").glob("*.json"))]
    startup = sum(record["startup_s"] for record in records)
    working = sum(record["seconds"] - record["startup_s"] for record in records)
    return startup, tiles / working if working else 0.0


def model_only_tiles_per_s(encoder: Sat2SoundEncoder, zoom_level: int, batch_size: int, tiles: int) -> float:
    images = torch.randint(0, 256, (batch_size, 3, 224, 224), dtype=torch.uint8)
    encoder.embed_images(images, zoom_level)
    batches = max(1, math.ceil(tiles / batch_size))
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(batches):
        encoder.embed_images(images, zoom_level)
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
    return batches * batch_size / (time.perf_counter() - start)


def fit_rate(builds: list[tuple[int, float]]) -> tuple[float, float]:
    """Tiles/s and fixed seconds of `seconds = start_s + tiles / tiles_per_s` through the smallest and the
    largest of (tiles, seconds) builds (one build: no fixed part)."""
    (small, small_s), (large, large_s) = min(builds), max(builds)
    if large == small or large_s <= small_s:
        return large / large_s, 0.0
    tiles_per_s = (large - small) / (large_s - small_s)
    return tiles_per_s, max(0.0, small_s - small / tiles_per_s)


def write_rates(
    path: Path,
    builds: list[tuple[int, float]],
    model_tiles_per_s: float,
    *,
    device: torch.device,
    model_size: str,
    cores: int,
) -> Rate:
    """Record the builds' rate and fixed start-up for this device kind and model size in the rates file."""
    cuda = device.type == "cuda"
    hardware = (
        torch.cuda.get_device_name(device)
        if cuda
        else f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()})"
    )
    tiles_per_s, start_s = fit_rate(builds)
    sizes = " and ".join(f"{tiles:,}" for tiles in sorted({min(builds)[0], max(builds)[0]}))
    rate = Rate(
        device="gpu" if cuda else "cpu",
        model=model_size,
        tiles_per_s=round(tiles_per_s, 1),
        measure="end-to-end",
        cores=None if cuda else os.cpu_count(),
        hardware=hardware,
        source=f"benchmarks/bench_build.py --write-rates: {sizes}-tile builds, snakemake --cores {cores}",
        date=datetime.date.today().isoformat(),
        start_s=round(start_s, 1),
    )
    update_rates(path, rate, model_only_tiles_per_s=round(model_tiles_per_s, 1))
    return rate


def load_encoder(args: argparse.Namespace, settings: Any) -> Sat2SoundEncoder:
    if args.checkpoint == "untrained":
        torch.manual_seed(settings.seed)
        return Sat2SoundEncoder(
            Sat2Sound(untrained_config(settings.sat_type, settings.metadata_type)), device=args.device
        )
    return Sat2SoundEncoder.from_checkpoint(args.checkpoint, device=args.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--checkpoint", default=default_config_from_anywhere()["model"]["checkpoint"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--tile-zoom-offset", type=int, default=5)
    parser.add_argument(
        "--chunk-depth",
        type=int,
        default=DEFAULT_CHUNK_DEPTH,
        help="chunks of 4**D tiles (tiling.chunk_zoom = tile zoom - D): smaller ones measure the per-chunk costs",
    )
    parser.add_argument("--model-tiles", type=int, default=2048, help="tiles timed for the model-only rate")
    parser.add_argument(
        "--audio-queries-only",
        action="store_true",
        help="only the default config's plain audio queries and no gallery: no text backbone is loaded (for a"
        " checkpoint whose backbone, flan-t5-large, is not at hand offline)",
    )
    parser.add_argument("--keep", type=Path, help="build here and keep the outputs (default: a temporary folder)")
    parser.add_argument(
        "--write-rates", action="store_true", help=f"record the largest build's rate in {RATES_PATH.name}"
    )
    args = parser.parse_args()
    keep_freed_memory()

    with tempfile.TemporaryDirectory(prefix="bench-build-") as scratch:
        root = args.keep or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        settings = load_build_config(build_config("settings", "0,0,1,1", args, root)).model
        zoom = _tile_zoom(args, settings)
        encoder = load_encoder(args, settings)
        rows = []
        for tiles in args.tiles:
            name = f"bench-{tiles}"
            config_path = root / f"{name}.yaml"
            config_path.write_text(yaml.safe_dump(build_config(name, square_region(tiles, zoom), args, root, zoom)))
            before = model_only_tiles_per_s(encoder, settings.zoom_level, args.batch_size, args.model_tiles)
            build = run_build(config_path, root, args.cores)
            after = model_only_tiles_per_s(encoder, settings.zoom_level, args.batch_size, args.model_tiles)
            model_rate = (before + after) / 2
            plan = read_plan(root / name / PLAN_NAME)
            count, seconds = plan.tile_count, build.seconds
            startup, embed_rate = embed_jobs_record(root / name, count)
            rows.append(
                (count, len(plan.chunk_ids), seconds, count / seconds, model_rate, startup, embed_rate, build.peak_mb)
            )
            print(
                f"built {count:,} tiles at zoom {plan.zoom} in {seconds:.1f} s; model alone {before:.1f} tiles/s"
                f" before the build, {after:.1f} after",
                flush=True,
            )
            # On a CPU the model alone keeps torch's threads busy; on a GPU its CPU share is not the bound.
            model_cpu = count / model_rate * torch.get_num_threads() if encoder.device.type == "cpu" else None
            print(cpu_lines(build, jobs_cpu(root / name), model_cpu, args.cores), flush=True)
    print(f"\ndevice {encoder.device}, {torch.get_num_threads()} torch threads, snakemake --cores {args.cores}")
    print(
        "tiles  chunks  end-to-end s  end-to-end tiles/s  model-only tiles/s  ratio"
        "  embed start-up s  embed tiles/s  peak RSS MB"
    )
    for count, chunks, seconds, rate, model_rate, startup, embed_rate, peak_mb in rows:
        print(
            f"{count:>5,}  {chunks:>6}  {seconds:>12.1f}  {rate:>18.1f}  {model_rate:>18.1f}"
            f"  {rate / model_rate:>5.2f}  {startup:>16.1f}  {embed_rate:>13.1f}  {peak_mb:>11.0f}"
        )
    if args.write_rates:
        builds = [(count, seconds) for count, _, seconds, *_ in rows]
        model_rate = max(rows)[4]
        written = write_rates(
            RATES_PATH, builds, model_rate, device=encoder.device, model_size=encoder.cfg.size, cores=args.cores
        )
        print(
            f"wrote {written.device}/{written.model}: {written.tiles_per_s} tiles/s after {written.start_s} s"
            f" of fixed start-up to {RATES_PATH}"
        )


def cpu_lines(build: BuildRun, jobs: dict[str, float], model_cpu_s: float | None, cores: int) -> str:
    """Where the build's CPU time went and, with the model's own CPU seconds, the ratio that allows: the model's
    work against the build's whole CPU time spread perfectly over `cores`."""
    by_job = ", ".join(f"{step} {cpu:.1f}" for step, cpu in sorted(jobs.items(), key=lambda item: -item[1]))
    rest = build.cpu_s - sum(jobs.values())
    lines = f"  CPU {build.cpu_s:.1f} s in all: jobs {by_job}; snakemake and the jobs' exits {rest:.1f}"
    if model_cpu_s is None:
        return lines
    return (
        f"{lines}\n  the model alone needs ~{model_cpu_s:.1f} s of it: with every CPU second packed on {cores} cores,"
        f" the ratio is at most {model_cpu_s / build.cpu_s * cores / torch.get_num_threads():.2f}"
    )


def _tile_zoom(args: argparse.Namespace, settings: Any) -> int:
    """The output zoom the build will use at the scene's latitude (automatic zoom + offset)."""
    sat_type = settings.sat_type
    if args.checkpoint != "untrained":
        from pipeline.model_setup import model_config

        sat_type = model_config(settings).sat_type
    view = ModelView.of(sat_type, settings.zoom_level)
    return output_zoom(view.size_m, SCENE_CENTRE[1]) + args.tile_zoom_offset


if __name__ == "__main__":
    main()

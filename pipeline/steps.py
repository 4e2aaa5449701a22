"""The jobs of the map workflow as commands: `python -m pipeline.steps STEP --settings settings.json ...`.

The Snakefile's rules call these. settings.json is the build's validated config with its defaults filled in
(`pipeline.config.read_settings` turns it back into typed settings); plan.npz is the build's plan, of which a
chunk's job reads only its chunk. Errors of ours print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common.atomic import atomic_path
from common.cli import USAGE_ERROR_STATUS, OneLineParser
from common.errors import Sat2SoundError
from common.memory import keep_freed_memory
from pipeline.config import BuildConfig, read_settings
from pipeline.launch import INTERRUPTED_STATUS, stop_marked

ERROR_STATUS = USAGE_ERROR_STATUS
# A job's last log line ends with its wall time and the CPU time of its whole process (interpreter start, imports
# and loader processes included): what `benchmarks/bench_build.py` adds up per job.
JOB_TIMES = re.compile(r"^(?P<step>\w+): .* \((?P<wall>[\d.]+) s, job CPU (?P<cpu>[\d.]+) s\)$")
# When the job's process started its Python code (the embed job reports its fixed start-up cost).
STARTED = time.perf_counter()


def _model(args: argparse.Namespace, config: BuildConfig) -> str:
    from pipeline.model_setup import prepare_model, untrained_notice

    settings = config.model
    record = prepare_model(settings, args.out.parent / "model", args.out)
    if record.untrained:
        print(untrained_notice(record.sat_type, settings.seed))
    elif record.description:
        print(f"model: {record.description}")
    return f"{record.checkpoint} ({record.sat_type}, {record.metadata_type}) sha256 {record.sha256[:12]}"


def _fetch(args: argparse.Namespace, config: BuildConfig) -> str:
    from pipeline.config import settings_digest
    from pipeline.fetch import fetch_chunks, fetch_stamp
    from pipeline.plan import job_chunks, read_plan

    digest = settings_digest(config, "fetch")
    fetched = fetch_chunks(
        job_chunks(args.plan, read_plan(args.plan), config.model.tiles_per_job, args.job),
        config.imagery,
        args.records_dir,
        lambda chunk: fetch_stamp(chunk, digest),
        say=lambda line: print(line, flush=True),
    )
    kept = sum(chunk.kept for chunk in fetched)
    unavailable = sum(chunk.unavailable for chunk in fetched)
    summary = {
        "chunks": [{"id": chunk.id, "kept": chunk.kept, "unavailable": chunk.unavailable} for chunk in fetched],
        "seconds": round(time.perf_counter() - STARTED, 3),
    }
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    line = f"{len(fetched) - kept} chunks fetched, {kept} kept from an earlier run"
    if unavailable:
        line += f", {unavailable} source items unavailable (failed or corrupt; their tiles are left empty)"
    return line


def _embed(args: argparse.Namespace, config: BuildConfig) -> str:
    """On a machine with several GPUs, each embed job claims one and sees only it (`common.gpu_claim`; the locks
    lie beside the jobs' records): jobs side by side then run one to a GPU."""
    from common.gpu_claim import own_gpu

    shared = config.model.shared_gpus
    with own_gpu(args.out.parent, shared, say=lambda line: print(f"embed: {line}", flush=True)) as gpu:
        if gpu is not None:
            print(f"embed: GPU {gpu} of {', '.join(shared)}, its own while the job runs", flush=True)
        return _embed_on_device(args, config)


def _embed_on_device(args: argparse.Namespace, config: BuildConfig) -> str:
    import torch

    from pipeline.config import settings_digest
    from pipeline.embed import EmbedOptions, TimeCosts, auto_batch_size, chunk_stamp, embed_chunks, stage_line
    from pipeline.model_setup import load_encoder, read_model_record
    from pipeline.plan import job_chunks, read_plan

    torch.set_num_threads(args.threads)
    model, plan = config.model, read_plan(args.plan)
    chunks = job_chunks(args.plan, plan, model.tiles_per_job, args.job)
    record = read_model_record(args.model)
    encoder = load_encoder(record, model.device, model.precision, compiled=model.compile)
    zoom_level = plan.view.zoom_level
    batch_size = auto_batch_size(encoder, zoom_level) if model.batch_size == "auto" else model.batch_size
    started = time.perf_counter() - STARTED
    print(
        f"embed: {len(chunks)} chunks on {encoder.device}{', compiled' if model.compile else ''},"
        f" batch size {batch_size} ({model.batch_size}); start-up (imports, model load) {started:.1f} s",
        flush=True,
    )
    times = model.times.all
    options = EmbedOptions(times, batch_size, model.loader_workers, config.outputs.concepts_top_k)
    embed_digest = settings_digest(config, "embed")
    reports = embed_chunks(
        chunks,
        zoom_level,
        encoder,
        config.imagery,
        options,
        args.chunks_dir,
        lambda chunk: chunk_stamp(chunk, embed_digest, record.sha256, times),
    )
    costs = TimeCosts.of_job(reports, len(times)).line()
    stages = stage_line(reports)
    for line in (costs, stages):
        if line is not None:
            print(f"embed: {line}", flush=True)
    seconds = time.perf_counter() - STARTED
    made = [report for report in reports if not report.reused]
    tiles = sum(report.tiles for report in made)
    summary = {
        "chunks": [report._asdict() for report in reports],
        "device": str(encoder.device),
        "batch_size": batch_size,
        "startup_s": round(started, 3),
        "times": [moment.label for moment in times],
        "time_costs": costs,
        "stages": stages,
        "seconds": round(seconds, 3),
    }
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    rate = tiles / max(seconds - started, 1e-9)
    return (
        f"{tiles:,} tiles in {len(made)} chunks ({len(reports) - len(made)} kept from an earlier run),"
        f" {sum(report.valid or 0 for report in made):,} valid, {rate:,.1f} tiles/s after start-up on {encoder.device}"
        + "".join(
            f"; {empty:,} left empty: imagery unavailable"
            for empty in [sum(report.empty_unavailable for report in made)]
            if empty
        )
    )


def _queries(args: argparse.Namespace, config: BuildConfig) -> str:
    from pipeline.model_setup import load_encoder, read_model_record
    from pipeline.queries import embed_queries, write_queries

    model = config.model
    encoder = load_encoder(read_model_record(args.model), model.device, model.precision, model.text_backbone)
    write_queries(args.out, embed_queries(encoder, config.queries))
    return f"{len(config.queries)} queries"


def _gallery(args: argparse.Namespace, config: BuildConfig) -> str:
    from common.atomic import atomic_directory
    from pipeline.gallery import build_gallery
    from pipeline.gallery_sources import folder_items
    from pipeline.model_setup import read_model_record

    model, items = config.model, folder_items(args.recordings, None)
    with atomic_directory(args.out) as tmp:
        summary = build_gallery(items, read_model_record(args.model).path, tmp, model.device, model.text_backbone)
    return (
        f"{summary.added:,} of {len(items):,} recordings of {args.recordings} embedded, {summary.skipped:,} skipped"
        " (could not be decoded, silent, or without a caption)"
    )


def _score(args: argparse.Namespace, config: BuildConfig) -> str:
    from pipeline.plan import read_plan
    from pipeline.store.scores import score_chunk

    chunks = read_plan(args.plan).chunk_ids
    matches = None
    if args.gallery is not None:
        from pipeline.gallery import open_gallery

        gallery, top_k = open_gallery(args.gallery), config.outputs.gallery_top_k

        def matches(embeddings: Any, valid: Any) -> dict[str, Any]:
            return gallery.tile_matches(embeddings, valid, top_k).arrays()

    for chunk in chunks:
        score_chunk(args.chunks_dir / f"{chunk}.npz", args.queries, args.out_dir / f"{chunk}.npz", matches)
    gallery_path = None if args.gallery is None else str(args.gallery)
    record = {"chunks": len(chunks), "gallery": gallery_path, "seconds": round(time.perf_counter() - STARTED, 3)}
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    found = f", each tile's {config.outputs.gallery_top_k} best recordings of {args.gallery}" if args.gallery else ""
    return f"{len(chunks)} chunks{found}"


def _mosaic(args: argparse.Namespace, config: BuildConfig) -> str:
    from pipeline.config import recorded_config
    from pipeline.model_setup import read_model_record
    from pipeline.plan import read_plan
    from pipeline.queries import read_queries
    from pipeline.store.write import imagery_gaps, write_store

    plan, queries = read_plan(args.plan), read_queries(args.queries)
    matches = None
    if args.gallery is not None:
        from pipeline.gallery import open_gallery
        from pipeline.store.write import GalleryMatches

        count = open_gallery(args.gallery).record.count
        matches = GalleryMatches(args.gallery, count, config.outputs.gallery_top_k)
    write_store(
        plan,
        args.chunks_dir,
        args.scores_dir,
        queries,
        read_model_record(args.model),
        recorded_config(config),
        args.out,
        top_k=config.outputs.concepts_top_k,
        block_px=config.outputs.zarr_chunk_px,
        workers=args.threads,
        times=config.model.times,
        gallery=matches,
    )
    gaps = imagery_gaps(plan.chunk_ids, args.chunks_dir).line
    return f"{plan.grid.width} x {plan.grid.height} px, {len(queries.ids)} queries" + (f"; {gaps}" if gaps else "")


def _cogs(args: argparse.Namespace, config: BuildConfig) -> str:
    from pipeline.export.cog import write_concept_cog, write_dominant_cog, write_query_cogs

    crs = config.outputs.crs
    paths = write_query_cogs(args.store, args.out_dir, dst_crs=crs)
    paths.append(write_concept_cog(args.store, args.out_dir, dst_crs=crs))
    paths += write_query_cogs(args.store, args.out_dir, variable="score_percentile", dst_crs=crs)
    paths.append(write_dominant_cog(args.store, args.out_dir, dst_crs=crs))
    return f"{len(paths)} COGs in {args.out_dir}: scores and percentiles per query, concepts, dominant query"


def _places(args: argparse.Namespace, config: BuildConfig) -> str:
    from pipeline.export.places import write_top_places

    count = write_top_places(args.store, config.outputs.top_k, args.gpkg, args.csv)
    return f"{count} places (outputs.top_k {config.outputs.top_k} per query) in {args.gpkg} and {args.csv}"


def _zones(args: argparse.Namespace, config: BuildConfig) -> str:
    from pipeline.export.zones import write_zones

    count = write_zones(args.store, config.outputs, args.gpkg, args.csv)
    return f"{count} zones of {config.outputs.zones} in {args.gpkg} and {args.csv}"


def _underlay(args: argparse.Namespace, config: BuildConfig) -> str:
    from pipeline.export.underlay import write_underlay
    from pipeline.plan import read_plan

    plan = read_plan(args.plan)
    written = write_underlay(config.imagery, plan.grid.bounds, plan.imagery.native_gsd_m, plan.latitude, args.out)
    return f"{written.width} x {written.height} px, {written.coverage:.0%} with imagery, in {args.out}"


def _preview(args: argparse.Namespace, config: BuildConfig) -> str:
    from pipeline.export.preview import write_preview
    from pipeline.plan import read_plan, region_feature

    write_preview(args.store, region_feature(read_plan(args.plan)), args.out, args.underlay, args.places)
    return f"wrote {args.out}"


def _project(args: argparse.Namespace, config: BuildConfig) -> str:
    from pipeline.export.qgis_project import BuildFiles, write_qgis_project

    files = BuildFiles(args.cog_dir, args.places, args.underlay, args.zones)
    report = write_qgis_project(args.store, files, config.imagery, args.out)
    return f"{report.layers} layers over {report.imagery}, in {args.out}"


Step = Callable[[argparse.Namespace, BuildConfig], str]
STEPS: dict[str, tuple[Step, tuple[str, ...], str]] = {
    "model": (_model, ("out",), "resolve or build the model weights and record them"),
    "fetch": (_fetch, ("plan", "job", "records_dir", "out"), "fetch one embed job's imagery into the tile cache"),
    "embed": (
        _embed,
        ("plan", "model", "job", "threads", "chunks_dir", "out"),
        "embed one job's chunks (on a GPU of its own where the machine has several)",
    ),
    "queries": (_queries, ("model", "out"), "embed the queries"),
    "gallery": (_gallery, ("model", "recordings", "out"), "embed outputs.gallery's recordings into a gallery"),
    "score": (
        _score,
        ("plan", "chunks_dir", "queries", "gallery?", "out_dir", "out"),
        "score every chunk's tiles against the queries (and find their best gallery recordings)",
    ),
    "mosaic": (
        _mosaic,
        ("plan", "model", "queries", "chunks_dir", "scores_dir", "gallery?", "threads", "out"),
        "write the Zarr store",
    ),
    "cogs": (
        _cogs,
        ("store", "out_dir"),
        "write per query a score and a percentile COG, the concept COG and the dominant-query COG",
    ),
    "places": (_places, ("store", "gpkg", "csv"), "write each query's top places as GeoPackage and CSV"),
    "zones": (_zones, ("store", "gpkg", "csv"), "write every query's statistics per zone as GeoPackage and CSV"),
    "underlay": (_underlay, ("plan", "out"), "write the build's imagery at preview resolution"),
    "preview": (_preview, ("store", "plan", "underlay", "places", "out"), "write the HTML preview"),
    "project": (_project, ("store", "cog_dir", "places", "underlay", "zones?", "out"), "write the QGIS project"),
}
OPTION_TYPES: dict[str, Callable[[str], Any]] = {"threads": int, "job": int}
# An option named with this suffix may be left out (None): a file only some builds have.
OPTIONAL = "?"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m pipeline.steps", description="Jobs of the map workflow")
    commands = parser.add_subparsers(dest="step", required=True, metavar="STEP")
    for name, (_, options, summary) in STEPS.items():
        command = commands.add_parser(name, help=summary)
        command.add_argument("--settings", required=True, type=Path, help="the build's settings.json")
        for option in options:
            name = option.removesuffix(OPTIONAL)
            command.add_argument(
                f"--{name.replace('_', '-')}", required=name == option, type=OPTION_TYPES.get(name, Path)
            )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if stop_marked():
        print(f"{args.step}: not started, the build was stopped (Ctrl-C)", file=sys.stderr)
        return INTERRUPTED_STATUS
    step = STEPS[args.step][0]
    keep_freed_memory()
    start = time.perf_counter()
    try:
        summary = step(args, read_settings(args.settings))
    except Sat2SoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ERROR_STATUS
    print(f"{args.step}: {summary} ({time.perf_counter() - start:.1f} s, job CPU {job_cpu_seconds():.1f} s)")
    return 0


def job_cpu_seconds() -> float:
    """User and system CPU seconds of this process and the children it has waited for."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


if __name__ == "__main__":
    sys.exit(main())

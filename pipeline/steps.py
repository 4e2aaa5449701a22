"""The jobs of the map workflow as commands: `python -m pipeline.steps STEP --settings JSON ...`.

The Snakefile's rules call these. `--settings` carries the validated config values a step's output
depends on (the rule's params: changing one reruns the step), `--runtime` those that only change how
it runs (device, batch size, tile cache). Errors of ours print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common.errors import Sat2SoundError
from pipeline.config import RUNTIME_IMAGERY_KEYS, ImagerySettings, Query, TilingSettings

ERROR_STATUS = 2


def _imagery(settings: dict[str, Any], runtime: dict[str, Any]) -> ImagerySettings:
    return ImagerySettings(**settings["imagery"], **{key: runtime[key] for key in RUNTIME_IMAGERY_KEYS})


def _plan(args: argparse.Namespace, settings: dict[str, Any], runtime: dict[str, Any]) -> str:
    from pipeline.build_plan import write_plan
    from pipeline.model_setup import read_model_record
    from pipeline.preflight import plan_build

    sat_type = read_model_record(args.model).sat_type
    tiling = TilingSettings(**settings["tiling"])
    plan = plan_build(settings["region"], sat_type, settings["zoom_level"], tiling, _imagery(settings, runtime))
    write_plan(args.out, plan)
    return f"{plan.tile_count:,} tiles at zoom {plan.tile_zoom} in {len(plan.chunks)} chunks"


def _model(args: argparse.Namespace, settings: dict[str, Any], runtime: dict[str, Any]) -> str:
    from pipeline.model_setup import prepare_model, untrained_notice

    record = prepare_model(
        settings["checkpoint"],
        settings["sat_type"],
        settings["metadata_type"],
        settings["seed"],
        args.out.parent / "model",
        args.out,
    )
    if record.untrained:
        print(untrained_notice(record.sat_type, settings["seed"]))
    return f"{record.checkpoint} ({record.sat_type}, {record.metadata_type}) sha256 {record.sha256[:12]}"


def _fetch(args: argparse.Namespace, settings: dict[str, Any], runtime: dict[str, Any]) -> str:
    from pipeline.build_plan import read_plan
    from pipeline.fetch import fetch_chunk

    report = fetch_chunk(read_plan(args.plan), args.chunk, _imagery(settings, runtime), args.out)
    return f"{report.views} views, {report.method}: {report.with_imagery}/{report.source_tiles} with imagery"


def _embed(args: argparse.Namespace, settings: dict[str, Any], runtime: dict[str, Any]) -> str:
    import torch

    from pipeline.build_plan import read_plan
    from pipeline.embed import EmbedOptions, embed_chunk
    from pipeline.model_setup import load_encoder, read_model_record

    torch.set_num_threads(args.threads)
    encoder = load_encoder(read_model_record(args.model), runtime["device"], settings["precision"])
    options = EmbedOptions(
        settings["month"],
        settings["hour"],
        runtime["batch_size"],
        runtime["loader_workers"],
        settings["top_k"],
    )
    valid = embed_chunk(read_plan(args.plan), args.chunk, encoder, _imagery(settings, runtime), options, args.out)
    return f"{valid} valid tiles on {encoder.device}"


def _queries(args: argparse.Namespace, settings: dict[str, Any], runtime: dict[str, Any]) -> str:
    from pipeline.model_setup import load_encoder, read_model_record
    from pipeline.queries import embed_queries, write_queries

    specs = [Query(**query) for query in settings["queries"]]
    record = read_model_record(args.model)
    encoder = load_encoder(record, runtime["device"], settings["precision"], settings["text_backbone"])
    write_queries(args.out, embed_queries(encoder, specs))
    return f"{len(specs)} queries"


def _score(args: argparse.Namespace, settings: dict[str, Any], runtime: dict[str, Any]) -> str:
    from pipeline.build_plan import read_plan
    from pipeline.store.scores import score_chunk

    chunks = read_plan(args.plan).chunks
    for chunk in chunks:
        score_chunk(args.chunks_dir / f"{chunk}.npz", args.queries, args.out_dir / f"{chunk}.npz")
    return f"{len(chunks)} chunks"


def _mosaic(args: argparse.Namespace, settings: dict[str, Any], runtime: dict[str, Any]) -> str:
    from pipeline.build_plan import read_plan
    from pipeline.model_setup import read_model_record
    from pipeline.queries import read_queries
    from pipeline.store.write import ChunkFiles, provenance, soundscape_dataset, write_soundscape

    plan, record, queries = read_plan(args.plan), read_model_record(args.model), read_queries(args.queries)
    files = ChunkFiles(plan, args.chunks_dir, args.scores_dir, settings["zarr_chunk_px"])
    dataset = soundscape_dataset(plan, files, queries, settings["top_k"], queries.embedding.shape[1])
    write_soundscape(dataset, provenance(record, plan, queries, settings["config"]), args.out, args.threads)
    return f"{plan.grid.width} x {plan.grid.height} px, {len(queries.ids)} queries"


def _cogs(args: argparse.Namespace, settings: dict[str, Any], runtime: dict[str, Any]) -> str:
    from pipeline.export.cog import write_concept_cog, write_query_cogs

    paths = write_query_cogs(args.store, args.out_dir, dst_crs=settings["crs"])
    paths.append(write_concept_cog(args.store, args.out_dir, dst_crs=settings["crs"]))
    return f"{len(paths)} COGs in {args.out_dir}"


def _preview(args: argparse.Namespace, settings: dict[str, Any], runtime: dict[str, Any]) -> str:
    from pipeline.build_plan import read_plan, region_feature
    from pipeline.export.preview import write_preview

    write_preview(args.store, region_feature(read_plan(args.plan).region), args.out)
    return f"wrote {args.out}"


Step = Callable[[argparse.Namespace, dict[str, Any], dict[str, Any]], str]
STEPS: dict[str, tuple[Step, tuple[str, ...], str]] = {
    "model": (_model, (), "resolve or build the model weights and record them"),
    "plan": (_plan, ("model",), "tile the region and check the imagery against the model"),
    "fetch": (_fetch, ("plan", "chunk"), "fetch one chunk's imagery into the tile cache"),
    "embed": (_embed, ("plan", "model", "chunk", "threads"), "embed one chunk's tiles"),
    "queries": (_queries, ("model",), "embed the queries"),
    "score": (
        _score,
        ("plan", "chunks_dir", "queries", "out_dir"),
        "score every chunk's tiles against the queries",
    ),
    "mosaic": (
        _mosaic,
        ("plan", "model", "queries", "chunks_dir", "scores_dir", "threads"),
        "write the Zarr store",
    ),
    "cogs": (_cogs, ("store", "out_dir"), "write one COG per query and the concept COG"),
    "preview": (_preview, ("store", "plan"), "write the HTML preview"),
}
OPTION_TYPES: dict[str, Callable[[str], Any]] = {"chunk": str, "threads": int}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.steps", description="Jobs of the map workflow")
    commands = parser.add_subparsers(dest="step", required=True, metavar="STEP")
    for name, (_, options, summary) in STEPS.items():
        command = commands.add_parser(name, help=summary)
        for option in options:
            kind = OPTION_TYPES.get(option, Path)
            command.add_argument(f"--{option.replace('_', '-')}", required=True, type=kind)
        command.add_argument(
            "--settings", type=json.loads, default={}, help="JSON: config values the output depends on"
        )
        command.add_argument("--runtime", type=json.loads, default={}, help="JSON: how to run (device, batch size...)")
        if "out_dir" not in options:
            command.add_argument("--out", required=True, type=Path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    step = STEPS[args.step][0]
    start = time.perf_counter()
    try:
        summary = step(args, args.settings, args.runtime)
    except Sat2SoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ERROR_STATUS
    print(f"{args.step}: {summary} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

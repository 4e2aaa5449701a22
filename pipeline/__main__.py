"""Command line: `python -m pipeline plan ...`, `python -m pipeline query BUILD ...`, `python -m pipeline gallery
build SOURCE ...`, `python -m pipeline listen BUILD ...` and `python -m pipeline cache info|prune ...`.

Errors of ours print one line on stderr and exit with status 2; warnings print one line each.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from common.cli import USAGE_ERROR_STATUS, OneLineParser
from common.errors import Sat2SoundError
from common.mapping_file import read_mapping
from model import GSD_BY_SAT_TYPE, TRAINED_ZOOM_LEVELS
from pipeline.build import check_named_files, describe, format_bytes, plan_build
from pipeline.config import load_plan_inputs
from pipeline.errors import BuildConfigError, GalleryError, QueryError
from pipeline.imagery.cache import TileCache, check_cache_dir

DEFAULT_QUERY_TOP_K = 50
DEFAULT_PLACE_OUT, DEFAULT_WALK_OUT = "place.flac", "soundwalk.flac"
DEFAULT_LISTEN_SECONDS = 30.0
DEFAULT_LISTEN_TOP_K = 5
DEFAULT_GALLERY_SPLIT = "test"  # a data set's split a gallery is built from: held out from training
WALKING_SPEED_M_S = 1.4
TARGET_LUFS = -23.0  # EBU R128's programme loudness
_SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?)?b?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY_SIZE_UNITS = {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.run is _run_cache_prune and args.max_size is None and args.older_than_days is None:
        print("error: cache prune needs --max-size and/or --older-than-days, e.g. --max-size 2GB", file=sys.stderr)
        return USAGE_ERROR_STATUS
    warnings.showwarning = _show_warning_line
    try:
        args.run(args)
    except Sat2SoundError as exc:
        print(f"error: {_as_written(str(exc), args)}", file=sys.stderr)
        return USAGE_ERROR_STATUS
    return 0


PLAN_CONFIG_FIX = "check the path, and write key: value lines as config/config.yaml does"
PLAN_LIMIT_HINT = "pick a smaller region or a larger --zoom-level, or raise --max-tiles"
# Flags of `plan` and the config keys they set; unset flags leave the config file's value or the schema default.
PLAN_FLAGS = {
    "region": ("region",),
    "imagery": ("imagery", "source"),
    "cache_dir": ("imagery", "cache_dir"),
    "offline": ("imagery", "offline"),
    "checkpoint": ("model", "checkpoint"),
    "sat_type": ("model", "sat_type"),
    "zoom_level": ("model", "zoom_level"),
    "tile_zoom_offset": ("tiling", "tile_zoom_offset"),
    "chunk_zoom": ("tiling", "chunk_zoom"),
    "max_tiles": ("tiling", "max_tiles"),
}


def _run_plan(args: argparse.Namespace) -> None:
    config = read_mapping(args.config, "the config", PLAN_CONFIG_FIX, BuildConfigError) if args.config else {}
    for flag, (*sections, key) in PLAN_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            target: dict[str, Any] = config
            for section in sections:
                target = target.setdefault(section, {})
            target[key] = value
    if "region" not in config:
        raise BuildConfigError("plan needs a region; pass --region or --config with a region")
    inputs = load_plan_inputs(config)
    # Any region is planned; over tiling.max_tiles the summary says the build would refuse it (--allow-large
    # is accepted for old scripts and changes nothing).
    planned = plan_build(inputs, limit_hint=PLAN_LIMIT_HINT, survey=True)
    check_named_files(inputs, planned.plan.region, weights=False)
    print("\n".join(describe(planned, offline=inputs.imagery.offline)))


def _as_written(message: str, args: argparse.Namespace) -> str:
    """`message` with the config keys the user gave as `plan` flags (all of them, without --config) named as
    those flags: `config.tiling.chunk_zoom: -1` becomes `--chunk-zoom -1`, `set model.zoom_level: 3` becomes `set
    --zoom-level 3`."""
    if args.run is not _run_plan:
        return message
    for flag, keys in PLAN_FLAGS.items():
        if args.config is None or getattr(args, flag) is not None:
            key = re.escape(".".join(keys))
            pattern = rf"\bconfig\.{key}\b:?" if len(keys) == 1 else rf"\b(?:config\.)?{key}\b:?"
            message = re.sub(pattern, f"--{flag.replace('_', '-')}", message)
    return message


def _run_query(args: argparse.Namespace) -> None:
    from pipeline.export.places import write_places
    from pipeline.new_query import (
        answer,
        answer_lines,
        check_places_files,
        new_query,
        open_built_map,
        write_map,
    )

    if args.text is not None and args.with_text is not None:
        raise QueryError("the query text is given twice (as TEXT and --text); give it once")
    built = open_built_map(args.build)
    text = args.text if args.with_text is None else args.with_text
    query = new_query(built, text, args.audio, args.id, args.top_k, maps=args.map)
    check_places_files(args.gpkg, args.csv, built.folder)
    result = answer(built, query, args.top_k)
    print("\n".join(answer_lines(built, result)))
    if args.gpkg or args.csv:
        write_places({query.id: (result.places, result.areas)}, args.gpkg, args.csv)
        print(f"places: {', '.join(str(path) for path in (args.gpkg, args.csv) if path)}")
    if args.map:
        paths = write_map(built, result)
        print(f"map: {', '.join(str(path) for path in paths)} (+ .qml)")


def _run_gallery_build(args: argparse.Namespace) -> None:
    from pipeline.gallery import build_gallery
    from pipeline.gallery_sources import dataset_items, folder_items

    start = time.perf_counter()
    if args.dataset is not None:
        if args.csv is not None:
            raise GalleryError("--csv is a folder's table, but --dataset reads Parquet shards; give one of them")
        items = dataset_items(args.source, args.dataset, args.split or DEFAULT_GALLERY_SPLIT)
    else:
        if args.split is not None:
            raise GalleryError(f"--split {args.split} picks a split of --dataset; name the dataset, or drop --split")
        items = folder_items(args.source, args.csv)
    if not items:
        raise GalleryError(f"{args.source} holds no recordings; add some")
    summary = build_gallery(items, args.checkpoint, args.out, args.device, args.text_backbone)
    print(
        f"gallery {args.out}: {summary.added:,} recordings added, {summary.kept:,} kept, {summary.skipped:,} skipped"
        f" (could not be decoded, silent, or without a caption); {summary.record.count:,} in all,"
        f" {summary.record.dim}-d, {summary.record.index_kind} index; {time.perf_counter() - start:.1f} s"
    )


def _run_listen(args: argparse.Namespace) -> None:
    from pipeline.listen import listen, listening_lines

    out = args.out if args.out is not None else Path(DEFAULT_WALK_OUT if args.along else DEFAULT_PLACE_OUT)
    result = listen(
        args.build,
        out,
        at=args.at,
        along=args.along,
        gallery=args.gallery,
        seconds=args.seconds,
        top_k=args.top_k,
        speed=args.speed,
        target_lufs=args.target_lufs,
        generator=args.generator,
    )
    print("\n".join(listening_lines(result)))


def _run_cache_info(args: argparse.Namespace) -> None:
    stats = _tile_cache(args.cache_dir).stats()
    print(f"{args.cache_dir}: {stats.files:,} tiles, {format_bytes(stats.bytes)}")


def _run_cache_prune(args: argparse.Namespace) -> None:
    removed = _tile_cache(args.cache_dir).prune(max_bytes=args.max_size, older_than_days=args.older_than_days)
    print(f"{args.cache_dir}: removed {removed.files:,} tiles, {format_bytes(removed.bytes)}")


def _tile_cache(folder: Path) -> TileCache:
    """The cache in `folder`, refused when there is no such folder."""
    check_cache_dir(folder, "--cache-dir", "give the tile cache folder (imagery.cache_dir)", existing=True)
    return TileCache(folder)


def _show_warning_line(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    print(f"warning: {message}", file=sys.stderr)


def parse_size(text: str) -> int:
    """Bytes in '2GB', '500 MB', '1.5GiB' or '1000000' (decimal units unless spelt with 'i')."""
    match = _SIZE_PATTERN.match(text)
    if match is None:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 2GB, 500MB or 1.5GiB")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    factor = _BINARY_SIZE_UNITS[unit] if unit.endswith("i") else _SIZE_UNITS[unit]
    return int(number * factor)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{value:g} is not a finite number from 0")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m pipeline", description="Sat2Sound map pipeline")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    plan = commands.add_parser(
        "plan", help="show what mapping a region will take, before any work (defaults: config/schema.json)"
    )
    plan.add_argument("--config", type=Path, help="a build config (YAML): plan exactly that build; flags override it")
    plan.add_argument(
        "--region",
        help="country or city name, vector file, bbox minlon,minlat,maxlon,maxlat, or lat,lon,RADIUS (3km);"
        " write --region=-90.2,... when it starts with a minus sign",
    )
    plan.add_argument("--imagery", help="imagery.source: esri, xyz:URL_TEMPLATE, stac:URL, or a raster PATH or URL")
    plan.add_argument("--checkpoint", help="model.checkpoint: a path, hf:// URI or 'untrained'")
    plan.add_argument("--sat-type", choices=sorted(GSD_BY_SAT_TYPE), help="model.sat_type of the untrained model")
    trained = ", ".join(str(level) for level in TRAINED_ZOOM_LEVELS)
    plan.add_argument("--zoom-level", type=int, help=f"model.zoom_level (trained: {trained})")
    plan.add_argument("--tile-zoom-offset", type=int, help="tiling.tile_zoom_offset: overlapping views")
    plan.add_argument("--chunk-zoom", type=int, help="tiling.chunk_zoom (default: output zoom - 6)")
    plan.add_argument("--max-tiles", type=int, help="tiling.max_tiles: the build's limit the plan checks against")
    plan.add_argument(
        "--allow-large", action="store_true", help="no longer needed: any region is planned (kept for old scripts)"
    )
    plan.add_argument("--cache-dir", type=str, help="imagery.cache_dir, the tile cache folder")
    plan.add_argument("--offline", action="store_true", default=None, help="count only cached imagery as available")
    plan.set_defaults(run=_run_plan)

    _add_query_parser(commands)
    _add_gallery_parser(commands)
    _add_listen_parser(commands)

    cache = commands.add_parser("cache", help="report or prune the imagery tile cache")
    actions = cache.add_subparsers(required=True, metavar="ACTION")
    info = actions.add_parser("info", help="number and size of cached tiles")
    _add_cache_options(info)
    info.set_defaults(run=_run_cache_info)
    prune = actions.add_parser("prune", help="delete old tiles, oldest first")
    _add_cache_options(prune)
    prune.add_argument("--max-size", type=_size, help="shrink the cache to at most this size, e.g. 2GB")
    prune.add_argument("--older-than-days", type=_non_negative_float, help="delete tiles older than this")
    prune.set_defaults(run=_run_cache_prune)
    return parser


def _add_query_parser(commands: Any) -> None:
    query = commands.add_parser(
        "query", help="ask a built map a new query: its best places in seconds, from the kept tile embeddings"
    )
    query.add_argument("build", type=Path, metavar="BUILD", help="the build's folder, e.g. outputs/itaipu-demo")
    query.add_argument("text", nargs="?", metavar="TEXT", help='what to listen for, e.g. "birds singing"')
    query.add_argument("--audio", metavar="FILE", help="an audio query (wav, flac, ogg or mp3); with text: composed")
    query.add_argument("--text", dest="with_text", metavar="TEXT", help="the text of an audio + text query")
    query.add_argument("--top-k", type=int, default=DEFAULT_QUERY_TOP_K, help="how many places (default: %(default)s)")
    query.add_argument(
        "--map", action="store_true", help="also write BUILD/cog/<id>.tif and <id>_percentile.tif (+ .qml)"
    )
    query.add_argument("--id", help="the query's id in file names and tables (default: made from the text)")
    query.add_argument("--csv", type=Path, help="write the places to this CSV file (as top_places.csv)")
    query.add_argument("--gpkg", type=Path, help="write the places and areas to this GeoPackage (as top_places.gpkg)")
    query.set_defaults(run=_run_query)


def _add_gallery_parser(commands: Any) -> None:
    gallery = commands.add_parser("gallery", help="a gallery of recordings and captions, embedded once")
    actions = gallery.add_subparsers(required=True, metavar="ACTION")
    build = actions.add_parser(
        "build", help="embed the recordings of SOURCE the gallery lacks (all of them for a new one)"
    )
    build.add_argument("source", type=Path, metavar="SOURCE", help="a folder of audio files, or of Parquet shards")
    build.add_argument("--checkpoint", required=True, help="the weights to embed with: those of the builds to use it")
    build.add_argument("--out", type=Path, required=True, metavar="GALLERY", help="the gallery folder")
    build.add_argument("--csv", type=Path, help="the folder's table (default: SOURCE/recordings.csv if present)")
    build.add_argument(
        "--dataset", help="geosound or soundingearth: SOURCE is a copy of the dataset in its Parquet layout"
    )
    build.add_argument("--split", help=f"the split of --dataset (default: {DEFAULT_GALLERY_SPLIT})")
    build.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    build.add_argument("--text-backbone", default="auto", help="the text backbone of the checkpoint (default: auto)")
    build.set_defaults(run=_run_gallery_build)


def _add_listen_parser(commands: Any) -> None:
    listen = commands.add_parser(
        "listen", help="what a place probably sounds like: its best gallery recordings, mixed, as FLAC + JSON"
    )
    listen.add_argument("build", type=Path, metavar="BUILD", help="the build's folder, e.g. outputs/itaipu-demo")
    where = listen.add_mutually_exclusive_group(required=True)
    where.add_argument("--at", metavar="LAT,LON", help="the place; write --at=-25.35,-54.52 for a negative latitude")
    where.add_argument("--along", type=Path, metavar="ROUTE", help="a soundwalk along the line in this GeoJSON file")
    listen.add_argument("--gallery", type=Path, help="the gallery (default: the build's outputs.gallery)")
    listen.add_argument(
        "--seconds", type=float, default=DEFAULT_LISTEN_SECONDS, help="length with --at (default: %(default)s)"
    )
    listen.add_argument(
        "--top-k", type=int, default=DEFAULT_LISTEN_TOP_K, help="recordings or captions used (default: %(default)s)"
    )
    listen.add_argument(
        "--speed", type=_positive_float, default=WALKING_SPEED_M_S, help="walking speed, m/s (default: %(default)s)"
    )
    listen.add_argument(
        "--target-lufs", type=float, default=TARGET_LUFS, help="integrated loudness (default: %(default)s LUFS)"
    )
    listen.add_argument("--generator", metavar="MODULE:FACTORY", help="a text-to-audio model prompted with captions")
    listen.add_argument("--out", type=Path, help=f"the FLAC (default: {DEFAULT_PLACE_OUT}, {DEFAULT_WALK_OUT})")
    listen.set_defaults(run=_run_listen)


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{value:g} is not a finite number above 0")
    return value


def _add_cache_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", type=Path, default=Path("tiles_cache"), help="tile cache folder")


if __name__ == "__main__":
    sys.exit(main())

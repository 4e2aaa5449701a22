"""Command line: `python -m pipeline plan ...` and `python -m pipeline cache info|prune ...`.

Errors of ours print one line on stderr and exit with status 2; warnings print one line each.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from common.errors import Sat2SoundError
from model.config import GSD_BY_SAT_TYPE
from pipeline.imagery import open_reader
from pipeline.imagery.cache import TileCache
from pipeline.plan import DEFAULT_MAX_TILES, format_bytes, format_plan, make_plan, parse_size
from pipeline.regions import parse_region

USAGE_ERROR_STATUS = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.run is _run_cache_prune and args.max_size is None and args.older_than_days is None:
        parser.error("cache prune needs --max-size and/or --older-than-days")
    warnings.showwarning = _show_warning_line
    try:
        args.run(args)
    except Sat2SoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR_STATUS
    return 0


def _run_plan(args: argparse.Namespace) -> None:
    region = parse_region(args.region)
    with open_reader(args.imagery, cache_dir=args.cache_dir, offline=args.offline) as reader:
        plan = make_plan(
            region,
            reader,
            sat_type=args.sat_type,
            zoom_level=args.zoom_level,
            zoom_offset=args.tile_zoom_offset,
            chunk_zoom=args.chunk_zoom,
            max_tiles=None if args.allow_large else args.max_tiles,
        )
    print(format_plan(plan, offline=args.offline))


def _run_cache_info(args: argparse.Namespace) -> None:
    stats = TileCache(args.cache_dir).stats()
    print(f"{args.cache_dir}: {stats.files:,} tiles, {format_bytes(stats.bytes)}")


def _run_cache_prune(args: argparse.Namespace) -> None:
    removed = TileCache(args.cache_dir).prune(max_bytes=args.max_size, older_than_days=args.older_than_days)
    print(f"{args.cache_dir}: removed {removed.files:,} tiles, {format_bytes(removed.bytes)}")


def _show_warning_line(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value:g} is negative")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description="Sat2Sound map pipeline")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    plan = commands.add_parser("plan", help="show what mapping a region will take, before any work")
    plan.add_argument(
        "--region",
        required=True,
        help="country or city name, vector file, bbox minlon,minlat,maxlon,maxlat, or lat,lon,RADIUS (3km);"
        " write --region=-90.2,... when it starts with a minus sign",
    )
    plan.add_argument("--imagery", default="esri", help="esri, xyz:URL_TEMPLATE, a raster PATH or stac:URL")
    plan.add_argument("--sat-type", default="bingmap", choices=sorted(GSD_BY_SAT_TYPE), help="checkpoint imagery")
    plan.add_argument("--zoom-level", type=_positive_int, default=1, help="checkpoint zoom level (1, 3 or 5)")
    plan.add_argument(
        "--tile-zoom-offset",
        type=int,
        default=0,
        help="output tiles this many zooms finer than the model view (overlapping views), as tiling.tile_zoom_offset",
    )
    plan.add_argument("--chunk-zoom", type=int, help="zoom of the chunk tiles (default: output zoom - 6)")
    plan.add_argument("--max-tiles", type=_positive_int, default=DEFAULT_MAX_TILES, help="refuse larger regions")
    plan.add_argument("--allow-large", action="store_true", help="plan regions above --max-tiles anyway")
    plan.set_defaults(run=_run_plan)
    _add_cache_options(plan)
    plan.add_argument("--offline", action="store_true", help="count only cached imagery as available")

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


def _add_cache_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", type=Path, default=Path("tiles_cache"), help="tile cache folder")


if __name__ == "__main__":
    sys.exit(main())

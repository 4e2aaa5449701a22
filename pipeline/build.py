"""Where a build starts: every input checked, the plan made once, and one summary of it for people.

`plan_build` is shared by the workflow and by `python -m pipeline plan`: the same defaults (config/schema.json),
the same resolution and coverage checks, the same tiles; so is `check_named_files`, the checks of the files a
config names (audio queries, zones, gallery). `start_build` is what the Snakefile runs when it starts
(through `open_workflow`): it refuses bad input with one `Sat2SoundError` line before any job, then writes
settings.json and plan.npz (each only when its content changes, so that Snakefile reruns follow content, not
time). `quiet_interrupts` makes Ctrl-C on a running build one line too.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from shapely.geometry import box

from common.cli import USAGE_ERROR_STATUS
from common.cores import usable_cores
from common.errors import Sat2SoundError
from common.mapping_file import read_mapping
from model import MODEL_INPUT_PX
from pipeline.config import BuildConfig, ImagerySettings, PlanInputs, load_build_config, write_settings
from pipeline.errors import BuildConfigError, BuildFolderError, ImageryCoverageError, OutputDirError
from pipeline.geometry import (
    WEB_MERCATOR,
    ChunkBlocks,
    ground_resolution_m,
    imagery_zoom,
    mercator_scale,
    region_latitude,
    tile_ground_size_m,
)
from pipeline.launch import CONFIG_FILE_FIX, STOP_MARK_ENV, STOPPED_LINE
from pipeline.model_setup import (
    check_device,
    check_model,
    earlier_model_record,
    model_config,
    model_description,
    untrained_notice,
)
from pipeline.plan import (
    ChunkTiles,
    ModelView,
    Plan,
    check_imagery,
    estimate_downloads,
    make_plan,
    read_plan,
    write_plan,
)
from pipeline.queries import check_query_files
from pipeline.rates import RATES_PATH, Rate, pick_rate, read_rates
from pipeline.regions import Region, parse_region
from pipeline.store.scores import SCORE_KINDS

if TYPE_CHECKING:
    from pipeline.imagery import FetchEstimate, ImageryReader

ERROR_STATUS = USAGE_ERROR_STATUS
BUILD_LIMIT_HINT = "lower tiling.tile_zoom_offset, raise model.zoom_level or tiling.max_tiles, or map a smaller region"
SETTINGS_NAME = "settings.json"
PLAN_NAME = "plan.npz"
MODEL_NAME = "model.json"
STORE_NAME = "soundscape.zarr"
# The file that stands for the store in the workflow (its consolidated metadata, written last).
STORE_MARKER = ".zmetadata"
COG_DIR = "cog"
PREVIEW_NAME = "preview.html"
PROJECT_NAME = "project.qgz"
# The zone statistics: <build>/zones.gpkg and zones.csv.
ZONES_NAME = "zones"
# Queries assumed by the size estimate when none are given (the default config has 5).
DEFAULT_QUERY_COUNT = 5
# COG overviews add at most a third to the full-resolution band.
OVERVIEW_FACTOR = 4 / 3


class Workload(NamedTuple):
    """What a build computes per tile, and the rates to time it by."""

    model_size: str  # Sat2SoundConfig.size
    embedding_dim: int
    query_count: int | None
    concepts_top_k: int
    rates: Sequence[Rate]
    times: int = 1  # model.month x model.hour


class PlannedBuild(NamedTuple):
    plan: Plan
    blocks: ChunkBlocks
    # Every chunk's tiles, or beyond EXACT_ESTIMATE_TILES tiles every `sample_step`-th chunk's (`make_plan`).
    chunks: list[ChunkTiles]
    downloads: FetchEstimate | None
    # The share of chunks the download estimate was counted on (1.0: all of them, else extrapolated).
    counted_share: float
    # The build's tile limit (tiling.max_tiles), reported when a survey plans beyond it.
    max_tiles: int | None = None
    workload: Workload | None = None


def plan_build(
    inputs: PlanInputs, *, limit_hint: str = BUILD_LIMIT_HINT, survey: bool = False, rates_path: Path = RATES_PATH
) -> PlannedBuild:
    """Parse the region, check the imagery against the model's view, tile the region and count downloads.

    The build refuses regions over tiling.max_tiles; a `survey` (`python -m pipeline plan`) plans any region,
    keeps only the chunks the download estimate samples, and its summary says when the build would refuse.
    """
    config = model_config(inputs.model)
    view = ModelView.of(config.sat_type, inputs.model.zoom_level)
    region = parse_region(inputs.region)
    tiling = replace(inputs.tiling, max_tiles=None) if survey else inputs.tiling
    with inputs.imagery.open_reader() as reader:
        check_coverage(region, reader, inputs.imagery.shown_source)
        fit = check_imagery(reader, inputs.imagery, view, region_latitude(region.geometry))
        plan, blocks, chunks = make_plan(region, view, tiling, fit, limit_hint=limit_hint)
        check_imagery_present(plan, reader)
        check_views_covered(plan, chunks, reader, inputs.imagery.min_coverage)
        downloads, share = estimate_downloads(reader, plan, chunks)
    if not survey:  # a plan still answers what the region would take once fetched
        check_offline_cache(inputs.imagery, downloads, share)
    workload = Workload(
        config.size,
        config.codebook_dim,
        inputs.query_count,
        inputs.concepts_top_k,
        read_rates(rates_path),
        len(inputs.model.times.all),
    )
    return PlannedBuild(plan, blocks, chunks, downloads, share, inputs.tiling.max_tiles, workload)


def check_coverage(region: Region, reader: ImageryReader, source: str) -> None:
    """Refuse a region that lies wholly outside the imagery's footprint (sources of the whole world pass)."""
    footprint = reader.footprint_lnglat()
    if footprint is None:
        return
    west, south, east, north = footprint
    parts = [box(west, south, east, north)]
    if west > east:
        parts = [box(west, south, 180.0, north), box(-180.0, south, east, north)]
    geometry = region.geometry
    if any(geometry.intersects(part) and not geometry.touches(part) for part in parts):
        return
    raise ImageryCoverageError(
        f"region {region.name} lies outside the imagery {source}, which covers {_format_lon(west)} to"
        f" {_format_lon(east)}, {_format_lat(south)} to {_format_lat(north)}; map a region inside it or set"
        " imagery.source to imagery of the region"
    )


def check_imagery_present(plan: Plan, reader: ImageryReader) -> None:
    """Refuse imagery without a valid pixel under the region's views (a blank raster, a wrong nodata value),
    where the reader can tell without fetching: every tile of its map would be empty."""
    if reader.holds_imagery(plan.views_extent()) is False:
        raise ImageryCoverageError(
            f"imagery {plan.imagery.source} has no valid pixel over region {plan.region.name} (each is nodata,"
            " NaN or masked there); check the file and imagery.options.nodata, or set imagery.source to imagery"
            " of the region"
        )


def check_views_covered(plan: Plan, chunks: Sequence[ChunkTiles], reader: ImageryReader, min_coverage: float) -> None:
    """Refuse a region none of whose model views the imagery can cover on `min_coverage` of their pixels (a region
    at the raster's edge): every tile would be left empty, found only after embedding. Skipped where `chunks` are
    a sample (regions of more than EXACT_ESTIMATE_TILES tiles), which could not tell."""
    if not chunks or len(chunks) < len(plan.chunk_ids):
        return
    bound = reader.coverage_bound(np.concatenate([chunk.views for chunk in chunks]))
    if bound is None or (bound >= min_coverage).any():
        return
    raise ImageryCoverageError(
        f"no model view of region {plan.region.name} can hold imagery on imagery.min_coverage ({min_coverage:g}) of"
        f" its pixels: {plan.imagery.source} covers at most {bound.max():.0%} of any; map a region further inside"
        " the imagery, or lower imagery.min_coverage"
    )


def check_offline_cache(imagery: ImagerySettings, downloads: FetchEstimate | None, share: float) -> None:
    """Refuse an offline build whose tile cache holds none of the source tiles it needs (when they were counted on
    every chunk): offline, a tile not cached is no imagery, so every tile of its map would be empty."""
    if imagery.offline and downloads is not None and share == 1.0 and downloads.tiles and not downloads.cached:
        raise ImageryCoverageError(
            f"imagery.offline is set but the tile cache {imagery.cache_dir} holds none of the {downloads.tiles:,}"
            " imagery tiles the region needs; unset imagery.offline to fetch them once, or set imagery.cache_dir to a"
            " cache that holds them"
        )


def check_output_dir(folder: Path) -> None:
    """Create `folder` if needed and make sure files can be written into it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise OutputDirError(
            f"cannot write into the output folder {folder} ({exc.strerror}); set output_dir to a writable folder"
        ) from None


def start_build(config: BuildConfig) -> PlannedBuild:
    """Check every input, then write the build's settings.json and plan.npz; raises one Sat2SoundError line."""
    check_device(config.model.device)
    planned = plan_build(config.plan_inputs)
    check_named_files(config.plan_inputs, planned.plan.region, weights=True)
    check_model(
        config.model,
        text_queries=any(query.text is not None for query in config.queries),
        recorded=earlier_model_record(config.build_dir / MODEL_NAME),
    )
    check_output_dir(config.build_dir)
    write_settings(config, config.build_dir / SETTINGS_NAME)
    write_plan(config.build_dir / PLAN_NAME, planned.plan, planned.blocks)
    return planned


def check_named_files(inputs: PlanInputs, region: Region, *, weights: bool) -> None:
    """Refuse the files a config names beside its imagery and model: audio queries, zones (against the `region`)
    and the gallery, checked against the model's weights only with `weights` (`python -m pipeline plan`, which
    runs these checks too, reads no weights)."""
    check_query_files(inputs.queries or ())
    outputs = inputs.outputs
    if outputs.zones is not None:
        # Imported here: geopandas, which a build without zones need not load.
        from pipeline.zone_file import check_zones

        check_zones(outputs, region)
    if outputs.gallery is not None:  # faiss loads only for builds that name a gallery
        from pipeline.gallery import check_build_gallery

        check_build_gallery(outputs.gallery, inputs.model if weights else None)


def open_workflow(
    config: Mapping[str, Any], main_process: bool, config_files: Sequence[str | Path] = ()
) -> tuple[BuildConfig, Plan]:
    """What the Snakefile runs first: the config checked, then, in the main process, the build started and its
    plan described on stderr; a job on a cluster node only reads the plan the main process wrote.
    `config_files` (the --configfile files Snakemake read into `config`) are read again as the project reads
    settings files, which refuses what Snakemake lets pass, a key given twice.

    Bad input prints one line, `error: ...`, and exits with status 2 before any job."""
    try:
        if main_process:
            for path in config_files:
                read_mapping(Path(path), "--configfile", CONFIG_FILE_FIX, BuildConfigError)
        build = load_build_config(config)
        if not main_process:
            return build, read_plan(build.build_dir / PLAN_NAME)
        started = start_build(build)
    except Sat2SoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(ERROR_STATUS) from None
    print("\n".join(start_lines(build, started)), file=sys.stderr)
    return build, started.plan


def quiet_interrupts() -> None:
    """Make Ctrl-C print one line: Snakemake reports every job it cancels as failed, with their tracebacks.

    Its own log (.snakemake/log) keeps the details. The interrupt then runs its course, so Snakemake still
    stops the jobs and releases its lock, and the same command resumes the build. The interrupt also creates the
    file `STOP_MARK_ENV` names: a job launched as it came finds it and does not start (`stop_marked`)."""

    # In Snakemake's own folder of the working directory, where its locks are.
    mark = Path.cwd() / ".snakemake" / f"stopped-{os.getpid()}"
    mark.unlink(missing_ok=True)
    atexit.register(mark.unlink, missing_ok=True)
    os.environ[STOP_MARK_ENV] = str(mark)
    stopped = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopped
        if not stopped:
            stopped = True
            mark.parent.mkdir(exist_ok=True)
            mark.touch()
            print(STOPPED_LINE, file=sys.stderr, flush=True)
            sys.stdout.flush()
            silent = os.open(os.devnull, os.O_WRONLY)
            os.dup2(silent, sys.stdout.fileno())
            os.dup2(silent, sys.stderr.fileno())
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, stop)


def describe(planned: PlannedBuild, *, offline: bool = False) -> list[str]:
    """A short summary with units, one fact per line."""
    plan = planned.plan
    view, grid, lat = plan.view, plan.grid, plan.latitude
    area_m2 = plan.region.area_m2
    west, south, east, north = grid.lnglat_bounds
    offset = plan.zoom - plan.auto_zoom
    zoom = f"zoom {plan.zoom}" + (f" ({plan.auto_zoom} + tile_zoom_offset {offset})" if offset else "")
    lines = [
        f"Region         {plan.region.name}: {_format_area(area_m2)} around latitude {_format_lat(lat)}",
        f"Model view     {view.sat_type} zoom level {view.zoom_level}: {_format_length(view.size_m)}"
        f" squares, {view.gsd_m:.2f} m/px at {MODEL_INPUT_PX} px",
        f"Output tiles   {plan.tile_count:,} at {zoom}",
        f"Chunks         {len(plan.chunk_ids):,} at zoom {plan.chunk_zoom}"
        f" (up to {4 ** (plan.zoom - plan.chunk_zoom):,} tiles each)",
        f"Output raster  {grid.width:,} x {grid.height:,} px in {WEB_MERCATOR},"
        f" {_format_length(tile_ground_size_m(plan.zoom, lat))}/px true GSD at {_format_lat(lat)};"
        f" extent {_format_lon(west)} {_format_lat(south)} to {_format_lon(east)} {_format_lat(north)}",
        *_describe_imagery(planned, offline),
        f"Attribution    {plan.imagery.attribution or '(none given)'}",
        *_describe_limit(planned),
        *_describe_workload(planned),
    ]
    return lines


def _describe_limit(planned: PlannedBuild) -> list[str]:
    limit, count = planned.max_tiles, planned.plan.tile_count
    if limit is None or count <= limit:
        return []
    return [f"Tile limit     {count:,} > tiling.max_tiles {limit:,}: the build refuses it; {BUILD_LIMIT_HINT}"]


def output_bytes_per_tile(workload: Workload) -> tuple[int, int]:
    """Uncompressed pixel bytes per output tile: the Zarr store (per time: float32 scores of every kind and query,
    float16 embedding, int32 + float32 concepts; bool valid) and the COGs (float32 raw and percentile per query and
    time, uint16 concepts, two uint8 bands of the dominant query, overviews). Compression shrinks them; metadata
    adds a fixed ~0.2 MB (and the top places a few kB), which dominates only tiny builds."""
    queries = DEFAULT_QUERY_COUNT if workload.query_count is None else workload.query_count
    per_time = len(SCORE_KINDS) * queries * 4 + workload.embedding_dim * 2 + workload.concepts_top_k * (4 + 4)
    zarr = workload.times * per_time + 1
    cogs = round((workload.times * 2 * queries * 4 + 2 + 2) * OVERVIEW_FACTOR)
    return zarr, cogs


def _describe_workload(planned: PlannedBuild) -> list[str]:
    workload, tiles = planned.workload, planned.plan.tile_count
    if workload is None:
        return []
    lines = []
    cpu = pick_rate(workload.rates, "cpu", workload.model_size)
    if cpu is not None:
        cores = usable_cores()
        speed_up, scaled = 1.0, ""
        if cpu.cores and cores != cpu.cores:
            speed_up, scaled = cores / cpu.cores, f", scaled from {cpu.cores} cores"
        lines.append(
            f"CPU time       ~{_format_duration(cpu.seconds(tiles, speed_up))} on this machine's {cores} cores"
            f" ({workload.model_size} model, {cpu.tiles_per_s * speed_up:,.1f} tiles/s {cpu.measure}{scaled}"
            f"{_start_up(cpu)})"
        )
    gpu = pick_rate(workload.rates, "gpu", workload.model_size)
    if gpu is not None:
        hours = gpu.seconds(tiles) / 3600
        lines.append(
            f"GPU time       ~{_format_duration(gpu.seconds(tiles))} on one {gpu.hardware}: {hours:,.2f} GPU-hours"
            f" ({gpu.model} model, {gpu.tiles_per_s:,.0f} tiles/s {gpu.measure}{_start_up(gpu)})"
        )
    if workload.times > 1:
        lines.append(
            f"Times          {workload.times} (model.month x model.hour): the times above are of one; each extra"
            " time runs only the metadata fusion and pooling (the embed log says what it costs)"
        )
    zarr, cogs = output_bytes_per_tile(workload)
    queries = (
        f"{DEFAULT_QUERY_COUNT} queries assumed" if workload.query_count is None else f"{workload.query_count} queries"
    )
    if workload.times > 1:
        queries += f" at {workload.times} times"
    lines.append(
        f"Outputs        ~{format_bytes(tiles * (zarr + cogs))} on disk: Zarr {format_bytes(tiles * zarr)},"
        f" COGs {format_bytes(tiles * cogs)} ({queries}, {workload.embedding_dim}-d embedding;"
        " pixels uncompressed)"
    )
    downloads = planned.downloads
    if downloads is not None:
        missing = downloads.tiles_to_fetch
        approx = "~" if planned.counted_share < 1.0 else ""
        if missing > 0:
            tile_bytes = downloads.bytes_to_fetch / missing
            lines.append(
                f"Tile cache     ~{format_bytes(round(downloads.tiles * tile_bytes))} on disk for"
                f" {approx}{downloads.tiles:,} imagery tiles (~{format_bytes(round(tile_bytes))} each)"
            )
    return lines


def _start_up(rate: Rate) -> str:
    if rate.start_s is None:
        return "; a build's start-up not measured there"
    return f" + {rate.start_s:.0f} s start-up" if rate.start_s else ""


def _describe_imagery(planned: PlannedBuild, offline: bool) -> list[str]:
    plan, downloads = planned.plan, planned.downloads
    fit = plan.imagery
    resolution = f"{fit.native_gsd_m:.3g} m/px"
    if downloads is None:
        return [f"Imagery        {fit.source_id} at {resolution}: read on demand, nothing to download up front"]
    zooms = (
        f"zoom {downloads.min_zoom}"
        if downloads.min_zoom == downloads.max_zoom
        else f"zooms {downloads.min_zoom}-{downloads.max_zoom}"
    )
    approx = "~" if planned.counted_share < 1.0 else ""
    missing = downloads.tiles_to_fetch
    at_cap = downloads.seconds_at_cap
    fetch = (
        f"{approx}{missing:,} missing (offline: read as no imagery)"
        if offline
        else f"{approx}{missing:,} to fetch, ~{format_bytes(downloads.bytes_to_fetch)}"
        + ("" if at_cap is None else f", ~{_format_duration(at_cap)} at {downloads.max_requests_per_s:g} req/s")
    )
    gsd_m = ground_resolution_m(downloads.max_zoom, plan.latitude)
    lines = [
        f"Imagery        {fit.source_id} at {zooms} ({gsd_m:.2f} m/px true GSD at {_format_lat(plan.latitude)}):"
        f" {approx}{downloads.tiles:,} tiles, {approx}{downloads.cached:,} cached, {fetch}"
    ]
    if approx:
        lines.append(f"               (counted on {planned.counted_share * 100:.2g}% of the chunks and scaled up)")
    wanted = imagery_zoom(plan.view.gsd_m * mercator_scale(plan.latitude))
    if wanted > downloads.source_max_zoom:
        lines.append(
            f"               (the source stops at zoom {downloads.source_max_zoom}: coarser than the model's"
            f" {plan.view.gsd_m:.2f} m/px)"
        )
    if downloads.terms_note is not None and not offline:
        lines.append(f"Terms          {downloads.terms_note}")
    return lines


def check_build_folder(folder: Path, names: Sequence[str]) -> None:
    """Refuse, in one line, a folder that is not a finished build holding `names` (files a build writes)."""
    if not folder.is_dir():
        raise BuildFolderError(f"no build folder {folder}; pass the folder a build wrote (<output_dir>/<name>)")
    missing = [name for name in names if not (folder / name).exists()]
    if missing:
        raise BuildFolderError(
            f"{folder} is no finished map build (no {', '.join(missing)}); pass the folder a build wrote"
            " (<output_dir>/<name>), or finish its build"
        )


def retry_unavailable(build_dir: Path | str, jobs: int) -> int:
    """Make this run retry imagery an earlier run could not have: drop the records of embed jobs whose chunks
    left tiles empty for it (embedded/<job>.json) and of their fetch jobs (imagery/<job>.json), and the store's
    marker, so that Snakemake reruns them and what follows (each of the `jobs` redoes only those chunks; a
    missing record alone reruns nothing while the outputs after it are there). Returns how many jobs will rerun."""
    build = Path(build_dir)
    rerun = 0
    for job in range(jobs):
        record = build / "embedded" / f"{job}.json"
        try:
            chunks = json.loads(record.read_text())["chunks"]
        except (OSError, ValueError, KeyError):
            continue
        if any(chunk.get("empty_unavailable") or chunk.get("unavailable_source_tiles") for chunk in chunks):
            rerun += 1
            record.unlink(missing_ok=True)
            (build / "imagery" / f"{job}.json").unlink(missing_ok=True)
    if rerun:
        (build / STORE_NAME / STORE_MARKER).unlink(missing_ok=True)
    return rerun


def idle_gpus_line(config: BuildConfig, jobs: int, gpu_limit: int | None) -> str | None:
    """What to add when a build of several embed jobs would run them one at a time (the local profile's `gpu=1`)
    on a machine whose GPUs they could share out (`ModelSettings.shared_gpus`); None when nothing would idle."""
    gpus = len(config.model.shared_gpus) if jobs > 1 and gpu_limit == 1 else 0
    if gpus < 2:
        return None
    return f"{gpus} GPUs here and embed jobs take one each: add --resources gpu={gpus} to run one on each"


def finish_lines(build_dir: Path | str, store: Path | str, zones: bool = False) -> list[str]:
    """What the workflow prints when it ends well: where the outputs are (`zones`: with the zone statistics) and,
    when imagery could not be had (`imagery.on_missing: leave_empty`), how many tiles were left empty and why
    (from the store's attributes)."""
    lines = [
        f"done: {build_dir}/{PREVIEW_NAME}, {build_dir}/{PROJECT_NAME} (QGIS), {build_dir}/{COG_DIR}/*.tif (+ .qml),"
        f" {build_dir}/top_places.gpkg (+ .csv),{f' {build_dir}/{ZONES_NAME}.gpkg (+ .csv),' if zones else ''}"
        f" {store}"
    ]
    try:
        metadata = json.loads((Path(store) / STORE_MARKER).read_text())
        attrs = metadata["metadata"][".zattrs"]
    except (OSError, ValueError, KeyError):
        return lines
    if attrs.get("empty_tiles_reason"):
        lines.append(f"warning: {attrs['empty_tiles_reason']}")
    return lines


def start_lines(config: BuildConfig, planned: PlannedBuild) -> list[str]:
    """What the workflow prints when it starts: the build folder, the plan, and plainly when the model is untrained."""
    lines = [
        f"build {config.build_dir}: {len(config.queries)} queries",
        *describe(planned, offline=config.imagery.offline),
    ]
    if config.model.untrained:
        lines.append(untrained_notice(config.model.sat_type, config.model.seed))
    elif description := model_description(config.model):
        lines.append(f"model: {description}")
    return lines


def _format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:,.1f} h"


def _format_lat(lat: float) -> str:
    return f"{abs(lat):.4f}°{'S' if round(lat, 4) < 0 else 'N'}"


def _format_lon(lon: float) -> str:
    return f"{abs(lon):.4f}°{'W' if round(lon, 4) < 0 else 'E'}"


def _format_length(metres: float) -> str:
    return f"{metres / 1000:.1f} km" if metres >= 10_000 else f"{metres:,.0f} m"


def _format_area(square_metres: float) -> str:
    return f"{square_metres / 1e6:,.1f} km²" if square_metres >= 1e5 else f"{square_metres:,.0f} m²"


def format_bytes(count: int) -> str:
    """Decimal units (kB, MB, GB) as disks and downloads are sized."""
    value = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000.0:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000.0
    return f"{value:.1f} TB"

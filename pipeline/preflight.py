"""What the workflow checks when it starts, before any job runs, and the plan it derives.

Every bad input (config, query file, output folder, model, region, imagery too coarse for the model)
raises one `Sat2SoundError` line; the Snakefile prints it and exits with status 2.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline.build_plan import BuildPlan, make_build_plan
from pipeline.config import BuildConfig, ImagerySettings, TilingSettings
from pipeline.errors import OutputDirError
from pipeline.fetch import open_imagery
from pipeline.geometry import region_latitude
from pipeline.gsd import check_imagery_fit, native_gsd_m
from pipeline.model_setup import model_config, untrained_notice
from pipeline.queries import check_query_files
from pipeline.regions import parse_region


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


def plan_build(
    region_spec: str, sat_type: str, zoom_level: int, tiling: TilingSettings, imagery: ImagerySettings
) -> BuildPlan:
    """Parse the region, check the imagery against the model's view and tile the region."""
    region = parse_region(region_spec)
    with open_imagery(imagery) as reader:
        native_m = imagery.native_gsd_m or native_gsd_m(reader, region_latitude(region.geometry))
        fit = check_imagery_fit(reader, imagery.source, native_m, sat_type, zoom_level)
    return make_build_plan(region, sat_type, zoom_level, tiling, fit)


def preflight(config: BuildConfig) -> BuildPlan:
    """The build's plan, once every input has been checked."""
    check_query_files(config.queries)
    sat_type = model_config(config.model).sat_type
    plan = plan_build(config.region, sat_type, config.model.zoom_level, config.tiling, config.imagery)
    check_output_dir(config.build_dir)
    return plan


def describe(config: BuildConfig, plan: BuildPlan) -> list[str]:
    """Lines saying what the build will make, and plainly when its model is untrained."""
    offset = plan.tile_zoom - plan.auto_tile_zoom
    zoom = f"zoom {plan.tile_zoom}" + (f" ({plan.auto_tile_zoom} + tile_zoom_offset {offset})" if offset else "")
    lines = [
        f"build {config.build_dir}: {plan.tile_count:,} tiles at {zoom} in {len(plan.chunks)} chunk(s),"
        f" a {plan.grid.width} x {plan.grid.height} px grid, {len(config.queries)} queries",
        f"model view: {plan.sat_type} zoom_level {plan.zoom_level}, {plan.footprint_size_m / 1000:g} km"
        f" squares at {plan.imagery.model_gsd_m:.3g} m/px; imagery {plan.imagery.source}"
        f" at {plan.imagery.native_gsd_m:.3g} m/px",
    ]
    if config.model.untrained:
        lines.append(untrained_notice(config.model.sat_type, config.model.seed))
    return lines

# Config, the build's start (every input checked, the plan made once), the build's paths, and each step's
# rerun trigger.

import shlex
import sys
from pathlib import Path

from model.checkpoint import checkpoint_files
from model.hub import is_hub_uri
from pipeline.build import (
    COG_DIR,
    MODEL_NAME,
    PLAN_NAME,
    PREVIEW_NAME,
    PROJECT_NAME,
    SETTINGS_NAME,
    STORE_MARKER,
    STORE_NAME,
    ZONES_NAME,
    idle_gpus_line,
    open_workflow,
    quiet_interrupts,
    retry_unavailable,
)
from pipeline.config import settings_digest
from pipeline.plan import embed_jobs

if workflow.is_main_process:
    quiet_interrupts()
CFG, PLANNED = open_workflow(config, workflow.is_main_process, workflow.overwrite_configfiles or ())

BUILD = str(CFG.build_dir)
SETTINGS = f"{BUILD}/{SETTINGS_NAME}"
PLAN = f"{BUILD}/{PLAN_NAME}"
MODEL = f"{BUILD}/{MODEL_NAME}"
QUERIES = f"{BUILD}/queries.npz"
STORE = f"{BUILD}/{STORE_NAME}"
COGS = f"{BUILD}/{COG_DIR}"
LOGS = f"{BUILD}/logs"
# The zone statistics, made only when outputs.zones names a polygon file.
ZONES = CFG.outputs.zones
ZONE_TABLES = {"gpkg": f"{BUILD}/{ZONES_NAME}.gpkg", "csv": f"{BUILD}/{ZONES_NAME}.csv"} if ZONES else {}
# The sound gallery (outputs.gallery): one made beforehand, or the build's own, embedded from a folder of recordings.
GALLERY = None
if CFG.outputs.gallery is not None:
    from pipeline.gallery import gallery_of_build

    GALLERY = gallery_of_build(CFG.outputs.gallery, CFG.build_dir)
GALLERY_RECORD = [str(GALLERY.record_path)] if GALLERY else []
GALLERY_OPTION = f" --gallery {shlex.quote(str(GALLERY.folder))}" if GALLERY else ""
QUERY_IDS = [query.id for query in CFG.queries]
STEP = f"{shlex.quote(sys.executable)} -m pipeline.steps"
# Embed jobs: one process each loads the model once and works through its chunks (chunks/<chunk>.npz).
JOBS = embed_jobs(PLANNED, CFG.model.tiles_per_job)
EMBEDDED = [f"{BUILD}/embedded/{job}.json" for job in range(len(JOBS))]
if workflow.is_main_process and retry_unavailable(BUILD, len(JOBS)):
    print("retrying the imagery an earlier run could not have (imagery.on_missing: leave_empty)", file=sys.stderr)
# The --resources gpu limit (profiles/local: 1), an int in Snakemake 8 and a Resource (its .value) in 9.
GPU_LIMIT = workflow.global_resources.get("gpu")
GPU_LIMIT = getattr(GPU_LIMIT, "value", GPU_LIMIT)
if workflow.is_main_process and (line := idle_gpus_line(CFG, len(JOBS), GPU_LIMIT)):
    print(line, file=sys.stderr)


def local_checkpoint(settings):
    """The checkpoint file and its config when model.checkpoint names local files; nothing for the Hub's."""
    if settings.untrained or is_hub_uri(settings.checkpoint):
        return []
    return [str(path) for path in checkpoint_files(Path(settings.checkpoint))]


def digest(step):
    """The rule's params: a hash of the config values its output depends on (see pipeline.config.step_values)."""
    return settings_digest(CFG, step)


wildcard_constraints:
    job=r"\d+",

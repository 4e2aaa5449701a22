# Config, the build's start (every input checked, the plan made once), the build's paths, and each step's
# rerun trigger.

import shlex
import sys
from pathlib import Path

from common.errors import Sat2SoundError
from pipeline.build import PLAN_NAME, SETTINGS_NAME, start_build, start_lines
from pipeline.config import load_build_config, settings_digest
from pipeline.plan import embed_jobs, read_plan


def stop(exc):
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)


try:
    CFG = load_build_config(config)
except Sat2SoundError as exc:
    stop(exc)

BUILD = str(CFG.build_dir)
SETTINGS = f"{BUILD}/{SETTINGS_NAME}"
PLAN = f"{BUILD}/{PLAN_NAME}"
MODEL = f"{BUILD}/model.json"
QUERIES = f"{BUILD}/queries.npz"
STORE = f"{BUILD}/soundscape.zarr"
LOGS = f"{BUILD}/logs"
QUERY_IDS = [query.id for query in CFG.queries]
STEP = f"{shlex.quote(sys.executable)} -m pipeline.steps"

if workflow.is_main_process:
    try:
        STARTED = start_build(CFG)
    except Sat2SoundError as exc:
        stop(exc)
    print("\n".join(start_lines(CFG, STARTED)), file=sys.stderr)
    PLANNED = STARTED.plan
else:
    # A job on a cluster node reads the Snakefile again: it only reads the plan the main run wrote.
    PLANNED = read_plan(Path(PLAN))
CHUNKS = PLANNED.chunk_ids
# Embed jobs: one process each loads the model once and works through its chunks (chunks/<chunk>.npz).
JOBS = embed_jobs(PLANNED, CFG.model.tiles_per_job)
EMBEDDED = [f"{BUILD}/embedded/{job}.json" for job in range(len(JOBS))]


def digest(step):
    """The rule's params: a hash of the config values its output depends on (see pipeline.config.step_values)."""
    return settings_digest(CFG, step)


wildcard_constraints:
    chunk=r"\d+_\d+_\d+",
    job=r"\d+",

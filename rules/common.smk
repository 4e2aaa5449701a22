# Config, start-up checks, the build's paths and the settings each rule hands to its step.

import json
import shlex
import sys
from pathlib import Path

from model.errors import Sat2SoundError
from pipeline.build_plan import read_plan
from pipeline.config import load_build_config, runtime_settings, step_settings
from pipeline.fetch import fetches_ahead
from pipeline.preflight import describe, preflight


def stop(exc):
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)


try:
    CFG = load_build_config(config)
except Sat2SoundError as exc:
    stop(exc)

BUILD = str(CFG.build_dir)
PLAN = f"{BUILD}/plan.json"
MODEL = f"{BUILD}/model.json"
QUERIES = f"{BUILD}/queries.npz"
STORE = f"{BUILD}/soundscape.zarr"
LOGS = f"{BUILD}/logs"
QUERY_IDS = [query.id for query in CFG.queries]
STEP = f"{shlex.quote(sys.executable)} -m pipeline.steps"
SETTINGS = {step: json.dumps(values) for step, values in step_settings(CFG).items()}
RUNTIME = json.dumps(runtime_settings(CFG))


def step_settings_of(step):
    # A function, so that Snakemake does not read the braces of URL templates in the JSON as wildcards.
    return lambda wildcards: SETTINGS[step]


if workflow.is_main_process:
    try:
        BUILD_PLAN = preflight(CFG)
    except Sat2SoundError as exc:
        stop(exc)
    print("\n".join(describe(CFG, BUILD_PLAN)), file=sys.stderr)
    CHUNKS = BUILD_PLAN.chunks
else:
    # A job on a cluster node reads the Snakefile again: the main run has written the plan by then.
    CHUNKS = read_plan(Path(PLAN)).chunks if Path(PLAN).exists() else ()


wildcard_constraints:
    chunk=r"\d+_\d+_\d+",

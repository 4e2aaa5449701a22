"""How long a large region's build takes to start: Snakemake's dry run of it (the build's start checks and plan,
then Snakemake's DAG of jobs), and the jobs it plans.

    python benchmarks/bench_dag.py [--region France --region=-10,36,30,60] [--zoom-level 1]

Each region is mapped by the untrained bingmap model at `--zoom-level` (1: 180 m views, output tiles at zoom 17)
over Esri World Imagery, with an empty tile cache in a temporary folder (a dry run fetches nothing) and
`tiling.max_tiles` raised to let the build through. Printed per region: its tiles and chunks, the jobs per rule,
the dry run's wall seconds and the peak resident memory of its process. Jobs and tracked files must grow with
the embed jobs (`model.tiles_per_job` tiles each), not with the chunks: Snakemake matches files against rules'
outputs, and a rule listing every chunk's file made a 48,108-chunk region's DAG quadratic (over 8 minutes).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REGIONS = ("France", "-10,36,30,60")
# The dry run in a child that reports its own peak memory (the build's start and Snakemake run in one process).
CHILD = (
    "import atexit, resource, sys; atexit.register(lambda: print('PEAK_KB', resource.getrusage("
    "resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)); from pipeline.launch import main; sys.exit(main())"
)


class DryRun(NamedTuple):
    region: str
    tiles: str
    chunks: str
    jobs: dict[str, str]
    seconds: float
    peak_mb: int | None


def dry_run(region: str, zoom_level: int, work: Path) -> DryRun:
    config = {
        "name": "dag",
        "output_dir": str(work / "out"),
        "region": region,
        "imagery": {"source": "esri", "cache_dir": str(work / "tiles")},
        "model": {"checkpoint": "untrained", "sat_type": "bingmap", "zoom_level": zoom_level},
        "tiling": {"max_tiles": 10**12},
        "queries": [{"id": "birds", "text": "birds singing"}],
        "outputs": {"gallery": None, "zones": None},
    }
    path = work / "config.json"
    path.write_text(json.dumps(config))
    command = [sys.executable, "-c", CHILD, "--profile", "profiles/local", "--configfile", str(path), "-n"]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"dry run of {region} failed:\n{result.stderr[-2000:]}")
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", result.stdout.split("Job stats:")[1].split("\n\n")[0], re.MULTILINE))
    tiles = re.search(r"Output tiles\s+([\d,]+)", result.stderr)
    chunks = re.search(r"Chunks\s+([\d,]+)", result.stderr)
    peak = re.search(r"PEAK_KB (\d+)", result.stderr)
    return DryRun(
        region,
        tiles.group(1) if tiles else "?",
        chunks.group(1) if chunks else "?",
        jobs,
        round(seconds, 1),
        round(int(peak.group(1)) / 1024) if peak else None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--region", action="append", help="region spec (repeatable; write --region=-10,... for bboxes)")
    parser.add_argument("--zoom-level", type=int, default=1)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")
    for region in args.region or DEFAULT_REGIONS:
        with tempfile.TemporaryDirectory(prefix="bench-dag-") as folder:
            found = dry_run(region, args.zoom_level, Path(folder))
        listed = ", ".join(f"{rule} {count}" for rule, count in found.jobs.items() if rule != "total")
        print(
            f"{found.region}: {found.tiles} tiles in {found.chunks} chunks; {found.jobs.get('total')} jobs"
            f" ({listed}); dry run {found.seconds} s, peak RSS {found.peak_mb} MB"
        )


if __name__ == "__main__":
    main()

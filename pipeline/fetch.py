"""Fetch one chunk's imagery into the shared tile cache, ahead of the model (the reader decides what that means).

On a cluster the fetch jobs run where snakemake runs (compute nodes often have no internet), so embed jobs on
GPU nodes read from disk. imagery/<chunk>.json records what was done, including the source tiles that could not
be had (`unavailable`, z/x/y; only with `imagery.on_missing: leave_empty`, else the job fails counting them).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from common.atomic import atomic_path
from model import MODEL_INPUT_PX
from pipeline.config import ImagerySettings
from pipeline.imagery import PrefetchReport
from pipeline.plan import ChunkTiles


def fetch_chunk(chunk: ChunkTiles, imagery: ImagerySettings, out: Path) -> PrefetchReport:
    start = time.perf_counter()
    with imagery.open_reader() as reader:
        report = reader.prefetch(chunk.views, MODEL_INPUT_PX)
    record = {
        **report._asdict(),
        "unavailable": [list(tile) for tile in report.unavailable],
        "source_id": reader.source_id,
        "seconds": round(time.perf_counter() - start, 3),
    }
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    return report

"""Fetch one embed job's imagery into the shared tile cache, chunk by chunk, ahead of the model (the reader decides
what that means).

On a cluster the fetch jobs run where snakemake runs (compute nodes often have no internet), so embed jobs on
GPU nodes read from disk. One fetch job serves one embed job's chunks: a region of tens of thousands of chunks
makes as many fetch jobs as embed jobs, not one per chunk. imagery/chunks/<chunk>.json records what was done for
a chunk, including the source tiles that could not be had (`unavailable`, z/x/y; only with
`imagery.on_missing: leave_empty`, else the job fails counting them), and a rerun skips a chunk whose record says
it was fetched whole for the same imagery settings and views; imagery/<job>.json sums the job up.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from common.atomic import atomic_path
from model import MODEL_INPUT_PX
from pipeline.config import ImagerySettings
from pipeline.plan import ChunkTiles


class FetchedChunk(NamedTuple):
    """One chunk's fetch record: `kept` when an earlier run had fetched it whole."""

    id: str
    kept: bool
    record: dict[str, Any]

    @property
    def unavailable(self) -> int:
        return len(self.record["unavailable"])


def fetch_stamp(chunk: ChunkTiles, settings_digest: str) -> str:
    """What a chunk's fetch depends on: the fetch step's imagery settings and the chunk's model views."""
    digest = hashlib.sha256(settings_digest.encode())
    digest.update(np.ascontiguousarray(chunk.views, dtype=np.float64).tobytes())
    return digest.hexdigest()[:24]


def fetch_chunks(
    chunks: Sequence[ChunkTiles],
    imagery: ImagerySettings,
    records_dir: Path,
    stamp: Callable[[ChunkTiles], str],
    say: Callable[[str], None] = print,
) -> list[FetchedChunk]:
    """Fetch each chunk's imagery unless its record (records_dir/<chunk>.json) holds `stamp(chunk)` and no
    unavailable tiles; `say` a line a chunk."""
    fetched = []
    with imagery.open_reader() as reader:
        for index, chunk in enumerate(chunks, 1):
            path, chunk_stamp = records_dir / f"{chunk.id}.json", stamp(chunk)
            record = _whole_record(path, chunk_stamp)
            if record is not None:
                fetched.append(FetchedChunk(chunk.id, True, record))
                continue
            start = time.perf_counter()
            report = reader.prefetch(chunk.views, MODEL_INPUT_PX)
            record = {
                **report._asdict(),
                "unavailable": [list(tile) for tile in report.unavailable],
                "source_id": reader.source_id,
                "stamp": chunk_stamp,
                "seconds": round(time.perf_counter() - start, 3),
            }
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(record, indent=1))
            fetched.append(FetchedChunk(chunk.id, False, record))
            lacking = f", {len(report.unavailable)} unavailable" if report.unavailable else ""
            say(
                f"fetch: chunk {index}/{len(chunks)} {chunk.id}: {report.views:,} views, {report.method}:"
                f" {report.with_imagery:,}/{report.source_items:,} with imagery{lacking} ({record['seconds']:.1f} s)"
            )
    return fetched


def _whole_record(path: Path, stamp: str) -> dict[str, Any] | None:
    """The chunk's record when it was fetched for `stamp` with nothing unavailable (else it is fetched again)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("stamp") != stamp or record.get("unavailable") != []:
        return None
    return record

"""Jobs side by side on a machine with several GPUs each hold one of their own, and see only it."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.cores import VISIBLE_ENV
from common.gpu_claim import own_gpu

# A job: claim a GPU, say which and what CUDA_VISIBLE_DEVICES then is, hold it for argv[3] seconds.
JOB = """
import json, os, sys, time
from pathlib import Path
from common.gpu_claim import own_gpu
with own_gpu(Path(sys.argv[1]), sys.argv[2].split(","), poll_s=0.05) as gpu:
    start = time.time()
    print(json.dumps({"claimed": gpu, "sees": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": start}), flush=True)
    time.sleep(float(sys.argv[3]))
    print(json.dumps({"end": time.time()}), flush=True)
"""


def start_job(folder: Path, gpus: str, hold_s: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", JOB, str(folder), gpus, str(hold_s)], stdout=subprocess.PIPE, text=True
    )


def test_three_jobs_on_two_gpus_never_share_one_and_the_third_waits_for_a_free_one(tmp_path: Path) -> None:
    jobs = [start_job(tmp_path, "GPU-a,GPU-b", 1.0) for _ in range(3)]
    runs = []
    for job in jobs:
        out, _ = job.communicate(timeout=60)
        lines = out.splitlines()
        runs.append({**json.loads(lines[-2]), **json.loads(lines[-1])})
        assert job.returncode == 0
    assert all(run["sees"] == run["claimed"] for run in runs), runs
    assert {run["claimed"] for run in runs} == {"GPU-a", "GPU-b"}
    for gpu in ("GPU-a", "GPU-b"):
        spans = sorted((run["start"], run["end"]) for run in runs if run["claimed"] == gpu)
        assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(spans)), spans


def test_a_waiting_job_says_so_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    holder = start_job(tmp_path, "0,1", 30.0)
    other = start_job(tmp_path, "0,1", 30.0)
    try:
        for job in (holder, other):
            assert job.stdout is not None
            assert "claimed" in job.stdout.readline()
        said: list[str] = []
        started = time.monotonic()

        def free_one_soon(line: str) -> None:
            said.append(line)
            holder.kill()

        with own_gpu(tmp_path, ["0", "1"], say=free_one_soon, poll_s=0.05) as gpu:
            assert os.environ[VISIBLE_ENV] == gpu
        assert len(said) == 1 and "all 2 GPUs are held" in said[0], said
        assert time.monotonic() - started < 20
    finally:
        for job in (holder, other):
            job.kill()
            job.wait()


def test_a_killed_job_frees_its_gpu(tmp_path: Path) -> None:
    first = start_job(tmp_path, "0,1", 60.0)
    assert first.stdout is not None
    assert json.loads(first.stdout.readline())["claimed"] == "0"
    first.send_signal(signal.SIGKILL)
    first.wait()
    second = start_job(tmp_path, "0,1", 0.0)
    out, _ = second.communicate(timeout=60)
    assert json.loads(out.splitlines()[0])["claimed"] == "0"


def test_with_one_gpu_or_none_nothing_is_claimed_and_nothing_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(VISIBLE_ENV, "3")
    for gpus in ([], ["3"]):
        with own_gpu(tmp_path / "locks", gpus) as gpu:
            assert gpu is None and os.environ[VISIBLE_ENV] == "3"
    assert not (tmp_path / "locks").exists()


def test_the_block_ends_with_cuda_visible_devices_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VISIBLE_ENV, "4,5")
    with own_gpu(tmp_path, ["4", "5"]) as gpu:
        assert (gpu, os.environ[VISIBLE_ENV]) == ("4", "4")
    assert os.environ[VISIBLE_ENV] == "4,5"
    monkeypatch.delenv(VISIBLE_ENV)
    with own_gpu(tmp_path, ["0", "1"]):
        assert os.environ[VISIBLE_ENV] == "0"
    assert VISIBLE_ENV not in os.environ

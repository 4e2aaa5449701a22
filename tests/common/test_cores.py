"""The cores a process may use follow its CPU affinity, as SLURM and taskset set it; a GPU is seen as torch sees it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.cores import gpu_visible


def test_a_process_pinned_to_one_core_has_one() -> None:
    one = min(os.sched_getaffinity(0))
    code = f"import os; os.sched_setaffinity(0, {{{one}}}); import common.cores as c; print(c.usable_cores())"
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert printed.strip() == "1"


@pytest.mark.parametrize(
    ("device_files", "visible", "seen"),
    [
        ([], None, False),
        (["proc/driver/nvidia/gpus/0000:65:00.0/information"], None, True),
        (["proc/driver/nvidia/gpus/0000:65:00.0/information"], "0,1", True),
        (["proc/driver/nvidia/gpus/0000:65:00.0/information"], "", False),
        (["proc/driver/nvidia/gpus/0000:65:00.0/information"], "-1", False),
        (["dev/kfd"], None, True),
        (["dev/nvidia0", "dev/nvidiactl"], None, True),
        (["dev/nvidiactl"], None, False),
    ],
)
def test_a_gpu_is_seen_where_a_driver_shows_one_and_cuda_visible_devices_does_not_hide_it(
    device_files: list[str], visible: str | None, seen: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in device_files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    (tmp_path / "proc/driver/nvidia/gpus").mkdir(parents=True, exist_ok=True)  # a driver loaded without a GPU
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert gpu_visible(tmp_path) is seen

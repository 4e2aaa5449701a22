"""The cores a process may use follow its CPU affinity, as SLURM and taskset set it; GPUs are seen as torch sees
them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.cores import visible_gpus


def test_a_process_pinned_to_one_core_has_one() -> None:
    one = min(os.sched_getaffinity(0))
    code = f"import os; os.sched_setaffinity(0, {{{one}}}); import common.cores as c; print(c.usable_cores())"
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert printed.strip() == "1"


NVIDIA = "proc/driver/nvidia/gpus/0000:{}:00.0/information"


@pytest.mark.parametrize(
    ("device_files", "visible", "seen"),
    [
        ([], None, ()),
        ([NVIDIA.format(65)], None, ("0",)),
        ([NVIDIA.format(65), NVIDIA.format(66), NVIDIA.format(67)], None, ("0", "1", "2")),
        ([NVIDIA.format(65), NVIDIA.format(66)], "1", ("1",)),
        ([NVIDIA.format(65), NVIDIA.format(66)], "GPU-5c3e, GPU-77af", ("GPU-5c3e", "GPU-77af")),
        ([NVIDIA.format(65), NVIDIA.format(66)], "1,-1,0", ("1",)),
        ([NVIDIA.format(65)], "", ()),
        ([NVIDIA.format(65)], "-1", ()),
        ([], "0,1", ()),
        (["dev/kfd"], None, ("0",)),
        (["dev/nvidia0", "dev/nvidia1", "dev/nvidiactl", "dev/nvidia-uvm"], None, ("0", "1")),
        # A container given two of a machine's four GPUs: their device files keep the machine's numbers.
        ([*(NVIDIA.format(bus) for bus in (65, 66, 67, 68)), "dev/nvidia1", "dev/nvidia3"], None, ("0", "1")),
        (["dev/nvidiactl"], None, ()),
    ],
)
def test_gpus_are_seen_where_a_driver_shows_them_as_cuda_visible_devices_narrows_them(
    device_files: list[str], visible: str | None, seen: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in device_files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    (tmp_path / "proc/driver/nvidia/gpus").mkdir(parents=True, exist_ok=True)  # a driver loaded without a GPU
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert visible_gpus(tmp_path) == seen

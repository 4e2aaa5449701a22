"""The CPU cores this process may use, and the GPUs it sees."""

from __future__ import annotations

import os
from pathlib import Path

# One folder per GPU the NVIDIA driver drives, or (in a container) its device files; ROCm's compute device, which
# torch.cuda drives on AMD GPUs.
NVIDIA_GPUS = Path("proc/driver/nvidia/gpus")
NVIDIA_DEVICES = "nvidia[0-9]*"
DEVICES = Path("dev")
ROCM_DEVICE = DEVICES / "kfd"
# The GPUs a CUDA process sees, by index or UUID, comma-separated.
VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the system reports one (SLURM and taskset narrow
    it to a job's share of a node), else every core of the machine."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def visible_gpus(root: Path = Path("/")) -> tuple[str, ...]:
    """The GPUs torch.cuda would find here, told without importing torch (1-2 s), as CUDA_VISIBLE_DEVICES names
    them (their indexes where it is unset): NVIDIA's device files, which are the GPUs a process may open (a
    container given some of a machine's GPUs has theirs only), or the GPUs the driver lists while it has made no
    device file yet; ROCm's compute device counts as one. CUDA_VISIBLE_DEVICES narrows them; like CUDA, it ends at
    its first invalid entry, so "" and "-1" hide them all."""
    nvidia = root / NVIDIA_GPUS
    listed = len(list(nvidia.iterdir())) if nvidia.is_dir() else 0
    count = len(list((root / DEVICES).glob(NVIDIA_DEVICES))) or listed or int((root / ROCM_DEVICE).exists())
    shown = os.environ.get(VISIBLE_ENV)
    if shown is None or not count:
        return tuple(str(index) for index in range(count))
    names: list[str] = []
    for name in (entry.strip() for entry in shown.split(",")):
        if not name or name.startswith("-"):
            break
        names.append(name)
    return tuple(names)

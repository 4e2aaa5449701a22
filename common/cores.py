"""The CPU cores this process may use, and whether it sees a GPU."""

from __future__ import annotations

import os
from pathlib import Path

# One folder per GPU the NVIDIA driver drives, or (in a container) its device files; ROCm's compute device, which
# torch.cuda drives on AMD GPUs.
NVIDIA_GPUS = Path("proc/driver/nvidia/gpus")
NVIDIA_DEVICES = "nvidia[0-9]*"
DEVICES = Path("dev")
ROCM_DEVICE = DEVICES / "kfd"


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the system reports one (SLURM and taskset narrow
    it to a job's share of a node), else every core of the machine."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def gpu_visible(root: Path = Path("/")) -> bool:
    """Whether torch.cuda would find a GPU here, told without importing torch (1-2 s): NVIDIA's driver lists one, its
    device file or ROCm's compute device exists, and CUDA_VISIBLE_DEVICES does not hide them all."""
    shown = os.environ.get("CUDA_VISIBLE_DEVICES")
    if shown is not None and shown.strip() in ("", "-1"):
        return False
    nvidia = root / NVIDIA_GPUS
    listed = nvidia.is_dir() and any(nvidia.iterdir())
    return listed or any((root / DEVICES).glob(NVIDIA_DEVICES)) or (root / ROCM_DEVICE).exists()

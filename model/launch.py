"""How many processes a training run spans: Lightning's `devices` and `num_nodes`, from the config's `devices`
and, in a SLURM job, from the tasks SLURM started.

Where SLURM started the process (Lightning's `SLURMEnvironment`: `SLURM_NTASKS` set, outside an interactive
allocation), Lightning starts no ranks itself: each task SLURM starts is one rank, a task per device. Given more
devices than tasks it trains in a world of the tasks alone and fails at the first validation, hours in; given
`--ntasks` without `--ntasks-per-node`, or another node count than the job's, it stops with a traceback. So the
tasks are read once, before any work: `devices` left out takes one device per task, and a mismatch is refused in
one line that says what to ask SLURM for.
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple

from lightning_fabric.plugins.environments import SLURMEnvironment

from model.devices import cuda_devices
from model.errors import ConfigError

# The start of the warning `SLURMEnvironment.detect` gives where `srun` is on PATH but did not start the process.
SRUN_UNUSED = "The `srun` command is available on your system but is not used"


class Launch(NamedTuple):
    devices: int | str  # a count, or "auto": every device of the accelerator
    num_nodes: int
    note: str | None  # for the log, where SLURM's tasks leave GPUs idle


class SlurmTasks(NamedTuple):
    per_node: int
    nodes: int


def slurm_tasks() -> SlurmTasks | None:
    """The tasks of the SLURM job step this process is one of, or None where Lightning does not see SLURM."""
    with warnings.catch_warnings():
        # Where `srun` is on PATH but did not start this process, `detect` warns that it could have; the warning
        # belongs to Lightning's own launch (the trainer's detection repeats it), not to a refusal of ours.
        warnings.filterwarnings("ignore", message=SRUN_UNUSED)
        if not SLURMEnvironment.detect():
            return None
    tasks = _count("SLURM_NTASKS")
    nodes = _count("SLURM_NNODES") if "SLURM_NNODES" in os.environ else 1
    if "SLURM_NTASKS_PER_NODE" in os.environ:
        return SlurmTasks(_count("SLURM_NTASKS_PER_NODE"), nodes)
    if tasks > 1:
        raise ConfigError(
            f"SLURM started {tasks} tasks without --ntasks-per-node, which Lightning needs to place its ranks; ask"
            f" for --ntasks-per-node={max(1, tasks // nodes)} (a task per device on each node) instead"
        )
    return SlurmTasks(1, nodes)


def training_launch(devices: int | None, gpus: int | None = None) -> Launch:
    """The launch of a run whose config asks for `devices` (None: every device, or a device per SLURM task) on a
    machine with `gpus` CUDA devices (None: as torch counts them; 0 trains on the CPU)."""
    if gpus is None:
        gpus = cuda_devices()
    tasks = slurm_tasks()
    if tasks is None:
        if devices is not None and 0 < gpus < devices:
            raise ConfigError(
                f"devices: {devices}, but this machine has {gpus} CUDA device(s); set devices: {gpus} or fewer, or"
                " leave it out to train on all of them"
            )
        return Launch("auto" if devices is None else devices, 1, None)
    if devices is not None and devices != tasks.per_node:
        raise ConfigError(
            f"devices: {devices}, but SLURM started {tasks.per_node} task(s) on each node, one per device; ask for"
            f" --ntasks-per-node={devices} and start the run with srun, or set devices: {tasks.per_node}"
        )
    if 0 < gpus < tasks.per_node:
        raise ConfigError(
            f"SLURM started {tasks.per_node} tasks on this node, but they see {gpus} GPU(s); ask for"
            f" --gpus-per-node={tasks.per_node} and let every task see all of them (no --gpus-per-task)"
        )
    note = None
    if gpus > tasks.per_node:
        note = (
            f"SLURM started {tasks.per_node} task(s) on this node: training on {tasks.per_node} of its {gpus} GPUs"
            f" (for all of them, ask for --ntasks-per-node={gpus} and start the run with srun)"
        )
    return Launch(tasks.per_node, tasks.nodes, note)


def _count(name: str) -> int:
    text = os.environ[name]
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise ConfigError(f"{name}={text!r} is not a count of 1 or more; start the run from a SLURM job as usual")
    return count

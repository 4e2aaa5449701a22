"""A training run's processes: a device per SLURM task, and what SLURM and the config disagree on refused in one
line (`model.launch`)."""

from __future__ import annotations

import os

import pytest

from model.errors import ConfigError
from model.launch import Launch, slurm_tasks, training_launch


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No SLURM variables but those a test sets."""
    for name in [name for name in os.environ if name.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    return monkeypatch


def in_slurm_job(environ: pytest.MonkeyPatch, **variables: str) -> None:
    for name, value in {"JOB_NAME": "train", "NNODES": "1", **variables}.items():
        environ.setenv(f"SLURM_{name}", value)


def test_outside_slurm_every_device_or_the_configs_count(environ: pytest.MonkeyPatch) -> None:
    assert slurm_tasks() is None
    assert training_launch(None, gpus=4) == Launch("auto", 1, None)
    assert training_launch(2, gpus=4) == Launch(2, 1, None)
    assert training_launch(2, gpus=0) == Launch(2, 1, None)  # processes on the CPU
    with pytest.raises(ConfigError, match="devices: 4, but this machine has 2 CUDA device"):
        training_launch(4, gpus=2)


def test_an_interactive_allocation_is_not_a_slurm_launch(environ: pytest.MonkeyPatch) -> None:
    in_slurm_job(environ, NTASKS="4", JOB_NAME="interactive")
    assert training_launch(None, gpus=4) == Launch("auto", 1, None)


def test_a_device_per_task_on_each_node(environ: pytest.MonkeyPatch) -> None:
    in_slurm_job(environ, NTASKS="8", NTASKS_PER_NODE="4", NNODES="2")
    assert training_launch(None, gpus=4) == Launch(4, 2, None)
    assert training_launch(4, gpus=4) == Launch(4, 2, None)


def test_a_batch_step_of_one_task_trains_on_one_gpu_and_says_so(environ: pytest.MonkeyPatch) -> None:
    in_slurm_job(environ, NTASKS="1")
    launch = training_launch(None, gpus=4)
    assert launch[:2] == (1, 1)
    assert launch.note is not None and "1 of its 4 GPUs" in launch.note and "--ntasks-per-node=4" in launch.note
    assert training_launch(None, gpus=0) == Launch(1, 1, None)


@pytest.mark.parametrize(
    ("variables", "devices", "gpus", "says"),
    [
        ({"NTASKS": "1"}, 2, 2, "devices: 2, but SLURM started 1 task(s) on each node"),
        ({"NTASKS": "4", "NTASKS_PER_NODE": "4"}, 2, 4, "--ntasks-per-node=2"),
        ({"NTASKS": "4", "NNODES": "2"}, None, 2, "without --ntasks-per-node"),
        ({"NTASKS": "4", "NTASKS_PER_NODE": "4"}, None, 1, "they see 1 GPU(s); ask for --gpus-per-node=4"),
        ({"NTASKS": "two"}, None, 0, "SLURM_NTASKS='two' is not a count"),
        ({"NTASKS": "2", "NTASKS_PER_NODE": "0"}, None, 0, "SLURM_NTASKS_PER_NODE='0'"),
    ],
)
def test_what_slurm_and_the_config_disagree_on_is_refused_in_one_line(
    environ: pytest.MonkeyPatch, variables: dict[str, str], devices: int | None, gpus: int, says: str
) -> None:
    in_slurm_job(environ, **variables)
    with pytest.raises(ConfigError) as refused:
        training_launch(devices, gpus=gpus)
    assert says in str(refused.value) and "\n" not in str(refused.value)

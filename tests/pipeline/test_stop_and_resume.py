"""Stopping a build as users do: Ctrl-C prints one line and the same command resumes; `run.sh unlock` clears the
lock a build killed hard leaves behind."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.paths import LANDSAT, REPO

from pipeline.config import DEFAULT_CONFIG_PATH, default_config_from_anywhere
from pipeline.launch import INTERRUPTED_STATUS, STOPPED_LINE, config_files

SNAKEMAKE = [sys.executable, "-m", "snakemake"]
TIMEOUT_S = 120
# The jobs import the pipeline: from this checkout, whatever the virtual environment was installed from.
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def wait_for(path: Path, run: subprocess.Popen[Any], text: str = "") -> None:
    """Until the file at `path` exists and holds `text`."""

    def there() -> bool:
        return path.is_file() and text in path.read_text()

    deadline = time.monotonic() + TIMEOUT_S
    while not there() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert there(), f"{path} never appeared or never held {text!r} (exit status {run.poll()})"


def locks(work: Path) -> list[Path]:
    return sorted((work / ".snakemake" / "locks").glob("*"))


def test_ctrl_c_on_a_running_build_prints_one_line_and_the_same_command_resumes(tmp_path: Path) -> None:
    config = default_config_from_anywhere()
    config["imagery"] |= {"source": str(LANDSAT), "cache_dir": str(tmp_path / "tiles")}
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    command = [*SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--profile", str(REPO / "profiles" / "local")]
    command += ["--configfile", str(config_path)]
    err_path, out_path = tmp_path / "stderr.txt", tmp_path / "stdout.txt"
    with err_path.open("w") as err, out_path.open("w") as out:
        # A session of its own, signalled as a whole: what a terminal does on Ctrl-C to its foreground job.
        run = subprocess.Popen(command, cwd=tmp_path, env=ENV, stdout=out, stderr=err, start_new_session=True)
        try:
            # Once the embed job says it has started: a job launched at the very moment of Ctrl-C may miss the
            # signal (see test_a_job_launched_after_ctrl_c_does_not_start).
            wait_for(tmp_path / "outputs" / config["name"] / "logs" / "embed" / "0.log", run, "embed: ")
            os.killpg(run.pid, signal.SIGINT)
            run.wait(TIMEOUT_S)
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
    stderr, stdout = err_path.read_text(), out_path.read_text()
    assert run.returncode != 0
    assert stderr.count(STOPPED_LINE) == 1 and stderr.rstrip().endswith(STOPPED_LINE), stderr[-3000:]
    for noise in ("Traceback", "Error", "Exception", "KeyboardInterrupt"):
        assert noise not in stderr + stdout, stderr[-3000:]
    assert not locks(tmp_path)

    resumed = subprocess.run([*command, "-n"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "\nembed " in resumed.stdout and "\nmodel " not in resumed.stdout, resumed.stdout


# Snakemake after Ctrl-C, launching one more job (the signal came as it was starting it, so the job missed it).
LATE_JOB = """
import os, signal, subprocess, sys, time
from pipeline.build import quiet_interrupts

quiet_interrupts()
try:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(10)
except KeyboardInterrupt:
    pass
with open(sys.argv[1], "w") as log:
    job = [sys.executable, "-m", "pipeline.steps", "model", "--settings", sys.argv[2], "--out", sys.argv[3]]
    sys.exit(subprocess.run(job, stdout=log, stderr=log).returncode)
"""


def test_a_job_launched_after_ctrl_c_does_not_start(tmp_path: Path) -> None:
    # Snakemake waits for the jobs it cancels; one that missed the signal would otherwise run to its end.
    log, out = tmp_path / "job.log", tmp_path / "model.json"
    late = subprocess.run(
        [sys.executable, "-c", LATE_JOB, str(log), str(tmp_path / "settings.json"), str(out)],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert late.returncode == INTERRUPTED_STATUS, log.read_text() if log.exists() else late.stderr
    assert log.read_text() == "model: not started, the build was stopped (Ctrl-C)\n"
    assert not out.exists()
    # The mark lay in Snakemake's folder while it ran, and went with it.
    assert (tmp_path / ".snakemake").is_dir() and not list((tmp_path / ".snakemake").iterdir())


def test_run_sh_unlock_releases_the_lock_of_a_build_killed_hard(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("run.sh", "Snakefile", "pyproject.toml"):
        shutil.copy(REPO / name, checkout / name)
    for name in ("rules", "profiles", "config"):
        shutil.copytree(REPO / name, checkout / name)
    (checkout / "examples").symlink_to(REPO / "examples")
    (checkout / "regions").symlink_to(REPO / "regions")
    (checkout / "model").mkdir()
    (checkout / "model" / "weights").symlink_to(REPO / "model" / "weights")
    # The environment run.sh would set up, already installed: its python is this test's (a script, as a symlink
    # to a venv's python would not find the venv's packages).
    bin_dir = checkout / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    stamp = hashlib.sha256((checkout / "pyproject.toml").read_bytes()).hexdigest()[:16]
    (checkout / ".venv" / f".installed-{stamp}").touch()

    build = subprocess.Popen(
        ["bash", "run.sh", "build"],
        cwd=checkout,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(checkout / "outputs" / "itaipu-demo" / "model.json", build)
    finally:
        os.killpg(build.pid, signal.SIGKILL)
        build.wait()
    assert locks(checkout), "a build killed with SIGKILL leaves its lock"

    unlock = subprocess.run(
        ["bash", str(checkout / "run.sh"), "unlock"], env=ENV, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert unlock.returncode == 0, unlock.stderr[-3000:]
    assert "Unlocked working directory." in unlock.stderr
    assert not locks(checkout)


@pytest.mark.parametrize("delay_s", [0.1, 0.3, 0.6])
def test_ctrl_c_before_the_workflow_is_read_prints_the_same_one_line(tmp_path: Path, delay_s: float) -> None:
    # What `bash run.sh build` runs; interrupted while Python still imports Snakemake, at different points.
    command = [sys.executable, "-m", "pipeline.launch", "-s", str(REPO / "Snakefile"), "-n"]
    command += ["--profile", str(REPO / "profiles" / "local"), "--configfile", str(DEFAULT_CONFIG_PATH)]
    run = subprocess.Popen(
        command, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    time.sleep(delay_s)
    os.killpg(run.pid, signal.SIGINT)
    _, stderr = run.communicate(timeout=TIMEOUT_S)
    text = stderr.decode()
    assert run.returncode != 0 and text.count(STOPPED_LINE) == 1, text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]


@pytest.mark.parametrize(
    ("argv", "files"),
    [
        (["--configfile", "config/city.yaml", "-n"], ["config/city.yaml"]),
        (["--configfile=no.yaml", "-n"], ["no.yaml"]),
        (["--configfiles", "a.yaml", "b.yaml", "--cores", "2", "all"], ["a.yaml", "b.yaml"]),
        (["-n", "all"], []),
    ],
)
def test_config_files_are_read_from_the_command_line_as_snakemake_reads_them(argv: list[str], files: list[str]) -> None:
    assert config_files(argv) == files


@pytest.mark.parametrize(
    ("content", "line"),
    [
        (None, "error: --configfile mine.yaml does not exist; "),
        ("- 1\n- 2\n", "error: --configfile mine.yaml holds no mapping of keys to values; "),
    ],
)
def test_a_config_file_snakemake_cannot_read_is_one_line_not_its_traceback(
    content: str | None, line: str, tmp_path: Path
) -> None:
    if content is not None:
        (tmp_path / "mine.yaml").write_text(content)
    command = [sys.executable, "-m", "pipeline.launch", "-s", str(REPO / "Snakefile"), "--configfile", "mine.yaml"]
    completed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert completed.returncode == 2 and completed.stdout == ""
    fix = "give a YAML file of key: value lines (shipped: config/config.yaml, config/city.yaml)"
    assert completed.stderr == f"{line}{fix}\n"


def test_a_config_the_workflow_refuses_is_one_line_through_the_profile_too(tmp_path: Path) -> None:
    """As `bash run.sh build` runs it: Snakemake's note on the profile does not come before the refusal."""
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({"name": "x", "region": "0,0,1,1"}))
    command = [sys.executable, "-m", "pipeline.launch", "-s", str(REPO / "Snakefile"), "-n"]
    command += ["--profile", str(REPO / "profiles" / "local"), "--configfile", "mine.yaml"]
    completed = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert (completed.returncode, completed.stdout) == (2, "")
    assert completed.stderr == "error: config: 'queries' is a required property; see config/schema.json\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mine.yaml"]

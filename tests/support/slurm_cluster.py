"""A real one-node SLURM cluster on this machine (Debian's slurmctld and slurmd), for running the workflow through
`profiles/slurm` as on a GPU cluster.

The node says it has the cores, memory and one GPU a GPU node of the profile's size has (`NODE_*`): slurmd takes
the configured sizes as they are (`SlurmdParameters=config_overrides`), and the GPU is a GRES without a device
(`File=/dev/null`), so jobs ask for and get `gres/gpu` and run on the CPU. No munge: `auth/none`. The config goes
where srun inside a job looks for it, /etc/slurm/slurm.conf (the job step plugin drops SLURM_CONF from the job's
environment), so the cluster is only started where that file does not exist yet, and the file goes at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

SLURM_CONF = Path("/etc/slurm/slurm.conf")
GRES_CONF = SLURM_CONF.with_name("gres.conf")
DAEMONS = ("slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "srun", "scontrol")
NODE = "sat2sound-test"
# A GPU node as profiles/slurm expects one (its embed jobs ask for 8 cores and 32,000 MB).
NODE_CPUS, NODE_MEMORY_MB = 16, 64_000
START_TIMEOUT_S = 30.0

# The daemons live in sbin, which a non-login shell's PATH may lack; the clients are found as the plugin finds them.
DAEMON_PATHS = {
    daemon: shutil.which(daemon, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"])) for daemon in DAEMONS
}

needs_slurm = pytest.mark.skipif(
    os.geteuid() != 0
    or not all(DAEMON_PATHS.values())
    or not all(shutil.which(command) for command in CLIENTS)
    or SLURM_CONF.exists(),
    reason="needs root, Debian's slurmctld, slurmd and slurm-client (bash run.sh test installs them as root) and no"
    f" {SLURM_CONF} of the machine's own",
)


def _free_port() -> int:
    with closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _config(folder: Path) -> str:
    # slurmctld checks that it runs on the host the config names.
    host = socket.gethostname().split(".")[0]
    lines = {
        "ClusterName": "sat2sound-test",
        "SlurmctldHost": f"{host}(127.0.0.1)",
        "SlurmctldPort": _free_port(),
        "SlurmdPort": _free_port(),
        "AuthType": "auth/none",
        "CredType": "cred/none",
        "SlurmUser": "root",
        "SlurmdUser": "root",
        "StateSaveLocation": folder / "state",
        "SlurmdSpoolDir": folder / "spool",
        "SlurmctldPidFile": folder / "slurmctld.pid",
        "SlurmdPidFile": folder / "slurmd.pid",
        "SlurmctldLogFile": folder / "slurmctld.log",
        "SlurmdLogFile": folder / "slurmd.log",
        "SlurmdParameters": "config_overrides",
        "ProctrackType": "proctrack/linuxproc",
        "TaskPlugin": "task/none",
        "JobAcctGatherType": "jobacct_gather/none",
        "AccountingStorageType": "accounting_storage/none",
        "SelectType": "select/cons_tres",
        "SelectTypeParameters": "CR_Core_Memory",
        "GresTypes": "gpu",
        "MpiDefault": "none",
        "MailProg": "/bin/true",
        "ReturnToService": 2,
        # Finished jobs stay visible to squeue and scontrol (no accounting database here) for ten minutes.
        "MinJobAge": 600,
    }
    node = f"NodeName={NODE} NodeAddr=127.0.0.1 CPUs={NODE_CPUS} RealMemory={NODE_MEMORY_MB} Gres=gpu:1 State=UNKNOWN"
    partition = f"PartitionName=main Nodes={NODE} Default=YES MaxTime=INFINITE State=UP"
    return "\n".join([*(f"{key}={value}" for key, value in lines.items()), node, partition, ""])


def _wait_until_idle(folder: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        state = subprocess.run(["sinfo", "-h", "-n", NODE, "-o", "%T"], capture_output=True, text=True, check=False)
        if state.stdout.strip() == "idle":
            return
        time.sleep(0.5)
    logs = "\n".join(f"--- {log}\n{log.read_text()[-2000:]}" for log in sorted(folder.glob("*.log")))
    raise RuntimeError(f"the test SLURM node did not come up in {START_TIMEOUT_S:.0f} s:\n{logs}")


def _stop(folder: Path) -> None:
    """Stop the daemons and wait for them to be gone, so that a cluster started next (another test module) meets
    none of this one's."""
    stopped = []
    for daemon in reversed(DAEMONS):
        pid_file = folder / f"{daemon}.pid"
        if pid_file.exists():
            try:
                pid = int(pid_file.read_text())
                os.kill(pid, signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                continue
            stopped.append(pid)
    deadline = time.monotonic() + START_TIMEOUT_S
    while stopped and time.monotonic() < deadline:
        stopped = [pid for pid in stopped if _running(pid)]
        time.sleep(0.1)


def _running(pid: int) -> bool:
    """Whether `pid` is alive: neither gone nor a zombie (the daemons' parent is whatever init this machine has)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@contextmanager
def slurm_cluster(folder: Path) -> Iterator[Path]:
    """Start the cluster with its state and logs in `folder`; yield `folder`; stop it and remove its config."""
    for name in ("state", "spool"):
        (folder / name).mkdir(parents=True)
    SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
    SLURM_CONF.write_text(_config(folder))
    GRES_CONF.write_text(f"NodeName={NODE} Name=gpu File=/dev/null\n")
    try:
        subprocess.run([str(DAEMON_PATHS["slurmctld"])], check=True)
        subprocess.run([str(DAEMON_PATHS["slurmd"]), "-N", NODE], check=True)
        _wait_until_idle(folder)
        yield folder
    finally:
        _stop(folder)
        SLURM_CONF.unlink(missing_ok=True)
        GRES_CONF.unlink(missing_ok=True)


def requested_gres(job_id: str) -> str:
    """The generic resources a job asked for and was run with, per job or per node ('gres:gpu:1'; '' for none)."""
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True)
    fields = dict(field.split("=", 1) for field in shown.stdout.split() if "=" in field)
    return " ".join(fields[key] for key in ("TresPerJob", "TresPerNode") if key in fields)

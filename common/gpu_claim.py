"""One GPU of its own for each of the jobs that run side by side on a machine with several.

Snakemake's local executor caps how many GPU jobs run at once (`--resources gpu=N`) but tells no job which GPU
is its own (snakemake/snakemake#281). A job claims the first GPU that no other holds by locking its file in a
folder of the build, and from then on sees only that GPU (CUDA_VISIBLE_DEVICES), as a cluster job sees the one it
was given. The lock is the kernel's (flock): it goes with the process, however the process ends.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from common.cores import VISIBLE_ENV

# How often a job that found every GPU held tries again: jobs run minutes, so a second is soon enough.
POLL_S = 1.0


@contextmanager
def own_gpu(
    folder: Path, gpus: Sequence[str], *, say: Callable[[str], None] = print, poll_s: float = POLL_S
) -> Iterator[str | None]:
    """Within the block, one of `gpus` (as CUDA_VISIBLE_DEVICES names them) is this process's alone among the
    processes of this machine that claim them in `folder`, and the only one it sees; its name is yielded. With
    fewer than two there is nothing to share out: None, and nothing changes. While every GPU is held (more jobs
    let run than there are GPUs), it waits, and `say`s so once."""
    if len(gpus) < 2:
        yield None
        return
    folder.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()  # GPUs are a machine's: jobs of other nodes sharing the folder claim their own
    waited = False
    while True:
        for index, gpu in enumerate(gpus):
            handle = (folder / f".gpu-{host}-{index}.lock").open("a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            before = os.environ.get(VISIBLE_ENV)
            os.environ[VISIBLE_ENV] = gpu
            try:
                yield gpu
            finally:
                if before is None:
                    os.environ.pop(VISIBLE_ENV, None)
                else:
                    os.environ[VISIBLE_ENV] = before
                handle.close()
            return
        if not waited:
            say(f"all {len(gpus)} GPUs are held by other jobs: waiting for one (lower --resources gpu to the count)")
            waited = True
        time.sleep(poll_s)

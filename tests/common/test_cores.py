"""The cores a process may use follow its CPU affinity, as SLURM and taskset set it."""

from __future__ import annotations

import os
import subprocess
import sys


def test_a_process_pinned_to_one_core_has_one() -> None:
    one = min(os.sched_getaffinity(0))
    code = f"import os; os.sched_setaffinity(0, {{{one}}}); import common.cores as c; print(c.usable_cores())"
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert printed.strip() == "1"

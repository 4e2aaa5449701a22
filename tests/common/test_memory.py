"""keep_freed_memory: blocks freed by one batch are reused by the next instead of being faulted in again."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

# Each run allocates, fills and frees a 64 MB block (above glibc's largest automatic mmap threshold, 32 MB)
# ten times, and reports the page faults of the last nine.
FAULTS_OF_REPEATED_BLOCKS = """
import ctypes, json, resource, sys
from common.memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size = 64 << 20
def fill_and_free():
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
fill_and_free()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(9):
    fill_and_free()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(mode: str) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", FAULTS_OF_REPEATED_BLOCKS, mode], capture_output=True, text=True, check=True
    )
    return json.loads(run.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's thresholds are glibc's")
def test_freed_blocks_are_reused_instead_of_faulted_in_again() -> None:
    plain, kept = _faults("plain"), _faults("keep")
    pages_of_one_block = (64 << 20) // 4096
    # Without the setting every block is mapped and zero-filled anew (fewer faults with huge pages, still many).
    assert plain["faults"] >= 9 * pages_of_one_block // 512
    assert kept["applied"] is True
    assert kept["faults"] < plain["faults"] / 20

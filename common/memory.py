"""Keeping freed memory in the process, so that a CPU model's batches stop faulting fresh pages in.

glibc's malloc gives every block above a threshold (128 kB, rising to at most 32 MB as such blocks are freed)
its own mapping and hands it back to the kernel when it is freed. A forward pass on the CPU allocates and frees
activations of several to tens of MB per batch, so every batch maps, zero-fills and unmaps them again: measured
on the small model (2 cores, batch 64), a quarter of its CPU time went to the kernel, 1.9 M page faults for
4,096 tiles, and keeping the blocks made it 30-40 % faster. The cost: a process keeps its peak heap until it
ends, which suits jobs whose peak is bounded (one chunk, one batch at a time). Every workflow job and
`python -m model` keep freed memory, and so do the benchmarks that time the model or the imagery, so that they
time what the jobs get.
"""

from __future__ import annotations

import ctypes

# mallopt() parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap, and the heap keeps up to this much free memory at its top.
KEPT_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Make this process's malloc keep and reuse freed blocks of up to `KEPT_BYTES`; False where the C library
    has no mallopt (not glibc) or refuses the setting, which then stays as it was."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_THRESHOLD, KEPT_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, KEPT_BYTES))

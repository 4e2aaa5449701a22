"""Atomic file writes: write to a temporary file beside the target, then rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import numpy as np

DEFAULT_FILE_MODE = 0o666


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        # mkstemp (and some writers) create files 0600; give the output the mode a plain open() would,
        # so others on a shared cluster can read it.
        if tmp.is_file():
            tmp.chmod(DEFAULT_FILE_MODE & ~_umask())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save_npz(target: Path, arrays: Mapping[str, np.ndarray]) -> None:
    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **cast(dict[str, Any], arrays))

"""Atomic writes: build the output under a temporary name beside the target, then rename it into place.

A reader, in this process or another, sees either no file or a whole one; a run stopped half-way leaves
only a hidden temporary name behind. Files get the mode a plain `open()` would give them (0666 less the
umask), so others sharing a cluster's file system can read them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import numpy as np

DEFAULT_FILE_MODE = 0o666
TEMP_PREFIX = ".tmp-"


_STATUS = Path("/proc/self/status")
_UMASK_LOCK = threading.Lock()


def unwritable_reason(path: Path) -> str | None:
    """Why a file cannot be written at `path`, in a few words, or None: a folder is there, or the nearest folder
    that exists above it takes no new entries (the folders below it are made when the file is written)."""
    if path.is_dir():
        return f"{path} is a folder"
    return unwritable_folder_reason(path.parent)


def unwritable_folder_reason(folder: Path) -> str | None:
    """Why files cannot be made in `folder`, in a few words, or None: it, or the nearest folder that exists above
    it (the folders below are made when a file is written), is a file or takes no new entries."""
    existing = nearest_existing(folder)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is no writable folder"
    return None


def nearest_existing(path: Path) -> Path:
    """`path`, or the nearest folder above it that exists (os.path.exists: an entry that cannot be looked into
    counts as missing, where Path.exists raises)."""
    return next(entry for entry in (path, *path.parents) if os.path.exists(entry))


def _umask() -> int:
    """The process umask, read without changing it where Linux tells it (setting it to 0 and back is not
    thread-safe: a parallel writer could create files in between with mode 0666)."""
    with contextlib.suppress(OSError, ValueError):
        for line in _STATUS.read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _UMASK_LOCK:
        mask = os.umask(0)
        os.umask(mask)
    return mask


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if tmp.is_file():
            tmp.chmod(DEFAULT_FILE_MODE & ~_umask())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(target: Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_save_npz(target: Path, arrays: Mapping[str, np.ndarray]) -> None:
    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **cast(dict[str, Any], arrays))


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; it replaces `target` only if the block succeeds."""
    tmp = target.with_name(f"{TEMP_PREFIX}{target.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        yield tmp
        if target.exists():
            stale = target.with_name(f"{TEMP_PREFIX}{target.name}.{uuid.uuid4().hex[:8]}.old")
            target.rename(stale)
            tmp.rename(target)
            shutil.rmtree(stale)
        else:
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

"""Atomic writes: a reader sees the old output or the whole new one, never a half-written one."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from common.atomic import atomic_directory, atomic_path, atomic_save_npz, atomic_write_bytes


def test_a_failed_store_write_keeps_the_previous_store(tmp_path: Path) -> None:
    target = tmp_path / "store.zarr"
    target.mkdir()
    (target / "old").write_text("previous build")
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("half written")
        raise RuntimeError("killed")
    assert [path.name for path in tmp_path.iterdir()] == ["store.zarr"]
    assert (target / "old").read_text() == "previous build"


def test_a_failed_file_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("previous")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "previous"
    assert [path.name for path in tmp_path.iterdir()] == ["out.json"]


def test_written_files_follow_the_umask_and_hold_the_whole_content(tmp_path: Path) -> None:
    previous = os.umask(0o002)
    try:
        atomic_write_bytes(tmp_path / "tile.png", b"png")
        atomic_save_npz(tmp_path / "arrays.npz", {"a": np.arange(3)})
    finally:
        os.umask(previous)
    assert (tmp_path / "tile.png").read_bytes() == b"png"
    assert (tmp_path / "tile.png").stat().st_mode & 0o777 == 0o664
    with np.load(tmp_path / "arrays.npz") as data:
        assert data["a"].tolist() == [0, 1, 2]

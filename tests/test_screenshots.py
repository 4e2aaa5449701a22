"""docs/screenshots.py (the README's screenshots, remade from a build) refuses a folder that is no finished build."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from support.paths import REPO

from pipeline.build import ERROR_STATUS, MODEL_NAME, PREVIEW_NAME, PROJECT_NAME, SETTINGS_NAME


def test_a_folder_that_is_no_finished_build_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / SETTINGS_NAME).write_text("{}")
    (tmp_path / PREVIEW_NAME).write_text("")
    result = subprocess.run(
        [sys.executable, str(REPO / "docs" / "screenshots.py"), str(tmp_path), "--out", str(tmp_path / "shots")],
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": str(REPO)},
        timeout=120,
        check=False,
    )
    assert result.returncode == ERROR_STATUS
    assert result.stderr.splitlines() == [
        f"error: {tmp_path} is no finished map build (no {MODEL_NAME}, {PROJECT_NAME}); pass the folder a build"
        " wrote (<output_dir>/<name>), or finish its build"
    ]
    assert not (tmp_path / "shots").exists()

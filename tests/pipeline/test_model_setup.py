"""The build's model as its jobs load it: errors of the model's settings name the config keys the user wrote."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from support.gallery import DEMO_WEIGHTS

from model.checkpoint import sha256_file
from pipeline.config import load_build_config, write_settings
from pipeline.model_setup import prepare_model, read_model_record
from pipeline.steps import main


def _queries_job(capsys: pytest.CaptureFixture[str], tmp_path: Path, **model: Any) -> tuple[int, str]:
    """Run the workflow's queries job (`python -m pipeline.steps queries`) of an untrained build."""
    config = load_build_config(
        {"name": "t", "region": "1,1,1.1,1.1", "queries": [{"id": "birds", "text": "birds"}], "model": model}
    )
    settings, record = tmp_path / "settings.json", tmp_path / "model.json"
    write_settings(config, settings)
    prepare_model(config.model, tmp_path, record)
    status = main(["queries", "--settings", str(settings), "--model", str(record), "--out", str(tmp_path / "q.npz")])
    return status, capsys.readouterr().err


def test_a_missing_text_backbone_directory_names_model_text_backbone(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "flan-t5"
    status, err = _queries_job(capsys, tmp_path, text_backbone=str(missing))
    assert (status, err) == (
        2,
        f"error: no T5 model directory at {missing}; check the path given as model.text_backbone\n",
    )


def test_cuda_without_cuda_names_model_device(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    status, err = _queries_job(capsys, tmp_path, device="cuda")
    assert (status, err) == (
        2,
        "error: device 'cuda': CUDA is not available on this machine; use auto or cpu\n",
    )


def test_the_model_job_records_a_converted_checkpoint_without_importing_torch(tmp_path: Path) -> None:
    # torch is ~3 s of a job's start: the model job, first on every build's path, only hashes such weights.
    config = load_build_config(
        {
            "name": "t",
            "region": "1,1,1.1,1.1",
            "queries": [{"id": "birds", "text": "birds"}],
            "model": {"checkpoint": str(DEMO_WEIGHTS)},
        }
    )
    settings, record = tmp_path / "settings.json", tmp_path / "model.json"
    write_settings(config, settings)
    job = (
        "import sys; from pipeline.steps import main;"
        f" status = main(['model', '--settings', {str(settings)!r}, '--out', {str(record)!r}]);"
        " print(status, 'torch' in sys.modules)"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", job], cwd=root, capture_output=True, text=True, check=True)
    assert result.stdout.splitlines()[-1] == "0 False"
    recorded = read_model_record(record)
    assert (recorded.path, recorded.sha256) == (str(DEMO_WEIGHTS.resolve()), sha256_file(DEMO_WEIGHTS))

"""The build's model as its jobs load it: errors of the model's settings name the config keys the user wrote."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.config import load_build_config, write_settings
from pipeline.model_setup import prepare_model
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

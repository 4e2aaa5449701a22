"""The demo command on the bundled real scene, untrained and with a saved checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.__main__ import main
from model.checkpoint import save_safetensors
from model.config import Sat2SoundConfig
from model.sat2sound import Sat2Sound


def test_demo_says_the_weights_are_untrained(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--grid", "2", "--query", "rain on a roof", "--query", "a dog barking"]) == 0
    out = capsys.readouterr().out
    assert "UNTRAINED" in out
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 4 and all(line.split()[-1] in ("q0", "q1") for line in rows)


def test_demo_with_a_saved_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(3)
    weights, _ = save_safetensors(Sat2Sound(Sat2SoundConfig.small()), tmp_path / "small.safetensors")
    assert main(["demo", "--checkpoint", str(weights), "--grid", "2"]) == 0
    out = capsys.readouterr().out
    assert "UNTRAINED" not in out and str(weights) in out

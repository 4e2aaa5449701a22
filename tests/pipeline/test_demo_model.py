"""The shipped demo model, judged on the scene held out from its training (the default build's scene).

Its land-cover queries must find their land cover in the default map: ROC AUC >= 0.85 per class, above every
other query's AUC for that class (`pipeline.demo_quality`), and its retrieval on held-out pairs must beat
chance by a wide margin (R@10 % >= 0.5 image -> audio, the reference protocol).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support.paths import REPO

from model.__main__ import main as model_main
from pipeline.demo_data import make_dataset
from pipeline.demo_quality import map_quality

pytestmark = pytest.mark.slow
DEFAULT_CONFIG = REPO / "config" / "config.yaml"
DEMO_WEIGHTS = REPO / "model" / "weights" / "demo.safetensors"
# The default queries meant for each land cover (config/config.yaml).
MEANT_FOR = {"water": "water", "birds": "tree", "town": "developed"}
HELD_OUT_VIEWS = 1000  # a data set with 200 held-out pairs


@pytest.fixture(scope="module")
def default_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("default-build")
    config = yaml.safe_load(DEFAULT_CONFIG.read_text()) | {"output_dir": str(folder)}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "pipeline.launch", "--profile", "profiles/local", "--configfile", str(path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return folder / config["name"]


def test_the_default_build_maps_with_the_demo_model(default_build: Path) -> None:
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert Path(config["model"]["checkpoint"]).resolve() == DEMO_WEIGHTS.resolve()
    assert set(MEANT_FOR) <= {query["id"] for query in config["queries"]}


def test_land_cover_queries_find_their_land_cover(default_build: Path) -> None:
    report = map_quality(default_build, MEANT_FOR)
    print(report.table())
    for query in MEANT_FOR:
        assert report.separates(query), f"{query}:\n{report.table()}"


def test_retrieval_on_held_out_pairs_beats_chance(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    make_dataset(data, HELD_OUT_VIEWS, seed=1)
    out = tmp_path / "metrics.json"
    argv = ["evaluate", "--checkpoint", str(DEMO_WEIGHTS), "--data", str(data), "--split", "test"]
    assert model_main([*argv, "--text-cache", str(tmp_path / "cache"), "--out", str(out)]) == 0
    metrics = yaml.safe_load(out.read_text())
    print(capsys.readouterr().out)
    assert metrics["none"]["I2S"]["recall"] >= 0.5

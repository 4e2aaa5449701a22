"""Training settings: the reference's defaults, relative paths from the YAML's folder, one-line refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from model.checkpoint import CONFIG_FORMAT
from model.config import Sat2SoundConfig
from model.errors import ConfigError
from model.train_config import load_settings, parse_settings

MINIMAL = {"out_dir": "run", "data": {"root": "pairs"}}


def init_weights(path: Path, cfg: Sat2SoundConfig) -> Path:
    """A .safetensors checkpoint as loading settings reads it: its config alone (the weights are not opened)."""
    path.write_bytes(b"")
    path.with_suffix(".json").write_text(json.dumps({"format": CONFIG_FORMAT, "config": cfg.to_dict()}))
    return path


def test_defaults_are_the_references() -> None:
    settings = parse_settings(MINIMAL)
    optim = settings.optim
    assert (optim.lr, optim.weight_decay, optim.betas, optim.eps) == (5e-5, 0.2, (0.9, 0.98), 1e-8)
    assert (optim.restart_steps, optim.grad_clip, settings.batch_size) == (5000, 0.5, 128)
    assert settings.model_config().meta_droprate == 0.5


def test_paths_are_taken_from_the_config_folder(tmp_path: Path) -> None:
    init_weights(tmp_path / "w.safetensors", Sat2SoundConfig.small("none"))
    path = tmp_path / "train.yaml"
    path.write_text(
        yaml.safe_dump({**MINIMAL, "model": {"init": "w.safetensors"}, "data": {"root": "hf://datasets/a/b"}})
    )
    settings = load_settings(path)
    assert settings.out_path == tmp_path / "run"
    assert settings.text_cache_path == tmp_path / "run" / "text_cache"
    assert settings.model.init == str(tmp_path / "w.safetensors")
    assert settings.recordings.table is None
    assert settings.data.root == "hf://datasets/a/b"


def test_image_pretraining_targets_are_the_data_sets(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    tower = {"shares": "labels.csv", "classes": ["water", "tree"]}
    path.write_text(yaml.safe_dump({**MINIMAL, "image_pretraining": tower}))
    settings = load_settings(path)
    assert settings.in_data("labels.csv") == tmp_path / "pairs" / "labels.csv"  # in the data folder, wherever it is
    assert settings.in_data("/data/shares.csv") == Path("/data/shares.csv")
    assert settings.image_pretraining.classes == ("water", "tree")
    assert settings.image_pretraining.enabled
    per_pixel = parse_settings({**MINIMAL, "image_pretraining": {"landcover": "landcover", "classes": ["water"]}})
    assert per_pixel.image_pretraining.enabled
    both = {"landcover": "landcover", "shares": "labels.csv", "classes": ["water"]}
    assert parse_settings({**MINIMAL, "image_pretraining": both}).image_pretraining.enabled
    assert not parse_settings(MINIMAL).image_pretraining.enabled


def test_a_recipe_says_how_weights_were_made_not_where_files_lay(tmp_path: Path) -> None:
    init_weights(tmp_path / "w.safetensors", Sat2SoundConfig.small("none"))
    path = tmp_path / "train.yaml"
    tower = {"landcover": str(tmp_path / "pairs" / "landcover"), "classes": ["water"], "epochs": 3}
    recordings = {"table": "sounds/recordings.csv"}
    values = {
        **MINIMAL,
        "model": {"init": "w.safetensors"},
        "image_pretraining": tower,
        "recordings": recordings,
        "seed": 7,
    }
    path.write_text(yaml.safe_dump({**values, "text_cache": "texts", "description": "a model"}))
    recipe = load_settings(path).recipe()
    assert str(tmp_path) not in json.dumps(recipe)
    assert {"out_dir", "text_cache", "mel_cache", "description"}.isdisjoint(recipe)
    assert {"root", "num_workers"}.isdisjoint(recipe["data"]) and recipe["data"]["format"] == "folder"
    assert recipe["model"]["init"] == "w.safetensors" and recipe["seed"] == 7
    assert recipe["image_pretraining"]["landcover"] == "landcover" and recipe["image_pretraining"]["epochs"] == 3
    assert recipe["optim"]["betas"] == (0.9, 0.98)
    assert recipe["recordings"] == {"table": "recordings.csv", "weight": 1.0, "directions": 0.0}


def test_the_architecture_takes_sat_type_and_metadata() -> None:
    values = {**MINIMAL, "data": {"root": "p", "sat_type": "bingmap"}, "model": {"metadata_type": "latlong"}}
    cfg = parse_settings(values).model_config()
    assert cfg.sat_type == "bingmap" and cfg.metadata_type == "latlong"
    assert cfg.fc_dim == Sat2SoundConfig.small().fc_dim
    full = parse_settings({**MINIMAL, "model": {"architecture": "full"}}).model_config()
    assert full.fc_dim == Sat2SoundConfig().fc_dim


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"data": {"root": "p"}}, "out_dir is missing"),
        ({"out_dir": "", "data": {"root": "p"}}, "out_dir is empty; name the folder for checkpoints and logs"),
        ({**MINIMAL, "text_cache": ""}, "text_cache is empty; give it a path, or leave it out"),
        ({**MINIMAL, "mel_cache": ""}, "mel_cache is empty"),
        ({**MINIMAL, "model": {"init": ""}}, "model.init is empty"),
        ({**MINIMAL, "image_pretraining": {"shares": "", "classes": ["a"]}}, "image_pretraining.shares is empty"),
        ({**MINIMAL, "image_pretraining": {"landcover": "", "classes": ["a"]}}, "image_pretraining.landcover is"),
        ({**MINIMAL, "recordings": {"table": ""}}, "recordings.table is empty"),
        ({"out_dir": "r", "data": {}}, "data.root is missing"),
        ({**MINIMAL, "batch_size": "big"}, "train.batch_size must be of type int"),
        ({**MINIMAL, "batch_size": 1}, "batch_size must be at least 2"),
        ({**MINIMAL, "devices": 0}, "devices must be at least 1"),
        ({**MINIMAL, "lr": 1}, "unknown setting train.lr"),
        ({**MINIMAL, "optim": {"betas": [0.9]}}, "optim.betas must be two numbers"),
        ({**MINIMAL, "optim": {"lr": 0}}, "optim.lr and optim.eps must be > 0"),
        ({**MINIMAL, "optim": {"weight_decay": -0.1}}, r"optim.weight_decay must be >= 0 \(0 turns"),
        ({**MINIMAL, "data": {"root": "p", "format": "webdataset"}}, "data.format must be"),
        ({**MINIMAL, "data": {"root": "p", "zooms": [0]}}, "data.zooms must be a list of zoom levels >= 1"),
        ({**MINIMAL, "data": {"root": "p", "zooms": "1"}}, "data.zooms must be of type list of int, got '1'"),
        ({**MINIMAL, "data": {"root": "p", "zooms": [1.5]}}, "each of data.zooms must be of type int, got 1.5"),
        ({**MINIMAL, "optim": {"lr": "fast"}}, "optim.lr must be of type number, got 'fast'"),
        ({**MINIMAL, "optim": {"betas": ["a", 0.9]}}, "each of optim.betas must be of type number, got 'a'"),
        ({**MINIMAL, "data": {"root": "p", "color_jitter": ["a", 0, 0, 0]}}, "data.color_jitter must be"),
        ({**MINIMAL, "data": {"root": "p", "color_jitter": [0.1, 0.1, 0.1]}}, "data.color_jitter must be"),
        ({**MINIMAL, "data": {"root": "p", "color_jitter": [0.1, 0.1, 0.1, 0.6]}}, "hue <= 0.5"),
        ({**MINIMAL, "data": {"root": "p", "color_jitter": 0.3}}, "data.color_jitter must be"),
        ({**MINIMAL, "data": {"root": "p", "color_jitter": [0.1, -0.1, 0.1, 0.0]}}, "each >= 0"),
        ({**MINIMAL, "model": {"architecture": "huge"}}, "model.architecture must be"),
        ({**MINIMAL, "model": "small"}, "model must be a mapping"),
        ({**MINIMAL, "precision": "64"}, "precision must be one of"),
        ({**MINIMAL, "image_pretraining": {"shares": "l.csv"}}, "image_pretraining needs classes"),
        ({**MINIMAL, "image_pretraining": {"shares": "l.csv", "classes": ["a"], "epochs": 0}}, "epochs >= 1"),
        ({**MINIMAL, "image_pretraining": {"landcover": "lc"}}, "image_pretraining needs classes"),
        (
            {**MINIMAL, "image_pretraining": {"shares": "l.csv", "classes": ["a"], "weight_decay": -0.1}},
            "image_pretraining.weight_decay must be >= 0",
        ),
        (
            {**MINIMAL, "data": {"root": "hf://d/a"}, "image_pretraining": {"landcover": "lc", "classes": ["a"]}},
            "data folder, on the hub here: give them as an absolute local path",
        ),
        (
            {**MINIMAL, "image_pretraining": {"classes": "water"}},
            "image_pretraining.classes must be of type list of str",
        ),
        (
            {**MINIMAL, "image_pretraining": {"shares": "l.csv", "classes": ["a"], "prototypes": -1}},
            "image_pretraining.prototypes must be >= 0",
        ),
        (
            {**MINIMAL, "image_pretraining": {"shares": "l.csv", "classes": ["a"], "prototypes": 1}},
            "set codebook: true and its shares or landcover, or leave prototypes 0",
        ),
        ({**MINIMAL, "image_pretraining": {"prototypes": 1}}, "set codebook: true and its shares or landcover"),
        ({**MINIMAL, "recordings": {"table": "r.csv", "weight": 0}}, "recordings.weight must be > 0"),
        ({**MINIMAL, "recordings": {"table": "r.csv", "directions": -1}}, "recordings.directions must be >= 0"),
        (
            {
                **MINIMAL,
                "image_pretraining": {"shares": "l.csv", "classes": ["a"]},
                "recordings": {"table": "r.csv", "directions": 2},
            },
            "set recordings.table and image_pretraining with codebook: true, or leave directions 0",
        ),
        (
            {
                **MINIMAL,
                "image_pretraining": {"shares": "l.csv", "classes": ["a"], "codebook": True},
                "recordings": {"directions": 2},
            },
            "set recordings.table and image_pretraining with codebook: true",
        ),
        ({**MINIMAL, "audio_prototypes": -1}, "audio_prototypes must be >= 0"),
        (
            {
                **MINIMAL,
                "image_pretraining": {"shares": "l.csv", "classes": ["a"], "codebook": True},
                "audio_prototypes": 1,
            },
            "set image_pretraining.prototypes > 0, or leave audio_prototypes 0",
        ),
    ],
)
def test_bad_settings_are_refused_in_one_line(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_settings(values)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("written", "fix"), [("5e-4", "5.0e-4"), ("1.0e308", "1.0e+308"), ("2E-1", "2.0e-1")])
def test_a_number_yaml_reads_as_text_is_refused_with_how_to_write_it(tmp_path: Path, written: str, fix: str) -> None:
    path = tmp_path / "train.yaml"
    path.write_text(f"out_dir: run\ndata:\n  root: pairs\noptim:\n  lr: {written}\n")
    message = f"optim.lr must be of type number, got '{written}' (YAML reads {written} as text; write {fix})"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        load_settings(path)
    path.write_text(f"out_dir: run\ndata:\n  root: pairs\noptim:\n  lr: {fix}\n")
    assert load_settings(path).optim.lr == float(written)


def test_a_missing_or_broken_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("out_dir: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(broken)

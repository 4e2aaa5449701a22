"""Bad training settings, init checkpoints that disagree with them, and checkpoints with wrong config fields are
refused in one line before any work; a converted checkpoint's weights and config appear together or not at all."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml

from model.__main__ import main
from model.checkpoint import filter_state_dict, save_safetensors
from model.config import Sat2SoundConfig
from model.errors import CheckpointError, ConfigError
from model.train_config import load_settings, parse_settings

MINIMAL: dict[str, Any] = {"out_dir": "run", "data": {"root": "pairs"}}
UPSTREAM_SMALL = {
    "fc_dim": 64,
    "codebook_dim": 64,
    "codebook_size": 256,
    "sat_type": "sentinel",
    "metadata_type": "none",
}
SMALL_SENTINEL = replace(Sat2SoundConfig.small("none"), sat_type="sentinel")


def one_line(info: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(info.value)
    assert "\n" not in message, message
    return message


def stub_model(cfg: Sat2SoundConfig) -> Any:
    """What save_safetensors reads of a model, without building one."""
    return SimpleNamespace(cfg=cfg, state_dict=lambda: {"weight": torch.zeros(2)})


def cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one stderr line of a refused command."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.strip()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"devices": "all"}, "train.devices must be of type int, got 'all'"),
        ({"text_cache": ["a"]}, r"train.text_cache must be of type str, got \['a'\]"),
        ({"batch_size": None}, "train.batch_size must be of type int, got None"),
        ({"model": {"init": 5}}, "model.init must be of type str, got 5"),
        ({"model": {"meta_droprate": "half"}}, "model.meta_droprate must be of type number, got 'half'"),
        ({"data": {"root": "p", "zooms": ["1"]}}, "each of data.zooms must be of type int, got '1'"),
        ({"data": {"root": "p", "color_jitter": 0.4}}, "data.color_jitter must be of type list of number, got 0.4"),
        ({"data": {"root": "p", "num_workers": -1}}, r"data.num_workers must be >= 0"),
        ({"seed": -1}, r"seed must be in 0\.\.4294967295"),
        ({"seed": 2**32}, r"seed must be in 0\.\.4294967295"),
        ({"optim": {"lr": float("inf")}}, "optim.lr must be a finite number, got inf"),
        ({"optim": {"eps": float("inf")}}, "optim.eps must be a finite number, got inf"),
        ({"optim": {"grad_clip": float("nan")}}, "optim.grad_clip must be a finite number, got nan"),
        (
            {"data": {"root": "p", "color_jitter": [float("inf"), 0, 0, 0]}},
            "each of data.color_jitter must be a finite number, got inf",
        ),
        ({"model": {"metadata_type": "foo"}}, r"unknown metadata \['foo'\] in metadata_type 'foo'"),
    ],
)
def test_every_setting_has_a_checked_type_and_range(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_settings({**MINIMAL, **values})
    one_line(info)


def test_train_refuses_an_infinite_learning_rate_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "train.yaml"
    config.write_text("out_dir: run\ndata: {root: pairs}\noptim: {lr: .inf}\n")
    assert cli_error(["train", "--config", str(config)], capsys) == "error: optim.lr must be a finite number, got inf"
    assert not (tmp_path / "run").exists()


def test_train_refuses_an_empty_out_dir_rather_than_train_in_the_current_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "train.yaml"
    config.write_text("out_dir: ''\ndata: {root: pairs}\n")
    monkeypatch.chdir(tmp_path)
    says = "error: out_dir is empty; name the folder for checkpoints and logs"
    assert cli_error(["train", "--config", str(config)], capsys) == says
    assert [path.name for path in tmp_path.iterdir()] == ["train.yaml"]


def write_init(folder: Path, cfg: Sat2SoundConfig) -> Path:
    weights, _ = save_safetensors(stub_model(cfg), folder / "init.safetensors")
    return weights


@pytest.mark.parametrize(
    ("section", "key", "value", "found"),
    [
        ("model", "metadata_type", "latlong_month", "none"),
        ("model", "architecture", "full", "small"),
        ("data", "sat_type", "bingmap", "sentinel"),
    ],
)
def test_a_setting_that_contradicts_the_init_checkpoint_is_refused(
    tmp_path: Path, section: str, key: str, value: str, found: str
) -> None:
    init = write_init(tmp_path, SMALL_SENTINEL)
    values = {**MINIMAL, "model": {"init": str(init)}}
    values[section] = {**values[section], key: value}
    with pytest.raises(ConfigError) as info:
        parse_settings(values)
    assert one_line(info) == (
        f"{section}.{key} is {value!r} but model.init {init} has {found!r};"
        f" leave {section}.{key} out to go on from the checkpoint's, or set it to {found!r}"
    )


def test_settings_left_out_take_the_init_checkpoints_so_the_recipe_tells_what_was_trained(tmp_path: Path) -> None:
    cfg = Sat2SoundConfig.small("latlong_month")  # bingmap
    init = write_init(tmp_path, cfg)
    settings = parse_settings({**MINIMAL, "model": {"init": str(init), "metadata_type": "latlong_month"}})
    recipe = settings.recipe()
    assert (recipe["model"]["architecture"], recipe["model"]["metadata_type"]) == ("small", "latlong_month")
    assert recipe["data"]["sat_type"] == settings.data.sat_type == "bingmap"


def test_a_missing_init_checkpoint_is_refused_when_the_settings_load(tmp_path: Path) -> None:
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({**MINIMAL, "model": {"init": "nothere.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"^model.init: checkpoint \S+nothere.safetensors does not exist") as info:
        load_settings(config)
    one_line(info)


def convert_error(source: Path, capsys: pytest.CaptureFixture[str]) -> str:
    out = source.parent / "out" / "model.safetensors"
    err = cli_error(["convert", str(source), str(out)], capsys)
    assert not out.parent.exists()
    return err


REGENERATE = "; regenerate it with 'python -m model convert'"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"fc_dim": "64"}, "fc_dim must be a whole number >= 1, got '64'"),
        ({"fc_dim": -64}, "fc_dim must be a whole number >= 1, got -64"),
        ({"metadata_type": 5}, "metadata_type must be a string, got 5"),
        ({"vit": {"depth": 0}}, "vit.depth must be a whole number >= 1, got 0"),
        (
            {"audio": {"depths": [2, 2], "num_heads": [1]}},
            "audio.num_heads (1,) must give one head count per stage of (2, 2)",
        ),
        ("small", f"config must be a mapping of fields, got str{REGENERATE}"),
        ([1, 2], f"config must be a mapping of fields, got list{REGENERATE}"),
    ],
)
def test_convert_refuses_a_config_with_wrong_fields_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config: object, message: str
) -> None:
    weights, config_path = save_safetensors(stub_model(SMALL_SENTINEL), tmp_path / "cv.safetensors")
    meta = json.loads(config_path.read_text())
    meta["config"] = {**meta["config"], **config} if isinstance(config, dict) else config
    config_path.write_text(json.dumps(meta))
    assert convert_error(weights, capsys) == f"error: {config_path}: {message}"


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (
            {"hyper_parameters": {**UPSTREAM_SMALL, "meta_droprate": "abc"}},
            ": meta_droprate must be a finite number >= 0, got 'abc'",
        ),
        ({"hyper_parameters": {**UPSTREAM_SMALL, "fc_dim": "big"}}, ": fc_dim must be a whole number >= 1, got 'big'"),
        ({"hyper_parameters": {**UPSTREAM_SMALL, "fc_dim": -5}}, ": fc_dim must be a whole number >= 1, got -5"),
        ({"hyper_parameters": {**UPSTREAM_SMALL, "metadata_type": None}}, ": metadata_type must be a string, got None"),
        ({"hyper_parameters": {**UPSTREAM_SMALL, "sat_type": ["x"]}}, ": sat_type must be a string, got ['x']"),
        ({"hyper_parameters": "hp"}, " is not a Sat2Sound checkpoint (its hyper_parameters is a str, not a mapping)"),
        ({"state_dict": "weights"}, " is not a Sat2Sound checkpoint (its state_dict is a str, not a mapping)"),
    ],
)
def test_convert_refuses_hyper_parameters_with_wrong_fields_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], payload: dict[str, Any], message: str
) -> None:
    source = tmp_path / "cv.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": UPSTREAM_SMALL, **payload}, source)
    assert convert_error(source, capsys).startswith(f"error: {source}{message}")


def test_state_dict_keys_that_are_not_names_are_passed_over() -> None:
    weight = torch.zeros(1)
    assert filter_state_dict({1: weight, "module.fc.weight": weight, "steps": 3}) == {"fc.weight": weight}


def test_weights_are_not_written_where_their_config_cannot_be(tmp_path: Path) -> None:
    (tmp_path / "model.json").mkdir()
    with pytest.raises(CheckpointError, match=r"model\.json .*is a folder") as info:
        save_safetensors(stub_model(SMALL_SENTINEL), tmp_path / "model.safetensors")
    one_line(info)
    assert not (tmp_path / "model.safetensors").exists()


def test_weights_whose_config_fails_to_land_are_taken_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rename = os.replace

    def refuse_configs(source: Path, target: Path) -> None:
        if Path(target).suffix == ".json":
            raise OSError(28, "No space left on device")
        rename(source, target)

    monkeypatch.setattr(os, "replace", refuse_configs)
    with pytest.raises(CheckpointError, match="No space left on device") as info:
        save_safetensors(stub_model(SMALL_SENTINEL), tmp_path / "model.safetensors")
    one_line(info)
    assert os.listdir(tmp_path) == []

"""Training end to end on a tiny folder of pairs: logs, best checkpoints, export the pipeline loads, an exact
resume, cached captions, and `python -m model evaluate --checkpoint` on a split."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import rasterio
import soundfile
import torch
import yaml
from rasterio.transform import from_bounds
from support.pair_data import encode_image, write_folder
from support.paths import REPO
from support.slurm_cluster import needs_slurm, slurm_cluster

from model import training
from model.__main__ import main
from model.checkpoint import load_model, read_checkpoint
from model.config import Sat2SoundConfig
from model.data.transforms import COLOR_JITTER, dihedral_turn
from model.errors import ConfigError, DataError
from model.loss import l2_normalize, soft_cross_entropy
from model.sat2sound import Sat2Sound
from model.text_cache import TextTokens
from model.train_config import RecordingSettings, load_settings, parse_settings
from model.training import (
    CHECKPOINTS,
    LAST,
    AudioGoals,
    ImageTowerPretraining,
    PatchShares,
    RecordingCaptions,
    ViewShares,
    checkpoint_step,
    class_directions,
    class_prototypes,
    config_changes,
    initial_model,
    mean_of_patches,
    open_pairs,
    prototypes_loss,
    read_patch_means,
    resume_checkpoint,
    token_shares_loss,
    train,
    transform_for,
    upstream_hparams,
)

COLOURS = {"water": (20, 40, 90), "forest": (30, 90, 30), "city": (170, 160, 150)}
RATE = 16_000
# What image pretraining with `codebook` teaches, by state-dict prefix; without it, the first alone.
IMAGE_SIDE = ("satmae_backbone.", "fdt.img_query_model.", "fdt.space_dict")


def make_pairs(root: Path) -> Path:
    """Three classes of plain-coloured 64 px images, each with its own tone as the recording."""
    lines = []
    rng = np.random.default_rng(0)
    for index in range(12):
        name = list(COLOURS)[index % 3]
        key = f"{name}{index}"
        image = np.clip(np.array(COLOURS[name]) + rng.integers(-10, 10, (64, 64, 3)), 0, 255).astype(np.uint8)
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "images" / f"{key}.png").write_bytes(encode_image(image))
        tone = np.sin(2 * np.pi * (200 + 300 * (index % 3)) * np.arange(RATE * 2) / RATE).astype(np.float32)
        (root / "audio").mkdir(exist_ok=True)
        soundfile.write(root / "audio" / f"{key}.wav", 0.3 * tone, RATE)
        split = "val" if index >= 9 else "train"
        lines.append(
            {
                "key": key,
                "image": f"images/{key}.png",
                "audio": f"audio/{key}.wav",
                "audio_caption": f"the sound of {name}",
                "image_caption": f"a satellite image of {name}",
                "lat": "-25.3",
                "lon": "-54.5",
                "time": "2020-05-18",
                "split": "test" if index == 11 else split,
            }
        )
    lines.append({**lines[-1], "key": "extra", "split": "test"})
    return write_folder(root, lines)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pairs(tmp_path_factory.mktemp("pairs"))


def config(tmp_path: Path, pairs: Path, **values: object) -> Path:
    settings = {
        "out_dir": "run",
        "data": {"format": "folder", "root": str(pairs), "zooms": [1], "num_workers": 0},
        "optim": {"lr": 1e-3},
        "batch_size": 4,
        "max_epochs": 2,
        "seed": 7,
        **values,
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def write_shares(path: Path, pairs: Path, skip: str | None = None) -> Path:
    """Each pair's class shares: all of its own colour's class."""
    keys = [row["key"] for row in csv.DictReader((pairs / "pairs.csv").open())]
    lines = ["key," + ",".join(COLOURS)]
    lines += [f"{key}," + ",".join(str(int(key.startswith(name))) for name in COLOURS) for key in keys if key != skip]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_landcover(
    folder: Path, pairs: Path, skip: str | None = None, names: tuple[str, ...] = tuple(COLOURS)
) -> Path:
    """Each pair's class raster: its own colour's class over the whole image, `names` the bands."""
    folder.mkdir(parents=True, exist_ok=True)
    for row in csv.DictReader((pairs / "pairs.csv").open()):
        if row["key"] != skip:
            bands = np.stack([np.full((64, 64), 255 * row["key"].startswith(name), np.uint8) for name in names])
            write_raster(folder / f"{row['key']}.tif", bands, names)
    return folder


def write_raster(path: Path, bands: np.ndarray, names: Sequence[str]) -> None:
    height, width = bands.shape[1:]
    place = {"crs": "EPSG:3857", "transform": from_bounds(0, 0, 30 * width, 30 * height, width, height)}
    profile = {"driver": "GTiff", "width": width, "height": height, "count": len(bands), **place}
    with rasterio.open(path, "w", dtype="uint8", **profile) as raster:
        raster.write(bands)
        raster.descriptions = tuple(names)


def tower_targets(tmp_path: Path, pairs: Path, targets: str, skip: str | None = None) -> dict[str, str]:
    """`landcover`, `shares`, or `both` (then only the shares skip `skip`)."""
    if targets == "landcover":
        return {"landcover": str(write_landcover(tmp_path / "landcover", pairs, skip))}
    shares = {"shares": str(write_shares(tmp_path / "shares.csv", pairs, skip))}
    return shares if targets == "shares" else {**tower_targets(tmp_path, pairs, "landcover"), **shares}


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(out / "model.safetensors")[1]


def test_the_configs_colour_jitter_reaches_the_training_transform(tmp_path: Path, pairs: Path) -> None:
    for jitter, expected in ((None, COLOR_JITTER), ([0.1, 0.1, 0.1, 0], (0.1, 0.1, 0.1, 0))):
        data = {"format": "folder", "root": str(pairs), "zooms": [1], "num_workers": 0, "color_jitter": jitter}
        settings = load_settings(config(tmp_path, pairs, data=data))
        source = open_pairs(settings.data, "train")
        assert transform_for(source, settings.data, train=True).color_jitter == expected


@pytest.mark.slow
def test_training_logs_keeps_the_best_and_exports_what_the_pipeline_loads(
    tmp_path: Path, pairs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = load_settings(config(tmp_path, pairs))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(settings, enable_progress_bar=False)
    # Lightning's notices that say nothing about the run stay out of its log.
    assert "GPU available" in caplog.text and "💡" not in caplog.text
    assert not [warning for warning in caught if "LeafSpec" in str(warning.message)]
    out = settings.out_path
    assert result.steps == 2 * 2  # 8 training pairs, batches of 4 (the last partial batch is dropped)
    assert result.best.name.startswith("best-")
    # last.ckpt follows every epoch, whether or not the epoch was the best
    assert torch.load(out / CHECKPOINTS / LAST, weights_only=True)["global_step"] == result.steps
    assert result.best_recall is not None and 0 <= result.best_recall <= 1
    rows = list(csv.DictReader((out / "logs" / "csv" / "version_0" / "metrics.csv").open()))
    assert any(row.get("train/loss") for row in rows) and any(row.get("val/recall") for row in rows)
    assert list((out / "logs" / "tensorboard").rglob("events.out.tfevents.*"))
    model, _ = load_model(out / "model.safetensors")
    assert model.cfg.sat_type == "sentinel" and model.cfg.text_dim == 384
    fresh = Sat2SoundConfig.small("none")
    assert all(torch.isfinite(value).all() for value in final_weights(out).values())
    assert model.cfg.fc_dim == fresh.fc_dim
    exported = json.loads((out / "model.json").read_text())
    assert exported["trained_by"] == "python -m model train"
    assert exported["training"] == json.loads(json.dumps(settings.recipe()))
    assert not (out / "model.ckpt").exists()  # upstream's layout cannot describe the small architecture
    assert list(settings.text_cache_path.rglob("*.npy"))


def write_recordings(folder: Path, pairs: Path, lines: Sequence[str]) -> Path:
    """A recordings table of `lines` (its header first) beside a tone of each class of the pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(COLOURS):
        (folder / f"{name}.wav").write_bytes((pairs / "audio" / f"{name}{index}.wav").read_bytes())
    table = folder / "recordings.csv"
    table.write_text("\n".join(lines) + "\n")
    return table


def logged_steps(out: Path, version: int) -> list[dict[str, str]]:
    """The training steps' rows of a run's CSV log (`version` counts the run's starts)."""
    rows = csv.DictReader((out / "logs" / "csv" / f"version_{version}" / "metrics.csv").open())
    return [row for row in rows if row.get("train/loss")]


def pairs_loss(row: dict[str, str]) -> float:
    """A logged step's loss of its pairs alone, its parts weighed as the small model weighs them."""
    fdt_weight = Sat2SoundConfig.small("none").fdt_weight
    return float(row["train/multimodal_loss"]) + fdt_weight * float(row["train/fdt_loss"])


TONES = ["file,caption", *(f"{name}.wav,the sound of {name} alone" for name in COLOURS)]


@pytest.mark.slow
def test_recordings_taught_their_captions_add_their_term_to_each_step(tmp_path: Path, pairs: Path) -> None:
    table = write_recordings(tmp_path / "sounds", pairs, TONES)
    settings = load_settings(config(tmp_path, pairs, recordings={"table": str(table), "weight": 0.5}))
    train(settings, enable_progress_bar=False)
    steps = logged_steps(settings.out_path, 0)
    assert len(steps) == 4
    for row in steps:
        term = float(row["train/recordings_loss"])
        assert term > 0
        assert float(row["train/loss"]) == pytest.approx(pairs_loss(row) + 0.5 * term, rel=1e-5)
    recipe = json.loads((settings.out_path / "model.json").read_text())["training"]
    assert recipe["recordings"] == {"table": "recordings.csv", "weight": 0.5, "directions": 0.0}


def recordings_model(caption_order: list[int], tower: torch.nn.Module, modes: list[bool]) -> SimpleNamespace:
    """A stand-in model whose audio embedding of recording i is the unit vector i (mels 0, 1, 2) and whose captions
    come out in `caption_order`; `modes` records the audio tower's training mode at each embedding."""

    def encode_audio(mel: torch.Tensor) -> SimpleNamespace:
        modes.append(tower.training)
        return SimpleNamespace(embedding=torch.eye(3)[mel.flatten().long()])

    return SimpleNamespace(
        audio_encoder=tower,
        logit_scale_at=torch.tensor(np.log(50.0)),
        encode_audio=encode_audio,
        encode_text=lambda hidden, mask: SimpleNamespace(embedding=hidden[caption_order, 0]),
    )


CAPTIONS = ["ducks", "an owl", "a cow"]


def caption_texts(encoded: list[list[str]]) -> SimpleNamespace:
    """Caption i encodes as the unit vector i; `encoded` records each call."""

    def encode(names: list[str]) -> TextTokens:
        encoded.append(names)
        hidden = torch.stack([torch.eye(3)[CAPTIONS.index(n)] for n in names])[:, None]
        return TextTokens(hidden, torch.ones(len(names), 1, dtype=torch.bool))

    return SimpleNamespace(encode=encode)


def test_each_recording_is_taught_its_own_caption_among_the_others() -> None:
    """The term is least when each recording's audio embedding meets its own caption's, rows stay paired, the
    audio tower embeds them as it embeds a query (by its running statistics), then trains on as it did, and the
    captions are encoded once for the run."""
    mel = torch.arange(3.0).reshape(3, 1, 1, 1)
    recordings = RecordingCaptions(mel, CAPTIONS, RecordingSettings(table="r.csv"))
    encoded: list[list[str]] = []
    texts = caption_texts(encoded)
    tower = torch.nn.BatchNorm2d(1).train()
    modes: list[bool] = []
    matched = recordings.losses(recordings_model([0, 1, 2], tower, modes), texts, None)  # type: ignore[arg-type]
    swapped = recordings.losses(recordings_model([1, 0, 2], tower, modes), texts, None)  # type: ignore[arg-type]
    assert list(matched) == ["train/recordings_loss"]
    assert float(matched["train/recordings_loss"]) < 1e-6 and float(swapped["train/recordings_loss"]) > 10
    assert modes == [False, False] and tower.training
    assert encoded == [CAPTIONS]


def test_recordings_and_their_captions_are_pulled_towards_their_classes_directions() -> None:
    """One minus the mean cosine of each recording, and of its caption, with its class's direction; weighted by
    `directions` beside the caption term's `weight`."""
    mel = torch.arange(3.0).reshape(3, 1, 1, 1)
    settings = RecordingSettings(table="r.csv", weight=0.5, directions=4.0)
    recordings = RecordingCaptions(mel, CAPTIONS, settings, land_covers=torch.tensor([2, 0, 1]))
    tower = torch.nn.BatchNorm2d(1)
    model = recordings_model([0, 1, 2], tower, [])
    along = torch.eye(3)[[1, 2, 0]]  # class c's direction is the unit vector of the recording of class c
    terms = recordings.losses(model, caption_texts([]), along)  # type: ignore[arg-type]
    assert float(terms["train/directions_loss"]) == pytest.approx(0.0, abs=1e-6)
    across = recordings.losses(model, caption_texts([]), torch.eye(3))  # type: ignore[arg-type]
    assert float(across["train/directions_loss"]) == pytest.approx(1.0)
    halfway = l2_normalize(torch.eye(3)[[1, 2, 0]] + torch.eye(3))
    tilted = recordings.losses(model, caption_texts([]), halfway)  # type: ignore[arg-type]
    assert float(tilted["train/directions_loss"]) == pytest.approx(1 - 2**-0.5)
    expected = 0.5 * tilted["train/recordings_loss"] + 4.0 * tilted["train/directions_loss"]
    assert float(recordings.weighted(tilted)) == pytest.approx(float(expected))


def test_class_directions_are_the_heads_rows_less_their_mean_row() -> None:
    head = torch.nn.Linear(2, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    expected = torch.tensor([[2.0, -1.0], [-1.0, 2.0], [-1.0, -1.0]])
    assert torch.allclose(class_directions(head), expected / expected.norm(dim=1, keepdim=True))


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (None, "recordings.table"),
        (["file", "water.wav"], "has no column 'caption'"),
        (TONES[:2], "lists 1 recordings; the term contrasts them, list at least 2"),
        ([*TONES[:3], "city.wav, "], "city.wav has no caption"),
        ([*TONES[:3], "absent.wav,rain"], "absent.wav does not exist"),
    ],
)
def test_a_bad_recordings_table_is_refused_before_any_training(
    tmp_path: Path, pairs: Path, capsys: pytest.CaptureFixture[str], rows: list[str] | None, message: str
) -> None:
    table = tmp_path / "sounds" / "recordings.csv"
    if rows is not None:
        table = write_recordings(tmp_path / "sounds", pairs, rows)
    tower = {**tower_targets(tmp_path, pairs, "shares"), "classes": list(COLOURS)}
    path = config(tmp_path, pairs, image_pretraining=tower, recordings={"table": str(table)})
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (TONES, "has no column 'land_cover'"),
        (
            ["file,caption,land_cover", "water.wav,water alone,water", "city.wav,a city,sky"],
            "city.wav's land_cover 'sky' is not one of image_pretraining.classes (water, forest, city); name one",
        ),
    ],
)
def test_recordings_pulled_to_their_classes_must_name_one(
    tmp_path: Path, pairs: Path, capsys: pytest.CaptureFixture[str], rows: list[str], message: str
) -> None:
    table = write_recordings(tmp_path / "sounds", pairs, rows)
    tower = {**tower_targets(tmp_path, pairs, "shares"), "classes": list(COLOURS), "codebook": True}
    recordings = {"table": str(table), "directions": 1.0}
    path = config(tmp_path, pairs, image_pretraining=tower, recordings=recordings)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_recordings_pulled_to_the_pretrained_heads_directions_and_a_resumed_run_keeps_them(
    tmp_path: Path, pairs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pretrain = training.pretrain_image_tower
    taught: list[torch.Tensor] = []

    def watched(*args: object, **overrides: object) -> torch.Tensor:
        directions = pretrain(*args, **overrides)  # type: ignore[arg-type]
        assert directions is not None
        taught.append(directions)
        return directions

    monkeypatch.setattr(training, "pretrain_image_tower", watched)
    lines = ["file,caption,land_cover", *(f"{name}.wav,the sound of {name} alone,{name}" for name in COLOURS)]
    table = write_recordings(tmp_path / "sounds", pairs, lines)
    tower = {**tower_targets(tmp_path, pairs, "shares"), "classes": list(COLOURS), "epochs": 1, "codebook": True}
    recordings = {"table": str(table), "weight": 0.5, "directions": 3.0}
    settings = load_settings(config(tmp_path, pairs, max_epochs=1, image_pretraining=tower, recordings=recordings))
    train(settings, enable_progress_bar=False)
    [directions] = taught
    assert directions.shape == (len(COLOURS), Sat2SoundConfig.small("none").codebook_dim)
    last = settings.out_path / CHECKPOINTS / LAST

    def saved() -> torch.Tensor:
        return torch.load(last, map_location="cpu", weights_only=True)["state_dict"]["directions"]

    assert torch.equal(saved(), directions)
    more = config(tmp_path, pairs, max_epochs=2, image_pretraining=tower, recordings=recordings)
    train(load_settings(more), enable_progress_bar=False)
    assert len(taught) == 1 and torch.equal(saved(), directions)
    steps = logged_steps(settings.out_path, 1)
    assert len(steps) == 2
    for row in steps:
        terms = 0.5 * float(row["train/recordings_loss"]) + 3.0 * float(row["train/directions_loss"])
        assert 0 < float(row["train/directions_loss"]) <= 2
        assert float(row["train/loss"]) == pytest.approx(pairs_loss(row) + terms, rel=1e-5)
    assert "directions" not in final_weights(settings.out_path)


def test_a_pairs_audio_is_drawn_to_its_views_mix_of_the_prototypes() -> None:
    """`AudioGoals`: the same term as the image pretraining's `prototypes_loss`, on the pairs' audio embeddings
    (normalised here: the model's are not), with the shares of the image pretraining's first target."""
    prototypes = class_prototypes(2, 4)
    shares = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    target = ViewShares({"a": shares[0], "b": shares[1]})
    batch = SimpleNamespace(keys=["a", "b"])
    goals = AudioGoals(target, prototypes)
    on_goal = 3 * l2_normalize(shares @ prototypes)
    assert float(goals.loss(on_goal, batch, torch.device("cpu"))) == pytest.approx(0.0, abs=1e-6)  # type: ignore[arg-type]
    swapped = on_goal.flip(0)
    expected = prototypes_loss(l2_normalize(swapped), shares, prototypes)
    assert float(goals.loss(swapped, batch, torch.device("cpu"))) == pytest.approx(float(expected))  # type: ignore[arg-type]
    assert float(expected) > 0.1


@pytest.mark.slow
def test_audio_drawn_to_the_prototypes_and_the_recordings_pulled_to_them(
    tmp_path: Path, pairs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `image_pretraining.prototypes`, the recordings' directions are the class prototypes themselves; with
    `audio_prototypes` each step adds its weighted term, logged as `train/audio_prototypes_loss`."""
    pretrain = training.pretrain_image_tower
    taught: list[torch.Tensor | None] = []

    def watched(*args: object, **overrides: object) -> torch.Tensor | None:
        taught.append(pretrain(*args, **overrides))  # type: ignore[arg-type]
        return taught[-1]

    monkeypatch.setattr(training, "pretrain_image_tower", watched)
    lines = ["file,caption,land_cover", *(f"{name}.wav,the sound of {name} alone,{name}" for name in COLOURS)]
    table = write_recordings(tmp_path / "sounds", pairs, lines)
    tower = {
        **tower_targets(tmp_path, pairs, "landcover"),
        "classes": list(COLOURS),
        "epochs": 1,
        "codebook": True,
        "prototypes": 2.0,
    }
    recordings = {"table": str(table), "weight": 0.5, "directions": 3.0}
    values = {"max_epochs": 1, "image_pretraining": tower, "recordings": recordings, "audio_prototypes": 1.5}
    settings = load_settings(config(tmp_path, pairs, **values))
    train(settings, enable_progress_bar=False)
    assert len(taught) == 1 and taught[0] is not None
    torch.testing.assert_close(taught[0], class_prototypes(len(COLOURS), Sat2SoundConfig.small("none").codebook_dim))
    steps = logged_steps(settings.out_path, 0)
    assert len(steps) == 2
    for row in steps:
        term = float(row["train/audio_prototypes_loss"])
        assert 0 < term <= 2
        recorded = 0.5 * float(row["train/recordings_loss"]) + 3.0 * float(row["train/directions_loss"])
        assert float(row["train/loss"]) == pytest.approx(pairs_loss(row) + recorded + 1.5 * term, rel=1e-5)
    assert json.loads((settings.out_path / "model.json").read_text())["training"]["audio_prototypes"] == 1.5


@pytest.mark.slow
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path: Path, pairs: Path) -> None:
    straight = load_settings(config(tmp_path / "straight", pairs, max_epochs=2))
    train(straight, enable_progress_bar=False)
    halves = tmp_path / "halves"
    train(load_settings(config(halves, pairs, max_epochs=1)), enable_progress_bar=False)
    resumed = load_settings(config(halves, pairs, max_epochs=2))
    result = train(resumed, enable_progress_bar=False)
    assert result.steps == 4
    expected, found = final_weights(straight.out_path), final_weights(resumed.out_path)
    assert expected.keys() == found.keys()
    for key in expected:
        assert torch.allclose(expected[key], found[key], atol=1e-6), key


@pytest.mark.slow
def test_a_run_requeued_by_slurm_in_its_first_epoch_resumes_from_lightnings_checkpoint(
    tmp_path: Path, pairs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requeued by SLURM (`sbatch --signal=USR1@90`), Lightning saves `hpc_ckpt_N.ckpt` in the run's root folder.
    Before the first epoch ends there is no last.ckpt: the run resumes from Lightning's checkpoint, which holds the
    taught image tower, so the image pretraining does not run again."""
    job = {"NTASKS": "1", "JOB_NAME": "train", "JOB_ID": "1", "NNODES": "1", "NODELIST": "localhost"}
    for name, value in {**job, "PROCID": "0", "LOCALID": "0", "NODEID": "0"}.items():
        monkeypatch.setenv(f"SLURM_{name}", value)
    tower = {**tower_targets(tmp_path, pairs, "shares"), "classes": list(COLOURS), "epochs": 1, "codebook": True}
    # Stopped after its first step of two an epoch, as a requeue stops it: the main run's state, no epoch's end.
    first = train(load_settings(config(tmp_path, pairs, max_steps=1, image_pretraining=tower)))
    out = tmp_path / "run"
    (out / CHECKPOINTS / LAST).rename(out / "hpc_ckpt_1.ckpt")
    shutil.rmtree(out / CHECKPOINTS)
    again = train(load_settings(config(tmp_path, pairs, max_epochs=2, image_pretraining=tower)))
    # Resumed at step 1, Lightning goes on from the next epoch: 2 more steps (a fresh run would take 4).
    assert (first.steps, again.steps) == (1, 3)
    logged = [list(csv.DictReader(path.open())) for path in sorted((out / "logs" / "csv").rglob("metrics.csv"))]
    assert [len([row for row in rows if row["train/loss"]]) for rows in logged] == [1, 2]
    assert len(list((out / "logs" / "image_pretraining").glob("version_*"))) == 1


def test_a_run_resumes_from_its_furthest_readable_checkpoint(tmp_path: Path, pairs: Path) -> None:
    settings = load_settings(config(tmp_path, pairs))
    assert resume_checkpoint(settings) is None
    (settings.out_path / CHECKPOINTS).mkdir(parents=True)
    for name, step in {f"{CHECKPOINTS}/{LAST}": 4, "hpc_ckpt_1.ckpt": 3, "hpc_ckpt_2.ckpt": 6}.items():
        torch.save({"global_step": step}, settings.out_path / name)
    assert resume_checkpoint(settings) == settings.out_path / "hpc_ckpt_2.ckpt"
    # A job killed while Lightning saved its checkpoint leaves it cut short: the run goes on from the next one.
    cut = settings.out_path / "hpc_ckpt_2.ckpt"
    cut.write_bytes(cut.read_bytes()[:40])
    with pytest.warns(UserWarning, match="hpc_ckpt_2.ckpt cannot be read"):
        assert resume_checkpoint(settings) == settings.out_path / CHECKPOINTS / LAST


# A run resumed in its out_dir with one setting changed: how the refusal says what differs.
REFUSED_RESUMES = {
    "metadata": r"lacks tensors these settings make \(16, e\.g\. model\.sat_encoder\.meta_fuser\..*; metadata_type"
    r" 'none' there, 'latlong' here\)",
    "image_pretraining": r"\(it trains (\d+) parameter tensors, these settings (?!\1)\d+\)",
    "directions": r"\(it lacks tensors these settings make \(1, e\.g\. directions\)\)",
    "prototypes": r"\(its image side was pretrained otherwise: image_pretraining\.prototypes 0\.0 there, 1\.5 here\)",
}


@pytest.mark.slow
@pytest.mark.parametrize("change", list(REFUSED_RESUMES))
def test_a_run_resumed_with_other_settings_is_refused_before_any_work(
    tmp_path: Path, pairs: Path, capsys: pytest.CaptureFixture[str], change: str
) -> None:
    lines = ["file,caption,land_cover", *(f"{name}.wav,the sound of {name} alone,{name}" for name in COLOURS)]
    recordings = {"table": str(write_recordings(tmp_path / "sounds", pairs, lines))}
    tower = {**tower_targets(tmp_path, pairs, "shares"), "classes": list(COLOURS), "epochs": 1, "codebook": True}
    before: dict[str, object] = {"recordings": recordings}
    if change in ("directions", "prototypes"):
        before["image_pretraining"] = tower
    after = {
        "metadata": {**before, "model": {"metadata_type": "latlong"}},
        "image_pretraining": {**before, "image_pretraining": tower},
        "directions": {**before, "recordings": {**recordings, "directions": 1.0}},
        "prototypes": {**before, "image_pretraining": {**tower, "prototypes": 1.5}},
    }[change]
    train(load_settings(config(tmp_path, pairs, max_epochs=1, **before)), enable_progress_bar=False)
    run = tmp_path / "run"
    last = run / CHECKPOINTS / LAST
    saved, listing = last.read_bytes(), sorted(run.rglob("*"))
    capsys.readouterr()
    assert main(["train", "--config", str(config(tmp_path, pairs, max_epochs=2, **after))]) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(REFUSED_RESUMES[change], err) and "\n" not in err
    assert err.startswith(f"error: {last} was saved by a run of other settings")
    assert err.endswith("resume with that run's settings, or give out_dir a new folder")
    assert last.read_bytes() == saved and sorted(run.rglob("*")) == listing


def test_a_refused_resume_names_each_model_field_that_differs_nested_ones_by_dotted_name() -> None:
    small, full = Sat2SoundConfig.small("none").to_dict(), Sat2SoundConfig().to_dict()
    changes = list(config_changes(small, full))
    assert "vit.embed_dim 64 there, 768 here" in changes and "fc_dim 64 there, 1024 here" in changes
    assert not any(change.startswith(("vit ", "audio ", "sat_type")) for change in changes)
    assert list(config_changes(full, full)) == []


class RequeuedAt(pl.Callback):
    """Saves Lightning's requeue checkpoint after `step` steps and stops, as SLURM's signal and requeue would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir))
            trainer.should_stop = True


@pytest.mark.slow
def test_a_run_requeued_after_an_epoch_resumes_from_the_further_checkpoint(tmp_path: Path, pairs: Path) -> None:
    """Requeued in its second epoch, the run goes on from Lightning's checkpoint of step 3, not from the first
    epoch's last.ckpt (step 2)."""
    train(load_settings(config(tmp_path, pairs, max_epochs=1)))
    # The second epoch stopped after one step of two by a requeue, with no last.ckpt callback to move on.
    stopped = train(load_settings(config(tmp_path, pairs, max_epochs=2)), callbacks=[RequeuedAt(3)])
    out = tmp_path / "run"
    assert stopped.steps == 3 and checkpoint_step(out / CHECKPOINTS / LAST) == 2
    assert resume_checkpoint(load_settings(config(tmp_path, pairs))) == out / "hpc_ckpt_1.ckpt"
    again = train(load_settings(config(tmp_path, pairs, max_epochs=2)))
    logged = [list(csv.DictReader(path.open())) for path in sorted((out / "logs" / "csv").rglob("metrics.csv"))]
    assert (again.steps, [len([row for row in rows if row["train/loss"]]) for rows in logged]) == (4, [2, 1, 1])


@pytest.mark.slow
def test_a_run_from_init_weights_trains_them_and_leaves_frozen_what_a_fresh_model_freezes(
    tmp_path: Path, pairs: Path
) -> None:
    first = load_settings(config(tmp_path / "first", pairs, max_epochs=1))
    train(first, enable_progress_bar=False)
    settings = load_settings(
        config(tmp_path / "next", pairs, max_epochs=1, model={"init": str(first.out_path / "model.safetensors")})
    )
    model = initial_model(settings)
    frozen = {name for name, param in Sat2Sound(model.cfg).named_parameters() if not param.requires_grad}
    assert frozen and {name for name, param in model.named_parameters() if not param.requires_grad} == frozen
    assert model.training

    assert train(settings, enable_progress_bar=False).steps == 2
    before, after = final_weights(first.out_path), final_weights(settings.out_path)
    moved = {key for key in before if not torch.equal(before[key], after[key])}
    assert len(moved) > len(before) // 2 and not moved & frozen


@pytest.mark.slow
@pytest.mark.parametrize(
    ("targets", "codebook", "taught_prefixes"),
    [
        ("shares", False, IMAGE_SIDE[:1]),
        ("shares", True, IMAGE_SIDE),
        ("landcover", True, IMAGE_SIDE),
        ("both", True, IMAGE_SIDE),
    ],
)
def test_image_pretraining_teaches_the_image_side_which_then_stays_frozen(
    tmp_path: Path,
    pairs: Path,
    monkeypatch: pytest.MonkeyPatch,
    targets: str,
    codebook: bool,
    taught_prefixes: tuple[str, ...],
) -> None:
    pretrain = training.pretrain_image_tower
    states: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    def watched(model: Sat2Sound, settings: object, launch: object, **overrides: object) -> None:
        before = {key: value.clone() for key, value in model.state_dict().items()}
        pretrain(model, settings, launch, **overrides)  # type: ignore[arg-type]
        states.append((before, {key: value.clone() for key, value in model.state_dict().items()}))

    monkeypatch.setattr(training, "pretrain_image_tower", watched)
    tower = {**tower_targets(tmp_path, pairs, targets), "classes": list(COLOURS), "epochs": 2, "codebook": codebook}
    settings = load_settings(config(tmp_path, pairs, max_epochs=1, image_pretraining=tower))
    train(settings, enable_progress_bar=False)
    [(fresh, taught)] = states
    changed = {key for key in fresh if not torch.equal(fresh[key], taught[key])}
    assert {prefix for prefix in taught_prefixes for key in changed if key.startswith(prefix)} == set(taught_prefixes)
    assert all(key.startswith(taught_prefixes) for key in changed)
    metrics = settings.out_path / "logs" / "image_pretraining" / "version_0" / "metrics.csv"
    logged = list(csv.DictReader(metrics.open()))
    assert {row["epoch"] for row in logged if row.get("image_pretraining/loss")} == {"0", "1"}

    exported = final_weights(settings.out_path)
    moved = {key for key in taught if not torch.equal(taught[key], exported[key])}
    assert moved and not any(key.startswith(taught_prefixes) for key in moved)
    # A resumed run does not teach the tower again: its checkpoint holds it.
    train(load_settings(config(tmp_path, pairs, max_epochs=2, image_pretraining=tower)), enable_progress_bar=False)
    assert len(states) == 1
    resumed = final_weights(settings.out_path)
    assert all(torch.equal(resumed[key], taught[key]) for key in taught if key.startswith(taught_prefixes))


@pytest.mark.parametrize(
    ("targets", "skip", "classes", "extra", "message"),
    [
        ("shares", "water0", list(COLOURS), {}, "has no row for pair 'water0'"),
        ("shares", None, ["water", "tree"], {}, "has no column 'tree'"),
        ("shares", None, list(COLOURS), {"codebook": True, "metadata": "latlong"}, "use it with metadata_type none"),
        ("landcover", "water0", list(COLOURS), {}, "water0.tif does not exist; give every train pair a class raster"),
        ("landcover", None, ["water", "city", "forest"], {}, "3 bands (water, forest, city); image_pretraining"),
        ("landcover", None, ["water", "forest"], {}, "classes must name them in order"),
        ("both", "water0", list(COLOURS), {}, "has no row for pair 'water0'"),
    ],
)
def test_image_pretraining_refuses_what_it_cannot_teach(
    tmp_path: Path,
    pairs: Path,
    capsys: pytest.CaptureFixture[str],
    targets: str,
    skip: str | None,
    classes: list[str],
    extra: dict[str, object],
    message: str,
) -> None:
    tower = {
        **tower_targets(tmp_path, pairs, targets, skip),
        "classes": classes,
        "codebook": extra.get("codebook", False),
    }
    model = {"metadata_type": extra.get("metadata", "none")}
    assert main(["train", "--config", str(config(tmp_path, pairs, image_pretraining=tower, model=model))]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "run" / CHECKPOINTS).exists()


def test_a_class_raster_that_does_not_decode_or_a_missing_folder_is_refused(tmp_path: Path) -> None:
    broken = tmp_path / "k.tif"
    broken.write_bytes(b"II*\x00 not a tiff")
    with pytest.raises(DataError, match=r"k\.tif is not a readable raster") as info:
        read_patch_means(broken, ("water",), 4)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="is not a folder; give the folder of class rasters"):
        PatchShares.read(tmp_path / "absent", ["k"], ("water",), 4)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_with_both_targets_each_token_learns_its_patch_and_its_view_through_a_head_each(
    tmp_path: Path, pairs: Path
) -> None:
    tower = {**tower_targets(tmp_path, pairs, "both"), "classes": list(COLOURS), "codebook": True}
    settings = load_settings(config(tmp_path, pairs, image_pretraining=tower))
    module = ImageTowerPretraining(initial_model(settings), settings)
    patch, view = module.targets
    assert isinstance(patch, PatchShares) and isinstance(view, ViewShares) and len(module.heads) == 2
    batch = next(iter(module.train_dataloader()))
    with torch.no_grad():
        loss = module.training_step(batch, 0)
        tokens = module.tower(batch.images, module.gsd(batch.zoom_level))
        embedding_logits = module.embedding_head(training.l2_normalize(module.encode_image(tokens).embedding))
        shares, valid = patch.patches(batch, torch.device("cpu"))
        view_shares = torch.stack([view.shares[key] for key in batch.keys])
        parts = (
            soft_cross_entropy(module.heads[0](tokens)[valid], shares[valid]),
            soft_cross_entropy(module.heads[1](tokens), view_shares[:, None, :].expand_as(shares)),
            soft_cross_entropy(embedding_logits, mean_of_patches(shares, valid)),
        )
    assert all(part > 0 for part in parts)
    torch.testing.assert_close(loss, sum(parts))


def test_class_prototypes_are_orthonormal_and_the_same_in_every_run() -> None:
    prototypes = class_prototypes(4, 64)
    assert prototypes.shape == (4, 64)
    torch.testing.assert_close(prototypes @ prototypes.T, torch.eye(4))
    assert torch.equal(prototypes, class_prototypes(4, 64))


def test_the_pooled_embedding_is_drawn_to_its_views_mix_of_prototypes() -> None:
    prototypes = class_prototypes(2, 4)
    shares = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    goals = l2_normalize(shares @ prototypes)
    assert float(prototypes_loss(goals, shares, prototypes)) == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(goals[1], (prototypes[0] + prototypes[1]) / 2**0.5)
    # A pure view's embedding on the other class's prototype is orthogonal to its goal; the mixed one's, at 45°.
    across = torch.stack([prototypes[1], prototypes[1]])
    assert float(prototypes_loss(across, shares, prototypes)) == pytest.approx((1 + (1 - 2**-0.5)) / 2)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize("targets", ["shares", "landcover"])
def test_prototypes_add_their_weighted_term_to_the_image_pretraining(tmp_path: Path, pairs: Path, targets: str) -> None:
    tower = {
        **tower_targets(tmp_path, pairs, targets),
        "classes": list(COLOURS),
        "codebook": True,
        "prototypes": 2.5,
    }
    settings = load_settings(config(tmp_path, pairs, image_pretraining=tower))
    module = ImageTowerPretraining(initial_model(settings), settings)
    [target] = module.targets
    assert module.prototypes is not None and torch.equal(module.prototypes, class_prototypes(3, 64))
    batch = next(iter(module.train_dataloader()))
    with torch.no_grad():
        loss = module.training_step(batch, 0)
        tokens = module.tower(batch.images, module.gsd(batch.zoom_level))
        embedding = l2_normalize(module.encode_image(tokens).embedding)
        patches = target.patches(batch, torch.device("cpu"))
        shares = mean_of_patches(*patches)
        base = token_shares_loss(module.heads[0](tokens), *patches)
        base = base + soft_cross_entropy(module.embedding_head(embedding), shares)
        term = prototypes_loss(embedding, shares, module.prototypes)
    torch.testing.assert_close(shares.sum(dim=1), torch.ones(len(batch)))
    assert 0 < float(term) <= 2
    torch.testing.assert_close(loss, base + 2.5 * term)


def test_more_classes_than_the_embedding_has_dimensions_are_refused_with_prototypes(
    tmp_path: Path, pairs: Path
) -> None:
    classes = [f"class{index}" for index in range(65)]
    tower = {"shares": "labels.csv", "classes": classes, "codebook": True, "prototypes": 1.0}
    settings = load_settings(config(tmp_path, pairs, image_pretraining=tower))
    with pytest.raises(ConfigError, match="name at most 64 classes, or leave prototypes 0"):
        ImageTowerPretraining(initial_model(settings), settings, pairs=SimpleNamespace())  # type: ignore[arg-type]


@pytest.mark.parametrize("turn", range(8))
def test_each_token_learns_its_own_patch_turned_as_its_image_was(tmp_path: Path, turn: int) -> None:
    """A 4 x 4 token grid over an 8 x 8 raster: class 0 fills the patch of row 0, column 1, class 1 the rest but
    the bottom-right patch, which holds no imagery (every band 0)."""
    bands = np.zeros((2, 8, 8), np.uint8)
    bands[0, 0:2, 2:4] = 255
    bands[1] = 255 - bands[0]
    bands[1, 6:8, 6:8] = 0
    write_raster(tmp_path / "k.tif", bands, ("a", "b"))
    write_raster(tmp_path / "turned.tif", dihedral_turn(torch.from_numpy(bands), turn).numpy(), ("a", "b"))
    targets = PatchShares({"k": read_patch_means(tmp_path / "k.tif", ("a", "b"), 4)})
    batch = SimpleNamespace(keys=("k",), turns=torch.tensor([turn]))
    shares, valid = targets.patches(batch, torch.device("cpu"))  # type: ignore[arg-type]
    # The tower's tokens run row by row over the image as it was given: turned.
    expected = read_patch_means(tmp_path / "turned.tif", ("a", "b"), 4).flatten(1).T
    assert torch.equal(valid[0], expected.sum(dim=1) > 0) and int(valid.sum()) == 15
    assert torch.allclose(shares[0][valid[0]], expected[valid[0]] / 255)
    assert int(shares[0, :, 0].argmax()) == int(expected[:, 0].argmax())
    logits = torch.zeros(1, 16, 2)
    logits[0, :, 0] = torch.where(shares[0, :, 0] > 0.5, 20.0, -20.0)
    assert float(token_shares_loss(logits, shares, valid)) < 1e-6
    # The pooled embedding learns the view's shares: 1 of its 15 patches with imagery is class 0. Soft cross-entropy
    # is least, the target's entropy, at logits that give those shares.
    view = mean_of_patches(shares, valid)
    torch.testing.assert_close(view, torch.tensor([[1 / 15, 14 / 15]]))
    best = soft_cross_entropy(view.log(), view)
    torch.testing.assert_close(best, -(view * view.log()).sum())
    for pooled in ([[20.0, 20.0]], [[20.0, -20.0]]):  # "some of each", as the largest patch shares say; all class 0
        assert float(soft_cross_entropy(torch.tensor(pooled), view)) > float(best) + 0.4


@pytest.mark.slow
def test_evaluate_a_checkpoint_on_a_split(tmp_path: Path, pairs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = load_settings(config(tmp_path, pairs, max_epochs=1))
    train(settings, enable_progress_bar=False)
    out = tmp_path / "metrics.json"
    code = main(
        [
            "evaluate",
            "--checkpoint",
            str(settings.out_path / "model.safetensors"),
            "--data",
            str(pairs),
            "--split",
            "test",
            "--text-cache",
            str(tmp_path / "cache"),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    metrics = json.loads(out.read_text())
    assert set(metrics) == {"none", "audio", "query"}
    assert "I2S" in capsys.readouterr().out


def test_evaluate_needs_one_source_of_embeddings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate"]) == 2
    assert "give either --embeddings" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", "x.safetensors"]) == 2
    assert "--checkpoint needs --data" in capsys.readouterr().err


def test_upstream_layout_only_for_what_its_hyper_parameters_describe() -> None:
    settings = parse_settings({"out_dir": "r", "data": {"root": "p"}, "model": {"architecture": "full"}})
    full = settings.model_config()
    assert Sat2SoundConfig.from_hparams(upstream_hparams(settings, full)) == full
    small = parse_settings({"out_dir": "r", "data": {"root": "p"}}).model_config()
    assert Sat2SoundConfig.from_hparams(upstream_hparams(settings, small)) != small


def test_train_refuses_a_bad_config_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"out_dir": "r", "data": {"root": str(tmp_path / "missing")}}))
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


def train_in_a_child(path: Path) -> subprocess.CompletedProcess[str]:
    """`python -m model train` in its own process (DDP launches its ranks from the command line), checked."""
    done = subprocess.run(
        [sys.executable, "-m", "model", "train", "--config", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=path.parent,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.mark.slow
def test_two_process_ddp_teaches_the_image_side_once_for_both_ranks(tmp_path: Path, pairs: Path) -> None:
    shares = str(write_shares(tmp_path / "shares.csv", pairs))
    tower = {"shares": shares, "classes": list(COLOURS), "epochs": 2, "codebook": True}
    path = config(tmp_path, pairs, max_epochs=1, devices=2, image_pretraining=tower)
    done = train_in_a_child(path)
    assert done.stdout.count("trained 1 steps") == 1
    settings = load_settings(path)
    pl.seed_everything(settings.seed, verbose=False)
    fresh = initial_model(settings).state_dict()
    exported = final_weights(settings.out_path)
    moved = [key for key in fresh if not torch.equal(fresh[key], exported[key])]
    taught = [prefix for prefix in IMAGE_SIDE if any(key.startswith(prefix) for key in moved)]
    assert taught == list(IMAGE_SIDE) and list((settings.out_path / "logs" / "image_pretraining").rglob("metrics.csv"))


@pytest.mark.slow
def test_two_process_ddp_validates_on_the_whole_split_and_exports_once(tmp_path: Path, pairs: Path) -> None:
    """DDP on CPU (gloo), as on several GPUs: each rank validates half the split, the recall is the whole split's."""
    path = config(tmp_path, pairs, max_epochs=1, devices=2, text_cache=str(tmp_path / "text"))
    done = train_in_a_child(path)
    # 9 train pairs, 5 a rank, batches of 4 with the last partial one dropped: one step; one rank reports.
    assert done.stdout.count("trained 1 steps") == 1 and done.stdout.count("trained ") == 1
    out = tmp_path / "run"
    logged = list(csv.DictReader((next((out / "logs" / "csv").rglob("metrics.csv"))).open()))
    rank = [float(row["val/none/I2S/median_rank"]) for row in logged if row.get("val/none/I2S/median_rank")]
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(out / "model.safetensors"),
                "--data",
                str(pairs),
                "--split",
                "val",
                "--text-cache",
                str(tmp_path / "text"),
                "--out",
                str(tmp_path / "val.json"),
            ]
        )
        == 0
    )
    assert rank == [json.loads((tmp_path / "val.json").read_text())["none"]["I2S"]["median_rank"]]


def sbatch(folder: Path, *options: str, command: str) -> tuple[int, str]:
    """`command` run as a batch job from `folder` and waited for: the job's exit status and its output. The ranks
    meet at 127.0.0.1: the test node's name does not resolve, as a real cluster's node names do."""
    done = subprocess.run(
        ["sbatch", "--wait", "--chdir", str(folder), "--output", "job.out", *options, "--wrap", command],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1"},
        timeout=420,
    )
    return done.returncode, (folder / "job.out").read_text()


@needs_slurm
@pytest.mark.slow
def test_on_slurm_srun_starts_a_rank_per_task_and_a_step_of_fewer_tasks_than_devices_is_refused(
    tmp_path: Path, pairs: Path
) -> None:
    """As users run it on a cluster (a real one-node SLURM, `support.slurm_cluster`): with devices left out, srun
    under --ntasks-per-node=2 starts the two ranks, a device each; `devices: 2` in a batch step of one task would
    train in a world of one and fail at its first validation, so it is refused before any work."""
    # Bounded, so that a run that hangs ends with its job rather than outliving the cluster.
    train = f"timeout 300 {shlex.quote(sys.executable)} -m model train --config train.yaml"
    with slurm_cluster(tmp_path / "slurm"):
        auto = config(tmp_path / "auto", pairs, max_epochs=1, text_cache=str(tmp_path / "text")).parent
        status, output = sbatch(auto, "--nodes=1", "--ntasks-per-node=2", command=f"srun {train}")
        assert status == 0, output[-2000:]
        assert "MEMBER: 2/2" in output and output.count("trained 1 steps") == 1
        assert (auto / "run" / "model.safetensors").is_file()
        two = config(tmp_path / "two", pairs, max_epochs=1, devices=2).parent
        status, output = sbatch(two, "--ntasks=1", command=train)
        assert status == 2
        assert output.strip().splitlines() == [
            "error: devices: 2, but SLURM started 1 task(s) on each node, one per device; ask for"
            " --ntasks-per-node=2 and start the run with srun, or set devices: 1"
        ]
        assert not (two / "run").exists()


@pytest.mark.slow
def test_mixed_precision_trains_and_exports_float32_weights(tmp_path: Path, pairs: Path) -> None:
    """bf16 autocast, as on GPUs (here on the CPU): the loop runs and the exported weights stay float32."""
    settings = load_settings(config(tmp_path, pairs, max_epochs=1, precision="bf16-mixed"))
    result = train(settings, enable_progress_bar=False)
    assert result.steps == 2
    weights = final_weights(settings.out_path)
    floats = [tensor for tensor in weights.values() if tensor.is_floating_point()]
    assert floats and all(tensor.dtype == torch.float32 and torch.isfinite(tensor).all() for tensor in floats)
    load_model(settings.out_path / "model.safetensors")

"""`python -m model` refuses bad input in one line on stderr (exit 2) before any long work, writing nothing:
outputs that cannot be written, a split too small to evaluate, and training settings that would fail only once
pretraining or the trainer had run."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import yaml
from support.model_cli import refused
from support.pair_data import encode_image, synthetic_image, wav_bytes, write_folder

from common import atomic
from model import Sat2Sound, Sat2SoundConfig, save_safetensors
from model.__main__ import main


def pairs_folder(root: Path, splits: Sequence[str], header_only: bool = False) -> Path:
    """A pair folder with one pair of real (tiny) files per entry of `splits`, or only the CSV header."""
    (root / "files").mkdir(parents=True)
    lines = []
    for index, split in enumerate(splits):
        key = f"p{index}"
        (root / "files" / f"{key}.png").write_bytes(encode_image(synthetic_image(64, index)))
        (root / "files" / f"{key}.wav").write_bytes(wav_bytes(0.5, seed=index))
        lines.append(
            {
                "key": key,
                "image": f"files/{key}.png",
                "audio": f"files/{key}.wav",
                "audio_caption": f"sound {index}",
                "image_caption": f"image {index}",
                "lat": "10",
                "lon": "20",
                "time": "2020-05-18",
                "split": split,
            }
        )
    return write_folder(root, [] if header_only else lines)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 train, 2 val and 2 test pairs, and class shares of each for image pretraining."""
    root = pairs_folder(tmp_path_factory.mktemp("pairs"), ["train"] * 4 + ["val"] * 2 + ["test"] * 2)
    (root / "shares.csv").write_text("key,a,b\n" + "".join(f"p{index},1,0\n" for index in range(8)))
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    weights, _ = save_safetensors(
        Sat2Sound(Sat2SoundConfig.small("none")), tmp_path_factory.mktemp("ckpt") / "s.safetensors"
    )
    return weights


@pytest.fixture
def bogus_checkpoint(tmp_path: Path) -> Path:
    """A checkpoint that fails to load: an output refused first is refused without naming it."""
    path = tmp_path / "bogus.ckpt"
    path.write_bytes(b"\x00" * 100)
    return path


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "a_file.txt"
    path.write_text("not a folder\n")
    return path


@pytest.fixture
def read_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder that takes no new entries (os.access says so; the tests may run as root)."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    access = os.access
    monkeypatch.setattr(atomic.os, "access", lambda path, mode: Path(path) != folder and access(path, mode))
    return folder


def test_evaluate_refuses_an_out_it_cannot_write(
    tmp_path: Path, a_file: Path, read_only: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    embeddings = tmp_path / "emb.npz"
    rows = np.eye(3, dtype=np.float32)
    np.savez(embeddings, image=rows, audio=rows, audio_caption=rows)
    for out, says in (
        (tmp_path, "is a folder"),
        (a_file / "m.json", "no writable folder"),
        (read_only / "m.json", "no writable folder"),
    ):
        refused(capsys, ["evaluate", "--embeddings", str(embeddings), "--out", str(out)], str(out), says, "--out")
    assert a_file.read_text() == "not a folder\n" and not list(read_only.iterdir())


def test_evaluate_with_a_checkpoint_refuses_an_out_or_text_cache_before_loading_it(
    tmp_path: Path, pairs: Path, a_file: Path, bogus_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    split = ["evaluate", "--checkpoint", str(bogus_checkpoint), "--data", str(pairs)]
    refused(capsys, [*split, "--text-cache", str(tmp_path / "tc"), "--out", str(tmp_path)], "is a folder", "--out")
    refused(capsys, [*split, "--text-cache", str(a_file)], str(a_file), "--text-cache")
    refused(capsys, [*split, "--text-cache", str(a_file / "sub")], str(a_file), "--text-cache")
    assert not (tmp_path / "tc").exists()


def test_embed_refuses_an_out_it_cannot_write_before_loading_anything(
    tmp_path: Path, a_file: Path, bogus_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for out, says in ((tmp_path, "is a folder"), (a_file / "x.npz", "no writable folder")):
        argv = ["embed", "--checkpoint", str(bogus_checkpoint), "--inputs", str(tmp_path / "none.npz")]
        refused(capsys, [*argv, "--out", str(out)], str(out), says, "--out")


@pytest.mark.parametrize(
    ("target", "says"),
    [
        (lambda tmp, file: tmp / "model.bin", "must end in .safetensors"),
        (lambda tmp, file: tmp / "sub.safetensors", "is a folder"),
        (lambda tmp, file: tmp / "j.safetensors", "j.json is a folder"),
        (lambda tmp, file: file / "x.safetensors", "no writable folder"),
    ],
    ids=["suffix", "weights-folder", "json-folder", "parent-file"],
)
def test_convert_refuses_its_outputs_before_loading_the_checkpoint(
    tmp_path: Path,
    a_file: Path,
    bogus_checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
    target: Callable[[Path, Path], Path],
    says: str,
) -> None:
    (tmp_path / "sub.safetensors").mkdir()
    (tmp_path / "j.json").mkdir()
    out = target(tmp_path, a_file)
    refused(capsys, ["convert", str(bogus_checkpoint), str(out)], says)
    assert not out.with_suffix(".json").is_file() and not out.is_file()


@pytest.mark.parametrize(
    ("splits", "header_only", "count"),
    [([], True, 0), (["train", "train"], False, 0), (["test", "train"], False, 1)],
    ids=["header-only", "no-test-rows", "one-test-pair"],
)
def test_evaluate_refuses_a_split_too_small_for_a_gallery_before_embedding(
    tmp_path: Path,
    checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
    splits: list[str],
    header_only: bool,
    count: int,
) -> None:
    data = pairs_folder(tmp_path / "data", splits, header_only)
    cache, out = tmp_path / "tc", tmp_path / "m.json"
    argv = ["evaluate", "--checkpoint", str(checkpoint), "--data", str(data), "--split", "test"]
    refused(capsys, [*argv, "--text-cache", str(cache), "--out", str(out)], f"test split of {data} holds {count}")
    assert not cache.exists() and not out.exists()  # no caption was encoded


def train_config(tmp_path: Path, data: Path, data_values: Mapping[str, object] | None = None, **values: object) -> Path:
    settings: dict[str, object] = {
        "out_dir": str(tmp_path / "run"),
        "data": {"format": "folder", "root": str(data), "zooms": [1], "num_workers": 0, **(data_values or {})},
        "batch_size": 2,
        "max_epochs": 1,
        "max_steps": 1,
        "precision": "32",
        **values,
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def test_train_refuses_folders_it_cannot_write_in(
    tmp_path: Path, pairs: Path, a_file: Path, read_only: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases: list[tuple[Mapping[str, object], list[str], str]] = [
        ({"out_dir": str(a_file)}, [], "out_dir"),
        ({}, ["--out-dir", str(a_file / "run")], "out_dir"),
        ({"out_dir": str(read_only / "run")}, [], "out_dir"),
        ({"text_cache": str(a_file)}, [], "text_cache"),
        ({"mel_cache": str(a_file / "mels")}, [], "mel_cache"),
    ]
    for values, options, setting in cases:
        path = train_config(tmp_path, pairs, None, **values)
        refused(capsys, ["train", "--config", str(path), *options], setting, "no writable folder")
    assert a_file.read_text() == "not a folder\n" and not list(read_only.iterdir())
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("data_values", "values", "says"),
    [
        ({"val_split": "bogus"}, {}, "unknown split 'bogus'"),
        ({}, {"model": {"text_backbone": "/nonexistent/t5"}}, "model.text_backbone"),
        ({}, {"batch_size": 8}, "holds 4 pairs, too few for one batch of batch_size 8"),
        ({}, {"max_steps": 0}, "max_epochs and max_steps must each be at least 1, or -1"),
        ({}, {"max_epochs": 0, "max_steps": 5}, "(0 trains no step)"),
    ],
    ids=["val-split", "text-backbone", "batch-over-pairs", "max-steps-0", "max-epochs-0"],
)
def test_train_refuses_what_would_fail_late_before_pretraining(
    tmp_path: Path,
    pairs: Path,
    capsys: pytest.CaptureFixture[str],
    data_values: dict[str, object],
    values: dict[str, object],
    says: str,
) -> None:
    tower = {"shares": "shares.csv", "classes": ["a", "b"], "epochs": 1}
    path = train_config(tmp_path, pairs, data_values, image_pretraining=tower, **values)
    refused(capsys, ["train", "--config", str(path)], says)
    assert not (tmp_path / "run").exists()


def test_train_without_a_train_pair_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = pairs_folder(tmp_path / "data", ["val", "val", "test"])
    refused(capsys, ["train", "--config", str(train_config(tmp_path, data))], "train split holds 0 pairs", "batch_size")
    assert not (tmp_path / "run").exists()


def test_train_refuses_a_val_split_too_small_for_a_gallery(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = pairs_folder(tmp_path / "data", ["train"] * 4 + ["val"])
    says = "the val split holds 1 pair(s); validation retrieval needs a gallery of at least 2: add val pairs"
    refused(capsys, ["train", "--config", str(train_config(tmp_path, data))], says)
    assert not (tmp_path / "run").exists()


def test_an_unused_srun_on_path_adds_no_warning_to_a_refusal(
    tmp_path: Path, pairs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for name in [name for name in os.environ if name.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        refused(capsys, ["train", "--config", str(train_config(tmp_path, pairs, batch_size=8))], "batch_size")
    assert not [str(warning.message) for warning in caught if "srun" in str(warning.message)]


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["evaluate", "--bogus"], "unrecognized arguments: --bogus; see python -m model --help"),
        ([], "the following arguments are required: command; see python -m model --help"),
        (
            ["train", "--config", "train.yaml", "--out-dir", ""],
            "argument --out-dir: is empty; give a path (write . for the current folder); see python -m model train"
            " --help",
        ),
        (
            ["evaluate", "--embeddings", ""],
            "argument --embeddings: is empty; give a path (write . for the current folder); see python -m model"
            " evaluate --help",
        ),
    ],
)
def test_a_bad_command_line_is_one_line(argv: list[str], words: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2 and capsys.readouterr().err == f"error: {words}\n"

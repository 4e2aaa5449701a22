"""Checkpoint loading: safe unpickling, clear one-line errors, safetensors conversion."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from model.__main__ import main
from model.checkpoint import (
    build_model,
    check_finite,
    convert_to_safetensors,
    load_model,
    read_checkpoint,
    read_config,
    save_safetensors,
    sha256_file,
    verify_sha256,
)
from model.config import Sat2SoundConfig
from model.errors import CheckpointError, CheckpointMismatchError
from model.sat2sound import Sat2Sound


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message, f"error message spans lines: {message!r}"
    return message


def test_truncated_checkpoint_is_reported(upstream_ckpt_path: Callable[[str], Path], tmp_path: Path) -> None:
    source = upstream_ckpt_path("bingmap_nometa")
    truncated = tmp_path / "truncated.ckpt"
    with open(source, "rb") as fh:
        truncated.write_bytes(fh.read(5_000_000))
    with pytest.raises(CheckpointError) as exc:
        read_checkpoint(truncated)
    assert "truncated" in one_line(exc)


def overwrite_middle(path: Path, garbage: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(path.stat().st_size // 2)
        fh.write(garbage)


def test_bytes_overwritten_in_the_middle_are_reported_with_the_tensor(
    upstream_ckpt_path: Callable[[str], Path], tmp_path: Path
) -> None:
    corrupt = tmp_path / "corrupt.ckpt"
    shutil.copyfile(upstream_ckpt_path("bingmap_nometa"), corrupt)
    overwrite_middle(corrupt, b"\xff" * 4096)
    try:
        with pytest.raises(CheckpointError) as exc:
            load_model(corrupt)
    finally:
        corrupt.unlink()
    message = one_line(exc)
    assert message.startswith(f"{corrupt} is corrupt: tensor ") and "holds 1,024 NaN or infinite values" in message


def test_finite_weights_whose_sum_overflows_pass_and_one_nan_among_them_is_counted() -> None:
    large = torch.full((4,), 60_000.0, dtype=torch.float16)  # each finite, their float16 sum is not
    check_finite({"large": large, "steps": torch.arange(3)})
    large[2] = float("nan")
    with pytest.raises(CheckpointError, match=r"^weights is corrupt: tensor large \(4,\) holds 1 NaN or infinite"):
        check_finite({"large": large}, "weights")


def test_building_a_model_from_weights_draws_no_randomness_and_skips_torch_dynamo() -> None:
    cfg = Sat2SoundConfig.small("none")
    weights = Sat2Sound(cfg).state_dict()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    model = build_model(cfg, weights)
    assert torch.equal(torch.rand(3), expected), "building a model moved the caller's random numbers"
    assert all(torch.equal(model.state_dict()[key], value) for key, value in weights.items())
    # Every job that loads a model pays for what the load imports: torch._dynamo alone is ~2.4 s.
    check = (
        "import sys; from model import Sat2Sound, Sat2SoundConfig; from model.checkpoint import build_model;"
        " cfg = Sat2SoundConfig.small('none'); build_model(cfg, Sat2Sound(cfg).state_dict());"
        " print('torch._dynamo' in sys.modules)"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", check], cwd=root, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False", "loading weights imports torch._dynamo"


def test_a_converted_checkpoint_with_garbage_inside_is_reported(tmp_path: Path) -> None:
    weights, _ = save_safetensors(Sat2Sound(Sat2SoundConfig.small("none")), tmp_path / "small.safetensors")
    overwrite_middle(weights, b"\xff" * 4096)
    with pytest.raises(CheckpointError, match=r"small\.safetensors is corrupt: tensor \S+ \(\d+(, \d+)*\) holds"):
        load_model(weights)


def test_a_checkpoint_whose_sha256_differs_from_the_expected_is_refused(tmp_path: Path) -> None:
    weights, _ = save_safetensors(Sat2Sound(Sat2SoundConfig.small("none")), tmp_path / "small.safetensors")
    digest = sha256_file(weights)
    assert verify_sha256(weights, digest.upper()) == digest
    with pytest.raises(CheckpointError) as exc:
        verify_sha256(weights, "0" * 64)
    assert f"has sha256 {digest}, not the expected {'0' * 64}" in one_line(exc)


def test_text_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.ckpt"
    path.write_text("hello")
    with pytest.raises(CheckpointError) as exc:
        read_checkpoint(path)
    assert "not a torch checkpoint" in one_line(exc)


def test_foreign_torch_file_is_not_a_sat2sound_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError) as exc:
        read_checkpoint(path)
    assert "not a Sat2Sound checkpoint" in one_line(exc)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as exc:
        read_checkpoint(tmp_path / "absent.ckpt")
    assert "absent.ckpt" in one_line(exc)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": _Payload(marker)}}, path)
    with pytest.raises(CheckpointError) as exc:
        read_checkpoint(path)
    assert "allow-list" in one_line(exc)
    assert not marker.exists()


def test_lightning_extras_load_with_the_allow_list(
    upstream_state_dict: Callable[[str], dict[str, torch.Tensor]],
    manifest: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Real Lightning files pickle AttributeDict, numpy scalars and paths beside the weights."""
    module_name = "pytorch_lightning.utilities.parsing"
    for name in ("pytorch_lightning", "pytorch_lightning.utilities", module_name):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    attribute_dict = type("AttributeDict", (dict,), {"__module__": module_name})
    sys.modules[module_name].AttributeDict = attribute_dict  # type: ignore[attr-defined]
    payload = {
        "state_dict": upstream_state_dict("bingmap_nometa"),
        "hyper_parameters": attribute_dict(manifest["configs"]["bingmap_nometa"]["hyper_parameters"]),
        "callbacks": {"ModelCheckpoint": {"best_model_score": np.float64(0.5), "dirpath": Path("/ckpts")}},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 5e-5}]}],
    }
    path = tmp_path / "lightning.ckpt"
    torch.save(payload, path)
    monkeypatch.undo()
    cfg, state_dict, hparams = read_checkpoint(path)
    assert cfg.metadata == () and hparams["codebook_size"] == 16000
    assert len(state_dict) == 381


def test_wrong_shapes_and_keys_are_listed(upstream_state_dict: Callable[[str], dict[str, torch.Tensor]]) -> None:
    state_dict = dict(upstream_state_dict("bingmap_nometa"))
    state_dict["fdt.space_dict"] = torch.zeros(100, 1024)
    del state_dict["fdt.img_query_model.q_map.1.bias"]
    state_dict["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as exc:
        build_model(Sat2SoundConfig(metadata_type="none"), state_dict)
    message = one_line(exc)
    assert "fdt.space_dict (100, 1024) vs model (16000, 1024)" in message
    assert "1 missing: fdt.img_query_model.q_map.1.bias" in message
    assert "1 unexpected: extra.weight" in message


def test_withmeta_weights_do_not_fit_a_nometa_config(upstream_state_dict) -> None:
    with pytest.raises(CheckpointMismatchError) as exc:
        build_model(Sat2SoundConfig(metadata_type="none"), upstream_state_dict("bingmap_withmeta"))
    assert "50 unexpected: sat_encoder.meta_fuser" in one_line(exc)


@pytest.mark.slow
def test_safetensors_conversion_round_trip(upstream_ckpt_path, tmp_path: Path) -> None:
    source = upstream_ckpt_path("bingmap_withmeta")
    out = tmp_path / "converted" / "withmeta.safetensors"
    assert main(["convert", str(source), str(out)]) == 0
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "no temporary files left behind"
    converted, _ = load_model(out)
    original, _ = load_model(source)
    for (key, a), (key_b, b) in zip(converted.state_dict().items(), original.state_dict().items(), strict=True):
        assert key == key_b and torch.equal(a, b), key


def test_convert_refuses_a_non_safetensors_target(upstream_ckpt_path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError):
        convert_to_safetensors(upstream_ckpt_path("bingmap_nometa"), tmp_path / "out.bin")


def test_cli_reports_bad_checkpoint_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x00" * 100)
    inputs = tmp_path / "in.npz"
    np.savez(inputs, x=np.zeros(1))
    code = main(["embed", "--checkpoint", str(bad), "--inputs", str(inputs), "--out", str(tmp_path / "o.npz")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert not (tmp_path / "o.npz").exists()


@pytest.mark.parametrize("inputs_text", [None, "not an npz"], ids=["missing", "text"])
def test_cli_embed_refuses_bad_inputs_before_the_checkpoint(
    inputs_text: str | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x00" * 100)
    inputs = tmp_path / "in.npz"
    if inputs_text is not None:
        inputs.write_text(inputs_text)
    code = main(["embed", "--checkpoint", str(bad), "--inputs", str(inputs), "--out", str(tmp_path / "o.npz")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {inputs} "), err
    assert "bad.ckpt" not in err and not (tmp_path / "o.npz").exists()


def test_small_model_state_dict_round_trips_through_build_model() -> None:
    cfg = Sat2SoundConfig.small()
    model = Sat2Sound(cfg)
    rebuilt = build_model(cfg, model.state_dict())
    assert not rebuilt.training
    assert all(not p.requires_grad for p in rebuilt.parameters())
    assert all(t.device.type == "cpu" for t in rebuilt.state_dict().values())


def test_read_config_of_a_safetensors_checkpoint_skips_the_weights(tmp_path: Path) -> None:
    cfg = Sat2SoundConfig.small("none")
    weights, _ = save_safetensors(Sat2Sound(cfg), tmp_path / "small.safetensors")
    weights.write_bytes(b"not read")
    assert read_config(weights) == cfg


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (None, "small.safetensors has no config beside it (small.json); convert the .ckpt again"),
        (b"{not json", "cannot read "),
        (b"\xff\xfe", "cannot read "),
        (b'{"format": "other/v1", "config": {}}', "small.json is not a Sat2Sound config (format 'other/v1')"),
        (b"[1, 2]", "small.json is not a Sat2Sound config (format None)"),
    ],
)
def test_a_safetensors_checkpoint_whose_config_is_missing_or_foreign_is_one_line(
    config: bytes | None, message: str, tmp_path: Path
) -> None:
    weights, config_path = save_safetensors(Sat2Sound(Sat2SoundConfig.small("none")), tmp_path / "small.safetensors")
    if config is None:
        config_path.unlink()
    else:
        config_path.write_bytes(config)
    for read in (read_config, read_checkpoint):
        with pytest.raises(CheckpointError) as exc:
            read(weights)
        assert message in one_line(exc)


def test_outputs_get_the_umask_mode_not_mkstemp_0600(tmp_path: Path) -> None:
    weights, config = save_safetensors(Sat2Sound(Sat2SoundConfig.small("none")), tmp_path / "m.safetensors")
    mask = os.umask(0)
    os.umask(mask)
    assert weights.stat().st_mode & 0o777 == 0o666 & ~mask
    assert config.stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_file_is_hashed_once_while_it_stays_as_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    contents = [b"first", b"second, longer", b"third, longer!"]
    expected = [hashlib.sha256(content).hexdigest() for content in contents]
    hashed: list[int] = []
    real = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda: hashed.append(1) or real())
    path = tmp_path / "weights.bin"
    path.write_bytes(contents[0])
    assert sha256_file(path) == sha256_file(path) == expected[0] and len(hashed) == 1
    path.write_bytes(contents[1])  # rewritten in place: another size and time
    assert sha256_file(path) == expected[1] and len(hashed) == 2
    replaced = tmp_path / "other.bin"
    replaced.write_bytes(contents[2])
    os.replace(replaced, path)  # renamed over it, as downloads and conversions write: another file
    assert sha256_file(path) == expected[2] and len(hashed) == 3

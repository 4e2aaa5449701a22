"""Parity with the upstream Sat2Sound code on the synthetic official-layout checkpoints.

Reference arrays: tests/data/parity_public.npz (computed by the unmodified upstream model).
Tolerances: the acceptance table of the parity reference (tests/data/README.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

from model.__main__ import main
from model.checkpoint import load_model
from model.metadata import Metadata
from model.sat2sound import Sat2Sound
from model.vit import resolution_pos_embed

EMBEDDINGS = ("ctotal", "fdt_sat_embeds", "audio_embeds", "audio_caption_embeds", "fdt_txt_embeds")
LOSSES = ("loss", "multimodal_loss", "fdt_loss")
LOGITS = ("logits_it", "logits_at", "logits_ia", "logits_i_at", "logits_fdt")
WEIGHTS = ("att_weight_img", "att_weight_audio", "att_weight_audio_caption", "att_weight_llava_caption")
CONFIGS = {"withmeta": "bingmap_withmeta", "nometa": "bingmap_nometa"}
PM_INPUTS = ("time", "month", "time_valid", "month_valid")


def assert_close(name: str, got: np.ndarray, ref: np.ndarray, atol: float, rtol: float = 0.0) -> None:
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != reference {ref.shape}"
    excess = np.abs(got.astype(np.float64) - ref) - (atol + rtol * np.abs(ref))
    assert excess.max() <= 0, f"{name}: max |diff| {np.abs(got - ref).max():.3g} over atol {atol} rtol {rtol}"


def check_outputs(out: Mapping[str, np.ndarray], parity: Mapping[str, np.ndarray], prefix: str) -> None:
    for name in EMBEDDINGS:
        assert_close(name, out[name], parity[f"{prefix}/{name}"], atol=1e-5, rtol=1e-4)
    for name in LOSSES:
        assert_close(name, out[name], parity[f"{prefix}/{name}"], atol=1e-5, rtol=1e-5)
    if prefix.endswith("_pm"):
        return
    for name in LOGITS:
        assert_close(name, out[name], parity[f"{prefix}/{name}"], atol=1e-5, rtol=1e-5)
    for name in WEIGHTS:
        assert_close(name, out[name], parity[f"{prefix}/{name}"], atol=1e-7)
    np.testing.assert_array_equal(out["token_att_codes"], parity[f"{prefix}/token_att_codes"])
    assert_close("token_att_img", out["token_att_img"], parity[f"{prefix}/token_att_img"], atol=2e-3, rtol=1e-5)
    assert_close("token_att_llava", out["token_att_llava"], parity[f"{prefix}/token_att_llava"], atol=2e-5)
    np.testing.assert_array_equal(out["llava_token_best_code"], parity[f"{prefix}/llava_token_best_code"])
    heatmap = parity[f"{prefix}/heatmap_llava_tokens"]
    assert_close("heatmap_llava_tokens", out["heatmap_llava_tokens"], heatmap, atol=2e-3, rtol=1e-5)


def write_inputs(path: Path, parity: Mapping[str, np.ndarray], partial_metadata: bool = False) -> Path:
    arrays = {name: value for name, value in parity.items() if name.startswith("in/")}
    if partial_metadata:
        arrays.update({f"in/{name}": parity[f"in_pm/{name}"] for name in PM_INPUTS})
    np.savez(path, **arrays)
    return path


def run_cli(tmp_path: Path, ckpt: Path, inputs: Path, *flags: str) -> dict[str, np.ndarray]:
    out = tmp_path / "out.npz"
    assert main(["embed", "--checkpoint", str(ckpt), "--inputs", str(inputs), "--out", str(out), *flags]) == 0
    with np.load(out) as data:
        return dict(data)


@pytest.fixture(scope="module")
def models(upstream_ckpt_path: Callable[[str], Path]) -> Callable[[str], Sat2Sound]:
    cache: dict[str, Sat2Sound] = {}

    def get(prefix: str) -> Sat2Sound:
        if prefix not in cache:
            cache[prefix] = load_model(upstream_ckpt_path(CONFIGS[prefix]))[0]
        return cache[prefix]

    return get


def test_resolution_pos_embed_matches_reference(parity: Mapping[str, np.ndarray]) -> None:
    table = resolution_pos_embed(768, 14, torch.from_numpy(parity["inter/input_res"]))
    selected = table[:, parity["inter/token_sel"]].numpy()
    assert_close("pos_embed_sel", selected, parity["inter/pos_embed_sel"], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("prefix", ["withmeta", "nometa"])
def test_embed_command_matches_reference(prefix: str, parity, upstream_ckpt_path, tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in.npz", parity)
    out = run_cli(tmp_path, upstream_ckpt_path(CONFIGS[prefix]), inputs)
    check_outputs(out, parity, prefix)
    np.testing.assert_array_equal(out["mel"], parity["in/mel"])


@pytest.mark.slow
def test_embed_command_partial_metadata(parity, upstream_ckpt_path, tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in.npz", parity, partial_metadata=True)
    out = run_cli(tmp_path, upstream_ckpt_path(CONFIGS["withmeta"]), inputs)
    check_outputs(out, parity, "withmeta_pm")
    changed = np.abs(out["ctotal"] - parity["withmeta/ctotal"]).max(axis=1) > 1e-4
    assert changed.tolist() == [False, True, False, True], "only the samples with missing metadata change"


@pytest.mark.slow
def test_embed_command_audio_from_waveform(parity, upstream_ckpt_path, tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in.npz", parity)
    out = run_cli(tmp_path, upstream_ckpt_path(CONFIGS["nometa"]), inputs, "--audio-from-waveform")
    assert_close("mel", out["mel"], parity["in/mel"], atol=1e-3)
    assert_close("audio_embeds", out["audio_embeds"], parity["nometa/audio_embeds"], atol=1e-5, rtol=1e-4)
    assert_close("att_weight_audio", out["att_weight_audio"], parity["nometa/att_weight_audio"], atol=1e-7)


def reference_metadata(parity: Mapping[str, np.ndarray], source: str = "in") -> Metadata:
    def t(name: str) -> torch.Tensor:
        key = f"{source}/{name}" if f"{source}/{name}" in parity else f"in/{name}"
        return torch.from_numpy(parity[key])

    return Metadata(
        latlong=t("latlong"),
        month=t("month"),
        time=t("time"),
        month_valid=t("month_valid"),
        time_valid=t("time_valid"),
        audio_source=t("audio_source"),
        caption_source=t("caption_source"),
    )


@pytest.mark.slow
@torch.inference_mode()
def test_image_tokens_match_reference_intermediates(parity, models) -> None:
    images = torch.from_numpy(parity["in/sat"])
    zoom = torch.from_numpy(parity["in/sat_zoom_level"])
    sel = parity["inter/token_sel"]
    nometa = models("nometa")
    tokens = nometa.image_tokens(images, zoom)
    assert_close("sat_tokens_sel", tokens[:, sel].numpy(), parity["inter/sat_tokens_sel"], atol=1e-4, rtol=1e-4)
    fused = models("withmeta").image_tokens(images, zoom, reference_metadata(parity))
    fused_sel = torch.cat([fused[:, sel], fused[:, 196:]], dim=1).numpy()
    assert_close("fused_tokens_sel", fused_sel, parity["withmeta/fused_tokens_sel"], atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_missing_metadata_tokens_are_zero_like_upstream_eval(parity, models) -> None:
    images = torch.from_numpy(parity["in/sat"])
    zoom = torch.from_numpy(parity["in/sat_zoom_level"])
    fused = models("withmeta").image_tokens(images, zoom, reference_metadata(parity, "in_pm"))
    ref = parity["withmeta_pm/meta_tokens"]
    assert_close("meta_tokens", fused[:, 196:].numpy(), ref, atol=1e-4, rtol=1e-4)
    assert (fused[1, 199:] == 0).all() and (fused[3, 200] == 0).all()
    sel = parity["inter/token_sel"]
    assert_close("pm fused", fused[:, sel].numpy(), parity["withmeta_pm/fused_tokens_sel"], atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_audio_tokens_match_reference(parity, models) -> None:
    tokens = models("nometa").audio_encoder(torch.from_numpy(parity["in/mel"]))
    assert_close("audio_tokens", tokens.numpy(), parity["inter/audio_tokens"], atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_image_embedding_does_not_depend_on_batch(parity, models) -> None:
    """Inputs the reference never saw: a reordered sub-batch gives the same rows."""
    model = models("withmeta")
    order = [3, 1]
    images = torch.from_numpy(parity["in/sat"][order])
    zoom = torch.from_numpy(parity["in/sat_zoom_level"][order])
    full = reference_metadata(parity, "in_pm")
    meta = Metadata(**{name: getattr(full, name)[order] for name in full.__dataclass_fields__})
    out = model.encode_image(images, zoom, meta)
    assert_close("ctotal subset", out.embedding.numpy(), parity["withmeta_pm/ctotal"][order], atol=1e-5, rtol=1e-4)

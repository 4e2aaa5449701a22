"""The synthetic upstream checkpoint is bit-identical to the one the parity reference outputs came from."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from support.upstream_ckpt import tensor_sha256, write_checkpoint

from model.errors import ConfigError
from model.htsat import relative_position_index, shifted_window_mask
from model.mel import dft_kernels, slaney_mel_filterbank

CONFIGS = ("bingmap_withmeta", "bingmap_nometa")


@pytest.mark.parametrize("config_name", CONFIGS)
def test_state_dict_is_bit_identical_to_manifest(
    config_name: str,
    manifest: dict[str, Any],
    upstream_state_dict: Callable[[str], OrderedDict[str, torch.Tensor]],
) -> None:
    entry = manifest["configs"][config_name]
    state_dict = upstream_state_dict(config_name)
    assert [(key, list(t.shape), str(t.dtype).removeprefix("torch.")) for key, t in state_dict.items()] == [
        (key, shape, dtype) for key, shape, dtype in entry["state_dict"]
    ]
    mismatched = [key for key, t in state_dict.items() if tensor_sha256(t) != entry["tensor_sha256"][key]]
    assert mismatched == []


def test_logit_scales_match_documented_values(
    upstream_state_dict: Callable[[str], OrderedDict[str, torch.Tensor]],
) -> None:
    documented = {
        "at": 2.22601,
        "it": 3.13715,
        "ia": 2.64115,
        "fdt": 2.29209,
        "i_at": 2.63327,
        "it_a": 2.64018,
    }
    state_dict = upstream_state_dict("bingmap_nometa")
    for suffix, value in documented.items():
        assert state_dict[f"logit_scale_{suffix}"].item() == pytest.approx(value, abs=5e-6)


def test_relative_position_index_of_a_2x2_window() -> None:
    # index = (row_i - row_j + 1) * 3 + (col_i - col_j + 1) for tokens (0,0), (0,1), (1,0), (1,1)
    expected = [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]]
    assert relative_position_index(2).tolist() == expected


def test_shifted_window_mask_groups_tokens_by_region() -> None:
    mask = shifted_window_mask(16, 16, window_size=8, shift=4)
    assert mask.shape == (4, 64, 64)
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    assert not torch.signbit(mask[mask == 0]).any()
    assert torch.equal(mask, mask.transpose(1, 2))
    # Top-left window is one region; top-right and bottom-left split in two; bottom-right in four.
    tokens_sharing_region = (mask == 0).sum(-1)
    assert tokens_sharing_region.amin(-1).tolist() == [64, 32, 32, 16]
    assert tokens_sharing_region.amax(-1).tolist() == [64, 32, 32, 16]


def test_stft_kernels_compute_the_hann_windowed_rfft() -> None:
    n_fft = 64
    real, imag = dft_kernels(n_fft)
    frame = np.random.default_rng(0).standard_normal(n_fft)
    periodic_hann = np.hanning(n_fft + 1)[:-1]
    spectrum = np.fft.rfft(frame * periodic_hann)
    np.testing.assert_allclose(real[:, 0].double().numpy() @ frame, spectrum.real, atol=1e-5)
    np.testing.assert_allclose(imag[:, 0].double().numpy() @ frame, spectrum.imag, atol=1e-5)


def test_slaney_mel_filters_are_area_normalised_triangles() -> None:
    weights = slaney_mel_filterbank(sample_rate=32000, n_fft=1024, n_mels=64, f_min=50.0, f_max=14000.0)
    assert weights.shape == (513, 64)
    assert weights.min() >= 0
    bin_hz = 32000 / 1024
    # A Slaney triangle of height 2/width has unit area; sampled every bin_hz its sum is about 1/bin_hz.
    np.testing.assert_allclose(weights.sum(0).numpy() * bin_hz, 1.0, rtol=0.08)
    peak_bins = weights.argmax(0)
    assert torch.all(peak_bins[1:] >= peak_bins[:-1])


def test_written_checkpoint_has_lightning_layout(tmp_path: Path, manifest: dict[str, Any]) -> None:
    entry = manifest["configs"]["bingmap_nometa"]
    small_entry = {**entry, "state_dict": [row for row in entry["state_dict"] if math.prod(row[1]) < 10_000]}
    small_manifest = {**manifest, "configs": {"bingmap_nometa": small_entry}}

    path = write_checkpoint("bingmap_nometa", tmp_path / "small.ckpt", small_manifest)
    checkpoint = torch.load(path, weights_only=True)

    assert checkpoint["hparams_name"] == "hparams"
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (0, 0)
    assert checkpoint["pytorch-lightning_version"] == "2.2.5"
    assert checkpoint["hyper_parameters"] == entry["hyper_parameters"]
    assert isinstance(checkpoint["state_dict"], OrderedDict)
    assert list(checkpoint["state_dict"]) == [key for key, _, _ in small_entry["state_dict"]]
    assert all(tensor_sha256(t) == entry["tensor_sha256"][k] for k, t in checkpoint["state_dict"].items())


def test_unknown_config_is_rejected(upstream_state_dict: Callable[[str], Any]) -> None:
    with pytest.raises(ConfigError, match="unknown parity config"):
        upstream_state_dict("sentinel_withmeta")

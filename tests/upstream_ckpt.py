"""Synthetic checkpoints in the official Sat2Sound Lightning layout, rebuilt from the parity fill rule.

Every tensor is a function of its key name, shape and dtype alone (the rule of section 1.1 of the Sat2Sound
parity reference README, summarised in tests/data/README.md), so the reference outputs in
tests/data/parity_public.npz can be reproduced without shipping any weights. The manifest records the
SHA-256 of every tensor the upstream tooling produced; `tensor_sha256` lets tests compare bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.errors import CheckpointError, ConfigError

MANIFEST_PATH = Path(__file__).parent / "data" / "upstream_manifest.json"

LOGIT_SCALE_INIT = math.log(1.0 / 0.07)
SWIN_MASK_FILL = -100.0

# HTS-AT front end: torchlibrosa STFT and librosa's Slaney mel filterbank with these settings.
MEL_SAMPLE_RATE = 32000
MEL_FMIN_HZ = 50.0
MEL_FMAX_HZ = 14000.0

_DTYPES = {"float32": torch.float32, "int64": torch.int64}

# Slaney mel scale: linear below 1 kHz, logarithmic above.
_SLANEY_HZ_PER_MEL = 200.0 / 3
_SLANEY_LOG_START_HZ = 1000.0
_SLANEY_LOG_START_MEL = _SLANEY_LOG_START_HZ / _SLANEY_HZ_PER_MEL
_SLANEY_LOG_STEP = math.log(6.4) / 27.0


def load_manifest(path: Path = MANIFEST_PATH) -> dict[str, Any]:
    with path.open(encoding="utf-8") as handle:
        manifest: dict[str, Any] = json.load(handle)
    return manifest


def _config_entry(manifest: dict[str, Any], config_name: str) -> dict[str, Any]:
    configs: dict[str, Any] = manifest["configs"]
    if config_name not in configs:
        raise ConfigError(f"unknown parity config {config_name!r}; use one of {sorted(configs)}")
    entry: dict[str, Any] = configs[config_name]
    return entry


def _exact_sqrt(n: int) -> int:
    root = math.isqrt(n)
    if root * root != n:
        raise CheckpointError(
            f"{n} is not a square count of Swin tokens or windows; check the manifest shape"
        )
    return root


def swin_relative_position_index(window_size: int) -> torch.Tensor:
    """(ws², ws²) index into the (2ws-1)² relative-bias table for every token pair of a square window."""
    rows, cols = torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    row_offset = rows[:, None] - rows[None, :] + (window_size - 1)
    col_offset = cols[:, None] - cols[None, :] + (window_size - 1)
    return (row_offset * (2 * window_size - 1) + col_offset).to(torch.int64)


def swin_shifted_window_mask(map_side: int, window_size: int, shift: int) -> torch.Tensor:
    """(n_windows, ws², ws²) mask: 0 where two tokens share a region after the cyclic shift, else -100."""
    bands = (slice(0, -window_size), slice(-window_size, -shift), slice(-shift, None))
    region = torch.zeros((map_side, map_side), dtype=torch.float32)
    for label, (row_band, col_band) in enumerate((r, c) for r in bands for c in bands):
        region[row_band, col_band] = label
    n_side = map_side // window_size
    windows = (
        region.view(n_side, window_size, n_side, window_size)
        .permute(0, 2, 1, 3)
        .reshape(n_side * n_side, window_size * window_size)
    )
    same_region = windows[:, None, :] == windows[:, :, None]
    return torch.where(same_region, 0.0, SWIN_MASK_FILL).to(torch.float32)


def stft_kernels(n_fft: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_fft//2+1, 1, n_fft) Conv1d kernels: periodic Hann times cos and -sin of the DFT phase."""
    sample = torch.arange(n_fft, dtype=torch.float64)
    hann = 0.5 - 0.5 * torch.cos(2.0 * math.pi * sample / n_fft)
    freq_bin = torch.arange(n_fft // 2 + 1, dtype=torch.int64)
    # Reducing k·n modulo n_fft in integers keeps the angles small and exact before the float cos/sin.
    phase_step = torch.remainder(freq_bin[:, None] * torch.arange(n_fft, dtype=torch.int64)[None, :], n_fft)
    angle = 2.0 * math.pi * phase_step.to(torch.float64) / n_fft
    real = (torch.cos(angle) * hann).to(torch.float32)
    imag = (-torch.sin(angle) * hann).to(torch.float32)
    return real[:, None, :].contiguous(), imag[:, None, :].contiguous()


def _hz_to_slaney_mel(hz: float) -> float:
    if hz >= _SLANEY_LOG_START_HZ:
        return _SLANEY_LOG_START_MEL + math.log(hz / _SLANEY_LOG_START_HZ) / _SLANEY_LOG_STEP
    return hz / _SLANEY_HZ_PER_MEL


def _slaney_mel_to_hz(mel: float) -> float:
    if mel >= _SLANEY_LOG_START_MEL:
        return _SLANEY_LOG_START_HZ * math.exp(_SLANEY_LOG_STEP * (mel - _SLANEY_LOG_START_MEL))
    return _SLANEY_HZ_PER_MEL * mel


def slaney_mel_matrix(n_fft: int, n_mels: int, sample_rate: int, fmin: float, fmax: float) -> torch.Tensor:
    """(n_fft//2+1, n_mels) Slaney-normalised triangular filterbank, bit-identical to librosa's float32."""
    fft_hz = np.arange(n_fft // 2 + 1, dtype=np.float64) * (sample_rate / n_fft)
    mel_lo, mel_hi = _hz_to_slaney_mel(fmin), _hz_to_slaney_mel(fmax)
    # np.linspace arithmetic (start + i·step, exact endpoint); scalar math.exp keeps libm rounding.
    mel_step = (mel_hi - mel_lo) / (n_mels + 1)
    edge_mels = [mel_lo + i * mel_step for i in range(n_mels + 1)] + [mel_hi]
    edge_hz = np.array([_slaney_mel_to_hz(m) for m in edge_mels], dtype=np.float64)
    edge_gap = np.diff(edge_hz)
    ramps = edge_hz[:, None] - fft_hz[None, :]
    rising = -ramps[:-2] / edge_gap[:-1, None]
    falling = ramps[2:] / edge_gap[1:, None]
    # librosa stores the triangles in float32 first, then scales them in place by the float64 norm.
    triangles = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
    slaney_norm = 2.0 / (edge_hz[2:] - edge_hz[:-2])
    weights = (triangles.astype(np.float64) * slaney_norm[:, None]).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(weights.T))


def fill_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The tensor the parity fill rule assigns to `key`; the first matching rule wins."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(zlib.crc32(key.encode("utf-8")))

    def normal(size: tuple[int, ...] = shape) -> torch.Tensor:
        return torch.randn(size, generator=generator, dtype=torch.float32)

    if dtype == torch.int64:
        if key.endswith("relative_position_index"):
            tensor = swin_relative_position_index(_exact_sqrt(shape[0]))
        elif key.endswith("num_batches_tracked"):
            tensor = torch.zeros(shape, dtype=torch.int64)
        else:
            raise CheckpointError(f"no fill rule for integer tensor {key!r}; extend tests/upstream_ckpt.py")
    elif key.endswith("attn_mask"):
        window_size = _exact_sqrt(shape[1])
        tensor = swin_shifted_window_mask(window_size * _exact_sqrt(shape[0]), window_size, window_size // 2)
    elif key.endswith("stft.conv_real.weight"):
        tensor = stft_kernels(shape[2])[0]
    elif key.endswith("stft.conv_imag.weight"):
        tensor = stft_kernels(shape[2])[1]
    elif key.endswith("melW"):
        tensor = slaney_mel_matrix(2 * (shape[0] - 1), shape[1], MEL_SAMPLE_RATE, MEL_FMIN_HZ, MEL_FMAX_HZ)
    elif key.endswith(("space_dict", "source_embed.weight")):
        tensor = normal()
    elif len(shape) == 0:
        if "logit_scale" not in key:
            raise CheckpointError(f"no fill rule for scalar {key!r}; extend tests/upstream_ckpt.py")
        tensor = torch.tensor(LOGIT_SCALE_INIT, dtype=torch.float32) + 0.25 * normal(())
    elif key.endswith("running_var"):
        tensor = 1.0 + 0.1 * normal().abs()
    elif len(shape) >= 2:
        tensor = normal() * (1.0 / math.sqrt(math.prod(shape[1:])))
    elif key.endswith("weight"):
        tensor = 1.0 + 0.1 * normal()
    else:
        tensor = 0.1 * normal()

    if tuple(tensor.shape) != shape or tensor.dtype != dtype:
        raise CheckpointError(
            f"fill rule gave {tuple(tensor.shape)} {tensor.dtype} for {key!r} but the manifest says "
            f"{shape} {dtype}; fix the rule"
        )
    return tensor.contiguous()


def build_state_dict(
    config_name: str, manifest: dict[str, Any] | None = None
) -> OrderedDict[str, torch.Tensor]:
    """The synthetic state dict of `config_name`, in the manifest's (upstream) key order."""
    entry = _config_entry(manifest if manifest is not None else load_manifest(), config_name)
    return OrderedDict(
        (key, fill_tensor(key, tuple(shape), _DTYPES[dtype_name]))
        for key, shape, dtype_name in entry["state_dict"]
    )


def build_checkpoint(config_name: str, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """The full Lightning-layout checkpoint dict (without optimizer or loop state, as the reference has)."""
    manifest = manifest if manifest is not None else load_manifest()
    entry = _config_entry(manifest, config_name)
    return {
        "state_dict": build_state_dict(config_name, manifest),
        "hyper_parameters": dict(entry["hyper_parameters"]),
        "hparams_name": "hparams",
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": manifest["pytorch_lightning_version"],
    }


def write_checkpoint(config_name: str, path: Path, manifest: dict[str, Any] | None = None) -> Path:
    """torch.save the synthetic checkpoint of `config_name` to `path` and return the path."""
    path = Path(path)
    torch.save(build_checkpoint(config_name, manifest), path)
    return path


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of the raw little-endian bytes of `tensor`, as recorded in the manifest."""
    array = tensor.detach().cpu().contiguous().numpy()
    return hashlib.sha256(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()).hexdigest()

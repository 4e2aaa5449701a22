"""Synthetic checkpoints in the official Sat2Sound Lightning layout, rebuilt from the parity fill rule.

Every tensor is a function of its key name, shape and dtype alone (the rule of section 1.1 of the Sat2Sound
parity reference README, summarised in tests/data/README.md), so the reference outputs in
tests/data/parity_public.npz can be reproduced without shipping any weights. The manifest records the
SHA-256 of every tensor the upstream tooling produced; `tensor_sha256` lets tests compare bit for bit.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from model.errors import CheckpointError, ConfigError
from model.htsat import relative_position_index, shifted_window_mask
from model.mel import dft_kernels, slaney_mel_filterbank
from model.sat2sound import LOGIT_SCALE_INIT

MANIFEST_PATH = Path(__file__).resolve().parents[1] / "data" / "upstream_manifest.json"

_DTYPES = {"float32": torch.float32, "int64": torch.int64}


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
        raise CheckpointError(f"{n} is not a square count of Swin tokens or windows; check the manifest shape")
    return root


def fill_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The tensor the parity fill rule assigns to `key`; the first matching rule wins."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(zlib.crc32(key.encode("utf-8")))

    def normal(size: tuple[int, ...] = shape) -> torch.Tensor:
        return torch.randn(size, generator=generator, dtype=torch.float32)

    if dtype == torch.int64:
        if key.endswith("relative_position_index"):
            tensor = relative_position_index(_exact_sqrt(shape[0]))
        elif key.endswith("num_batches_tracked"):
            tensor = torch.zeros(shape, dtype=torch.int64)
        else:
            raise CheckpointError(f"no fill rule for integer tensor {key!r}; extend tests/upstream_ckpt.py")
    elif key.endswith("attn_mask"):
        window_size = _exact_sqrt(shape[1])
        side = window_size * _exact_sqrt(shape[0])
        tensor = shifted_window_mask(side, side, window_size, window_size // 2)
    elif key.endswith("stft.conv_real.weight"):
        tensor = dft_kernels(shape[2])[0]
    elif key.endswith("stft.conv_imag.weight"):
        tensor = dft_kernels(shape[2])[1]
    elif key.endswith("melW"):
        tensor = slaney_mel_filterbank(n_fft=2 * (shape[0] - 1), n_mels=shape[1])
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


def build_state_dict(config_name: str, manifest: dict[str, Any] | None = None) -> OrderedDict[str, torch.Tensor]:
    """The synthetic state dict of `config_name`, in the manifest's (upstream) key order."""
    entry = _config_entry(manifest if manifest is not None else load_manifest(), config_name)
    return OrderedDict(
        (key, fill_tensor(key, tuple(shape), _DTYPES[dtype_name])) for key, shape, dtype_name in entry["state_dict"]
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


def hparams_checkpoint_bytes(config_name: str, megabytes: int, manifest: dict[str, Any] | None = None) -> bytes:
    """A torch checkpoint of the Lightning layout with `config_name`'s hyper-parameters and about `megabytes` of
    stand-in weights, for reading its architecture without its weights."""
    hparams = _config_entry(manifest or load_manifest(), config_name)["hyper_parameters"]
    buffer = io.BytesIO()
    weights = {f"block.{index}.weight": torch.ones(1 << 18) for index in range(megabytes)}
    torch.save({"state_dict": weights, "hyper_parameters": hparams, "optimizer_states": []}, buffer)
    return buffer.getvalue()

"""Loading Sat2Sound checkpoints without executing code from the file.

Two formats: the official Lightning `.ckpt` (a torch zip holding `state_dict` and `hyper_parameters`),
read with `torch.load(weights_only=True)` and an explicit allow-list of the few harmless classes
Lightning checkpoints pickle; and a converted `.safetensors` file with a `.json` config beside it.
All key handling lives in `filter_state_dict`. A checkpoint's config, sha256 and description are read without
importing torch (a build's model job reads only those of a converted checkpoint); what touches weights imports it.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import json
import pathlib
import pickle
import zipfile
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from safetensors import SafetensorError

from common.atomic import atomic_path, unwritable_reason
from model.config import Sat2SoundConfig
from model.errors import CheckpointError, CheckpointMismatchError, ConfigError, first_line

if TYPE_CHECKING:
    from torch import Tensor

    from model.sat2sound import Sat2Sound

SAFETENSORS_SUFFIX = ".safetensors"
# The config beside a .safetensors checkpoint.
CONFIG_SUFFIX = ".json"
CONFIG_FORMAT = "sat2sound-maps/config-v1"
# The sentence a converted or trained checkpoint's config may carry about what the weights are.
DESCRIPTION_KEY = "description"
# Key prefixes of weights that no part of Sat2Sound reads (older revisions kept a text projector).
IGNORED_PREFIXES = ("text_encoder.",)
# Prefixes added by wrappers (DDP, torch.compile) around the whole model.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
MAX_LISTED_KEYS = 3


class _AttributeDict:
    """Stand-in for Lightning's AttributeDict (a dict subclass): unpickles as a plain dict."""

    def __new__(cls, *args: object, **kwargs: object) -> dict:  # type: ignore[misc]
        return {}


def _numpy_safe_globals() -> list[Any]:
    multiarray = importlib.import_module("numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray")
    scalar = multiarray.scalar
    dtypes = [type(np.dtype(name)) for name in ("float64", "float32", "int64", "int32", "bool")]
    return [
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
        *dtypes,
    ]


SAFE_GLOBALS: list[Any] = [
    argparse.Namespace,
    pathlib.PosixPath,
    pathlib.WindowsPath,
    (_AttributeDict, "pytorch_lightning.utilities.parsing.AttributeDict"),
    (_AttributeDict, "lightning.fabric.utilities.data.AttributeDict"),
    (_AttributeDict, "lightning_fabric.utilities.data.AttributeDict"),
    *_numpy_safe_globals(),
]


def sha256_file(path: Path) -> str:
    """The file's sha256, hashed once per process while the file stays as it is (the build's start asks for the
    checkpoint's up to three times: its expected sha256, the model record, the gallery's weights)."""
    stat = path.stat()
    return _sha256_of(str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256_of(path: str, inode: int, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def filter_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Tensor]:
    """Bring a checkpoint's state dict to this package's key names (which equal upstream's)."""
    from torch import Tensor

    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            continue
        for prefix in WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        if not key.startswith(IGNORED_PREFIXES):
            out[key] = value
    return out


def _unpickling_culprit(exc: pickle.UnpicklingError) -> str:
    """The line of torch's long weights-only error that names the refused object."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line or "Can only" in line]
    return (named or lines or ["unsupported object"])[0][:200]


def _torch_load(source: Path | IO[bytes], name: str, *, weights: bool = True) -> dict[str, Any]:
    """The payload of a torch checkpoint, a local file or an open one (`name` says which in messages); without
    `weights` its tensors hold shapes and dtypes but no data, and no byte of the weights is read."""
    import torch

    try:
        is_zip = zipfile.is_zipfile(source)
    except ValueError:  # a remote file shorter than a zip's end record: fsspec refuses the seek before its start
        is_zip = False
    if not is_zip:
        raise CheckpointError(
            f"{name} is not a torch checkpoint (not a zip archive: truncated or another format); "
            "download it again or pass the .ckpt/.safetensors file"
        )
    if not isinstance(source, Path):
        source.seek(0)  # is_zipfile read the archive's end
    with ExitStack() as stack:
        stack.enter_context(torch.serialization.safe_globals(SAFE_GLOBALS))
        if not weights:
            stack.enter_context(torch.serialization.skip_data())
        try:
            payload = torch.load(source, map_location="cpu", weights_only=True, mmap=weights)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"{name} holds pickled objects outside the safe allow-list ({_unpickling_culprit(exc)});"
                " it is not a plain Sat2Sound checkpoint — refusing to run code from it"
            ) from None
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
            raise CheckpointError(
                f"{name} cannot be read ({first_line(exc)[:160]}); the file is truncated or corrupt, download it again"
            ) from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{name} is not a Sat2Sound checkpoint (holds a {type(payload).__name__}, not a dict)")
    return payload


def _torch_parts(payload: Mapping[str, Any], name: str) -> tuple[Sat2SoundConfig, dict[str, Tensor], dict[str, Any]]:
    parts = ("state_dict", "hyper_parameters")
    missing = [key for key in parts if key not in payload]
    if missing:
        raise CheckpointError(
            f"{name} is not a Sat2Sound checkpoint (no {' or '.join(missing)}); "
            "expected a Lightning checkpoint of mvrl/sat2sound"
        )
    for key in parts:
        if not isinstance(payload[key], Mapping):
            raise CheckpointError(
                f"{name} is not a Sat2Sound checkpoint (its {key} is a {type(payload[key]).__name__}, not a mapping);"
                " expected a Lightning checkpoint of mvrl/sat2sound"
            )
    hparams = dict(payload["hyper_parameters"])
    try:
        cfg = Sat2SoundConfig.from_hparams(hparams)
    except ConfigError as exc:
        raise CheckpointError(f"{name}: {exc}") from None
    return cfg, filter_state_dict(payload["state_dict"]), hparams


def read_torch_checkpoint(path: Path) -> tuple[Sat2SoundConfig, dict[str, Tensor], dict[str, Any]]:
    return _torch_parts(_torch_load(path, str(path)), str(path))


def _safetensors_config_path(path: Path) -> Path:
    return path.with_suffix(CONFIG_SUFFIX)


def checkpoint_files(path: Path) -> list[Path]:
    """The files of a local checkpoint: the weights, and beside a .safetensors file its .json config."""
    return [path, *([_safetensors_config_path(path)] if path.suffix == SAFETENSORS_SUFFIX else [])]


def _read_meta(config_path: Path) -> dict[str, Any]:
    """The JSON config beside a .safetensors checkpoint."""
    if not config_path.is_file():
        raise CheckpointError(
            f"{config_path.with_suffix(SAFETENSORS_SUFFIX)} has no config beside it ({config_path.name});"
            " convert the .ckpt again"
        )
    try:
        meta = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {config_path} ({first_line(exc)}); convert the .ckpt again") from None
    if not isinstance(meta, dict) or meta.get("format") != CONFIG_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{config_path} is not a Sat2Sound config (format {found!r}); convert the .ckpt again")
    return meta


def _meta_config(meta: Mapping[str, Any], config_path: Path) -> Sat2SoundConfig:
    try:
        return Sat2SoundConfig.from_dict(meta.get("config", {}))
    except ConfigError as exc:
        raise CheckpointError(f"{config_path}: {exc}") from None


def read_safetensors_checkpoint(path: Path) -> tuple[Sat2SoundConfig, dict[str, Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    config_path = _safetensors_config_path(path)
    meta = _read_meta(config_path)
    cfg = _meta_config(meta, config_path)
    try:
        state_dict = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} cannot be read ({exc}); convert the .ckpt again") from None
    return cfg, filter_state_dict(state_dict), meta.get("hyper_parameters", {})


def checkpoint_description(path: Path) -> str:
    """What a .safetensors checkpoint says it is (its config's description; empty for other files)."""
    if path.suffix != SAFETENSORS_SUFFIX:
        return ""
    return str(_read_meta(_safetensors_config_path(path)).get(DESCRIPTION_KEY, ""))


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path or use hf://MVRL/sat2sound/...")


def read_checkpoint(path: Path) -> tuple[Sat2SoundConfig, dict[str, Tensor], dict[str, Any]]:
    """Config, filtered state dict and original hyper-parameters of a local checkpoint file."""
    _check_exists(path)
    if path.suffix == SAFETENSORS_SUFFIX:
        return read_safetensors_checkpoint(path)
    return read_torch_checkpoint(path)


def read_config(path: Path) -> Sat2SoundConfig:
    """The architecture of a local checkpoint without reading its weights (.ckpt files are memory-mapped)."""
    _check_exists(path)
    if path.suffix == SAFETENSORS_SUFFIX:
        config_path = _safetensors_config_path(path)
        return _meta_config(_read_meta(config_path), config_path)
    return read_checkpoint(path)[0]


def resolve_checkpoint(uri: str | Path) -> Path:
    """The local file of the checkpoint at `uri` (a path, or an hf:// URI downloaded on first use); an hf://
    .safetensors file comes with the .json config beside it."""
    from model.hub import is_hub_uri, resolve

    path = resolve(uri)
    if is_hub_uri(uri) and path.suffix == SAFETENSORS_SUFFIX:
        resolve(_config_uri(str(uri)))
    return path


def checkpoint_config(uri: str | Path) -> Sat2SoundConfig:
    """The architecture of the checkpoint at `uri` without downloading its weights. A local file, or an hf:// one
    already in the cache, is read where it lies. Of an hf:// checkpoint not yet downloaded, a .safetensors
    file's .json config alone is downloaded, and a torch checkpoint's hyper-parameters are read in place: a few
    HTTP range requests, about a megabyte of the 0.6 GB of an official checkpoint."""
    from model.hub import in_cache, is_hub_uri, open_remote, resolve

    text = str(uri)
    if not is_hub_uri(text) or in_cache(text):
        return read_config(resolve_checkpoint(text))
    if text.endswith(SAFETENSORS_SUFFIX):
        config_path = resolve(_config_uri(text))
        return _meta_config(_read_meta(config_path), config_path)
    with open_remote(text) as remote:
        return _torch_parts(_torch_load(remote, text, weights=False), text)[0]


def _config_uri(uri: str) -> str:
    return uri.removesuffix(SAFETENSORS_SUFFIX) + CONFIG_SUFFIX


def describe_mismatch(expected: Mapping[str, Tensor], found: Mapping[str, Tensor]) -> str:
    """One line listing missing and unexpected keys and shape differences, or '' if they fit."""
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    shapes = [
        f"{key} {tuple(found[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in expected
        if key in found and found[key].shape != expected[key].shape
    ]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - MAX_LISTED_KEYS} more)" if len(items) > MAX_LISTED_KEYS else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:MAX_LISTED_KEYS])}{more}")
    return "; ".join(parts)


def check_finite(state_dict: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Raise CheckpointError naming the first floating-point tensor that holds NaN or infinite values: bytes
    overwritten in a file (0xFF runs are NaNs) load without complaint and break the model later."""
    import torch

    for key, tensor in state_dict.items():
        # A finite sum proves every value finite in one cheap pass; count only when it is not (or overflowed).
        if not tensor.is_floating_point() or torch.isfinite(tensor.sum()):
            continue
        bad = int(tensor.numel() - torch.isfinite(tensor).sum())
        if bad:
            raise CheckpointError(
                f"{source} is corrupt: tensor {key} {tuple(tensor.shape)} holds {bad:,} NaN or infinite values;"
                " download or convert it again"
            )


def verify_sha256(path: Path, expected: str) -> str:
    """The file's sha256; raises CheckpointError unless it is `expected` (hex, either case)."""
    actual = sha256_file(path)
    if actual != expected.lower():
        raise CheckpointError(
            f"{path} has sha256 {actual}, not the expected {expected.lower()}: the file is corrupt or another"
            " checkpoint; download it again or correct the expected sha256"
        )
    return actual


def build_model(
    cfg: Sat2SoundConfig, state_dict: Mapping[str, Tensor], source: str = "checkpoint", trainable: bool = False
) -> Sat2Sound:
    """A Sat2Sound model holding exactly the given weights (strict), all of them finite: for inference, in eval
    mode and frozen; `trainable`, in train mode with gradients where a fresh model has them (the STFT and mel
    matrices official checkpoints carry stay frozen)."""
    import torch

    from model.sat2sound import Sat2Sound

    # Built on the CPU, not the meta device, whose first operation imports torch._dynamo (~2.4 s of every job's
    # start, more than initialising the weights that are then replaced); without drawing on the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        model = Sat2Sound(cfg)
    problems = describe_mismatch(model.state_dict(), state_dict)
    if problems:
        raise CheckpointMismatchError(
            f"{source} does not fit a {cfg.sat_type}/{cfg.metadata_type} Sat2Sound: {problems}"
        )
    check_finite(state_dict, source)
    # assign=True takes the tensors but keeps each parameter's requires_grad of the fresh model.
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.train() if trainable else model.eval().requires_grad_(False)


def load_model(source: str | Path) -> tuple[Sat2Sound, dict[str, Any]]:
    """Model and provenance (path, sha256, hyper-parameters) from a path or an hf:// URI, on the CPU."""
    path = resolve_checkpoint(source)
    cfg, state_dict, hparams = read_checkpoint(path)
    model = build_model(cfg, state_dict, source=str(source))
    return model, {"checkpoint": str(source), "path": str(path), "hyper_parameters": hparams}


def save_safetensors(
    model: Sat2Sound, out: Path, hparams: Mapping[str, Any] | None = None, provenance: Mapping[str, Any] | None = None
) -> tuple[Path, Path]:
    """Write `out` (.safetensors weights) and its `.json` config beside it: both, each atomically, or neither."""
    from safetensors.torch import save_file

    if out.suffix != SAFETENSORS_SUFFIX:
        raise CheckpointError(f"output {out} must end in {SAFETENSORS_SUFFIX}")
    config_path = _safetensors_config_path(out)
    for target in (out, config_path):
        if reason := unwritable_reason(target):
            raise CheckpointError(f"cannot write {target} ({reason}); choose another output path")
    meta = {
        "format": CONFIG_FORMAT,
        "config": model.cfg.to_dict(),
        "hyper_parameters": json.loads(json.dumps(dict(hparams or {}), default=str)),
        **dict(provenance or {}),
    }
    weights_placed = False
    try:
        with atomic_path(config_path) as tmp_config:
            tmp_config.write_text(json.dumps(meta, indent=1))
            with atomic_path(out) as tmp_weights:
                save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(tmp_weights))
            weights_placed = True
    except OSError as exc:
        if weights_placed:  # their config could not follow them into place
            out.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write {out} and its config ({first_line(exc)}); choose another path") from None
    return out, config_path


def convert_to_safetensors(checkpoint: Path, out: Path) -> tuple[Path, Path]:
    """One-time conversion of a `.ckpt` to `out` (.safetensors) plus its `.json` config."""
    cfg, state_dict, hparams = read_checkpoint(checkpoint)
    model = build_model(cfg, state_dict, source=str(checkpoint))
    source = {"converted_from": {"name": checkpoint.name, "sha256": sha256_file(checkpoint)}}
    return save_safetensors(model, out, hparams, source)

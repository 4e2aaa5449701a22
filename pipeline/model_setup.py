"""The model of a build: an official checkpoint, or a small untrained model built from a fixed seed.

`prepare_model` records it once in model.json (local weights path and sha256), so every job of the build
loads the very same weights; the untrained model is saved as safetensors inside the build folder.
torch is imported only where weights are touched: the workflow reads this module while it plans.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from common.atomic import atomic_path
from model import Sat2SoundConfig
from pipeline.config import ModelSettings
from pipeline.errors import BuildConfigError

if TYPE_CHECKING:
    from model import Sat2SoundEncoder

UNTRAINED_WEIGHTS_NAME = "untrained.safetensors"
# The metadata token each time key of the config feeds.
TIME_TOKENS = {"month": "month", "hour": "time"}


class ModelRecord(NamedTuple):
    checkpoint: str
    path: str
    sha256: str
    untrained: bool
    sat_type: str
    metadata_type: str
    description: str = ""  # what the weights are, from their config (trained demo weights say so)


def untrained_notice(sat_type: str, seed: int) -> str:
    return (
        f"model: UNTRAINED small Sat2Sound ({sat_type}, seed {seed}): the maps show the plumbing, not"
        " soundscapes; set model.checkpoint to a trained checkpoint for real predictions"
    )


def untrained_config(sat_type: str, metadata_type: str) -> Sat2SoundConfig:
    return replace(Sat2SoundConfig.small(metadata_type), sat_type=sat_type)


def check_device(device: str) -> None:
    """Refuse a model.device this machine does not have, before any job asks for it."""
    if device in ("auto", "cpu"):  # always there: spare the workflow's start importing torch
        return
    from model.devices import pick_device
    from model.errors import InputError

    try:
        pick_device(device)
    except InputError as exc:
        raise BuildConfigError(f"config.model.device: {exc}") from None


def check_model(settings: ModelSettings, text_queries: bool, recorded: ModelRecord | None = None) -> None:
    """Refuse, before any job: a checkpoint whose weights are corrupt (not finite, or not the shapes its
    hyper-parameters describe) or whose sha256 is not model.checkpoint_sha256, months or hours listed for a model
    that does not fuse them (`check_times`), and a text backbone that cannot be loaded here when text queries need
    one. Reads every weight of the checkpoint, unless `recorded` (the build's model record, made after an earlier
    start checked them) names the same file with the same sha256: loading the weights imports torch (~3 s)."""
    from model.errors import CheckpointError, TextBackboneError

    if settings.untrained:
        if settings.checkpoint_sha256 is not None:
            raise BuildConfigError(
                "config.model.checkpoint_sha256 is set but model.checkpoint is untrained (no file to check);"
                " remove it or set model.checkpoint to the file"
            )
        cfg = untrained_config(settings.sat_type, settings.metadata_type)
    else:
        from model.checkpoint import load_model, read_config, resolve_checkpoint, sha256_file, verify_sha256

        path = resolve_checkpoint(settings.checkpoint)
        digest = None
        if settings.checkpoint_sha256 is not None:
            try:
                digest = verify_sha256(path, settings.checkpoint_sha256)
            except CheckpointError as exc:
                raise BuildConfigError(f"config.model.checkpoint_sha256: {exc}") from None
        checked = (
            recorded is not None
            and recorded.path == str(path.resolve())
            and recorded.sha256 == (digest or sha256_file(path))
        )
        cfg = read_config(path) if checked else load_model(path)[0].cfg
    check_times(settings, cfg)
    if not text_queries:
        return
    from model.text_specs import check_text_backbone

    try:
        check_text_backbone(settings.text_backbone, cfg.text_dim)
    except TextBackboneError as exc:
        raise BuildConfigError(f"config.model.text_backbone: {exc}") from None


def check_times(settings: ModelSettings, cfg: Sat2SoundConfig) -> None:
    """Refuse a list (or `all`) of months or hours for a model that does not fuse that token: its maps would all
    be the same."""
    for key in settings.swept:
        if TIME_TOKENS[key] not in cfg.metadata:
            raise BuildConfigError(
                f"config.model.{key}: a list of {key}s (or all) needs a model that fuses the {key}, but this one fuses"
                f" {'_'.join(cfg.metadata) or 'no metadata'} (every {key} would give the same map); give one {key}"
                f" or null, or use a withmeta checkpoint (untrained: model.metadata_type with {TIME_TOKENS[key]})"
            )


def model_config(settings: ModelSettings) -> Sat2SoundConfig:
    """The architecture the build will run, from the checkpoint's hyper-parameters (an hf:// checkpoint's are
    read without downloading its weights: `checkpoint_config`)."""
    if settings.untrained:
        return untrained_config(settings.sat_type, settings.metadata_type)
    from model import checkpoint_config

    return checkpoint_config(settings.checkpoint)


def model_description(settings: ModelSettings) -> str:
    """The checkpoint's own sentence about what its weights are ("" when it has none, or is untrained)."""
    if settings.untrained:
        return ""
    from model.checkpoint import checkpoint_description, resolve_checkpoint

    return checkpoint_description(resolve_checkpoint(settings.checkpoint))


def prepare_model(settings: ModelSettings, weights_dir: Path, out: Path) -> ModelRecord:
    """Resolve the weights (or, for 'untrained', build them from the seed and save them); write model.json.

    `sat_type` and `metadata_type` shape the untrained model only: checkpoints carry their own.
    """
    from model import read_config, resolve_checkpoint, sha256_file

    checkpoint, untrained = settings.checkpoint, settings.untrained
    if untrained:
        import torch

        from model import Sat2Sound, save_safetensors

        torch.manual_seed(settings.seed)
        cfg = untrained_config(settings.sat_type, settings.metadata_type)
        provenance = {"untrained": True, "seed": settings.seed}
        path, _ = save_safetensors(Sat2Sound(cfg).eval(), weights_dir / UNTRAINED_WEIGHTS_NAME, provenance=provenance)
    else:
        path = resolve_checkpoint(checkpoint)
        cfg = read_config(path)
    record = ModelRecord(
        checkpoint=checkpoint,
        path=str(path.resolve()),
        sha256=sha256_file(path),
        untrained=untrained,
        sat_type=cfg.sat_type,
        metadata_type=cfg.metadata_type,
        description=model_description(settings),
    )
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(record._asdict(), indent=1))
    return record


def read_model_record(path: Path) -> ModelRecord:
    return ModelRecord(**json.loads(path.read_text()))


def earlier_model_record(path: Path) -> ModelRecord | None:
    """The build's model record if an earlier run wrote one (None if it is missing or unreadable)."""
    try:
        return read_model_record(path)
    except (OSError, ValueError, TypeError):
        return None


def load_encoder(
    record: ModelRecord, device: str, precision: str, text_backbone: str = "auto", compiled: bool = False
) -> Sat2SoundEncoder:
    from model import Sat2SoundEncoder

    return Sat2SoundEncoder.from_checkpoint(
        record.path, device=device, precision=precision, text_backbone=text_backbone, compiled=compiled
    )

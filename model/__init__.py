"""Sat2Sound: satellite tiles, audio and text embedded into one space through a shared codebook.

The package's front door. Importing it is cheap: the names that need torch load on first use.

    from model import Sat2SoundEncoder, Metadata
    encoder = Sat2SoundEncoder.from_checkpoint("hf://MVRL/sat2sound/sat2sound/bingmap_withmeta.ckpt")
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from model.config import GSD_BY_SAT_TYPE, MODEL_INPUT_PX, TILE_PX_BY_SAT_TYPE, TRAINED_ZOOM_LEVELS, Sat2SoundConfig

if TYPE_CHECKING:
    from model.checkpoint import checkpoint_config, read_config, resolve_checkpoint, save_safetensors, sha256_file
    from model.inference import Sat2SoundEncoder
    from model.metadata import Metadata
    from model.sat2sound import Sat2Sound

_LAZY = {
    "Metadata": "model.metadata",
    "Sat2Sound": "model.sat2sound",
    "Sat2SoundEncoder": "model.inference",
    "checkpoint_config": "model.checkpoint",
    "read_config": "model.checkpoint",
    "resolve_checkpoint": "model.checkpoint",
    "save_safetensors": "model.checkpoint",
    "sha256_file": "model.checkpoint",
}

__all__ = [
    "GSD_BY_SAT_TYPE",
    "MODEL_INPUT_PX",
    "TILE_PX_BY_SAT_TYPE",
    "TRAINED_ZOOM_LEVELS",
    "Metadata",
    "Sat2Sound",
    "Sat2SoundConfig",
    "Sat2SoundEncoder",
    "checkpoint_config",
    "read_config",
    "resolve_checkpoint",
    "save_safetensors",
    "sha256_file",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")

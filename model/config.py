"""Architecture configuration: one frozen object describes every size of the model.

`Sat2SoundConfig.from_hparams` reads the few fields it needs from a Lightning `hyper_parameters`
dict (official checkpoints carry many more); `Sat2SoundConfig.small()` builds a tiny model for tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any, TypeGuard

from model.errors import ConfigError

# Ground sample distance (m/px) at zoom level 1 for each imagery type the model was trained on.
GSD_BY_SAT_TYPE: dict[str, float] = {"bingmap": 0.6, "sentinel": 10.0, "googleEarth": 0.2}
# Source tile edge (px) that one zoom-level step covers before the resize to 224 px.
TILE_PX_BY_SAT_TYPE: dict[str, int] = {"bingmap": 300, "sentinel": 256, "googleEarth": 256}

# Edge (px) of the square image the model's ViT takes.
MODEL_INPUT_PX = 224
# Zoom levels (the model's view in imagery tiles of its type, per side) the official checkpoints were trained at,
# ascending.
TRAINED_ZOOM_LEVELS: tuple[int, ...] = (1, 3, 5)


def crop_px(zoom_level: int, sat_type: str) -> int:
    """Edge of the centre crop (source pixels) that one sample at `zoom_level` covers."""
    return zoom_level * TILE_PX_BY_SAT_TYPE[sat_type]


# Metadata tokens in the order upstream appends them after the patch tokens.
METADATA_ORDER: tuple[str, ...] = ("asource", "tsource", "latlong", "month", "time")
AUDIO_SOURCES: tuple[str, ...] = ("yfcc", "iNat", "aporee", "freesound")
CAPTION_SOURCES: tuple[str, ...] = ("meta", "qwen", "pengi")
# The months and hours the metadata tokens take (upstream's dates: month 1-12, hour 0-23).
MONTHS: tuple[int, ...] = tuple(range(1, 13))
HOURS: tuple[int, ...] = tuple(range(24))


def _is_whole(value: object) -> TypeGuard[int]:
    """An int that is no bool (YAML and JSON `true` would pass isinstance)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[float]:
    """A finite int or float that is no bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_whole(value: object) -> bool:
    return _is_whole(value) and value >= 1


def _field_rule(default: object) -> tuple[str, Callable[[Any], bool]]:
    """What a config field must be, in words, and its test, after the kind of the field's default."""
    if isinstance(default, bool):
        return "true or false", lambda value: isinstance(value, bool)
    if isinstance(default, int):
        return "a whole number >= 1", _positive_whole
    if isinstance(default, float):
        return "a finite number >= 0", lambda value: _is_number(value) and value >= 0
    if isinstance(default, tuple):
        return (
            "a list of whole numbers >= 1",
            lambda value: isinstance(value, tuple) and bool(value) and all(map(_positive_whole, value)),
        )
    if isinstance(default, str):
        return "a string", lambda value: isinstance(value, str)
    return "a mapping of its fields", lambda value: isinstance(value, type(default))


def _check_fields(config: Any, prefix: str = "") -> None:
    """Refuse, in one line naming the field, a value of another kind than the field's default or out of its range:
    a checkpoint file's config would otherwise reach the tensor shapes unchecked."""
    for item in fields(config):
        default = item.default if item.default_factory is MISSING else item.default_factory()
        rule, fits = _field_rule(default)
        value = getattr(config, item.name)
        if not fits(value):
            raise ConfigError(f"{prefix}{item.name} must be {rule}, got {value!r}")


@dataclass(frozen=True)
class ViTConfig:
    """SatMAE ViT image encoder (no cls token, no learned position table)."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        _check_fields(self, "vit.")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


@dataclass(frozen=True)
class HTSATConfig:
    """HTS-AT Swin audio encoder as used by MGA-CLAP."""

    mel_bins: int = 64
    spec_size: int = 256
    patch_size: int = 4
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 8
    mlp_ratio: float = 4.0
    num_classes: int = 527

    def __post_init__(self) -> None:
        _check_fields(self, "audio.")
        if len(self.num_heads) != len(self.depths):
            raise ConfigError(f"audio.num_heads {self.num_heads} must give one head count per stage of {self.depths}")

    @property
    def out_dim(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)


@dataclass(frozen=True)
class Sat2SoundConfig:
    """Everything that decides the shapes of a Sat2Sound model."""

    fc_dim: int = 1024
    codebook_dim: int = 1024
    codebook_size: int = 16000
    sat_type: str = "bingmap"
    metadata_type: str = "latlong_month_time_asource_tsource"
    text_dim: int = 1024
    fdt_temperature: float = 1000.0
    fusion_layers: int = 3
    fusion_heads: int = 8
    fusion_ff_dim: int = 2048
    metadata_hidden: int = 64
    combined_modality_loss: bool = True
    fdt_weight: float = 1.0
    pseudo_match_alpha: float = 0.1
    # Share of each metadata type dropped per training batch (upstream `meta_droprate`); never in evaluation.
    meta_droprate: float = 0.5
    vit: ViTConfig = field(default_factory=ViTConfig)
    audio: HTSATConfig = field(default_factory=HTSATConfig)

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.sat_type not in GSD_BY_SAT_TYPE:
            raise ConfigError(f"unknown sat_type {self.sat_type!r}; use one of {sorted(GSD_BY_SAT_TYPE)}")
        if not 0.0 <= self.meta_droprate <= 1.0:
            raise ConfigError(f"meta_droprate must be within [0, 1], got {self.meta_droprate}")
        unknown = set(self.metadata) - set(METADATA_ORDER)
        if unknown:
            raise ConfigError(
                f"unknown metadata {sorted(unknown)} in metadata_type {self.metadata_type!r};"
                f" use 'none' or names from {list(METADATA_ORDER)} joined by '_'"
            )

    @property
    def metadata(self) -> tuple[str, ...]:
        """Metadata token names in upstream token order; empty for 'none'."""
        if self.metadata_type in ("", "none"):
            return ()
        parts = set(self.metadata_type.split("_"))
        return tuple(name for name in METADATA_ORDER if name in parts) + tuple(sorted(parts - set(METADATA_ORDER)))

    @property
    def size(self) -> str:
        """ "full" for the reference's ViT image tower, "small" otherwise: what sets a map build's speed."""
        return "full" if self.vit == ViTConfig() else "small"

    @property
    def gsd(self) -> float:
        return GSD_BY_SAT_TYPE[self.sat_type]

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> Sat2SoundConfig:
        """Build the config from a checkpoint's `hyper_parameters`, reading only what shapes the model."""
        names = ("fc_dim", "codebook_dim", "codebook_size", "sat_type", "metadata_type")
        missing = [name for name in names if name not in hparams]
        if missing:
            raise ConfigError(
                f"hyper_parameters lack {missing}; this is not a Sat2Sound checkpoint"
                " (expected the Lightning hparams of mvrl/sat2sound)"
            )
        kwargs: dict[str, Any] = {name: hparams[name] for name in names}
        combined = hparams.get("combined_modality_loss", 1)
        kwargs["combined_modality_loss"] = bool(combined) if combined in (0, 1) else combined  # upstream's 0 or 1
        for name in ("fdt_weight", "pseudo_match_alpha", "meta_droprate"):
            if name in hparams:
                kwargs[name] = float(hparams[name]) if _is_number(hparams[name]) else hparams[name]
        return cls(**kwargs)

    @classmethod
    def small(cls, metadata_type: str = "latlong_month_time_asource_tsource") -> Sat2SoundConfig:
        """A few-MB model with the official structure, for tests and the untrained default build."""
        return cls(
            fc_dim=64,
            codebook_dim=64,
            codebook_size=256,
            metadata_type=metadata_type,
            text_dim=384,
            fusion_layers=1,
            fusion_heads=4,
            fusion_ff_dim=128,
            metadata_hidden=16,
            vit=ViTConfig(embed_dim=64, depth=2, num_heads=2),
            audio=HTSATConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4)),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> Sat2SoundConfig:
        """Inverse of `to_dict` (used by the safetensors + JSON checkpoint format)."""
        values = _fields_of(data, "config")
        vit = _fields_of(values.pop("vit", {}), "vit")
        audio = _fields_of(values.pop("audio", {}), "audio")
        for name in ("depths", "num_heads"):
            if isinstance(audio.get(name), list):
                audio[name] = tuple(audio[name])
        try:
            return cls(vit=ViTConfig(**vit), audio=HTSATConfig(**audio), **values)
        except TypeError as exc:
            raise ConfigError(f"bad model config ({exc}); regenerate it with 'python -m model convert'") from None

    def with_metadata(self, metadata_type: str) -> Sat2SoundConfig:
        return replace(self, metadata_type=metadata_type)


def _fields_of(data: object, where: str) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        kind = type(data).__name__
        raise ConfigError(
            f"{where} must be a mapping of fields, got {kind}; regenerate it with 'python -m model convert'"
        )
    return dict(data)

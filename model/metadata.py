"""Metadata (audio/caption source, location, month, hour): their encodings and the early-fusion
transformer that appends one token per metadata type after the image patch tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from model.config import AUDIO_SOURCES, CAPTION_SOURCES, HOURS, MONTHS, Sat2SoundConfig
from model.errors import InputError

FUSION_LAYERNORM_EPS = 1e-5
# Upstream encodes the hour with period 23, not 24; trained checkpoints expect it.
HOUR_PERIOD = 23.0
MONTH_PERIOD = 12.0
ENCODING_WIDTH = {"latlong": 4, "month": 2, "time": 2}


def encode_latlong(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """(N, 4) float32 [sin(pi*lat/90), cos(pi*lat/90), sin(pi*lon/180), cos(pi*lon/180)]."""
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    if np.any(np.abs(lat) > 90) or np.any(np.abs(lon) > 180):
        raise InputError("latitude must be within ±90° and longitude within ±180°; pass degrees in EPSG:4326")
    return np.stack(
        [
            np.sin(np.pi * lat / 90),
            np.cos(np.pi * lat / 90),
            np.sin(np.pi * lon / 180),
            np.cos(np.pi * lon / 180),
        ],
        axis=-1,
    ).astype(np.float32)


def _encode_cyclic(values: np.ndarray | None, period: float, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) float32 [sin, cos] and (N,) validity; missing values (None or negative) become [0, 0], invalid."""
    if values is None:
        return np.zeros((count, 2), np.float32), np.zeros(count, np.int64)
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    valid = values >= 0
    angle = 2 * np.pi * np.where(valid, values, 0.0) / period
    encoded = np.stack([np.sin(angle), np.cos(angle)], axis=-1) * valid[:, None]
    return encoded.astype(np.float32), valid.astype(np.int64)


@dataclass(frozen=True)
class Metadata:
    """Encoded metadata for a batch, in the exact form the fusion module consumes."""

    latlong: Tensor  # (B, 4)
    month: Tensor  # (B, 2)
    time: Tensor  # (B, 2)
    month_valid: Tensor  # (B,) 0/1
    time_valid: Tensor  # (B,) 0/1
    audio_source: Tensor  # (B,) int64
    caption_source: Tensor  # (B,) int64

    @classmethod
    def from_values(
        cls,
        lat: np.ndarray,
        lon: np.ndarray,
        month: np.ndarray | None = None,
        hour: np.ndarray | None = None,
        audio_source: str | Sequence[str] = AUDIO_SOURCES[0],
        caption_source: str | Sequence[str] = CAPTION_SOURCES[0],
    ) -> Metadata:
        """Encode raw values; month is 1-12, hour 0-23; None or -1 means unknown. A source is one name for
        the whole batch or one name per sample."""
        lat = np.atleast_1d(lat)
        count = len(lat)
        if month is not None and np.any((np.asarray(month) > MONTHS[-1]) | (np.asarray(month) == 0)):
            raise InputError(f"month must be {MONTHS[0]}-{MONTHS[-1]} (or -1 for unknown)")
        if hour is not None and np.any(np.asarray(hour) > HOURS[-1]):
            raise InputError(f"hour must be {HOURS[0]}-{HOURS[-1]} (or -1 for unknown)")
        month_enc, month_valid = _encode_cyclic(
            None if month is None else np.broadcast_to(month, count), MONTH_PERIOD, count
        )
        time_enc, time_valid = _encode_cyclic(
            None if hour is None else np.broadcast_to(hour, count), HOUR_PERIOD, count
        )
        return cls(
            latlong=torch.from_numpy(encode_latlong(lat, np.broadcast_to(lon, count))),
            month=torch.from_numpy(month_enc),
            time=torch.from_numpy(time_enc),
            month_valid=torch.from_numpy(month_valid),
            time_valid=torch.from_numpy(time_valid),
            audio_source=_source_indices(audio_source, AUDIO_SOURCES, count),
            caption_source=_source_indices(caption_source, CAPTION_SOURCES, count),
        )

    def to(self, device: torch.device | str) -> Metadata:
        return Metadata(**{name: getattr(self, name).to(device) for name in self.__dataclass_fields__})

    def __len__(self) -> int:
        return int(self.latlong.shape[0])


def _source_indices(given: str | Sequence[str], names: tuple[str, ...], count: int) -> Tensor:
    """(count,) int64 indices into `names` of one name for all samples or one name per sample."""
    per_sample = [given] * count if isinstance(given, str) else list(given)
    if len(per_sample) != count:
        raise InputError(f"got {len(per_sample)} source names for {count} samples; pass one name or one per sample")
    unknown = sorted(set(per_sample) - set(names))
    if unknown:
        raise InputError(f"unknown source {unknown[0]!r}; use one of {list(names)}")
    return torch.tensor([names.index(name) for name in per_sample], dtype=torch.int64)


def drop_metadata(valid: Tensor, rate: float, generator: torch.Generator | None = None) -> Tensor:
    """(B,) bool validity of one metadata type, with random rows made invalid until int(rate * B) are.

    Upstream's training-time metadata dropout: rows already invalid (an unknown month, say) count towards
    the quota, so a batch with that many unknowns loses nothing more.
    """
    quota = int(rate * len(valid)) - int((~valid).sum())
    if quota <= 0:
        return valid
    open_rows = torch.nonzero(valid).squeeze(1)
    order = torch.randperm(len(open_rows), generator=generator).to(valid.device)
    dropped = valid.clone()
    dropped[open_rows[order[:quota]]] = False
    return dropped


class SourceEmbedding(nn.Module):
    def __init__(self, count: int, dim: int) -> None:
        super().__init__()
        self.source_embed = nn.Embedding(count, dim)

    def forward(self, ids: Tensor) -> Tensor:
        return self.source_embed(ids)


class MetaMLP(nn.Module):
    def __init__(self, in_dim: int, hidden: int, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.gelu = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.gelu(self.fc1(x)))


class MetadataEmbedder(nn.Module):
    """One (B, dim) token per configured metadata type, each multiplied by its validity.

    In training mode each type also loses `cfg.meta_droprate` of the batch to `drop_metadata`, as upstream.
    """

    def __init__(self, cfg: Sat2SoundConfig) -> None:
        super().__init__()
        self.names = cfg.metadata
        self.droprate = cfg.meta_droprate
        dim, hidden = cfg.fc_dim, cfg.metadata_hidden
        if "asource" in self.names:
            self.audio_source_fc = SourceEmbedding(len(AUDIO_SOURCES), dim)
        if "tsource" in self.names:
            self.caption_source_fc = SourceEmbedding(len(CAPTION_SOURCES), dim)
        if "latlong" in self.names:
            self.location_fc = MetaMLP(ENCODING_WIDTH["latlong"], hidden, dim)
        if "month" in self.names:
            self.month_fc = MetaMLP(ENCODING_WIDTH["month"], hidden, dim)
        if "time" in self.names:
            self.time_fc = MetaMLP(ENCODING_WIDTH["time"], hidden, dim)

    def forward(self, meta: Metadata) -> tuple[Tensor, Tensor]:
        """Tokens (B, M, dim) and validity (B, M) bool."""
        always = torch.ones(len(meta), dtype=torch.bool, device=meta.latlong.device)
        parts: dict[str, tuple[Tensor, Tensor]] = {}
        if "asource" in self.names:
            parts["asource"] = (self.audio_source_fc(meta.audio_source), always)
        if "tsource" in self.names:
            parts["tsource"] = (self.caption_source_fc(meta.caption_source), always)
        if "latlong" in self.names:
            parts["latlong"] = (self.location_fc(meta.latlong), always)
        if "month" in self.names:
            parts["month"] = (self.month_fc(meta.month), meta.month_valid.bool())
        if "time" in self.names:
            parts["time"] = (self.time_fc(meta.time), meta.time_valid.bool())
        if self.training and self.droprate > 0:
            parts = {name: (token, drop_metadata(valid, self.droprate)) for name, (token, valid) in parts.items()}
        tokens = torch.stack([parts[name][0] * parts[name][1][:, None] for name in self.names], dim=1)
        valid = torch.stack([parts[name][1] for name in self.names], dim=1)
        return tokens, valid


class FusionLayer(nn.Module):
    """Post-norm transformer encoder layer (GELU), parameter names as `nn.TransformerEncoderLayer`."""

    def __init__(self, dim: int, heads: int, ff_dim: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.linear1 = nn.Linear(dim, ff_dim)
        self.linear2 = nn.Linear(ff_dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=FUSION_LAYERNORM_EPS)
        self.norm2 = nn.LayerNorm(dim, eps=FUSION_LAYERNORM_EPS)
        self.activation = nn.GELU()

    def forward(self, x: Tensor, padding: Tensor) -> Tensor:
        attended = self.self_attn(x, x, x, key_padding_mask=padding, need_weights=False)[0]
        x = self.norm1(x + attended)
        return self.norm2(x + self.linear2(self.activation(self.linear1(x))))


class FusionEncoder(nn.Module):
    def __init__(self, cfg: Sat2SoundConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            FusionLayer(cfg.fc_dim, cfg.fusion_heads, cfg.fusion_ff_dim) for _ in range(cfg.fusion_layers)
        )

    def forward(self, x: Tensor, padding: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, padding)
        if not self.training and _left_aligned(~padding):
            # Upstream evaluation runs nn.TransformerEncoder's nested-tensor path, which returns exact
            # zeros at padded positions whenever every row's valid tokens form a prefix. Trained
            # checkpoints were evaluated that way, and the zero tokens still enter the codebook pooling.
            x = x.masked_fill(padding[..., None], 0.0)
        return x


def _left_aligned(valid: Tensor) -> bool:
    """True when, in every row, the valid positions form a prefix."""
    return bool((valid.int().cummin(dim=1).values == valid.int()).all())


class MetaFuser(nn.Module):
    def __init__(self, cfg: Sat2SoundConfig) -> None:
        super().__init__()
        self.transformer_encoder = FusionEncoder(cfg)
        self.meta_embed = MetadataEmbedder(cfg)

    def forward(self, tokens: Tensor, meta: Metadata) -> Tensor:
        meta_tokens, meta_valid = self.meta_embed(meta)
        patch_valid = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        padding = ~torch.cat([patch_valid, meta_valid], dim=1)
        return self.transformer_encoder(torch.cat([tokens, meta_tokens.to(tokens.dtype)], dim=1), padding)


class SatMetaEncoder(nn.Module):
    """Early fusion: image tokens (B, N, D) + metadata -> (B, N + M, D) fused tokens."""

    def __init__(self, cfg: Sat2SoundConfig) -> None:
        super().__init__()
        self.meta_fuser = MetaFuser(cfg)

    def forward(self, tokens: Tensor, meta: Metadata) -> Tensor:
        return self.meta_fuser(tokens, meta)

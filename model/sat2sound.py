"""The Sat2Sound model: image, audio and text tokens pooled through one shared codebook.

Submodule and parameter names equal upstream's (`mvrl/sat2sound`), so official checkpoints load
with `strict=True`. The text backbone (Flan-T5) is not part of the checkpoint and lives outside.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from model.config import Sat2SoundConfig
from model.errors import InputError
from model.fdt import FDT, CodebookOutput
from model.htsat import HTSATAudioEncoder
from model.loss import LossOutput, pseudo_positive_loss, similarity
from model.metadata import Metadata, SatMetaEncoder
from model.vit import SatMAEBackbone

LOGIT_SCALE_INIT = float(np.log(1 / 0.07))
LOGIT_SCALE_NAMES = ("at", "it", "ia", "fdt")
# Saved by checkpoints trained with the combined image vs (audio + caption) term; `it_a` is never read.
COMBINED_LOGIT_SCALE_NAMES = ("i_at", "it_a")


@dataclass(frozen=True)
class Sat2SoundBatch:
    """One training/evaluation batch in model space (mel features and text hidden states precomputed)."""

    images: Tensor  # (B, 3, 224, 224) ImageNet-normalised
    zoom_level: Tensor  # (B,)
    mel: Tensor  # (B, 1, 1001, 64) log-mel
    audio_caption: tuple[Tensor, Tensor]  # hidden (B, T, text_dim), valid mask (B, T)
    image_caption: tuple[Tensor, Tensor]
    metadata: Metadata | None = None


class Sat2SoundOutput(NamedTuple):
    image: CodebookOutput
    audio: CodebookOutput
    audio_caption: CodebookOutput
    image_caption: CodebookOutput


class Sat2Sound(nn.Module):
    logit_scale_at: nn.Parameter
    logit_scale_it: nn.Parameter
    logit_scale_ia: nn.Parameter
    logit_scale_fdt: nn.Parameter
    logit_scale_i_at: nn.Parameter

    def __init__(self, cfg: Sat2SoundConfig) -> None:
        super().__init__()
        self.cfg = cfg
        names = LOGIT_SCALE_NAMES + (COMBINED_LOGIT_SCALE_NAMES if cfg.combined_modality_loss else ())
        for name in names:
            self.register_parameter(f"logit_scale_{name}", nn.Parameter(torch.tensor(LOGIT_SCALE_INIT)))
        self.satmae_backbone = SatMAEBackbone(cfg.vit, cfg.fc_dim)
        self.sat_encoder: nn.Module = SatMetaEncoder(cfg) if cfg.metadata else nn.Identity()
        self.audio_encoder = HTSATAudioEncoder(cfg.audio)
        self.fdt = FDT(cfg)

    def ground_sample_distance(self, zoom_level: Tensor | Sequence[float]) -> Tensor:
        """Per-sample GSD in metres: zoom level x the imagery type's GSD, product in float64 as upstream."""
        zoom = torch.as_tensor(zoom_level, dtype=torch.float64).reshape(-1)
        if torch.any(zoom <= 0):
            raise InputError("zoom_level must be positive (1 = the imagery's native resolution)")
        return (zoom * self.cfg.gsd).to(torch.float32)

    def patch_tokens(self, images: Tensor, zoom_level: Tensor | Sequence[float]) -> Tensor:
        """The ViT's patch tokens (B, 196, D): the part of `image_tokens` that metadata does not change."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.cfg.vit.img_size, self.cfg.vit.img_size):
            size = self.cfg.vit.img_size
            raise InputError(f"images must be (B, 3, {size}, {size}), got {tuple(images.shape)}")
        gsd = self.ground_sample_distance(zoom_level)
        if len(gsd) != len(images):
            raise InputError(f"got {len(gsd)} zoom levels for {len(images)} images; pass one per image")
        return self.satmae_backbone(images, gsd)

    def fuse(self, tokens: Tensor, meta: Metadata | None = None) -> Tensor:
        """Patch tokens (B, 196, D) with the metadata fused in: plus one token per metadata type when fused."""
        if not self.cfg.metadata:
            return tokens
        if meta is None:
            raise InputError(
                "this checkpoint fuses metadata: pass lat/lon (month and hour optional) or use a nometa checkpoint"
            )
        if len(meta) != len(tokens):
            raise InputError(f"got metadata for {len(meta)} samples and {len(tokens)} images")
        return self.sat_encoder(tokens, meta.to(tokens.device))

    def image_tokens(
        self, images: Tensor, zoom_level: Tensor | Sequence[float], meta: Metadata | None = None
    ) -> Tensor:
        """Tokens the codebook pools: (B, 196, D), plus one per metadata type when fused."""
        return self.fuse(self.patch_tokens(images, zoom_level), meta)

    def encode_image(
        self, images: Tensor, zoom_level: Tensor | Sequence[float], meta: Metadata | None = None
    ) -> CodebookOutput:
        return self.encode_patch_tokens(self.patch_tokens(images, zoom_level), meta)

    def encode_patch_tokens(self, tokens: Tensor, meta: Metadata | None = None) -> CodebookOutput:
        """`encode_image` from the images' `patch_tokens`: a sweep over metadata (months, hours) runs the ViT once
        and only this, the fusion transformer and the codebook pooling, per metadata."""
        return self.fdt.weigh(self.image_scores(tokens, meta))

    def image_scores(self, tokens: Tensor, meta: Metadata | None = None) -> Tensor:
        """The max-pooled codebook scores (B, K) of patch tokens, metadata fused in: `encode_patch_tokens` up to
        the sparsemax, which needs a host-side check (what `Sat2SoundEncoder(compiled=True)` compiles)."""
        return self.fdt.image_scores(self.fuse(tokens, meta))

    def encode_audio(self, mel: Tensor) -> CodebookOutput:
        return self.fdt.encode_audio(self.audio_encoder(mel))

    def encode_text(self, hidden: Tensor, valid: Tensor) -> CodebookOutput:
        if hidden.ndim != 3 or hidden.shape[-1] != self.cfg.text_dim:
            raise InputError(
                f"text hidden states must be (B, T, {self.cfg.text_dim}), got {tuple(hidden.shape)};"
                " use the text backbone the checkpoint was trained with"
            )
        return self.fdt.encode_text(hidden, valid.to(hidden.device))

    def forward(self, batch: Sat2SoundBatch) -> Sat2SoundOutput:
        return Sat2SoundOutput(
            image=self.encode_image(batch.images, batch.zoom_level, batch.metadata),
            audio=self.encode_audio(batch.mel),
            audio_caption=self.encode_text(*batch.audio_caption),
            image_caption=self.encode_text(*batch.image_caption),
        )

    def loss(self, out: Sat2SoundOutput) -> LossOutput:
        alpha = self.cfg.pseudo_match_alpha
        image, audio = out.image.embedding, out.audio.embedding
        caption, image_caption = out.audio_caption.embedding, out.image_caption.embedding
        logits = {
            "it": similarity(image, caption, self.logit_scale_it),
            "at": similarity(audio, caption, self.logit_scale_at),
            "ia": similarity(image, audio, self.logit_scale_ia),
        }
        multimodal = sum(pseudo_positive_loss(logits[name], alpha) for name in ("ia", "it", "at")) / 3
        if self.cfg.combined_modality_loss:
            logits["i_at"] = similarity(image, audio + caption, self.logit_scale_i_at)
            multimodal = multimodal + pseudo_positive_loss(logits["i_at"], alpha)
        logits["fdt"] = similarity(image, image_caption, self.logit_scale_fdt)
        fdt_loss = pseudo_positive_loss(logits["fdt"], alpha)
        assert isinstance(multimodal, Tensor)
        return LossOutput(multimodal + self.cfg.fdt_weight * fdt_loss, multimodal, fdt_loss, logits)

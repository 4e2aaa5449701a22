"""Batched inference: tiles, captions and audio clips to L2-normalised embeddings in the shared space.

Runs on CPU or CUDA; by default the encoders run under bf16 autocast on CUDA and in float32 on the CPU
(bf16/fp16 can be asked for on either), while the codebook pooling always stays in float32.
Everything runs under `torch.inference_mode`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from model.audio import load_audio
from model.checkpoint import load_model
from model.config import Sat2SoundConfig
from model.devices import pick_device
from model.errors import InputError, TextBackboneError
from model.fdt import CodebookOutput
from model.loss import l2_normalize
from model.mel import log_mel
from model.metadata import Metadata
from model.preprocess import to_model_input
from model.sat2sound import Sat2Sound
from model.text import TextBackbone, load_text_backbone
from model.text_specs import backbone_spec

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Embeddings(NamedTuple):
    """L2-normalised embeddings (B, D) and the sparse codebook weights (B, K) behind them, on the CPU."""

    embedding: Tensor
    weights: Tensor


class Concepts(NamedTuple):
    """L2-normalised embeddings (B, D) and each row's k largest codebook weights (B, k) with their codes (B, k,
    int32, -1 where the weight is 0), on the CPU."""

    embedding: Tensor
    concept_index: Tensor
    concept_weight: Tensor


def top_concepts(weights: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The codes (int32, -1 where the weight is 0) and weights of the k largest codebook weights per row, on the
    weights' device."""
    values, indices = torch.topk(weights, k, dim=1)
    return torch.where(values > 0, indices, -1).int(), values


def pick_precision(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; use one of {['auto', *PRECISIONS]}")
    return PRECISIONS[precision]


def _unit_rows(embedding: Tensor) -> Tensor:
    """L2-normalised float32 rows, on the host."""
    return l2_normalize(embedding.float()).cpu()


def _normalized(out: CodebookOutput) -> Embeddings:
    return Embeddings(_unit_rows(out.embedding), out.weights.float().cpu())


class Sat2SoundEncoder:
    """A loaded model plus its text backbone, with batched encode methods for the pipeline."""

    def __init__(
        self,
        model: Sat2Sound,
        text_backbone: TextBackbone | str = "auto",
        device: str = "auto",
        precision: str = "auto",
        provenance: dict[str, Any] | None = None,
        compiled: bool = False,
    ) -> None:
        self.device = pick_device(device)
        self.dtype = pick_precision(precision, self.device)
        self.model = model.to(self.device).eval()
        self._image_scores = self.model.image_scores
        if compiled:
            # The image path through torch.compile: the ViT in place (parameter names unchanged), then the
            # fusion and the codebook scores. Compiled for the first batch size, and once more with the batch
            # dimension dynamic at the second (a strip's last batch). On an H200 this beat compiling every
            # dimension dynamic from the start (7,781 against 7,160 images/s at batch 1,024).
            self.model.satmae_backbone.compile()
            self._image_scores = torch.compile(self.model.image_scores)
        self.provenance = provenance or {}
        self._text_backbone = None if isinstance(text_backbone, str) else text_backbone
        self._text_backbone_spec = text_backbone if isinstance(text_backbone, str) else text_backbone.name

    @classmethod
    def from_checkpoint(
        cls,
        source: str | os.PathLike[str],
        device: str = "auto",
        precision: str = "auto",
        text_backbone: str = "auto",
        compiled: bool = False,
    ) -> Sat2SoundEncoder:
        model, provenance = load_model(str(source))
        return cls(model, text_backbone, device=device, precision=precision, provenance=provenance, compiled=compiled)

    @property
    def cfg(self) -> Sat2SoundConfig:
        return self.model.cfg

    @property
    def text_backbone(self) -> TextBackbone:
        """Loaded on first use: map builds that score only audio queries never need it."""
        if self._text_backbone is None:
            spec = backbone_spec(self._text_backbone_spec, self.cfg.text_dim)
            self._text_backbone = load_text_backbone(spec, device=self.device)
        if self._text_backbone.dim != self.cfg.text_dim:
            raise TextBackboneError(
                f"text backbone {self._text_backbone.name} gives {self._text_backbone.dim}-d states but the "
                f"checkpoint expects {self.cfg.text_dim}-d; use the backbone it was trained with"
            )
        return self._text_backbone

    def _autocast(self) -> torch.autocast:
        return torch.autocast(device_type=self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    @torch.inference_mode()
    def embed_images(
        self, images: Tensor | np.ndarray, zoom_level: int | Sequence[float], metadata: Metadata | None = None
    ) -> Embeddings:
        """Tiles as uint8 RGB (B, 3, H, W) (resized to 224) or normalised float (B, 3, 224, 224)."""
        return _normalized(next(self._image_outputs(images, zoom_level, [metadata])))

    @torch.inference_mode()
    def image_concepts(
        self,
        images: Tensor | np.ndarray,
        zoom_level: int | Sequence[float],
        metadata: Sequence[Metadata | None],
        top_k: int,
    ) -> Iterator[Concepts]:
        """`embed_images` of the same tiles under each of `metadata` in turn (e.g. one per month and hour), yielded
        one at a time, with only each tile's `top_k` codebook weights, chosen on the model's device: what a map
        keeps, without carrying all K weights of every tile to the host. The ViT runs once, with the first; then
        only the fusion and the codebook pooling."""
        for out in self._image_outputs(images, zoom_level, metadata):
            index, weight = top_concepts(out.weights, top_k)
            yield Concepts(_unit_rows(out.embedding), index.cpu(), weight.float().cpu())

    def _image_outputs(
        self,
        images: Tensor | np.ndarray,
        zoom_level: int | Sequence[float],
        metadata: Sequence[Metadata | None],
    ) -> Iterator[CodebookOutput]:
        batch = torch.as_tensor(images).to(self.device)
        if batch.dtype == torch.uint8:
            batch = to_model_input(batch)
        zoom = [zoom_level] * len(batch) if isinstance(zoom_level, (int, float)) else list(zoom_level)
        with self._autocast():
            tokens = self.model.patch_tokens(batch, zoom)
        for meta in metadata:
            with self._autocast():  # `Sat2Sound.encode_patch_tokens`, the scores maybe compiled
                out = self.model.fdt.weigh(self._image_scores(tokens, meta))
            yield out

    def _encode_text(self, text: str) -> CodebookOutput:
        # One text per forward: upstream zeroes pad-token scores before the max-pool, so in a padded
        # batch a text's embedding would depend on the lengths of the other texts.
        tokens = self.text_backbone.encode([text])
        with self._autocast():
            return self.model.encode_text(tokens.hidden.to(self.device), tokens.mask.to(self.device))

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> Embeddings:
        if isinstance(texts, str) or not texts:
            raise InputError("embed_texts takes a non-empty list of strings; wrap a single text in a list")
        outputs = [self._encode_text(text) for text in texts]
        return _normalized(
            CodebookOutput(torch.cat([o.weights for o in outputs]), torch.cat([o.embedding for o in outputs]))
        )

    @torch.inference_mode()
    def embed_waveforms(self, waveforms: Tensor | np.ndarray) -> Embeddings:
        """Mono 32 kHz clips (B, 320000) in [-1, 1]."""
        mel = log_mel(torch.as_tensor(waveforms, dtype=torch.float32).to(self.device))
        with self._autocast():
            out = self.model.encode_audio(mel)
        return _normalized(out)

    def embed_audio(self, paths: Sequence[str | os.PathLike[str]]) -> Embeddings:
        """Audio files (wav/flac/ogg/mp3, any rate/channels), first 10 s of each."""
        return self.embed_waveforms(np.stack([load_audio(path) for path in paths]))

    @torch.inference_mode()
    def embed_composed(self, paths: Sequence[str | os.PathLike[str]], texts: Sequence[str]) -> Embeddings:
        """Audio + caption queries, composed as training does: normalise(audio + caption) of raw embeddings."""
        if len(paths) != len(texts):
            raise InputError(f"composed queries need one text per audio file, got {len(paths)} and {len(texts)}")
        mel = log_mel(torch.as_tensor(np.stack([load_audio(p) for p in paths])).to(self.device))
        with self._autocast():
            audio = self.model.encode_audio(mel)
        captions = [self._encode_text(text) for text in texts]
        combined = audio.embedding.float() + torch.cat([c.embedding for c in captions]).float()
        weights = (audio.weights + torch.cat([c.weights for c in captions])) / 2
        return Embeddings(_unit_rows(combined), weights.float().cpu())

"""Run the model on a file in the upstream parity-reference format (`in/...` arrays) and collect
every output the reference records: embeddings, codebook weights, losses, logits and token maps."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import DTypeLike
from torch import Tensor

from model.audio import N_MELS, fit_clip, resample
from model.config import AUDIO_SOURCES, CAPTION_SOURCES, Sat2SoundConfig
from model.errors import InputError
from model.mel import log_mel
from model.metadata import ENCODING_WIDTH, Metadata
from model.sat2sound import Sat2Sound, Sat2SoundBatch

# Codes kept for the token maps: every 125th code plus each sample's top codes by image weight.
TOKEN_MAP_CODE_STEP = 125
TOKEN_MAP_TOP_CODES = 8
INT16_SCALE = 32768.0


@dataclass(frozen=True)
class Kind:
    """What an input array's values must be: `text` in errors, of one of `dtypes`, within [low, high]."""

    text: str
    dtypes: tuple[DTypeLike, ...]
    low: int | None = None
    high: int | None = None


REAL = Kind("finite real numbers", (np.floating, np.integer))
FLAGS = Kind("0/1 flags", (np.bool_, np.integer), 0, 1)
INT16 = Kind("int16 samples (float audio times 32767, rounded)", (np.int16,))
HERTZ = Kind("whole number of Hz above 0", (np.integer,), 1)


def _indices(names: tuple[str, ...]) -> Kind:
    return Kind(f"indices 0 to {len(names) - 1} into {list(names)}", (np.integer,), 0, len(names) - 1)


def _input(arrays: Mapping[str, np.ndarray], name: str, shape: tuple[int | None, ...], kind: Kind) -> Tensor:
    """Array `name` as a tensor once it is shaped `shape` (None: any length) and of `kind`; InputError otherwise."""
    if name not in arrays:
        raise InputError(f"input file lacks '{name}'; write it in the parity-reference format (see README)")
    array = arrays[name]
    fits = array.ndim == len(shape) and all(want in (None, got) for got, want in zip(array.shape, shape, strict=True))
    if not fits or not any(np.issubdtype(array.dtype, dtype) for dtype in kind.dtypes):
        sizes = ", ".join("any" if size is None else str(size) for size in shape)
        must = f"({sizes}) {kind.text}" if shape else f"one {kind.text}"
        raise InputError(f"input array '{name}' is {array.dtype} {array.shape}; it must be {must}")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InputError(f"input array '{name}' holds NaN or infinite values; it must be {kind.text}")
    outside = (kind.low is not None and (array < kind.low).any()) or (
        kind.high is not None and (array > kind.high).any()
    )
    if array.size and outside:
        raise InputError(
            f"input array '{name}' holds values from {array.min()} to {array.max()}; it must be {kind.text}"
        )
    return torch.from_numpy(np.ascontiguousarray(array))


def reference_mel(arrays: Mapping[str, np.ndarray], samples: int, from_waveform: bool) -> Tensor:
    """Mel features as stored (`in/mel`) or computed from `in/waveform_int16` / 32768 at `in/sample_rate`."""
    if not from_waveform:
        return _input(arrays, "in/mel", (samples, 1, None, N_MELS), REAL).float()
    waveforms = _input(arrays, "in/waveform_int16", (samples, None), INT16).numpy().astype(np.float32) / INT16_SCALE
    rate = int(_input(arrays, "in/sample_rate", (), HERTZ))
    clips = np.stack([fit_clip(resample(waveform, rate)) for waveform in waveforms])
    return log_mel(torch.from_numpy(clips))


def reference_caption(arrays: Mapping[str, np.ndarray], samples: int, name: str) -> tuple[Tensor, Tensor]:
    """A caption's text hidden states `in/{name}_hidden` (samples, tokens, width) and their valid mask."""
    hidden = _input(arrays, f"in/{name}_hidden", (samples, None, None), REAL).float()
    return hidden, _input(arrays, f"in/{name}_mask", (samples, hidden.shape[1]), FLAGS).bool()


def reference_metadata(arrays: Mapping[str, np.ndarray], samples: int) -> Metadata:
    encoded = {
        name: _input(arrays, f"in/{name}", (samples, width), REAL).float() for name, width in ENCODING_WIDTH.items()
    }
    return Metadata(
        **encoded,
        month_valid=_input(arrays, "in/month_valid", (samples,), FLAGS).long(),
        time_valid=_input(arrays, "in/time_valid", (samples,), FLAGS).long(),
        audio_source=_input(arrays, "in/audio_source", (samples,), _indices(AUDIO_SOURCES)).long(),
        caption_source=_input(arrays, "in/caption_source", (samples,), _indices(CAPTION_SOURCES)).long(),
    )


def reference_batch(
    arrays: Mapping[str, np.ndarray], cfg: Sat2SoundConfig, from_waveform: bool = False
) -> Sat2SoundBatch:
    """The batch of a model of architecture `cfg` from `in/...` arrays; each array's shape, dtype and values are
    checked (one InputError naming the array and what it must be) before the mel features are computed, so that
    bad arrays are refused before the weights are loaded."""
    images = _input(arrays, "in/sat", (None, 3, None, None), REAL).float()
    samples = len(images)
    zoom_level = _input(arrays, "in/sat_zoom_level", (samples,), REAL)
    audio_caption = reference_caption(arrays, samples, "audio_caption")
    image_caption = reference_caption(arrays, samples, "llava_caption")
    metadata = reference_metadata(arrays, samples) if cfg.metadata else None
    return Sat2SoundBatch(
        images=images,
        zoom_level=zoom_level,
        mel=reference_mel(arrays, samples, from_waveform),
        audio_caption=audio_caption,
        image_caption=image_caption,
        metadata=metadata,
    )


def token_map_codes(image_weights: Tensor) -> Tensor:
    """Sorted union of every 125th code and each sample's top-8 codes by image codebook weight."""
    grid = torch.arange(0, image_weights.shape[1], TOKEN_MAP_CODE_STEP)
    top = image_weights.topk(TOKEN_MAP_TOP_CODES, dim=1).indices.reshape(-1)
    return torch.unique(torch.cat([grid, top]))


@torch.inference_mode()
def run_reference(model: Sat2Sound, batch: Sat2SoundBatch) -> dict[str, np.ndarray]:
    out = model(batch)
    losses = model.loss(out)
    image_tokens = model.image_tokens(batch.images, batch.zoom_level, batch.metadata)
    image_map = model.fdt.image_token_attention(image_tokens)
    caption_map = model.fdt.text_token_attention(*batch.image_caption)
    codes = token_map_codes(out.image.weights)
    best_code = caption_map.argmax(dim=-1)
    patches = model.cfg.vit.num_patches
    heatmap = torch.gather(image_map[:, :patches], 2, best_code[:, None, :].expand(-1, patches, -1)).transpose(1, 2)
    results: dict[str, Tensor] = {
        "ctotal": out.image.embedding,
        "fdt_sat_embeds": out.image.embedding,
        "audio_embeds": out.audio.embedding,
        "audio_caption_embeds": out.audio_caption.embedding,
        "fdt_txt_embeds": out.image_caption.embedding,
        "att_weight_img": out.image.weights,
        "att_weight_audio": out.audio.weights,
        "att_weight_audio_caption": out.audio_caption.weights,
        "att_weight_llava_caption": out.image_caption.weights,
        "loss": losses.loss,
        "multimodal_loss": losses.multimodal_loss,
        "fdt_loss": losses.fdt_loss,
        "mel": batch.mel,
        "token_att_codes": codes,
        "token_att_img": image_map[..., codes],
        "token_att_llava": caption_map[..., codes],
        "llava_token_best_code": best_code,
        "heatmap_llava_tokens": heatmap,
        **{f"logits_{name}": logits for name, logits in losses.logits.items()},
    }
    return {name: value.detach().cpu().numpy() for name, value in results.items()}

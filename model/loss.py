"""Sat2Sound's multi-task contrastive loss with pseudo-positives.

For a similarity matrix S, L(S) = clip(S, I) + alpha * clip(S, M'), where clip is the symmetric
soft-target cross-entropy and M' marks the diagonal plus every pair at least as similar as the
diagonal of its row (pseudo-positives). The total combines image-audio, image-caption and
audio-caption terms, the image vs (audio + caption) term and the codebook image-caption term.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

NORM_EPS = 1e-8


class LossOutput(NamedTuple):
    loss: Tensor
    multimodal_loss: Tensor
    fdt_loss: Tensor
    logits: dict[str, Tensor]


def l2_normalize(x: Tensor) -> Tensor:
    return x / (x.norm(p=2, dim=-1, keepdim=True) + NORM_EPS)


def similarity(a: Tensor, b: Tensor, logit_scale: Tensor) -> Tensor:
    return l2_normalize(a) @ l2_normalize(b).t() * logit_scale.exp()


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of -sum_j targets_ij * log_softmax(logits_i)_j (targets not renormalised), in float32 whatever
    the logits' precision."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


def symmetric_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    return 0.5 * soft_cross_entropy(logits, targets) + 0.5 * soft_cross_entropy(logits.t(), targets.t())


def pseudo_positive_loss(logits: Tensor, alpha: float) -> Tensor:
    identity = torch.eye(len(logits), device=logits.device, dtype=logits.dtype)
    with torch.no_grad():
        pseudo = ((logits >= logits.diagonal()[:, None]) | identity.bool()).to(logits.dtype)
    return symmetric_cross_entropy(logits, identity) + alpha * symmetric_cross_entropy(logits, pseudo)

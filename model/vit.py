"""SatMAE image branch: a ViT-B/16 without cls token or learned position table, whose 2-D sin-cos
positional encoding is scaled per sample by the ground sample distance (the ScaleMAE scheme),
followed by a per-token projector to `fc_dim`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ViTConfig

VIT_LAYERNORM_EPS = 1e-6
POS_EMBED_BASE = 10000.0


def resolution_pos_embed(embed_dim: int, grid_size: int, gsd: Tensor) -> Tensor:
    """(B, grid_size**2, embed_dim) sin-cos table with patch coordinates scaled by each sample's GSD.

    Token t = row * grid_size + col gets [sin(col*r*w), cos(col*r*w), sin(row*r*w), cos(row*r*w)]
    with w_k = 1 / 10000**(k / (embed_dim/4)); the column coordinate comes first.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim {embed_dim} must be divisible by 4 for a 2-D sin-cos embedding")
    quarter = embed_dim // 4
    device = gsd.device
    omega = torch.arange(quarter, dtype=torch.float32, device=device) / (embed_dim / 4.0)
    omega = 1.0 / POS_EMBED_BASE**omega
    coords = torch.arange(grid_size, dtype=torch.float32, device=device)
    scaled = gsd.to(torch.float32)[:, None] * coords[None, :]  # (B, G)
    col = scaled[:, None, :].expand(-1, grid_size, -1).reshape(len(gsd), -1)
    row = scaled[:, :, None].expand(-1, -1, grid_size).reshape(len(gsd), -1)

    def sincos(pos: Tensor) -> Tensor:
        angles = pos[..., None] * omega
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)

    return torch.cat([sincos(col), sincos(row)], dim=-1)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=VIT_LAYERNORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=VIT_LAYERNORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SatViT(nn.Module):
    """ViT trunk: patch embedding + GSD-scaled positional encoding + blocks, no final norm."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))

    def forward(self, images: Tensor, gsd: Tensor) -> Tensor:
        x = self.patch_embed(images)
        x = x + resolution_pos_embed(self.cfg.embed_dim, self.cfg.grid_size, gsd.to(x.device)).to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return x


class Projector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(in_dim, out_dim)
        self.linear2 = nn.Linear(out_dim, out_dim)
        self.gelu = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.gelu(self.linear1(x)))


class SatMAEBackbone(nn.Module):
    """Image tokens (B, num_patches, fc_dim) from ImageNet-normalised (B, 3, 224, 224) tiles."""

    def __init__(self, cfg: ViTConfig, fc_dim: int) -> None:
        super().__init__()
        self.backbone = SatViT(cfg)
        self.projector = Projector(cfg.embed_dim, fc_dim)

    def forward(self, images: Tensor, gsd: Tensor) -> Tensor:
        return self.projector(self.backbone(images, gsd))

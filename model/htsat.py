"""HTS-AT Swin audio encoder as MGA-CLAP uses it inside Sat2Sound.

Input: log-mel features (B, 1, T <= 1024, mel_bins) from `model.mel.log_mel`. Output: (B, 32, out_dim)
token hidden states taken from the locality-aware "value path" of the last Swin block: that block passes
the value projection of each token through `attn.proj` without attention mixing, adds its input, then
adds norm2 of the result (no MLP). Module names follow upstream, so the keys of
`HTSATAudioEncoder.state_dict()` are the upstream keys under `audio_encoder.` and official checkpoints
load with strict=True.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import HTSATConfig
from model.errors import InputError
from model.mel import dft_kernels, slaney_mel_filterbank
from model.vit import Mlp

# Additive attention mask between tokens that the cyclic shift made neighbours but that are not.
SWIN_MASK_FILL = -100.0
RELATIVE_BIAS_INIT_STD = 0.02


def relative_position_index(window_size: int) -> Tensor:
    """(ws², ws²) int64 index into the (2ws-1)² relative-bias table for every token pair of a window."""
    rows, cols = torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    row_offset = rows[:, None] - rows[None, :] + window_size - 1
    col_offset = cols[:, None] - cols[None, :] + window_size - 1
    return row_offset * (2 * window_size - 1) + col_offset


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """(B, H, W, C) -> (B, n_windows, ws², C), windows in row-major order."""
    batch, height, width, dim = x.shape
    x = x.view(batch, height // window_size, window_size, width // window_size, window_size, dim)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, -1, window_size * window_size, dim)


def window_merge(windows: Tensor, window_size: int, height: int, width: int) -> Tensor:
    """Inverse of `window_partition`: (B, n_windows, ws², C) -> (B, H, W, C)."""
    batch, _, _, dim = windows.shape
    x = windows.view(batch, height // window_size, width // window_size, window_size, window_size, dim)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, height, width, dim)


def shifted_window_mask(height: int, width: int, window_size: int, shift: int) -> Tensor:
    """(n_windows, ws², ws²) float mask: 0 where two tokens came from the same region before the cyclic
    shift, SWIN_MASK_FILL otherwise."""

    def band(size: int) -> Tensor:
        position = torch.arange(size)
        return (position >= size - window_size).long() + (position >= size - shift).long()

    region = band(height)[:, None] * 3 + band(width)[None, :]
    windows = window_partition(region[None, :, :, None], window_size)[0, :, :, 0]
    same_region = windows[:, None, :] == windows[:, :, None]
    return torch.where(same_region, 0.0, SWIN_MASK_FILL).to(torch.float32)


def _frozen_weight(tensor: Tensor) -> nn.ParameterDict:
    return nn.ParameterDict({"weight": nn.Parameter(tensor, requires_grad=False)})


class FrozenMelMatrices(nn.Module):
    """torchlibrosa's STFT kernels and mel filterbank, frozen, under upstream's key names.

    Sat2Sound computes log-mels outside the model (`model.mel.log_mel`, same values), so nothing reads
    these; they exist because official checkpoints store them and load with strict=True.
    """

    def __init__(self, mel_bins: int) -> None:
        super().__init__()
        real, imag = dft_kernels()
        stft = nn.ModuleDict({"conv_real": _frozen_weight(real), "conv_imag": _frozen_weight(imag)})
        self.mel_trans = nn.ModuleDict({"stft": stft})
        mel_matrix = nn.Parameter(slaney_mel_filterbank(n_mels=mel_bins), requires_grad=False)
        self.log_trans = nn.ParameterDict({"melW": mel_matrix})


class PatchEmbed(nn.Module):
    """Non-overlapping square patches of the 1-channel spectrogram image -> LayerNorm'd tokens."""

    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, image: Tensor) -> Tensor:
        return self.norm(self.proj(image).flatten(2).transpose(1, 2))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative-position bias."""

    def __init__(self, dim: int, window_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=RELATIVE_BIAS_INIT_STD)
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def relative_position_bias(self) -> Tensor:
        """(heads, ws², ws²) additive attention bias."""
        index = cast(Tensor, self.relative_position_index)
        tokens = index.shape[0]
        bias = self.relative_position_bias_table[index.flatten()].view(tokens, tokens, self.num_heads)
        return bias.permute(2, 0, 1)

    def forward(self, windows: Tensor, mask: Tensor | None) -> Tensor:
        """(B, n_windows, ws², C) -> same shape; `mask` is (n_windows, ws², ws²) or None."""
        batch, n_windows, tokens, dim = windows.shape
        qkv = self.qkv(windows).view(batch, n_windows, tokens, 3, self.num_heads, dim // self.num_heads)
        query, key, value = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)
        bias = self.relative_position_bias()
        if mask is not None:
            bias = bias + mask[:, None]
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=bias.to(query.dtype))
        return self.proj(attended.transpose(2, 3).reshape(batch, n_windows, tokens, dim))

    def project_values(self, tokens: Tensor) -> Tensor:
        """`proj` of each token's own value vector: the attention output with no mixing between tokens."""
        dim = tokens.shape[-1]
        values = F.linear(tokens, self.qkv.weight[2 * dim :], self.qkv.bias[2 * dim :])
        return self.proj(values)


class SwinBlock(nn.Module):
    """Pre-norm Swin block over a (H, W) token grid; odd blocks shift the windows by half a window."""

    attn_mask: Tensor | None

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        num_heads: int,
        window_size: int,
        shift: int,
        mlp_ratio: float,
    ) -> None:
        super().__init__()
        if min(resolution) <= window_size:
            # One window covers the whole grid: nothing to shift.
            window_size, shift = min(resolution), 0
        self.resolution = resolution
        self.window_size = window_size
        self.shift = shift
        mask = shifted_window_mask(*resolution, window_size, shift) if shift else None
        self.register_buffer("attn_mask", mask)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        batch, _, dim = x.shape
        height, width = self.resolution
        grid = self.norm1(x).view(batch, height, width, dim)
        if self.shift:
            grid = torch.roll(grid, shifts=(-self.shift, -self.shift), dims=(1, 2))
        attended = self.attn(window_partition(grid, self.window_size), self.attn_mask)
        grid = window_merge(attended, self.window_size, height, width)
        if self.shift:
            grid = torch.roll(grid, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + grid.reshape(batch, height * width, dim)
        return x + self.mlp(self.norm2(x))

    def value_path(self, x: Tensor) -> Tensor:
        """MGA-CLAP's locality-aware output. It is token-wise, so window shifts and partitions cancel out."""
        values = x + self.attn.project_values(self.norm1(x))
        return values + self.norm2(values)


class PatchMerging(nn.Module):
    """Halve the grid: concatenate each 2x2 neighbourhood (4C), LayerNorm, project to 2C."""

    def __init__(self, dim: int, resolution: tuple[int, int]) -> None:
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, _, dim = x.shape
        grid = x.view(batch, *self.resolution, dim)
        quads = (grid[:, 0::2, 0::2], grid[:, 1::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 1::2])
        return self.reduction(self.norm(torch.cat(quads, dim=-1).view(batch, -1, 4 * dim)))


class SwinStage(nn.Module):
    """Swin blocks at one resolution, followed by patch merging except in the last stage."""

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        downsample: bool,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, resolution, num_heads, window_size, window_size // 2 if i % 2 else 0, mlp_ratio)
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim, resolution) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x

    def value_path(self, x: Tensor) -> Tensor:
        """All blocks but the last on the main path, then the last block's value path."""
        for block in self.blocks[:-1]:
            x = block(x)
        values = cast(SwinBlock, self.blocks[-1]).value_path(x)
        return self.downsample(values) if self.downsample is not None else values


class HTSATSwin(nn.Module):
    """HTS-AT: log-mel -> spectrogram image -> 4 Swin stages -> value-path tokens grouped by time."""

    def __init__(self, config: HTSATConfig) -> None:
        super().__init__()
        self.config = config
        # The mel axis is stacked `freq_ratio` times to fill the square spectrogram image.
        self.freq_ratio = config.spec_size // config.mel_bins
        grid = config.spec_size // config.patch_size
        n_stages = len(config.depths)
        self.final_grid = grid // 2 ** (n_stages - 1)
        self.audio_feats_extractor = FrozenMelMatrices(config.mel_bins)
        self.bn0 = nn.BatchNorm2d(config.mel_bins)
        self.patch_embed = PatchEmbed(config.patch_size, config.embed_dim)
        self.layers = nn.ModuleList(
            SwinStage(
                dim=config.embed_dim * 2**i,
                resolution=(grid // 2**i, grid // 2**i),
                depth=config.depths[i],
                num_heads=config.num_heads[i],
                window_size=config.window_size,
                mlp_ratio=config.mlp_ratio,
                downsample=i < n_stages - 1,
            )
            for i in range(n_stages)
        )
        self.norm = nn.LayerNorm(config.out_dim)
        # HTS-AT's token-semantic classifier; never run by Sat2Sound, present for checkpoint parity.
        self.tscam_conv = nn.Conv2d(
            config.out_dim,
            config.num_classes,
            kernel_size=(self.final_grid // self.freq_ratio, 3),
            padding=(0, 1),
        )
        self.head = nn.Linear(config.num_classes, config.num_classes)

    @property
    def max_frames(self) -> int:
        return self.config.spec_size * self.freq_ratio

    def spectrogram_image(self, mel: Tensor) -> Tensor:
        """(B, 1, T, F) -> (B, 1, spec, spec): time stretched to `max_frames` (bicubic, align_corners),
        cut into `freq_ratio` chunks stacked along frequency (row = chunk * F + mel bin)."""
        batch, _, frames, mel_bins = mel.shape
        if frames < self.max_frames:
            mel = F.interpolate(mel, size=(self.max_frames, mel_bins), mode="bicubic", align_corners=True)
        chunks = mel.transpose(2, 3).reshape(batch, 1, mel_bins, self.freq_ratio, self.config.spec_size)
        return chunks.transpose(2, 3).reshape(batch, 1, self.config.spec_size, self.config.spec_size)

    def time_tokens(self, grid_tokens: Tensor) -> Tensor:
        """(B, G*G, C) final-grid tokens -> (B, freq_ratio*G, C): frequency rows of a chunk averaged."""
        batch, _, dim = grid_tokens.shape
        rows_per_chunk = self.final_grid // self.freq_ratio
        chunks = grid_tokens.view(batch, self.freq_ratio, rows_per_chunk, self.final_grid, dim)
        return chunks.mean(dim=2).reshape(batch, self.freq_ratio * self.final_grid, dim)

    def forward(self, mel: Tensor) -> Tensor:
        if mel.ndim != 4 or mel.shape[1] != 1 or mel.shape[3] != self.config.mel_bins:
            raise InputError(
                f"audio features must be (batch, 1, frames, {self.config.mel_bins}), got {tuple(mel.shape)};"
                " compute them with model.mel.log_mel"
            )
        if mel.shape[2] > self.max_frames:
            raise InputError(
                f"audio features have {mel.shape[2]} frames but HTS-AT takes at most {self.max_frames};"
                " cut the waveform to 10 s with model.audio.fit_clip"
            )
        # BatchNorm2d normalises over mel bins, so the bins go to the channel axis and back.
        x = self.bn0(mel.transpose(1, 3)).transpose(1, 3)
        tokens = self.patch_embed(self.spectrogram_image(x))
        *early_stages, last_stage = self.layers
        for stage in early_stages:
            tokens = stage(tokens)
        values = cast(SwinStage, last_stage).value_path(tokens)
        return self.time_tokens(self.norm(values))


class MGACLAPAudioEncoder(nn.Module):
    """MGA-CLAP's audio-encoder shell; it only adds the `audio_enc` level of the checkpoint key path."""

    def __init__(self, config: HTSATConfig) -> None:
        super().__init__()
        self.audio_enc = HTSATSwin(config)


class HTSATAudioEncoder(nn.Module):
    """Sat2Sound's audio branch: (B, 1, T, mel_bins) log-mel -> (B, 32, out_dim) token hidden states.

    State-dict keys are `model.audio_enc.…`, upstream's keys under `audio_encoder.`.
    """

    def __init__(self, config: HTSATConfig) -> None:
        super().__init__()
        self.config = config
        self.model = MGACLAPAudioEncoder(config)

    def forward(self, mel: Tensor) -> Tensor:
        return cast(Tensor, self.model.audio_enc(mel))

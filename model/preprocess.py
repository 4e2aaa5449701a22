"""Image preprocessing that matches Sat2Sound training: centre crop of zoom x tile px, resize to
224 px (bicubic, antialiased), scale to [0, 1] and ImageNet normalisation."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from model.config import MODEL_INPUT_PX
from model.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def center_crop(images: Tensor, size: int) -> Tensor:
    height, width = images.shape[-2:]
    if size > min(height, width):
        raise InputError(f"cannot crop {size} px from a {height}x{width} image; fetch a larger footprint")
    top, left = (height - size) // 2, (width - size) // 2
    return images[..., top : top + size, left : left + size]


def resize_to_unit(images: Tensor | np.ndarray, size: int = MODEL_INPUT_PX) -> Tensor:
    """uint8 RGB (B, 3, H, W) -> float32 (B, 3, size, size) in [0, 1], resized bicubic with antialiasing."""
    batch = torch.as_tensor(images)
    if batch.ndim == 3:
        batch = batch[None]
    if batch.ndim != 4 or batch.shape[1] != 3 or batch.dtype != torch.uint8:
        raise InputError(f"images must be uint8 RGB shaped (B, 3, H, W), got {tuple(batch.shape)} {batch.dtype}")
    # Each step works in place on the one fresh copy: a batch is tens of MB, and memory sets the pace here.
    pixels = batch.float().div_(255.0)
    if tuple(pixels.shape[-2:]) != (size, size):
        pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        pixels = pixels.clamp_(0.0, 1.0)
    return pixels


def normalize(pixels: Tensor) -> Tensor:
    """ImageNet normalisation of float (B, 3, H, W) pixels in [0, 1]."""
    return _normalize_in_place(pixels.clone())


def _normalize_in_place(pixels: Tensor) -> Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=pixels.device).view(1, 3, 1, 1)
    return pixels.sub_(mean).div_(std)


def to_model_input(images: Tensor | np.ndarray, size: int = MODEL_INPUT_PX) -> Tensor:
    """uint8 RGB (B, 3, H, W) -> float32 (B, 3, size, size), resized and ImageNet-normalised."""
    return _normalize_in_place(resize_to_unit(images, size))

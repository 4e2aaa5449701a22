"""Which torch device a `device` setting names, and whether this machine has it.

Kept apart from `model.inference` so that a program can check a device without importing the text encoders.
"""

from __future__ import annotations

import torch

from model.errors import InputError

DEVICE_FORMS = "auto, cpu, cuda, cuda:N or mps"


def cuda_devices() -> int:
    """The CUDA devices this process sees (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pick_device(device: str = "auto") -> torch.device:
    """The device `device` names; "auto" is CUDA when available, else the CPU.

    Raises InputError for a name torch does not know, a kind of device this package does not run on, and a
    device this machine does not have."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}; use {DEVICE_FORMS}") from None
    if chosen.type == "cuda":
        count = cuda_devices()
        if count == 0:
            raise InputError(f"device {device!r}: CUDA is not available on this machine; use auto or cpu")
        if chosen.index is not None and chosen.index >= count:
            raise InputError(
                f"device {device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1};"
                " use one of them or auto"
            )
    elif chosen.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"device {device!r}: Apple's MPS is not available on this machine; use auto or cpu")
    elif chosen.type != "cpu":
        raise InputError(f"device {device!r} is not supported; use {DEVICE_FORMS}")
    return chosen

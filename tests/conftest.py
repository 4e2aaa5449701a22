"""Session fixtures for checkpoint and output parity with the upstream Sat2Sound code."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from support.upstream_ckpt import MANIFEST_PATH, build_state_dict, load_manifest, write_checkpoint

PARITY_PATH = Path(__file__).parent / "data" / "parity_public.npz"


@pytest.fixture(scope="session")
def parity() -> dict[str, np.ndarray]:
    """Inputs, intermediates and reference outputs of tests/data/parity_public.npz, keyed like the file."""
    with np.load(PARITY_PATH) as archive:
        return dict(archive)


@pytest.fixture(scope="session")
def manifest() -> dict[str, Any]:
    return load_manifest(MANIFEST_PATH)


@pytest.fixture(scope="session")
def upstream_state_dict(manifest: dict[str, Any]) -> Callable[[str], OrderedDict[str, torch.Tensor]]:
    """`fn(config_name)` -> the synthetic upstream state dict, built once per config per session.

    The tensors are shared by every test of the session: treat them as read-only (clone before editing).
    """

    @cache
    def build(config_name: str) -> OrderedDict[str, torch.Tensor]:
        return build_state_dict(config_name, manifest)

    return build


@pytest.fixture(scope="session")
def upstream_ckpt_path(manifest: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`fn(config_name)` -> path of the synthetic upstream .ckpt (~600 MB), written on first use only."""
    folder = tmp_path_factory.mktemp("upstream_ckpt")

    @cache
    def write(config_name: str) -> Path:
        return write_checkpoint(config_name, folder / f"{config_name}.ckpt", manifest)

    return write

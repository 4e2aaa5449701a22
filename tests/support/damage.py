"""Files damaged the way disks and interrupted copies damage them, for tests of what a build refuses."""

from __future__ import annotations

from pathlib import Path

GARBAGE = b"\xff" * 4096  # 0xFF bytes read as NaN in float tensors


def overwritten_copy(checkpoint: Path, target: Path) -> Path:
    """A copy of a safetensors checkpoint (and its .json sidecar) with 4 KiB in the middle overwritten."""
    for suffix in (".safetensors", ".json"):
        target.with_suffix(suffix).write_bytes(checkpoint.with_suffix(suffix).read_bytes())
    with open(target, "r+b") as weights:
        weights.seek(target.stat().st_size // 2)
        weights.write(GARBAGE)
    return target

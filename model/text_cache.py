"""The frozen text backbone's token states, cached on disk by content hash.

Training encodes every caption of every batch; the backbone never changes, so each distinct text is run
once and its states (T, dim), float16, are kept as `<folder>/<hash[:2]>/<hash>.npy`, where the hash covers
the backbone's name and the text. Epochs after the first never run the backbone. A batch is padded to its
longest text, as upstream pads it, with a mask of the real tokens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from common.atomic import atomic_path
from model.text import TextBackbone, TextTokens

CACHE_DTYPE = np.float16


def text_key(backbone_name: str, text: str) -> str:
    return hashlib.sha256(f"{backbone_name}\0{text}".encode()).hexdigest()


class TextCache:
    """`encode(texts)` like a backbone's, served from disk after a text's first use.

    `load` builds the backbone named `name` (of `dim`-d states) on the first text not yet cached, so a run
    whose captions are all cached never loads it.
    """

    def __init__(self, name: str, dim: int, load: Callable[[], TextBackbone], folder: Path) -> None:
        self.name = name
        self.dim = dim
        self.folder = folder
        self._load = load
        self._backbone: TextBackbone | None = None
        self.hits = 0
        self.misses = 0

    @property
    def backbone(self) -> TextBackbone:
        if self._backbone is None:
            self._backbone = self._load()
        return self._backbone

    def _path(self, text: str) -> Path:
        key = text_key(self.name, text)
        return self.folder / key[:2] / f"{key}.npy"

    def _states(self, texts: Sequence[str]) -> list[np.ndarray]:
        states: dict[str, np.ndarray] = {}
        missing: list[str] = []
        distinct = dict.fromkeys(texts)
        for text in distinct:
            path = self._path(text)
            if path.is_file():
                states[text] = np.load(path)
            else:
                missing.append(text)
        self.hits += len(distinct) - len(missing)
        self.misses += len(missing)
        if missing:
            tokens = self.backbone.encode(missing)
            hidden = tokens.hidden.float().cpu().numpy().astype(CACHE_DTYPE)
            lengths = tokens.mask.sum(dim=1).tolist()
            for text, row, length in zip(missing, hidden, lengths, strict=True):
                states[text] = row[:length]
                with atomic_path(self._path(text)) as tmp, tmp.open("wb") as handle:
                    np.save(handle, states[text])
        return [states[text] for text in texts]

    def encode(self, texts: Sequence[str]) -> TextTokens:
        states = self._states(texts)
        longest = max(len(state) for state in states)
        hidden = torch.zeros(len(states), longest, self.dim, dtype=torch.float32)
        mask = torch.zeros(len(states), longest, dtype=torch.bool)
        for row, state in enumerate(states):
            hidden[row, : len(state)] = torch.from_numpy(state.astype(np.float32))
            mask[row, : len(state)] = True
        return TextTokens(hidden=hidden, mask=mask)

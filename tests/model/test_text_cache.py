"""The text backbone's states are cached by content: a text runs through the backbone once, ever."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from model.text import TextTokens
from model.text_cache import TextCache, text_key


class CountingBackbone:
    """Token states that depend on the text alone (length = word count), counting every text encoded."""

    name = "counting"
    dim = 4

    def __init__(self) -> None:
        self.encoded: list[str] = []

    def encode(self, texts: Sequence[str]) -> TextTokens:
        self.encoded.extend(texts)
        longest = max(len(text.split()) for text in texts)
        hidden = torch.zeros(len(texts), longest, self.dim)
        mask = torch.zeros(len(texts), longest, dtype=torch.bool)
        for row, text in enumerate(texts):
            for col, word in enumerate(text.split()):
                hidden[row, col] = torch.tensor([len(word), col, 1.5, -len(text)])
                mask[row, col] = True
        return TextTokens(hidden, mask)

    def to(self, device: torch.device | str) -> CountingBackbone:
        return self


def make_cache(folder: Path) -> tuple[TextCache, CountingBackbone]:
    backbone = CountingBackbone()
    return TextCache(backbone.name, backbone.dim, lambda: backbone, folder), backbone


def test_each_text_is_encoded_once_across_batches_and_processes(tmp_path: Path) -> None:
    cache, backbone = make_cache(tmp_path)
    first = cache.encode(["birds in trees", "rain", "birds in trees"])
    assert backbone.encoded == ["birds in trees", "rain"]
    again, backbone_again = make_cache(tmp_path)
    second = again.encode(["rain", "birds in trees", "rain"])
    assert backbone_again.encoded == []
    assert again.hits == 2 and again.misses == 0
    assert torch.equal(second.hidden[1], first.hidden[0])
    assert torch.equal(second.mask[0, :1], torch.tensor([True]))


def test_batches_are_padded_to_the_longest_text_with_a_mask(tmp_path: Path) -> None:
    cache, backbone = make_cache(tmp_path)
    tokens = cache.encode(["a b c", "d"])
    reference = backbone.encode(["a b c", "d"])
    assert tokens.hidden.shape == (2, 3, 4) and tokens.hidden.dtype == torch.float32
    assert tokens.mask.tolist() == [[True, True, True], [True, False, False]]
    assert torch.allclose(tokens.hidden[tokens.mask], reference.hidden[reference.mask], atol=1e-2)
    assert torch.all(tokens.hidden[~tokens.mask] == 0)


def test_the_key_covers_backbone_and_text(tmp_path: Path) -> None:
    assert text_key("a", "x") != text_key("b", "x") != text_key("a", "y")
    cache, _ = make_cache(tmp_path)
    cache.encode(["water"])
    files = list(tmp_path.rglob("*.npy"))
    assert [path.stem for path in files] == [text_key("counting", "water")]
    assert np.load(files[0]).dtype == np.float16


def test_a_fully_cached_run_never_loads_the_backbone(tmp_path: Path) -> None:
    make_cache(tmp_path)[0].encode(["water"])

    def refuse() -> CountingBackbone:
        raise AssertionError("the backbone was loaded although every text is cached")

    cache = TextCache("counting", 4, refuse, tmp_path)
    assert cache.encode(["water"]).hidden.shape == (1, 1, 4)
    with pytest.raises(AssertionError, match="loaded"):
        cache.encode(["new text"])

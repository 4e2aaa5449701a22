"""Embedding a chunk: model batches regrouped from the loader's, and the concepts kept per tile."""

from __future__ import annotations

import pytest
import torch

from pipeline.embed import model_batches, top_concepts


def test_top_concepts_mark_empty_ranks_with_minus_one() -> None:
    weights = torch.tensor([[0.0, 0.7, 0.3, 0.0], [0.25, 0.25, 0.25, 0.25]])
    indices, values = top_concepts(weights, 3)
    assert indices[0].tolist() == [1, 2, -1] and values[0].tolist() == pytest.approx([0.7, 0.3, 0.0])
    assert len(set(indices[1].tolist())) == 3 and values[1].tolist() == pytest.approx([0.25] * 3)


def test_loader_batches_are_regrouped_into_model_batches_in_order() -> None:
    loader = [(torch.arange(start, start + 3), torch.full((3,), float(start))) for start in range(0, 30, 3)]
    batches = list(model_batches(loader, 7))
    assert [len(pixels) for pixels, _ in batches] == [7, 7, 7, 7, 2]
    assert torch.equal(torch.cat([pixels for pixels, _ in batches]), torch.arange(30))
    assert torch.equal(
        torch.cat([coverage for _, coverage in batches]),
        torch.arange(30).div(3, rounding_mode="floor").mul(3).float(),
    )

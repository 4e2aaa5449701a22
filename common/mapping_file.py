"""Settings files (build and training configs) read one way: UTF-8 JSON or YAML text that holds a mapping, as
Snakemake reads a --configfile (JSON first, then YAML); anything else is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from common.errors import Sat2SoundError, first_line


def read_mapping(path: Path, what: str, fix: str, error: type[Sat2SoundError]) -> dict[str, Any]:
    """The mapping in the file at `path`; `error` names it as `what` and says `fix` when the file is missing,
    is not UTF-8 JSON or YAML, or holds something else than a mapping."""
    if not path.is_file():
        raise error(f"{what} {path} does not exist; {fix}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{what} {path} cannot be read as UTF-8 text ({type(exc).__name__}); {fix}") from None
    try:
        loaded = json.loads(text)
    except ValueError:
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise error(f"{what} {path} is not valid YAML ({first_line(exc)}); {fix}") from None
    if not isinstance(loaded, dict):
        raise error(f"{what} {path} holds no mapping of keys to values; {fix}")
    return loaded

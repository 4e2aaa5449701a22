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
    is not UTF-8 JSON or YAML, or holds something else than a mapping (a folder is refused as one)."""
    if path.is_dir():
        raise error(f"{what} {path} is a folder; give the YAML file itself, not its folder")
    if not path.is_file():
        raise error(f"{what} {path} does not exist; {fix}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{what} {path} cannot be read as UTF-8 text ({type(exc).__name__}); {fix}") from None
    try:
        try:
            loaded = json.loads(text, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError:
            loaded = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise error(f"{what} {path} is not valid YAML ({first_line(exc)}); {fix}") from None
    except DuplicateKeyError as exc:
        raise error(f"{what} {path} gives {exc} twice, and only the last would count; keep one") from None
    if not isinstance(loaded, dict):
        raise error(f"{what} {path} holds no mapping of keys to values; {fix}")
    return loaded


class DuplicateKeyError(ValueError):
    """A key given twice in one mapping: the message is the key."""


def _unique_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    keys = [key for key, _ in pairs]
    twice = next((key for index, key in enumerate(keys) if key in keys[:index]), None)
    if twice is not None:
        raise DuplicateKeyError(repr(twice))
    return dict(pairs)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that names a key twice (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # The mapping's own keys; those a merge (<<) brings in may be overridden, as YAML allows.
        own = [key for key, _ in node.value if key.tag != "tag:yaml.org,2002:merge"]
        seen: list[Any] = []
        for key_node in own:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise DuplicateKeyError(f"{key!r} (line {key_node.start_mark.line + 1})")
            seen.append(key)
        return super().construct_mapping(node, deep=deep)

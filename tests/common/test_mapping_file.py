"""common.mapping_file: settings files read as Snakemake reads a --configfile, refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import Sat2SoundError
from common.mapping_file import read_mapping


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "settings.yaml does not exist; the fix"),
        ("", "settings.yaml holds no mapping of keys to values; the fix"),
        ("- 1\n- 2\n", "settings.yaml holds no mapping of keys to values; the fix"),
        ("a: [1,\n", "settings.yaml is not valid YAML (while parsing a flow node); the fix"),
        (b"\xff\xfe", "settings.yaml cannot be read as UTF-8 text (UnicodeDecodeError); the fix"),
    ],
)
def test_a_file_that_holds_no_mapping_is_refused_in_one_line(
    content: str | bytes | None, problem: str, tmp_path: Path
) -> None:
    path = tmp_path / "settings.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(Sat2SoundError) as refused:
        read_mapping(path, "the file", "the fix", Sat2SoundError)
    assert str(refused.value) == f"the file {path.parent / problem}"


@pytest.mark.parametrize(
    ("content", "mapping"),
    [
        ('{"name":\t"x", "n": [1, 2]}', {"name": "x", "n": [1, 2]}),  # JSON with a tab, which YAML refuses
        ("name: x\nn: [1, 2]\n", {"name": "x", "n": [1, 2]}),
    ],
)
def test_json_and_yaml_mappings_are_read(content: str, mapping: dict[str, object], tmp_path: Path) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text(content)
    assert read_mapping(path, "the file", "the fix", Sat2SoundError) == mapping

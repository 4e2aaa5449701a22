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


@pytest.mark.parametrize(
    ("content", "key"),
    [
        ("name: x\nqueries: [1]\nn: 2\nqueries: [2]\n", "'queries' (line 4)"),
        ("model:\n  device: cpu\n  device: cuda\n", "'device' (line 3)"),
        ('{"name": "x", "name": "y"}', "'name'"),
    ],
)
def test_a_key_given_twice_is_refused_where_the_last_would_silently_count(
    content: str, key: str, tmp_path: Path
) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text(content)
    with pytest.raises(Sat2SoundError) as refused:
        read_mapping(path, "the file", "the fix", Sat2SoundError)
    assert str(refused.value) == f"the file {path} gives {key} twice, and only the last would count; keep one"


def test_keys_a_yaml_merge_brings_in_may_be_overridden(tmp_path: Path) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text("base: &base {device: cpu, batch_size: 8}\nmodel:\n  <<: *base\n  device: cuda\n")
    assert read_mapping(path, "the file", "the fix", Sat2SoundError)["model"] == {"device": "cuda", "batch_size": 8}

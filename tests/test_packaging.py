"""environment.yml (conda, for clusters) and pyproject.toml (pip) must list the same dependencies."""

from __future__ import annotations

import re
import tomllib

import yaml
from support.paths import REPO as ROOT

# conda-forge names of packages whose PyPI name differs.
CONDA_TO_PYPI = {
    "pytorch": "torch",
    "huggingface_hub": "huggingface-hub",
    "pysoundfile": "soundfile",
    "soxr-python": "soxr",
}
CONDA_ONLY = {"python", "pip"}


def split_requirement(spec: str) -> tuple[str, str]:
    match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*(.*)", spec)
    assert match, f"unparsable requirement {spec!r}"
    return match.group(1).lower(), match.group(2).replace(" ", "")


def pyproject_requirements() -> dict[str, str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return dict(split_requirement(spec) for spec in data["project"]["dependencies"])


def environment_requirements() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    found: dict[str, str] = {}
    for entry in env["dependencies"]:
        specs = entry["pip"] if isinstance(entry, dict) else [entry]
        for spec in specs:
            name, version = split_requirement(spec)
            if name not in CONDA_ONLY:
                found[CONDA_TO_PYPI.get(name, name)] = version
    return found


def test_environment_and_pyproject_list_the_same_dependencies() -> None:
    assert environment_requirements() == pyproject_requirements()

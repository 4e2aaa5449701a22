"""The code stays lint-clean, type-checks (ruff and mypy with the settings in pyproject.toml) and keeps its layers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from support.paths import REPO as ROOT


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, check=False)


def test_ruff_finds_nothing() -> None:
    result = run_tool("ruff", "check", "common", "model", "pipeline", "tests", "benchmarks", "docs")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_finds_nothing() -> None:
    result = run_tool("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


# Each layer and the packages of ours it may import; a layer may always import itself.
LAYERS = {
    "common": set(),
    "model": {"common"},
    "pipeline/errors.py": {"common"},
    "pipeline/geometry.py": {"pipeline.errors"},
    "pipeline/regions.py": {"common", "pipeline.errors", "pipeline.geometry"},
    "pipeline/zone_file.py": {"common", "pipeline.config", "pipeline.errors", "pipeline.geometry", "pipeline.regions"},
    "pipeline/imagery": {"common", "pipeline.errors", "pipeline.geometry"},
    "pipeline/views.py": {"pipeline.errors", "pipeline.geometry", "pipeline.imagery"},
    "pipeline/launch.py": {"common"},
    "pipeline/vectors.py": {"common"},
    "pipeline/search.py": {"common", "pipeline.errors", "pipeline.store", "pipeline.vectors"},
    "pipeline/store": {
        "common",
        "model",
        "pipeline.config",
        "pipeline.errors",
        "pipeline.geometry",
        "pipeline.model_setup",
        "pipeline.plan",
        "pipeline.queries",
        "pipeline.regions",
    },
}
OURS = ("common", "model", "pipeline")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {name for name in names if name.split(".")[0] in OURS}


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_low_layers_import_nothing_above_them(layer: str) -> None:
    root = ROOT / layer
    files = [root] if root.suffix == ".py" else sorted(root.rglob("*.py"))
    own = layer.removesuffix(".py").replace("/", ".")
    allowed = (*LAYERS[layer], own)
    for path in files:
        for name in imported_modules(path):
            assert name == own or name.startswith(tuple(f"{prefix}." for prefix in allowed)) or name in allowed, (
                f"{path.relative_to(ROOT)} imports {name}"
            )


# Modules that build jobs import, and a heavy library each must not pull in: every job is a fresh process, and
# each of these imports costs seconds of its start-up (a map's export jobs, an image-only embed job).
NOT_IMPORTED = {
    "pipeline.export.cog": ("torch", "dask"),
    "pipeline.export.places": ("torch", "dask"),
    "pipeline.export.zones": ("torch", "dask"),
    "pipeline.export.underlay": ("torch", "dask"),
    "pipeline.export.qgis_project": ("torch", "dask"),
    "pipeline.export.preview": ("torch", "dask"),
    "model.audio": ("torch",),
    "pipeline.store.read": ("torch", "dask"),
    "pipeline.gallery": ("torch", "huggingface_hub"),
    "pipeline.plan": ("torch", "geopandas"),
    "model.inference": ("transformers",),
    "model.hub": ("huggingface_hub", "httpx2"),  # every job resolves its checkpoint, most a local file
    "pipeline.zone_file": ("torch", "zarr", "rio_cogeo"),  # a build's start checks the zone file
}


@pytest.mark.parametrize("module", sorted(NOT_IMPORTED))
def test_a_job_module_does_not_import_a_heavy_library_it_does_not_use(module: str) -> None:
    heavy = NOT_IMPORTED[module]
    check = f"import sys, {module}; print([name for name in {heavy!r} if name in sys.modules])"
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", f"importing {module} imports {result.stdout.strip()}"

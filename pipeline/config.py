"""The map build's config: checked against config/schema.json, defaults filled in, turned into typed settings.

Every problem becomes one `BuildConfigError` line naming the key and the fix.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

from pipeline.errors import BuildConfigError

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "config" / "schema.json"
DEFAULT_CONFIG_PATH = SCHEMA_PATH.with_name("config.yaml")
UNTRAINED = "untrained"


@dataclass(frozen=True)
class ImagerySettings:
    source: str
    options: Mapping[str, Any]
    cache_dir: str
    offline: bool
    native_gsd_m: float | None
    min_coverage: float


@dataclass(frozen=True)
class ModelSettings:
    checkpoint: str
    sat_type: str
    metadata_type: str
    seed: int
    zoom_level: int
    month: int | None
    hour: int | None
    text_backbone: str
    device: str
    precision: str
    batch_size: int
    loader_workers: int

    @property
    def untrained(self) -> bool:
        return self.checkpoint == UNTRAINED


@dataclass(frozen=True)
class TilingSettings:
    tile_zoom_offset: int
    chunk_zoom: int | None
    max_tiles: int


@dataclass(frozen=True)
class Query:
    """A text query, an audio query, or both at once (a composed query)."""

    id: str
    text: str | None = None
    audio: str | None = None

    @property
    def kind(self) -> str:
        if self.audio is None:
            return "text"
        return "audio" if self.text is None else "composed"

    @property
    def label(self) -> str:
        """What a map reader sees as the query's name."""
        if self.audio is None:
            return str(self.text)
        name = Path(self.audio).name
        return name if self.text is None else f"{name} + {self.text}"


@dataclass(frozen=True)
class OutputSettings:
    concepts_top_k: int
    crs: str | None
    zarr_chunk_px: int


@dataclass(frozen=True)
class BuildConfig:
    name: str
    output_dir: str
    region: str
    imagery: ImagerySettings
    model: ModelSettings
    tiling: TilingSettings
    queries: tuple[Query, ...]
    outputs: OutputSettings
    raw: Mapping[str, Any]

    @property
    def build_dir(self) -> Path:
        return Path(self.output_dir) / self.name


@cache
def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def with_defaults(config: Mapping[str, Any], schema: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A copy of `config` with every missing key that has a schema default filled in, recursively."""
    schema = _schema() if schema is None else schema
    filled = dict(config)
    for key, sub_schema in schema.get("properties", {}).items():
        if key not in filled and "default" in sub_schema:
            filled[key] = json.loads(json.dumps(sub_schema["default"]))
        if isinstance(filled.get(key), Mapping) and "properties" in sub_schema:
            filled[key] = with_defaults(filled[key], sub_schema)
    return filled


def _describe(error: ValidationError) -> str:
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error.absolute_path)
    message = " ".join(error.message.split())
    return f"config{where}: {message}; see {SCHEMA_PATH.relative_to(SCHEMA_PATH.parents[1])}"


def load_build_config(config: Mapping[str, Any]) -> BuildConfig:
    """Validate a config mapping (as Snakemake loaded it) and return typed settings with defaults."""
    if not config:
        raise BuildConfigError(f"the config is empty; pass --configfile {DEFAULT_CONFIG_PATH.name} or another file")
    filled = with_defaults(config)
    error = best_match(Draft202012Validator(_schema()).iter_errors(filled))
    if error is not None:
        raise BuildConfigError(_describe(error))
    ids = [query["id"] for query in filled["queries"]]
    repeated = sorted({query_id for query_id in ids if ids.count(query_id) > 1})
    if repeated:
        raise BuildConfigError(f"config.queries: id {repeated[0]!r} is used twice; give every query its own id")
    return BuildConfig(
        name=filled["name"],
        output_dir=filled["output_dir"],
        region=filled["region"],
        imagery=ImagerySettings(**filled["imagery"]),
        model=ModelSettings(**filled["model"]),
        tiling=TilingSettings(**filled["tiling"]),
        queries=tuple(Query(**query) for query in filled["queries"]),
        outputs=OutputSettings(**filled["outputs"]),
        raw=filled,
    )


RUNTIME_IMAGERY_KEYS = ("cache_dir", "offline")
RUNTIME_MODEL_KEYS = ("device", "batch_size", "loader_workers")


def runtime_settings(config: BuildConfig) -> dict[str, Any]:
    """Settings that change how jobs run but not what they write: never a reason to rerun a job."""
    return {
        **{key: config.raw["imagery"][key] for key in RUNTIME_IMAGERY_KEYS},
        **{key: config.raw["model"][key] for key in RUNTIME_MODEL_KEYS},
    }


def step_settings(config: BuildConfig) -> dict[str, dict[str, Any]]:
    """Per workflow step, the config values its output depends on.

    They are the rule's params, so Snakemake reruns a step exactly when one of them changes: adding a
    query touches only `queries` (and, through their inputs, scoring, the store and the exports).
    """
    raw = config.raw
    model = raw["model"]
    imagery = {key: value for key, value in raw["imagery"].items() if key not in RUNTIME_IMAGERY_KEYS}
    return {
        "model": {key: model[key] for key in ("checkpoint", "sat_type", "metadata_type", "seed")},
        "plan": {
            "region": raw["region"],
            "zoom_level": model["zoom_level"],
            "tiling": raw["tiling"],
            "imagery": imagery,
        },
        "fetch": {"imagery": imagery},
        "embed": {
            "imagery": imagery,
            "top_k": raw["outputs"]["concepts_top_k"],
            **{key: model[key] for key in ("month", "hour", "precision")},
        },
        "queries": {"queries": raw["queries"], **{key: model[key] for key in ("text_backbone", "precision")}},
        "mosaic": {
            "top_k": raw["outputs"]["concepts_top_k"],
            "zarr_chunk_px": raw["outputs"]["zarr_chunk_px"],
            "config": raw,
        },
        "cogs": {"crs": raw["outputs"]["crs"]},
    }

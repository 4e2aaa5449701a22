"""The map build's config: checked against config/schema.json, defaults filled in, turned into typed settings.

Every problem becomes one `BuildConfigError` line naming the key and the fix.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypedDict

import rasterio
import yaml
from jsonschema.exceptions import ValidationError, best_match
from rasterio.crs import CRS
from rasterio.errors import CRSError

from common.atomic import atomic_path
from common.cores import visible_gpus
from common.errors import first_line
from common.schema import SettingsValidator
from model.config import HOURS, MONTHS
from pipeline.errors import BuildConfigError, ImageryError

if TYPE_CHECKING:
    from pipeline.imagery import ImageryReader

REPO = Path(__file__).resolve().parents[1]
SCHEMA_PATH = REPO / "config" / "schema.json"
DEFAULT_CONFIG_PATH = SCHEMA_PATH.with_name("config.yaml")
UNTRAINED = "untrained"
# The project's own folders, which no build may write into (the repository root and its outputs/ it may).
SOURCE_FOLDERS = ("pipeline", "model", "common", "rules", "config", "regions", "tests", "benchmarks", "examples")


def default_config_from_anywhere() -> dict[str, Any]:
    """The default config with its repository-relative files (checkpoint, audio queries, zones, gallery) made
    absolute, for builds run from another folder (tests, benchmarks)."""
    config: dict[str, Any] = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    config["model"]["checkpoint"] = str(REPO / config["model"]["checkpoint"])
    for query in config["queries"]:
        if "audio" in query:
            query["audio"] = str(REPO / query["audio"])
    for key in ("zones", "gallery"):
        config["outputs"][key] = str(REPO / config["outputs"][key])
    return config


class Time(NamedTuple):
    """One month and hour the metadata tokens are given (None: unknown)."""

    month: int | None
    hour: int | None

    @property
    def label(self) -> str:
        """How a map reader sees the time: "month 6, hour 14", the known part alone, or "time unknown"."""
        parts = [f"{name} {value}" for name, value in (("month", self.month), ("hour", self.hour)) if value is not None]
        return ", ".join(parts) or "time unknown"


@dataclass(frozen=True)
class Times:
    """The times a build maps: every month with every hour (month-major), each None where unknown."""

    months: tuple[int | None, ...]
    hours: tuple[int | None, ...]

    @property
    def all(self) -> tuple[Time, ...]:
        return tuple(Time(month, hour) for month, hour in product(self.months, self.hours))

    @property
    def sweeps(self) -> bool:
        """Whether there is more than one time: the build's per-time outputs then have a time axis."""
        return len(self.all) > 1


ONE_UNKNOWN_TIME = Times((None,), (None,))


def _time_values(value: int | list[int] | str | None, every: tuple[int, ...]) -> tuple[int | None, ...]:
    if isinstance(value, str):
        return every
    return tuple(value) if isinstance(value, list) else (value,)


@dataclass(frozen=True)
class ImagerySettings:
    """Which imagery a build reads; `cache_dir` and `offline` (runtime) say where its tiles are kept."""

    source: str
    options: Mapping[str, Any]
    cache_dir: str
    offline: bool
    native_gsd_m: float | None
    min_coverage: float
    on_missing: str = "fail"

    @property
    def shown_source(self) -> str:
        """`source` as messages and outputs show it: a URL's credential-like query parameters hidden."""
        from pipeline.imagery.http import redact

        return redact(self.source)

    def open_reader(self) -> ImageryReader:
        from pipeline.imagery import open_reader

        for key in ("offline", "on_missing"):
            if key in self.options:
                raise ImageryError(f"imagery.options.{key} is an imagery key of its own; set imagery.{key}")
        return open_reader(
            self.source,
            cache_dir=Path(self.cache_dir),
            offline=self.offline,
            on_missing=self.on_missing,
            **dict(self.options),
        )


@dataclass(frozen=True)
class ModelSettings:
    checkpoint: str
    checkpoint_sha256: str | None
    sat_type: str
    metadata_type: str
    seed: int
    zoom_level: int
    month: int | list[int] | Literal["all"] | None
    hour: int | list[int] | Literal["all"] | None
    text_backbone: str
    device: str
    precision: str
    compile: bool
    batch_size: int | Literal["auto"]
    loader_workers: int
    tiles_per_job: int

    @property
    def untrained(self) -> bool:
        return self.checkpoint == UNTRAINED

    @property
    def times(self) -> Times:
        """`month` x `hour`: a list or `all` maps each of its values."""
        return Times(_time_values(self.month, MONTHS), _time_values(self.hour, HOURS))

    @property
    def swept(self) -> tuple[str, ...]:
        """The keys (month, hour) given as a list or `all`."""
        return tuple(key for key in ("month", "hour") if isinstance(getattr(self, key), list | str))

    @property
    def shared_gpus(self) -> tuple[str, ...]:
        """The GPUs embed jobs share out, one each, where several run side by side (`common.gpu_claim`): this
        machine's, unless `device` names one (cuda:N) or none."""
        return visible_gpus() if self.device in ("auto", "cuda") else ()

    @property
    def embed_gpus(self) -> int:
        """The GPUs an embed job takes on this machine: one where it runs on a GPU (`device` cuda or mps, or auto
        with a GPU in sight), none on the CPU."""
        if self.device == "auto":
            return int(bool(self.shared_gpus))
        return int(self.device != "cpu")


@dataclass(frozen=True)
class TilingSettings:
    tile_zoom_offset: int
    chunk_zoom: int | None
    max_tiles: int | None  # the build's guard; None: no limit


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
    top_k: int
    zarr_chunk_px: int
    zones: str | None = None
    zone_field: str | None = None
    gallery: str | None = None
    gallery_top_k: int = 5


@dataclass(frozen=True)
class PlanInputs:
    """What a plan is made from: the region, its imagery, the model (its view) and the tiling; and the outputs and
    queries (None: not given), whose files a plan checks as the build does and whose sizes it estimates."""

    region: str
    imagery: ImagerySettings
    model: ModelSettings
    tiling: TilingSettings
    outputs: OutputSettings
    queries: tuple[Query, ...] | None = None

    @property
    def query_count(self) -> int | None:
        return None if self.queries is None else len(self.queries)

    @property
    def concepts_top_k(self) -> int:
        return self.outputs.concepts_top_k


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

    @property
    def plan_inputs(self) -> PlanInputs:
        return PlanInputs(self.region, self.imagery, self.model, self.tiling, self.outputs, self.queries)


@cache
def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def schema_bounds(section: str, key: str) -> tuple[int, int]:
    """The minimum and maximum config/schema.json allows for the number `section.key`."""
    spec = _schema()["properties"][section]["properties"][key]
    return int(spec["minimum"]), int(spec["maximum"])


def holds_words(text: str) -> bool:
    """Whether a query's text holds a word (a letter or digit, in any script): config/schema.json's rule for it."""
    return re.search(_schema()["properties"]["queries"]["items"]["properties"]["text"]["pattern"], text) is not None


def id_key(query_id: str) -> str:
    """What tells query ids apart: their text less its case, as GeoPackage layer and field names (and file names
    on file systems that ignore case) are told apart."""
    return query_id.lower()


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
    """One line for a schema error: the schema's own words for the failed keyword where it has them (its
    "errorMessage" templates, formatted with the offending `value`), else jsonschema's sentence."""
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error.absolute_path)
    templates = error.schema.get("errorMessage", {}) if isinstance(error.schema, Mapping) else {}
    try:
        return f"config{where}: {templates[error.validator].format(value=error.instance)}"
    except (KeyError, IndexError, TypeError):  # no template, or a value it cannot be formatted with
        message = " ".join(error.message.split())
        return f"config{where}: {message}; see {SCHEMA_PATH.relative_to(REPO)}"


def _validated(
    config: Mapping[str, Any], schema: Mapping[str, Any], *, where_builds_land: bool = True
) -> dict[str, Any]:
    """The config with its defaults, checked; `where_builds_land` checks output_dir too (not when a build's own
    settings are read again: a relative output_dir is relative to where the build ran, not to where it is read)."""
    _check_finite(config, "config")
    filled = with_defaults(config)
    error = best_match(SettingsValidator(schema).iter_errors(filled))
    if error is not None:
        raise BuildConfigError(_describe(error))
    if filled["outputs"]["crs"] is not None:
        _check_output_crs(filled["outputs"]["crs"])
    if where_builds_land:
        _check_output_dir(filled["output_dir"])
    _check_across_keys(filled)
    return filled


def _check_output_dir(output_dir: str) -> None:
    """Refuse an output_dir whose builds would land among files not theirs: the file system's root, or one of the
    project's own folders."""
    folder = Path(output_dir).resolve()
    fix = "set output_dir to a folder of its own, e.g. outputs"
    if folder == Path(folder.anchor):
        raise BuildConfigError(f"config.output_dir: {output_dir!r} is the file system's root; {fix}")
    for name in SOURCE_FOLDERS:
        if folder.is_relative_to(REPO / name):
            raise BuildConfigError(
                f"config.output_dir: {output_dir!r} lies in the project's own folder {REPO / name}; {fix}"
            )


def _check_across_keys(config: Mapping[str, Any]) -> None:
    """Refuse what no single key's schema can: two queries of one id (case aside), a zone field without zones."""
    seen: dict[str, str] = {}
    for query_id in (query["id"] for query in config.get("queries", [])):
        key = id_key(query_id)
        if key in seen:
            raise BuildConfigError(f"config.queries: {_id_clash(seen[key], query_id)}; give every query its own id")
        seen[key] = query_id
    if config["outputs"]["zone_field"] is not None and config["outputs"]["zones"] is None:
        raise BuildConfigError(
            "config.outputs.zone_field names the zones' column but outputs.zones names no zone file;"
            " set outputs.zones to a polygon file, or drop zone_field"
        )


def _id_clash(first: str, second: str) -> str:
    if first == second:
        return f"id {first!r} is used twice"
    return f"ids {first!r} and {second!r} differ only in case (GeoPackage and field names ignore case)"


def _check_finite(value: Any, where: str) -> None:
    """Refuse NaN and infinities anywhere in the config: JSON Schema's bounds let NaN through (every comparison
    with it is false), and no setting means an infinite amount."""
    if isinstance(value, float) and not math.isfinite(value):
        raise BuildConfigError(f"{where}: {value} is not a finite number; give a number")
    items = value.items() if isinstance(value, Mapping) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        _check_finite(item, f"{where}.{key}" if isinstance(value, Mapping) else f"{where}[{key}]")


def _check_output_crs(text: str) -> None:
    """Refuse an `outputs.crs` that GDAL does not know or that is no map CRS (geocentric, vertical)."""
    fix = "name one like EPSG:4326 or EPSG:32633 (a UTM zone)"
    # Inside an Env, GDAL reports a bad CRS through the exception only, not also on stderr.
    with rasterio.Env():
        try:
            crs = CRS.from_user_input(text)
        except CRSError as exc:
            raise BuildConfigError(
                f"config.outputs.crs: {text!r} is not a known CRS ({first_line(exc)}); {fix}"
            ) from None
    if not (crs.is_geographic or crs.is_projected):
        raise BuildConfigError(
            f"config.outputs.crs: {text!r} is not a map CRS (neither geographic nor projected); {fix}"
        )


class _Sections(TypedDict):
    """The config's sections as typed settings, alike in a build's config and a plan's inputs."""

    imagery: ImagerySettings
    model: ModelSettings
    tiling: TilingSettings
    outputs: OutputSettings


def _sections(filled: Mapping[str, Any]) -> _Sections:
    return _Sections(
        imagery=ImagerySettings(**filled["imagery"]),
        model=ModelSettings(**filled["model"]),
        tiling=TilingSettings(**filled["tiling"]),
        outputs=OutputSettings(**filled["outputs"]),
    )


def _queries(items: Sequence[Mapping[str, Any]]) -> tuple[Query, ...]:
    return tuple(Query(**query) for query in items)


def load_build_config(config: Mapping[str, Any], *, where_builds_land: bool = True) -> BuildConfig:
    """Validate a config mapping (as Snakemake loaded it) and return typed settings with defaults."""
    if not config:
        raise BuildConfigError(f"the config is empty; pass --configfile {DEFAULT_CONFIG_PATH.name} or another file")
    filled = _validated(config, _schema(), where_builds_land=where_builds_land)
    return BuildConfig(
        name=filled["name"],
        output_dir=filled["output_dir"],
        region=filled["region"],
        queries=_queries(filled["queries"]),
        raw=filled,
        **_sections(filled),
    )


def load_plan_inputs(config: Mapping[str, Any]) -> PlanInputs:
    """The plan's part of a config (no name or queries needed), checked against the same schema and defaults."""
    filled = _validated(config, {**_schema(), "required": ["region"]})
    queries = _queries(filled["queries"]) if "queries" in filled else None
    return PlanInputs(region=filled["region"], queries=queries, **_sections(filled))


# GDAL options whose values are credentials (AWS_SECRET_ACCESS_KEY, AZURE_STORAGE_SAS_TOKEN, GDAL_HTTP_USERPWD...).
SECRET_OPTION = re.compile(r"(?i)KEY|SECRET|TOKEN|PASSWORD|USERPWD|CREDENTIAL|SIGNATURE")
# Keys that change how jobs run, or only what is checked when a build starts, never what they write.
RUNTIME_KEYS = {
    "imagery": ("cache_dir", "offline"),
    "model": ("checkpoint_sha256", "device", "compile", "batch_size", "loader_workers", "tiles_per_job"),
}
STEP_KEYS: dict[str, dict[str, tuple[str, ...]]] = {
    "model": {"model": ("checkpoint", "sat_type", "metadata_type", "seed")},
    "fetch": {"imagery": ("source", "options", "native_gsd_m", "on_missing")},
    "embed": {
        "imagery": ("source", "options", "native_gsd_m", "min_coverage", "on_missing"),
        "model": ("month", "hour", "precision"),
        "outputs": ("concepts_top_k",),
    },
    "queries": {"queries": (), "model": ("text_backbone", "precision")},
    "gallery": {"outputs": ("gallery",), "model": ("text_backbone",)},
    "score": {"outputs": ("gallery", "gallery_top_k")},
    "cogs": {"outputs": ("crs",)},
    "places": {"outputs": ("top_k",)},
    "zones": {"outputs": ("zones", "zone_field")},
    "underlay": {"imagery": ("source", "options", "native_gsd_m")},
    "project": {"imagery": ("source", "options"), "outputs": ("zones",)},
}


def step_values(config: BuildConfig, step: str) -> dict[str, Any]:
    """The config values a workflow step's output depends on (its rerun trigger).

    Adding a query changes only `queries` (and, through their inputs, scoring, the store and the exports);
    the runtime keys (`RUNTIME_KEYS`: device, batch size, loader workers, tile cache, the checkpoint's expected
    sha256) are in no step's values, so changing how jobs run never reruns one. The plan is not a step: its
    file changes when the region, model view, tiling or imagery change, and every job that reads it reruns then.
    """
    if step == "mosaic":  # the store records the whole config, less how it ran, as provenance
        return recorded_config(config)
    values: dict[str, Any] = {}
    for section, keys in STEP_KEYS[step].items():
        raw = config.raw[section]
        values[section] = raw if not keys else {key: raw[key] for key in keys}
    return values


def recorded_config(config: BuildConfig) -> dict[str, Any]:
    """The config as outputs record it: everything but the runtime keys, and no credentials (a raster URL's
    credential-like query parameters, the values of secret-like GDAL options)."""
    from pipeline.imagery.http import REDACTED, redact

    recorded = dict(config.raw)
    for section, keys in RUNTIME_KEYS.items():
        recorded[section] = {key: value for key, value in config.raw[section].items() if key not in keys}
    imagery = recorded["imagery"] = {**recorded["imagery"], "source": redact(recorded["imagery"]["source"])}
    gdal_env = imagery["options"].get("gdal_env")
    if gdal_env:
        hidden = {key: REDACTED if SECRET_OPTION.search(key) else value for key, value in gdal_env.items()}
        imagery["options"] = {**imagery["options"], "gdal_env": hidden}
    return recorded


def settings_digest(config: BuildConfig, step: str) -> str:
    """A short hash of `step_values`: the rule's params, so Snakemake reruns a step when they change."""
    text = json.dumps(step_values(config, step), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_settings(config: BuildConfig, path: Path) -> None:
    """The validated config with every default filled in, for the steps to read (rewritten only on change)."""
    text = json.dumps(config.raw, indent=1, sort_keys=True)
    if not path.is_file() or path.read_text() != text:
        with atomic_path(path) as tmp:
            tmp.write_text(text)


def read_settings(path: Path) -> BuildConfig:
    """A build's settings.json, as its jobs and later commands (`python -m pipeline query`, from any folder) read it."""
    return load_build_config(json.loads(path.read_text()), where_builds_land=False)

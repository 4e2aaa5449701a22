"""The training run's settings (`python -m model train --config train.yaml`), checked before any work starts.

Defaults are the reference's: AdamW (0.9, 0.98), eps 1e-8, weight decay 0.2, lr 5e-5, cosine warm restarts
every 5,000 steps, gradient clipping 0.5 (norm), batch 128, metadata dropout 0.5.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from common.mapping_file import read_mapping
from model.checkpoint import read_config
from model.config import GSD_BY_SAT_TYPE, Sat2SoundConfig
from model.errors import CheckpointError, ConfigError
from model.hub import is_hub_uri

ARCHITECTURES = ("small", "full")
DATA_FORMATS = ("folder", "geosound", "soundingearth")
PRECISIONS = ("auto", "32", "bf16-mixed", "16-mixed")
MAX_SEED = 2**32 - 1  # the largest seed seed_everything (numpy) takes
# The settings' types in words, for refusals.
TYPE_NAMES: dict[type, str] = {bool: "bool", int: "int", float: "number", str: "str"}


@dataclass(frozen=True)
class DataSettings:
    """Where the pairs are and how they are read (`format`: geosound, soundingearth or folder)."""

    format: str = "folder"
    root: str = ""
    sat_type: str = "sentinel"
    zooms: tuple[int, ...] | None = None  # None: the data set's own (GeoSound 1, 3, 5)
    train_split: str = "train"
    val_split: str = "val"
    num_workers: int = 2
    dihedral: bool = False  # train on random quarter turns and mirrors of each image (upstream does not)
    # Brightness, contrast, saturation and hue of the training images' colour jitter; None: upstream's
    # (model.data.transforms.COLOR_JITTER). Where colour is the signal (land cover), a hue jitter hides it.
    color_jitter: tuple[float, ...] | None = None


@dataclass(frozen=True)
class ModelSettings:
    """The model to train: an architecture from scratch, or `init` weights (a checkpoint path) to go on from, whose
    architecture, metadata_type and data.sat_type the settings then take (refusing others stated)."""

    architecture: str = "small"
    init: str | None = None
    metadata_type: str = "none"
    text_backbone: str = "auto"
    meta_droprate: float | None = None  # None: the architecture's (0.5) or the init checkpoint's


@dataclass(frozen=True)
class OptimSettings:
    lr: float = 5e-5
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    restart_steps: int = 5000
    grad_clip: float = 0.5


@dataclass(frozen=True)
class TowerSettings:
    """Teach the image side land cover before the rest trains, then keep it frozen. Its targets, in the data folder
    (or absolute paths), one or both of:

    shares     a CSV of `key` and one column per class: every patch token learns its view's class shares
    landcover  a folder of one raster per pair (`<key>.tif`, one uint8 band per class, 0-255 = the class's share of
               the pixel, over exactly the pair's image): every patch token learns its own patch's shares

    With both, every token learns each through a head of its own. With `codebook`, the pooled image embedding
    learns the view's shares too (with `landcover`, the mean of its patches') and the codebook and its image
    queries stay frozen with the tower; with `prototypes` > 0 as well, it is also drawn towards its shares'
    point in the embedding space (`model.training.class_prototypes`), so that it varies with them rather than
    with what else a scene shows. Off while both are unset."""

    shares: str | None = None
    landcover: str | None = None
    classes: tuple[str, ...] = ()  # columns of `shares`, bands of the `landcover` rasters
    epochs: int = 10
    lr: float = 5e-4
    weight_decay: float = 0.05
    codebook: bool = False  # teach and freeze the image's codebook path too
    prototypes: float = 0.0  # weight of the pooled embedding's pull to its shares' point (0: off)

    @property
    def enabled(self) -> bool:
        return self.shares is not None or self.landcover is not None


@dataclass(frozen=True)
class RecordingSettings:
    """Recordings heard alone, each taught its own caption in the main run: `table` is a CSV of `file` (beside it)
    and `caption`, e.g. the recordings a data set's mixes are made of. The pairs teach what a place sounds of; this
    keeps each recording apart from the others, so that one recording's query finds itself in a gallery of them.
    The term (symmetric cross-entropy of the recordings' audio against their captions, the audio-caption
    temperature) is added to each step's loss times `weight`. Off while `table` is unset.

    With `directions` > 0 (and `image_pretraining` with `codebook`), each recording and its caption are also pulled
    towards the direction of the recording's `land_cover` (a column of `table`, one of `image_pretraining.classes`):
    with `image_pretraining.prototypes`, the class's point the pooled image embedding was drawn to; otherwise its
    direction in the head that taught the pooled image embedding its view's shares, that class's row of the head
    less the mean row. The term, one minus the mean cosine, is added times `directions`. The image side then scores
    a class by how far it lies along that direction, and so do the class's sounds and words."""

    table: str | None = None
    weight: float = 1.0
    directions: float = 0.0


@dataclass(frozen=True)
class TrainSettings:
    out_dir: str
    data: DataSettings
    model: ModelSettings = field(default_factory=ModelSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    image_pretraining: TowerSettings = field(default_factory=TowerSettings)
    recordings: RecordingSettings = field(default_factory=RecordingSettings)
    batch_size: int = 128
    max_epochs: int = 30
    max_steps: int = -1
    val_every_epochs: int = 1
    keep_best: int = 1
    precision: str = "auto"
    devices: int | None = None  # None: every device of the accelerator, or one per SLURM task (model.launch)
    seed: int = 0
    text_cache: str | None = None  # default: <out_dir>/text_cache
    mel_cache: str | None = None  # folder sources' log-mels; default: <out_dir>/mel_cache
    description: str = ""  # what the exported weights are, in a sentence; maps built with them show it
    export: str = "best"  # the checkpoint exported: best (by validation recall) or last
    # Weight of the main run's pull of each train pair's audio embedding to its view's point, the one the image
    # pretraining's `prototypes` term drew its image to (one minus their cosine); 0: off.
    audio_prototypes: float = 0.0

    @property
    def out_path(self) -> Path:
        return Path(self.out_dir)

    @property
    def text_cache_path(self) -> Path:
        return Path(self.text_cache) if self.text_cache else self.out_path / "text_cache"

    @property
    def mel_cache_path(self) -> Path:
        return Path(self.mel_cache) if self.mel_cache else self.out_path / "mel_cache"

    def in_data(self, path: str) -> Path:
        """A path in the data folder, wherever that is, or an absolute one."""
        return Path(self.data.root) / path

    def model_config(self) -> Sat2SoundConfig:
        """The architecture to build when not starting from `model.init` weights."""
        base = Sat2SoundConfig.small() if self.model.architecture == "small" else Sat2SoundConfig()
        return self.with_droprate(replace(base, sat_type=self.data.sat_type, metadata_type=self.model.metadata_type))

    def with_droprate(self, cfg: Sat2SoundConfig) -> Sat2SoundConfig:
        droprate = self.model.meta_droprate
        return cfg if droprate is None else replace(cfg, meta_droprate=droprate)

    def recipe(self) -> dict[str, Any]:
        """How the run's weights were made, for their exported config: every setting but where its files lie on
        this machine (the files it was taught from keep only their names) and how many workers read them."""
        values = dataclasses.asdict(self)
        for key in ("out_dir", "text_cache", "mel_cache", "description"):
            del values[key]
        del values["data"]["root"], values["data"]["num_workers"]
        named = (
            ("model", "init"),
            ("image_pretraining", "shares"),
            ("image_pretraining", "landcover"),
            ("recordings", "table"),
        )
        for section, key in named:
            if values[section][key]:
                values[section][key] = Path(values[section][key]).name
        return values


def _typed(value: Any, hint: Any, where: str) -> Any:
    """`value` as the setting's declared type `hint` (YAML lists become tuples), or a one-line error; None only
    where the setting may be left unset."""
    kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in kinds:
        return None
    kind = kinds[0]
    if typing.get_origin(kind) is not tuple:
        return _scalar(value, kind, where)
    item = typing.get_args(kind)[0]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where} must be of type list of {TYPE_NAMES[item]}, got {value!r}")
    return tuple(_scalar(v, item, f"each of {where}") for v in value)


def _yaml_text_hint(value: Any, kind: type) -> str:
    """Why a number may have been read as text: YAML 1.1 (PyYAML) reads a float only with a dot in its mantissa
    and a sign in its exponent, so 5e-4 and 1.0e308 are strings."""
    if kind is not float or not isinstance(value, str):
        return ""
    try:
        number = float(value)
    except ValueError:
        return ""
    mantissa, _, exponent = value.lower().partition("e")
    if not exponent or not math.isfinite(number):
        return ""
    mantissa = mantissa if "." in mantissa else f"{mantissa}.0"
    exponent = exponent if exponent[0] in "+-" else f"+{exponent}"
    return f" (YAML reads {value} as text; write {mantissa}e{exponent})"


def _scalar(value: Any, kind: type, where: str) -> Any:
    """`value` as `kind` (a whole number as a float), or a one-line error; never an infinite or NaN number."""
    fits = isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
    if not fits or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(f"{where} must be of type {TYPE_NAMES[kind]}, got {value!r}{_yaml_text_hint(value, kind)}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    return float(value) if kind is float else value


def _section(cls: type, values: Any, where: str) -> Any:
    if values is None:
        return cls()
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where} must be a mapping of settings, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(f"unknown setting {where}.{unknown[0]}; known: {', '.join(hints)}")
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = value if dataclasses.is_dataclass(value) else _typed(value, hints[name], f"{where}.{name}")
    return cls(**kwargs)


def _check(settings: TrainSettings) -> None:
    data, model, optim, tower = settings.data, settings.model, settings.optim, settings.image_pretraining
    checks = [
        (bool(settings.out_dir), "out_dir is empty; name the folder for checkpoints and logs"),
        (bool(data.root), "data.root is missing; give the data folder or hf://datasets/OWNER/NAME"),
        (data.format in DATA_FORMATS, f"data.format must be one of {', '.join(DATA_FORMATS)}"),
        (data.sat_type in GSD_BY_SAT_TYPE, f"data.sat_type must be one of {', '.join(GSD_BY_SAT_TYPE)}"),
        (
            data.zooms is None or (bool(data.zooms) and all(z >= 1 for z in data.zooms)),
            "data.zooms must be a list of zoom levels >= 1, e.g. [1, 3]",
        ),
        (
            data.color_jitter is None
            or (len(data.color_jitter) == 4 and min(data.color_jitter) >= 0 and data.color_jitter[3] <= 0.5),
            "data.color_jitter must be [brightness, contrast, saturation, hue], each >= 0 and hue <= 0.5",
        ),
        (data.num_workers >= 0, "data.num_workers must be >= 0 (0 reads the data in the training process)"),
        (model.architecture in ARCHITECTURES, f"model.architecture must be one of {', '.join(ARCHITECTURES)}"),
        (model.meta_droprate is None or 0 <= model.meta_droprate < 1, "model.meta_droprate must be in [0, 1)"),
        (optim.lr > 0 and optim.eps > 0, "optim.lr and optim.eps must be > 0"),
        (optim.weight_decay >= 0, "optim.weight_decay must be >= 0 (0 turns weight decay off)"),
        (
            len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas),
            "optim.betas must be two numbers in [0, 1)",
        ),
        (optim.restart_steps >= 1 and optim.grad_clip > 0, "optim.restart_steps and optim.grad_clip must be > 0"),
        (
            not tower.enabled or (bool(tower.classes) and tower.epochs >= 1 and tower.lr > 0),
            "image_pretraining needs classes (its targets' columns or bands), epochs >= 1 and lr > 0",
        ),
        (tower.weight_decay >= 0, "image_pretraining.weight_decay must be >= 0 (0 turns weight decay off)"),
        (tower.prototypes >= 0, "image_pretraining.prototypes must be >= 0 (0 leaves the term out)"),
        (
            tower.prototypes == 0 or (tower.enabled and tower.codebook),
            "image_pretraining.prototypes teaches the pooled image embedding: set codebook: true and its shares"
            " or landcover, or leave prototypes 0",
        ),
        (
            not is_hub_uri(data.root)
            or all(Path(path).is_absolute() for path in (tower.shares, tower.landcover) if path),
            "image_pretraining's targets lie in the data folder, on the hub here: give them as an absolute local path",
        ),
        (settings.recordings.weight > 0, "recordings.weight must be > 0 (leave recordings.table unset to turn it off)"),
        (
            settings.recordings.directions >= 0,
            "recordings.directions must be >= 0 (0 leaves the recordings' class directions out)",
        ),
        (
            settings.recordings.directions == 0
            or (settings.recordings.table is not None and tower.enabled and tower.codebook),
            "recordings.directions pulls recordings towards the classes image pretraining teaches the pooled image"
            " embedding: set recordings.table and image_pretraining with codebook: true, or leave directions 0",
        ),
        (settings.audio_prototypes >= 0, "audio_prototypes must be >= 0 (0 leaves the term out)"),
        (
            settings.audio_prototypes == 0 or tower.prototypes > 0,
            "audio_prototypes draws each pair's audio to the point image_pretraining.prototypes draws its image to:"
            " set image_pretraining.prototypes > 0, or leave audio_prototypes 0",
        ),
        (
            settings.devices is None or settings.devices >= 1,
            "devices must be at least 1 (leave it out for every device, or a device per SLURM task)",
        ),
        (0 <= settings.seed <= MAX_SEED, f"seed must be in 0..{MAX_SEED}"),
        (settings.batch_size >= 2, "batch_size must be at least 2 (the loss contrasts pairs within a batch)"),
        (settings.max_epochs >= 1 or settings.max_steps >= 1, "set max_epochs or max_steps to at least 1"),
        (
            all(limit >= 1 or limit == -1 for limit in (settings.max_epochs, settings.max_steps)),
            "max_epochs and max_steps must each be at least 1, or -1 for no limit (0 trains no step)",
        ),
        (settings.keep_best >= 1 and settings.val_every_epochs >= 1, "keep_best and val_every_epochs must be >= 1"),
        (settings.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}"),
        (settings.export in ("best", "last"), "export must be best or last"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    optional_paths = {
        "text_cache": settings.text_cache,
        "mel_cache": settings.mel_cache,
        "model.init": model.init,
        "image_pretraining.shares": tower.shares,
        "image_pretraining.landcover": tower.landcover,
        "recordings.table": settings.recordings.table,
    }
    empty = next((name for name, path in optional_paths.items() if path == ""), None)
    if empty is not None:  # Path("") is the current folder
        raise ConfigError(f"{empty} is empty; give it a path, or leave it out")


def parse_settings(values: Mapping[str, Any], base: Path | None = None) -> TrainSettings:
    """Settings from a parsed YAML mapping; relative paths are taken from `base` (the YAML file's folder)."""
    values = dict(values)
    sections = {
        "data": DataSettings,
        "model": ModelSettings,
        "optim": OptimSettings,
        "image_pretraining": TowerSettings,
        "recordings": RecordingSettings,
    }
    raw = {name: values.pop(name, None) for name in sections}
    parsed = {name: _section(cls, raw[name], name) for name, cls in sections.items()}
    if "out_dir" not in values:
        raise ConfigError("out_dir is missing; name the folder for checkpoints and logs")
    settings: TrainSettings = _section(TrainSettings, {**values, **parsed}, "train")
    if base is not None:
        settings = _relative_to(settings, base)
    _check(settings)
    if settings.model.init is None:
        settings.model_config()  # refuses a metadata_type of unknown tokens
        return settings
    return _from_init(settings, {f"{name}.{key}" for name, section in raw.items() if section for key in section})


def _from_init(settings: TrainSettings, given: set[str]) -> TrainSettings:
    """With `model.init`, the architecture is the checkpoint's: a setting `given` that says otherwise is refused,
    and those left out take the checkpoint's values, so that the exported recipe tells what was trained."""
    init = str(settings.model.init)
    try:
        cfg = read_config(Path(init))
    except CheckpointError as exc:
        raise CheckpointError(f"model.init: {exc}") from None
    found = {"model.architecture": cfg.size, "model.metadata_type": cfg.metadata_type, "data.sat_type": cfg.sat_type}
    stated = {
        "model.architecture": settings.model.architecture,
        "model.metadata_type": settings.model.metadata_type,
        "data.sat_type": settings.data.sat_type,
    }
    for key in sorted(given & found.keys()):
        if stated[key] != found[key]:
            raise ConfigError(
                f"{key} is {stated[key]!r} but model.init {init} has {found[key]!r};"
                f" leave {key} out to go on from the checkpoint's, or set it to {found[key]!r}"
            )
    return replace(
        settings,
        model=replace(settings.model, architecture=cfg.size, metadata_type=cfg.metadata_type),
        data=replace(settings.data, sat_type=cfg.sat_type),
    )


def _relative_to(settings: TrainSettings, base: Path) -> TrainSettings:
    def resolve(path: str | None) -> str | None:
        if not path or is_hub_uri(path) or Path(path).is_absolute():
            return path
        return str(base / path)

    return replace(
        settings,
        out_dir=resolve(settings.out_dir) or settings.out_dir,
        text_cache=resolve(settings.text_cache),
        mel_cache=resolve(settings.mel_cache),
        data=replace(settings.data, root=resolve(settings.data.root) or ""),
        model=replace(settings.model, init=resolve(settings.model.init)),
        recordings=replace(settings.recordings, table=resolve(settings.recordings.table)),
    )


def load_settings(path: Path) -> TrainSettings:
    values = read_mapping(path, "training config", "write one of key: value lines (see README, Training)", ConfigError)
    return parse_settings(values, base=path.parent)

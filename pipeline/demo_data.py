"""The demo model's data set: real Landsat 8 scenes and real CC0 recordings, paired by the scenes' land cover.

    python -m pipeline.demo_data OUT_DIR [--views N] [--seed S] [--past-edge]

Views are cut as the default map build cuts them (config/config.yaml: its imagery options, sat_type and zoom
level; `LocalRasterReader.source_pixels`, then `pipeline.views.cut_views`): squares of the model's view size
centred on random points (seeded) at least half a view inside a scene's footprint, kept where at least
MIN_COVERAGE of their pixels hold imagery. With --past-edge, centres lie anywhere over the footprint and views
are kept from the map's own imagery.min_coverage, so that views, like the map's tiles, may reach past a scene's
edge.

    train  N views of the training scenes (examples/training/) lying wholly east of VAL_WEST_OF_LON, half at
           the map's zoom level and half at zoom level 1 (a third of the size at 3; upstream too trains at
           several zoom levels), chosen among BALANCED_POOL x N candidates to spread over dominant classes as
           far as they go: at the map's zoom the training scenes hold hardly a view of open water or of forest
           away from shores, which the held-out scene is full of
    val    views of the training scenes wholly west of it (a spatial block; views across the line are dropped),
           at the map's zoom level
    test   views of the default map's scene at the map's zoom level, held out: no training scene comes within
           one view of it

A view's label is the share of each land-cover class (`pipeline.landcover`) among its pixels, cut from the
per-pixel classes exactly like its image. Its recording is its own 10 s mix of the classes' sounds: each class
weighs its share relative to that class's share over all train views (its location quotient, so that rare
towns are heard among fields), classes under MIN_MIX_WEIGHT of the mix are left out, and each class left sounds
a random non-empty subset of its recordings (examples/sounds/recordings.csv), each looped from a random start,
together holding the class's weight of the mix's power. The audio caption names the mixed recordings, loudest
first. Written atomically (a run stopped half-way leaves no OUT_DIR):

    OUT_DIR/pairs.csv       key,image,audio,audio_caption,image_caption,lat,lon,time,split,sat_type,
                            audio_source,caption_source,zoom_level (the plain folder layout of model.data.folder)
    OUT_DIR/labels.csv      key,split,scene,zoom_level,water,tree,crop,developed,dominant,mix
                            (mix: class:file:weight;...)
    OUT_DIR/dataset.json    how it was made: seed, views per split and zoom level, class shares, counts per split
                            and class
    OUT_DIR/images/<key>.png        the view, RGB, MODEL_INPUT_PX px square: the footprint of its zoom level
                                    (pairs.csv's zoom_level, the one level model.data.folder reads it at)
    OUT_DIR/recordings/<key>.flac   the view's mix, 10 s mono 32 kHz 16-bit
    OUT_DIR/landcover/<key>.tif     the view's land cover: a uint8 band per class (CLASSES, named), 0-255 its share
                                    of each pixel, cut like the image; EPSG:3857, over the view's bounds
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import rasterio
import soundfile
import yaml
from rasterio.transform import from_bounds
from rasterio.warp import transform_bounds

from common.atomic import atomic_directory
from common.cli import OneLineParser
from common.errors import Sat2SoundError, first_line
from common.tables import read_table
from model import MODEL_INPUT_PX
from model.audio import CLIP_SAMPLES, CLIP_SECONDS, SAMPLE_RATE, decode_audio
from model.config import TRAINED_ZOOM_LEVELS
from model.data.folder import OPTIONAL_COLUMNS, REQUIRED_COLUMNS
from model.data.sources import SPLITS
from pipeline.config import DEFAULT_CONFIG_PATH, load_build_config
from pipeline.errors import DatasetError
from pipeline.geometry import WEB_MERCATOR, WGS84, lnglat_of_mercator, mercator_scale, views_centred_at
from pipeline.imagery import ImageryReader, Stretch, open_reader
from pipeline.imagery.base import SourcePixels
from pipeline.imagery.codec import encode_png
from pipeline.landcover import CLASSES, class_planes, classify
from pipeline.plan import ModelView
from pipeline.views import cut_views

REPO = DEFAULT_CONFIG_PATH.parents[1]
TRAINING_DIR = REPO / "examples" / "training"
TRAINING_SCENES = (
    "landsat8_224077_north_30m.tif",
    "landsat8_224077_west_30m.tif",
    "landsat8_224078_southwest_30m.tif",
)
RECORDINGS_CSV = REPO / "examples" / "sounds" / "recordings.csv"
# Every shipped scene, the default map's included, is of the Landsat 8 pass of this day.
ACQUIRED = "2020-05-18"
# The validation block: the training scenes west of this meridian (their western 16 km).
VAL_WEST_OF_LON = -54.92
MIN_COVERAGE = 0.9
# Views of the val and of the test split, each, per train view.
HELD_OUT_SHARE = 0.2
# Floor of a class's share over the train views, so that a class train views lack cannot fill every mix.
MIN_CLASS_SHARE = 0.01
# A class under this share of a view's mix is left out of it (and of its caption).
MIN_MIX_WEIGHT = 0.05
# The mix's RMS level (dBFS), unless its peak would then pass MIX_PEAK (full scale 1).
MIX_RMS_DBFS = -20.0
MIX_PEAK = 0.99
# The metadata of model.config closest to these recordings: a curated CC0 sound-effect library, described by
# its own titles.
AUDIO_SOURCE = "freesound"
CAPTION_SOURCE = "meta"
CAPTION_NOUNS = {"water": "water", "tree": "forest", "crop": "farmland", "developed": "city blocks"}
MOSTLY_AT_LEAST = 0.5
PLAIN_AT_LEAST = 0.2
MENTIONED_AT_LEAST = 0.05
FORMAT = "sat2sound-maps/demo-dataset-v4"
# Earlier formats a run may replace.
FORMAT_FAMILY = "sat2sound-maps/demo-dataset-"
SUMMARY_NAME = "dataset.json"
LANDCOVER_DIR = "landcover"
DEFAULT_VIEWS = 3000
# zlib level of the images: 4x faster than GDAL's default (6), files 13 % larger.
IMAGE_ZLEVEL = 1
# Balanced train views are chosen among this many times as many candidates.
BALANCED_POOL = 4
# Views cut at once (memory: about 200 kB each), and candidate views drawn per round at least.
CUT_BATCH = 256
MIN_ROUND = 16
# Candidates drawn per view still missing: most train candidates are kept (some lack imagery or cross the val
# block); val views, from the narrow val block alone, take ~15 rounds.
ROUND_OVERSAMPLING = 1.25
MAX_ROUNDS = 40
# Label planes hold indicators 0/1: this stretch maps them to 0/255, as cut_views writes uint8.
INDICATOR_STRETCH = Stretch(0.0, 1.0)
PAIRS_COLUMNS = (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS)


class Recording(NamedTuple):
    file: str
    land_cover: str
    caption: str


class Scene(NamedTuple):
    """A raster views are cut from, the EPSG:3857 box their centres are drawn in (its footprint less half a view
    on every side; the whole footprint with `Settings.past_edge`), and its land cover: the classes of all its
    pixels as 0/1 planes, to cut like its images."""

    name: str
    reader: ImageryReader
    centres: tuple[float, float, float, float]
    land_cover: SourcePixels

    @property
    def centre_area(self) -> float:
        left, bottom, right, top = self.centres
        return max(right - left, 0.0) * max(top - bottom, 0.0)


class Component(NamedTuple):
    """One recording in a view's mix: its weight, and the sample of it the 10 s loop starts at."""

    recording: Recording
    weight: float
    start: int


class View(NamedTuple):
    split: str
    scene: str
    zoom_level: int
    bounds: np.ndarray  # (4,) EPSG:3857
    fractions: np.ndarray  # (len(CLASSES),)

    @property
    def dominant(self) -> int:
        """Index in CLASSES of the class covering most of the view."""
        return int(np.argmax(self.fractions))


@dataclass(frozen=True)
class Settings:
    """How views are cut: the default map build's imagery options and model view."""

    options: dict[str, Any]
    test_scene: Path
    sat_type: str
    zoom_level: int
    map_min_coverage: float  # imagery.min_coverage: the least imagery a map keeps a tile from
    past_edge: bool = False

    @property
    def min_coverage(self) -> float:
        """The share of a view's pixels that must hold imagery for the view to be kept."""
        return self.map_min_coverage if self.past_edge else MIN_COVERAGE

    @property
    def view_size_m(self) -> float:
        return self.view_size_at(self.zoom_level)

    def view_size_at(self, zoom_level: int) -> float:
        return ModelView.of(self.sat_type, zoom_level).size_m

    @property
    def train_zoom_levels(self) -> tuple[int, ...]:
        """The map's zoom level and the finest one."""
        return tuple(sorted({TRAINED_ZOOM_LEVELS[0], self.zoom_level}))


def default_settings() -> Settings:
    config = load_build_config(yaml.safe_load(DEFAULT_CONFIG_PATH.read_text()))
    source = Path(config.imagery.source)
    return Settings(
        options=dict(config.imagery.options),
        test_scene=source if source.is_absolute() else REPO / source,
        sat_type=config.model.sat_type,
        zoom_level=config.model.zoom_level,
        map_min_coverage=config.imagery.min_coverage,
    )


def read_recordings(path: Path = RECORDINGS_CSV) -> list[Recording]:
    rows = read_table(path, ("file", "land_cover", "caption"), "give file, land_cover and caption", DatasetError)
    recordings = [Recording(row["file"], row["land_cover"], row["caption"]) for row in rows]
    lacking = [name for name in CLASSES if name not in {recording.land_cover for recording in recordings}]
    unknown = sorted({recording.land_cover for recording in recordings} - set(CLASSES))
    if lacking or unknown:
        raise DatasetError(f"{path} pairs classes {lacking} with no recording or names unknown ones {unknown}")
    return recordings


def shipped_inputs() -> list[Path]:
    """The files a data set is made from: the scenes (training and test), the recordings and their table."""
    recordings = [RECORDINGS_CSV.parent / recording.file for recording in read_recordings()]
    return [
        *(TRAINING_DIR / name for name in TRAINING_SCENES),
        default_settings().test_scene,
        RECORDINGS_CSV,
        *recordings,
    ]


def image_caption(fractions: Sequence[float]) -> str:
    """'a satellite image of mostly farmland, with forest and some water' from a view's class shares."""
    ranked = sorted(
        ((share, name) for share, name in zip(fractions, CLASSES, strict=True) if share >= MENTIONED_AT_LEAST),
        reverse=True,
    )
    (top_share, top), *others = ranked
    head = f"mostly {CAPTION_NOUNS[top]}" if top_share >= MOSTLY_AT_LEAST else CAPTION_NOUNS[top]
    rest = [CAPTION_NOUNS[name] if share >= PLAIN_AT_LEAST else f"some {CAPTION_NOUNS[name]}" for share, name in others]
    if not rest:
        return f"a satellite image of {head}"
    return f"a satellite image of {head}, with {listed(rest)}"


def listed(words: Sequence[str]) -> str:
    """'a, b and c'."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def mix_weights(fractions: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """(N, CLASSES) weights summing to 1 per view: each class's share relative to its train share (at least
    MIN_CLASS_SHARE), normalised, those under MIN_MIX_WEIGHT dropped and the rest normalised again."""
    quotients = fractions / np.maximum(shares, MIN_CLASS_SHARE)
    weights = quotients / quotients.sum(axis=1, keepdims=True)
    weights = np.where(weights >= MIN_MIX_WEIGHT, weights, 0.0)
    return weights / weights.sum(axis=1, keepdims=True)


def choose_components(
    weights: np.ndarray, recordings: Sequence[Recording], clips: Mapping[str, np.ndarray], rng: np.random.Generator
) -> list[Component]:
    """A view's mix, loudest class first: per class it weighs, a random non-empty subset of the class's recordings
    (of a random size), each from a random loop start. A class's n recordings heard each weigh sqrt(its weight /
    n): independent sounds add up in power, and a class twice as wide holds twice the sources, so the class's
    power is its weight whatever its number of recordings (an amplitude of its weight would bury a class of a
    tenth 20 dB down). Hearing sometimes one recording of a class alone is what lets a query of one recording (a duck)
    find its land cover; hearing several of them most of the time keeps a view's sound close to its land cover."""
    components = []
    for index in np.argsort(-weights, kind="stable"):
        if weights[index] > 0:
            members = [recording for recording in recordings if recording.land_cover == CLASSES[index]]
            chosen = rng.choice(len(members), size=int(rng.integers(1, len(members) + 1)), replace=False)
            members = [members[i] for i in sorted(chosen)]
            weight = math.sqrt(float(weights[index]) / len(members))
            for recording in members:
                components.append(Component(recording, weight, int(rng.integers(len(clips[recording.file])))))
    return components


def mix_audio(components: Sequence[Component], clips: Mapping[str, np.ndarray]) -> np.ndarray:
    """(CLIP_SAMPLES,) float32: the components' recordings brought to equal RMS, each looped to 10 s from its start and
    scaled by its weight, summed; the sum at MIX_RMS_DBFS, or lower where its peak would pass MIX_PEAK."""
    mix = np.zeros(CLIP_SAMPLES, np.float64)
    for component in components:
        clip = clips[component.recording.file]
        looped = np.resize(np.roll(clip, -component.start), CLIP_SAMPLES)
        mix += component.weight * looped / np.sqrt(np.mean(np.square(clip, dtype=np.float64)))
    gain = min(10 ** (MIX_RMS_DBFS / 20) / np.sqrt(np.mean(mix**2)), MIX_PEAK / np.abs(mix).max())
    return (mix * gain).astype(np.float32)


def mix_caption(components: Sequence[Component]) -> str:
    """'ducks quacking and a cow mooing': the mixed recordings' captions, loudest first."""
    return listed([component.recording.caption for component in components])


def split_by_block(views: np.ndarray) -> list[str | None]:
    """'val' for views wholly west of VAL_WEST_OF_LON, 'train' for those wholly east, None across it."""
    west, _ = lnglat_of_mercator(views[:, 0], views[:, 1])
    east, _ = lnglat_of_mercator(views[:, 2], views[:, 1])
    return [
        "val" if right <= VAL_WEST_OF_LON else "train" if left >= VAL_WEST_OF_LON else None
        for left, right in zip(west, east, strict=True)
    ]


def open_scene(path: Path, settings: Settings, stack: ExitStack) -> Scene:
    """The scene at `path`, its reader closed with `stack`; its pixels are classified whole, once."""
    reader = stack.enter_context(open_reader(str(path), cache_dir=REPO / "tiles_cache", **settings.options))
    footprint = reader.footprint_lnglat()
    if footprint is None:
        raise DatasetError(f"scene {path} has no footprint; use a georeferenced raster")
    left, bottom, right, top = transform_bounds(WGS84, WEB_MERCATOR, *footprint)
    half = (
        0.0
        if settings.past_edge
        else settings.view_size_m * mercator_scale((footprint.bottom + footprint.top) / 2.0) / 2.0
    )
    centres = (left + half, bottom + half, right - half, top - half)
    # Views centred on opposite corners of the centres' box span the whole footprint (and past it with past_edge).
    corners = views_centred_at(centres[::2], centres[1::2], settings.view_size_m)
    source = reader.source_pixels(corners, MODEL_INPUT_PX)
    if source.stretch is None:
        raise DatasetError(f"scene {path} is 8-bit; the land-cover rules need Landsat 8 digital numbers")
    red, green, blue = source.values
    classes = classify(red, green, blue, source.valid)
    planes = replace(source, values=class_planes(classes), valid=classes >= 0, stretch=INDICATOR_STRETCH)
    return Scene(path.name, reader, centres, planes)


def random_views(scene: Scene, count: int, view_size_m: float, rng: np.random.Generator) -> np.ndarray:
    left, bottom, right, top = scene.centres
    return views_centred_at(rng.uniform(left, right, count), rng.uniform(bottom, top, count), view_size_m)


def land_cover(scene: Scene, views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each view's coverage (N,) and class shares (N, len(CLASSES)): the scene's class planes cut exactly like the
    views' images, averaged over the pixels that hold imagery."""
    coverage, fractions = [], []
    for batch in _batches(views):
        cut = cut_views(scene.land_cover, batch, MODEL_INPUT_PX)
        sums = cut.pixels.double().sum(dim=(2, 3)).numpy()
        coverage.append(cut.coverage.numpy())
        fractions.append(sums / np.maximum(sums.sum(axis=1, keepdims=True), 1.0))
    return np.concatenate(coverage), np.concatenate(fractions)


def draw_views(
    scenes: Sequence[Scene],
    quotas: dict[str, int],
    split_of: Callable[[np.ndarray], list[str | None]],
    view_sizes: Mapping[int, float],
    min_coverage: float,
    rng: np.random.Generator,
    balanced: bool = False,
) -> dict[str, list[View]]:
    """`quotas[split]` views per split with at least `min_coverage` imagery, drawn at random over `scenes` (in
    proportion to their area) and zoom levels (`view_sizes`: each one's view size in m, equally often), a random
    choice among those kept when a round kept more. `balanced`: a choice among BALANCED_POOL times as many, spread
    over dominant classes (`choose_balanced`)."""
    weights = np.array([scene.centre_area for scene in scenes])
    if not weights.sum() > 0:
        raise DatasetError(f"scenes {[scene.name for scene in scenes]} are smaller than one view; use larger ones")
    pool = BALANCED_POOL if balanced else 1
    kept: dict[str, list[View]] = {split: [] for split in quotas}
    for _ in range(MAX_ROUNDS):
        missing = sum(max(quota * pool - len(kept[split]), 0) for split, quota in quotas.items())
        if missing == 0:
            choose = choose_balanced if balanced else _choose
            return {split: choose(kept[split], quotas[split], rng) for split in quotas}
        for scene, count in zip(
            scenes,
            rng.multinomial(max(math.ceil(ROUND_OVERSAMPLING * missing), MIN_ROUND), weights / weights.sum()),
            strict=True,
        ):
            for zoom_level, zoom_count in zip(
                view_sizes, rng.multinomial(count, [1 / len(view_sizes)] * len(view_sizes)), strict=True
            ):
                if zoom_count == 0:
                    continue
                views = random_views(scene, int(zoom_count), view_sizes[zoom_level], rng)
                coverage, fractions = land_cover(scene, views)
                for index, split in enumerate(split_of(views)):
                    if split in kept and coverage[index] >= min_coverage:
                        kept[split].append(View(split, scene.name, zoom_level, views[index], fractions[index]))
        print(
            "demo_data: drew "
            + ", ".join(f"{len(kept[split])}/{quota * pool} {split}" for split, quota in quotas.items()),
            flush=True,
        )
    raise DatasetError(
        f"could not draw {quotas} views with {min_coverage:.0%} imagery from {[scene.name for scene in scenes]}"
        f" in {MAX_ROUNDS} rounds; check the scenes"
    )


def _choose(views: list[View], count: int, rng: np.random.Generator) -> list[View]:
    return [views[index] for index in sorted(rng.choice(len(views), count, replace=False))]


def choose_balanced(views: list[View], count: int, rng: np.random.Generator) -> list[View]:
    """`count` of `views` (in their order), as evenly spread over dominant classes as they allow: classes in
    order of fewest candidates, each takes its even part of what is left, or all it has if that is fewer."""
    dominant = np.array([view.dominant for view in views])
    groups = sorted((np.flatnonzero(dominant == index) for index in range(len(CLASSES))), key=len)
    chosen: list[int] = []
    for position, group in enumerate(groups):
        take = min(len(group), (count - len(chosen)) // (len(groups) - position))
        chosen.extend(int(index) for index in rng.choice(group, take, replace=False))
    return [views[index] for index in sorted(chosen)]


def _batches(views: np.ndarray) -> Iterator[np.ndarray]:
    for start in range(0, len(views), CUT_BATCH):
        yield views[start : start + CUT_BATCH]


def make_dataset(out_dir: Path, views: int, seed: int, past_edge: bool = False) -> dict[str, Any]:
    """Write the data set into `out_dir` (replacing a data set there) and return its summary; `past_edge`: see
    `Settings`."""
    if views < 1:
        raise DatasetError(f"--views {views} is below 1; ask for at least one train view")
    if seed < 0:
        raise DatasetError(f"--seed {seed} is negative; pass a seed of 0 or more")
    _check_out_dir(out_dir)
    settings, recordings = replace(default_settings(), past_edge=past_edge), read_recordings()
    rng = np.random.default_rng(seed)
    held_out = max(1, round(views * HELD_OUT_SHARE))
    with ExitStack() as stack:
        training = [open_scene(TRAINING_DIR / name, settings, stack) for name in TRAINING_SCENES]
        test = open_scene(settings.test_scene, settings, stack)
        train_sizes = {zoom: settings.view_size_at(zoom) for zoom in settings.train_zoom_levels}
        map_size = {settings.zoom_level: settings.view_size_m}
        coverage = settings.min_coverage
        drawn = draw_views(training, {"train": views}, split_by_block, train_sizes, coverage, rng, balanced=True)
        drawn |= draw_views(training, {"val": held_out}, split_by_block, map_size, coverage, rng)
        drawn |= draw_views([test], {"test": held_out}, lambda batch: ["test"] * len(batch), map_size, coverage, rng)
        ordered = [view for split in SPLITS for view in drawn[split]]
        keys = [f"{view.split}-{index:05d}" for split in SPLITS for index, view in enumerate(drawn[split])]
        fractions = np.stack([view.fractions for view in ordered])
        shares = fractions[: len(drawn["train"])].mean(axis=0)
        weights = mix_weights(fractions, shares)
        clips = _decoded(recordings)
        mixes = [choose_components(row, recordings, clips, rng) for row in weights]
        scenes = {scene.name: scene for scene in [*training, test]}
        try:
            with atomic_directory(out_dir) as folder:
                folder.mkdir()
                _write_views(folder, scenes, ordered, keys)
                _write_mixes(folder, keys, mixes, clips)
                _write_pairs(folder, ordered, keys, mixes, settings.sat_type)
                _write_labels(folder, ordered, keys, mixes)
                summary = _summary(seed, settings, drawn, shares, weights)
                (folder / SUMMARY_NAME).write_text(json.dumps(summary, indent=1) + "\n")
        except OSError as exc:
            raise DatasetError(f"cannot write {out_dir} ({first_line(exc)}); pass a folder you can write") from None
    return summary


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise DatasetError(f"{out_dir} is a file; pass a folder for the data set")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not _holds_dataset(out_dir):
        raise DatasetError(f"{out_dir} holds other files than a demo data set; pass a new folder or empty it")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"cannot create {out_dir.parent} ({first_line(exc)}); pass a folder you can write") from None


def _holds_dataset(folder: Path) -> bool:
    try:
        return str(json.loads((folder / SUMMARY_NAME).read_text()).get("format")).startswith(FORMAT_FAMILY)
    except (OSError, ValueError, AttributeError):
        return False


def _write_views(folder: Path, scenes: dict[str, Scene], views: Sequence[View], keys: Sequence[str]) -> None:
    """Each view's image and land-cover raster, cut scene by scene in batches."""
    for name in ("images", LANDCOVER_DIR):
        (folder / name).mkdir()
    started, done = time.perf_counter(), 0
    for name, scene in scenes.items():
        indices = [index for index, view in enumerate(views) if view.scene == name]
        for start in range(0, len(indices), CUT_BATCH):
            batch = indices[start : start + CUT_BATCH]
            bounds = np.stack([views[index].bounds for index in batch])
            cut = cut_views(scene.reader.source_pixels(bounds, MODEL_INPUT_PX), bounds, MODEL_INPUT_PX)
            planes = cut_views(scene.land_cover, bounds, MODEL_INPUT_PX)
            for index, pixels, classes in zip(batch, cut.pixels.numpy(), planes.pixels.numpy(), strict=True):
                (folder / "images" / f"{keys[index]}.png").write_bytes(encode_png(pixels, zlevel=IMAGE_ZLEVEL))
                _write_landcover(folder / LANDCOVER_DIR / f"{keys[index]}.tif", classes, views[index].bounds)
            done += len(batch)
            print(f"demo_data: {done}/{len(views)} views, {time.perf_counter() - started:.0f} s", flush=True)


def _write_landcover(path: Path, classes: np.ndarray, bounds: np.ndarray) -> None:
    """(len(CLASSES), px, px) uint8 class planes as a GeoTIFF over the view's EPSG:3857 bounds, a band per class."""
    height, width = classes.shape[1:]
    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": len(classes),
        "dtype": "uint8",
        "crs": WEB_MERCATOR,
        "transform": from_bounds(*bounds, width, height),
        "compress": "deflate",
    }
    with rasterio.open(path, "w", **profile) as raster:
        raster.write(classes)
        raster.descriptions = CLASSES


def _decoded(recordings: Sequence[Recording]) -> dict[str, np.ndarray]:
    """Each shipped recording's samples (32 kHz mono, its first 10 s), decoded once."""
    return {
        recording.file: decode_audio(RECORDINGS_CSV.parent / recording.file, CLIP_SECONDS) for recording in recordings
    }


def _write_mixes(
    folder: Path, keys: Sequence[str], mixes: Sequence[Sequence[Component]], clips: Mapping[str, np.ndarray]
) -> None:
    (folder / "recordings").mkdir()
    started = time.perf_counter()
    for done, (key, components) in enumerate(zip(keys, mixes, strict=True), start=1):
        soundfile.write(folder / "recordings" / f"{key}.flac", mix_audio(components, clips), SAMPLE_RATE, "PCM_16")
        if done % 1000 == 0 or done == len(keys):
            print(f"demo_data: {done}/{len(keys)} mixes, {time.perf_counter() - started:.0f} s", flush=True)


def _write_pairs(
    folder: Path, views: Sequence[View], keys: Sequence[str], mixes: Sequence[Sequence[Component]], sat_type: str
) -> None:
    with open(folder / "pairs.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(PAIRS_COLUMNS)
        for view, key, components in zip(views, keys, mixes, strict=True):
            left, bottom, right, top = view.bounds
            lon, lat = lnglat_of_mercator((left + right) / 2.0, (bottom + top) / 2.0)
            writer.writerow(
                [
                    key,
                    f"images/{key}.png",
                    f"recordings/{key}.flac",
                    mix_caption(components),
                    image_caption(view.fractions.tolist()),
                    f"{float(lat):.6f}",
                    f"{float(lon):.6f}",
                    ACQUIRED,
                    view.split,
                    sat_type,
                    AUDIO_SOURCE,
                    CAPTION_SOURCE,
                    view.zoom_level,
                ]
            )


def _write_labels(
    folder: Path, views: Sequence[View], keys: Sequence[str], mixes: Sequence[Sequence[Component]]
) -> None:
    with open(folder / "labels.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "split", "scene", "zoom_level", *CLASSES, "dominant", "mix"])
        for view, key, components in zip(views, keys, mixes, strict=True):
            shares = [f"{share:.4f}" for share in view.fractions]
            mix = ";".join(
                f"{part.recording.land_cover}:{part.recording.file}:{part.weight:.4f}" for part in components
            )
            writer.writerow([key, view.split, view.scene, view.zoom_level, *shares, CLASSES[view.dominant], mix])


def _summary(
    seed: int, settings: Settings, drawn: dict[str, list[View]], shares: np.ndarray, weights: np.ndarray
) -> dict[str, Any]:
    dominant: dict[str, dict[str, int]] = {}
    heard: dict[str, dict[str, int]] = {}
    first = 0
    for split in SPLITS:
        views = drawn[split]
        dominant[split] = _class_counts(np.array([view.dominant for view in views]))
        in_mix = weights[first : first + len(views)] > 0
        heard[split] = {name: int(count) for name, count in zip(CLASSES, in_mix.sum(axis=0), strict=True)}
        first += len(views)
    return {
        "format": FORMAT,
        "seed": seed,
        "views": {split: len(drawn[split]) for split in SPLITS},
        "views_by_zoom_level": {
            split: {
                str(zoom): count for zoom, count in sorted(Counter(view.zoom_level for view in drawn[split]).items())
            }
            for split in SPLITS
        },
        "scenes": {split: sorted({view.scene for view in drawn[split]}) for split in SPLITS},
        "image_px": MODEL_INPUT_PX,
        "sat_type": settings.sat_type,
        "zoom_level": settings.zoom_level,
        "view_size_m": settings.view_size_m,
        "train_zoom_levels": list(settings.train_zoom_levels),
        "min_coverage": settings.min_coverage,
        "past_edge": settings.past_edge,
        "val_west_of_lon": VAL_WEST_OF_LON,
        "acquired": ACQUIRED,
        "train_class_shares": {name: round(float(share), 4) for name, share in zip(CLASSES, shares, strict=True)},
        "dominant": dominant,
        "min_mix_weight": MIN_MIX_WEIGHT,
        "in_mix": heard,
    }


def _class_counts(indexes: np.ndarray) -> dict[str, int]:
    counts = np.bincount(indexes, minlength=len(CLASSES))
    return {name: int(count) for name, count in zip(CLASSES, counts, strict=True)}


def _count(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DatasetError(f"{flag} {text!r} is not a whole number; pass one such as {flag} 1") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m pipeline.demo_data", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to write (replaced if it holds an earlier data set)")
    parser.add_argument("--views", default=str(DEFAULT_VIEWS), help=f"train views (default {DEFAULT_VIEWS})")
    parser.add_argument("--seed", default="0", help="seed of every random draw (default 0)")
    parser.add_argument(
        "--past-edge",
        action="store_true",
        help="views centred anywhere over a scene, kept from the map's imagery.min_coverage (default: views inside)",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        count, seed = _count(args.views, "--views"), _count(args.seed, "--seed")
        summary = make_dataset(args.out_dir, count, seed, past_edge=args.past_edge)
    except Sat2SoundError as exc:
        print(f"error: {first_line(exc)}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{count} {split}" for split, count in summary["views"].items())
    print(f"demo_data: wrote {args.out_dir}: {counts} views in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a place probably sounds like, without training: `python -m pipeline listen BUILD --at LAT,LON` (or
`--along ROUTE.geojson`) [--gallery GALLERY] [--seconds 30] [--top-k 5] [--out place.flac].

- The place: the build's tile under LAT,LON (its embedding from `soundscape.zarr`), refused in one line outside
  the build or where the tile has no prediction.
- The gallery: `--gallery`, else the build's `outputs.gallery`; refused if there is none, if it is empty or if
  other weights than the build's embedded it (`pipeline.gallery`).
- First strategy, a mix: the place's `--top-k` recordings by the composed image->audio + image->caption logit
  (`pipeline.gallery`), weighted by a softmax over those logits, mixed as `pipeline.mix` says (each clip looped or
  trimmed with crossfades and loudness-normalised, the mix brought to `--target-lufs` and never clipped). A
  recording that no longer decodes is left out with a warning line.
- Second strategy, `--generator module:factory`: the place's `--top-k` best captions (image->caption) as one
  prompt for a text-to-audio model (`pipeline.synthesis`), its audio fitted and normalised the same way.
- A soundwalk, `--along ROUTE.geojson` (a line in lon/lat): a track as long as walking the line at `--speed`
  m/s takes; the line is sampled every second, each stretch over one tile is that place's sound (a tile without
  a prediction keeps the sound before it; stretches under MIN_PLACE_SECONDS join the one before), and places
  follow each other with crossfades.
- Writes FLAC (16-bit, mono, 32 kHz) and beside it a JSON sidecar of the same name: every clip used (its file,
  row for Parquet audio, weight, licence, attribution), every place, the loudness target and what was measured.

Every bad input is refused in one line before any audio is decoded.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import mercantile
import numpy as np
import soundfile

from common.atomic import atomic_path, atomic_write_bytes, unwritable_reason
from model.audio import SAMPLE_RATE
from model.errors import AudioDecodeError
from pipeline.errors import GalleryWarning, ListenError
from pipeline.gallery import CAPTION, COMPOSED, Gallery, build_command, item_facts, open_filled_gallery
from pipeline.gallery_sources import AudioReader
from pipeline.mix import (
    CROSSFADE_SECONDS,
    LOUDNESS_RANGE_LUFS,
    crossfade_join,
    fit_length,
    mastered,
    measured_loudness,
    mix,
    softmax,
    to_loudness,
)
from pipeline.new_query import BuiltMap, check_top_k
from pipeline.synthesis import TextToAudio, generated, load_generator, prompt_of
from pipeline.walk import route_points

MIN_SECONDS = 2 * CROSSFADE_SECONDS
MAX_SECONDS = 3 * 3600.0
MAX_TOP_K = 50
WALK_STEP_SECONDS = 1.0
MIN_PLACE_SECONDS = 2 * CROSSFADE_SECONDS
OUTPUT_SUFFIX = ".flac"
SIDECAR_SUFFIX = ".json"


class Place(NamedTuple):
    lat: float
    lon: float
    row: int
    col: int
    seconds: float


class Rendered(NamedTuple):
    """One place's sound and what made it."""

    samples: np.ndarray
    facts: dict[str, Any]


Renderer = Callable[[np.ndarray, float], Rendered]


def parse_point(text: str) -> tuple[float, float]:
    """LAT,LON in decimal degrees."""
    try:
        lat, lon = (float(part) for part in text.split(","))
    except ValueError:
        raise ListenError(f"--at {text!r} is not LAT,LON; write e.g. --at=-25.35,-54.52") from None
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise ListenError(f"--at {text}: latitude or longitude out of range; write LAT,LON in decimal degrees")
    return lat, lon


def check_output(out: Path) -> None:
    """`out` names a FLAC file that can be written, as can its sidecar."""
    if out.suffix.lower() != OUTPUT_SUFFIX:
        raise ListenError(f"--out {out} is not a .flac file; name one, e.g. --out place.flac")
    if reason := unwritable_reason(out):
        raise ListenError(f"cannot write --out {out} ({reason}); pass --out a writable .flac path")


def check_numbers(seconds: float, top_k: int, target_lufs: float) -> None:
    if not MIN_SECONDS <= seconds <= MAX_SECONDS:
        raise ListenError(
            f"--seconds {seconds:g} is outside {MIN_SECONDS:g} to {MAX_SECONDS:g}; ask for another length"
        )
    check_top_k(top_k, 1, MAX_TOP_K, "recordings", ListenError)
    quietest, loudest = LOUDNESS_RANGE_LUFS
    if not quietest <= target_lufs <= loudest:
        raise ListenError(
            f"--target-lufs {target_lufs:g} is outside {quietest:g} to {loudest:g} LUFS; give e.g. -23 (EBU R128)"
            " or -14 (streaming)"
        )


def gallery_of(built: BuiltMap, given: Path | None) -> Gallery:
    """The gallery asked for, else the build's own, refused if there is none, it is empty or of other weights."""
    folder = given if given is not None else built.store.gallery
    if folder is None:
        raise ListenError(
            f"the build {built.folder} has no gallery (outputs.gallery is not set); pass --gallery GALLERY"
        )
    gallery = open_filled_gallery(folder)
    if gallery.record.sha256 != built.model.sha256:
        raise ListenError(
            f"the gallery {folder} was embedded with other weights ({gallery.record.checkpoint}) than the build's"
            f" ({built.model.checkpoint}); build one with {build_command('NEW_GALLERY', built.model.path)}"
        )
    return gallery


def tile_at(built: BuiltMap, lat: float, lon: float, fix: str = "pick a place inside it") -> tuple[int, int]:
    """The grid row and column of the build's tile under lat, lon (refused outside the build, with `fix`)."""
    grid = built.store.grid
    x, y = mercantile.xy(lon, lat)
    col, row = (int(np.floor(value)) for value in ~grid.transform @ (x, y))
    if not (0 <= row < grid.height and 0 <= col < grid.width):
        west, south, east, north = _lnglat_bounds(built)
        raise ListenError(
            f"{lat:.5f},{lon:.5f} lies outside the build {built.folder} (lat {south:.4f} to {north:.4f}, lon"
            f" {west:.4f} to {east:.4f}); {fix}"
        )
    return row, col


def _lnglat_bounds(built: BuiltMap) -> tuple[float, float, float, float]:
    left, bottom, right, top = built.store.grid.bounds
    west, south = mercantile.lnglat(left, bottom)
    east, north = mercantile.lnglat(right, top)
    return west, south, east, north


def is_valid(built: BuiltMap, row: int, col: int) -> bool:
    return bool(built.store.valid(slice(row, row + 1), slice(col, col + 1))[0, 0])


def tile_embedding(built: BuiltMap, row: int, col: int) -> np.ndarray:
    vector = built.store.embeddings(slice(row, row + 1), slice(col, col + 1))[:, 0, 0].astype(np.float32)
    return vector / np.linalg.norm(vector)


def place_at(built: BuiltMap, lat: float, lon: float, seconds: float) -> Place:
    row, col = tile_at(built, lat, lon)
    if not is_valid(built, row, col):
        raise ListenError(
            f"the tile under {lat:.5f},{lon:.5f} has no prediction in {built.folder} (no imagery there); pick"
            " another place"
        )
    return Place(lat, lon, row, col, seconds)


def route_places(built: BuiltMap, route: Path, speed: float) -> list[Place]:
    """The places a walk along the line in `route` passes, each with the seconds spent over it."""
    lats, lons = route_points(route, speed, WALK_STEP_SECONDS, MIN_SECONDS, MAX_SECONDS)
    fix = f"the route {route} leaves the build there: draw it inside the build"
    cells = [tile_at(built, lat, lon, fix) for lat, lon in zip(lats, lons, strict=True)]
    valid = [is_valid(built, row, col) for row, col in cells]
    if not any(valid):
        raise ListenError(f"no tile along {route} has a prediction in {built.folder}; walk where the map has imagery")
    runs: list[list[int]] = []  # row, col, steps and first step of each stretch over one tile
    for index, (cell, has_sound) in enumerate(zip(cells, valid, strict=True)):
        if has_sound and (not runs or (runs[-1][0], runs[-1][1]) != cell):
            runs.append([*cell, 0, index])
        if runs:
            runs[-1][2] += 1
    runs[0][2] += valid.index(True)  # the steps before the first tile with a prediction
    return _merged(runs, lats, lons)


def _merged(runs: list[list[int]], lats: np.ndarray, lons: np.ndarray) -> list[Place]:
    places: list[Place] = []
    for row, col, steps, start in runs:
        seconds = steps * WALK_STEP_SECONDS
        if places and (seconds < MIN_PLACE_SECONDS or places[-1].seconds < MIN_PLACE_SECONDS):
            places[-1] = places[-1]._replace(seconds=places[-1].seconds + seconds)
            continue
        places.append(Place(float(lats[start]), float(lons[start]), row, col, seconds))
    return places


def mix_renderer(gallery: Gallery, top_k: int, target_lufs: float, longest: float) -> Renderer:
    """A place's sound from its best recordings, each decoded once for the whole track; a recording that can no
    longer be decoded is left out with a warning (the others' weights are a softmax among themselves)."""
    reader = AudioReader()
    clips: dict[int, np.ndarray | None] = {}

    def clip(position: int) -> np.ndarray | None:
        if position not in clips:
            try:
                clips[position] = reader.clip(gallery.items[position], longest)
            except AudioDecodeError as exc:
                warnings.warn(GalleryWarning(f"left out {gallery.items[position].id}: {exc}"), stacklevel=2)
                clips[position] = None
        return clips[position]

    def render(embedding: np.ndarray, seconds: float) -> Rendered:
        logits, found = gallery.search(embedding, top_k, COMPOSED)
        usable = []  # position, logit and samples of each recording mixed
        for position, logit in zip(found[0].tolist(), logits[0].tolist(), strict=True):
            samples = clip(position) if position >= 0 else None
            if samples is not None:
                usable.append((position, logit, samples))
        if not usable:
            raise ListenError(f"none of the {top_k} best recordings of {gallery.folder} decodes; build it again")
        weights = softmax(np.array([logit for _, logit, _ in usable]))
        length = round(seconds * SAMPLE_RATE)
        mixed = mix([samples for *_, samples in usable], weights.tolist(), length, target_lufs)
        used = [
            {**item_facts(gallery.items[position]), "weight": float(weight), "logit": logit}
            for (position, logit, _), weight in zip(usable, weights, strict=True)
        ]
        return Rendered(mixed, {"clips": used})

    return render


def generator_renderer(gallery: Gallery, generator: TextToAudio, spec: str, top_k: int) -> Renderer:
    """A place's sound from a text-to-audio model prompted with its best captions."""
    crossfade = round(CROSSFADE_SECONDS * SAMPLE_RATE)

    def render(embedding: np.ndarray, seconds: float) -> Rendered:
        cosines, found = gallery.search(embedding, top_k, CAPTION)
        kept = found[0] >= 0
        items = [gallery.items[position] for position in found[0][kept]]
        prompt = prompt_of([item.caption for item in items])
        samples = fit_length(generated(generator, prompt, seconds), round(seconds * SAMPLE_RATE), crossfade)
        captions = [
            {**item_facts(item), "cosine": float(cosine)} for item, cosine in zip(items, cosines[0][kept], strict=True)
        ]
        return Rendered(samples, {"generator": spec, "prompt": prompt, "captions": captions})

    return render


def render_track(
    built: BuiltMap, places: list[Place], render: Renderer, target_lufs: float
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The places' sounds one after the other, crossfaded, each at the target loudness, and their facts."""
    crossfade = round(CROSSFADE_SECONDS * SAMPLE_RATE)
    sounds, facts = [], []
    start = 0.0
    for index, place in enumerate(places):
        overlap = CROSSFADE_SECONDS if index < len(places) - 1 else 0.0
        rendered = render(tile_embedding(built, place.row, place.col), place.seconds + overlap)
        sounds.append(to_loudness(rendered.samples, target_lufs))
        facts.append({**place._asdict(), "start_s": start, **rendered.facts})
        start += place.seconds
    track = sounds[0]
    for sound in sounds[1:]:
        track = crossfade_join(track, sound, crossfade)
    return mastered(track, target_lufs), facts


def clips_used(places: list[dict[str, Any]], total_seconds: float) -> list[dict[str, Any]]:
    """Every recording mixed, once, with its weight in the whole track (its weights by the time spent at each
    place), heaviest first."""
    used: dict[str, dict[str, Any]] = {}
    for place in places:
        share = place["seconds"] / total_seconds
        for clip in place.get("clips", []):
            entry = used.setdefault(clip["id"], {key: clip[key] for key in clip if key not in ("weight", "logit")})
            entry["weight"] = entry.get("weight", 0.0) + clip["weight"] * share
    return sorted(used.values(), key=lambda entry: -entry["weight"])


def write_listening(out: Path, track: np.ndarray, sidecar: dict[str, Any]) -> Path:
    """The FLAC and its sidecar (returned), each written atomically."""
    with atomic_path(out) as tmp:
        soundfile.write(tmp, track, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    side = out.with_suffix(SIDECAR_SUFFIX)
    atomic_write_bytes(side, json.dumps(sidecar, indent=1).encode())
    return side


def sidecar_of(
    built: BuiltMap, gallery: Gallery, places: list[dict[str, Any]], track: np.ndarray, target_lufs: float
) -> dict[str, Any]:
    seconds = len(track) / SAMPLE_RATE
    return {
        "build": str(built.folder),
        "gallery": str(gallery.folder),
        "seconds": seconds,
        "sample_rate": SAMPLE_RATE,
        "target_lufs": target_lufs,
        "loudness_lufs": measured_loudness(track),
        "peak": float(np.max(np.abs(track))),
        "clips": clips_used(places, sum(place["seconds"] for place in places)),
        "places": places,
    }


class Listening(NamedTuple):
    out: Path
    sidecar_path: Path
    sidecar: dict[str, Any]


def listen(
    build: Path,
    out: Path,
    *,
    at: str | None = None,
    along: Path | None = None,
    gallery: Path | None = None,
    seconds: float,
    top_k: int,
    speed: float,
    target_lufs: float,
    generator: str | None = None,
) -> Listening:
    """The sound of the place at `at` (LAT,LON) or of a walk `along` a route, written to `out` and its sidecar."""
    from pipeline.new_query import open_built_map

    check_numbers(seconds, top_k, target_lufs)
    check_output(out)
    point = parse_point(at) if at is not None else None
    built = open_built_map(build)
    chosen = gallery_of(built, gallery)
    if point is not None:
        places = [place_at(built, *point, seconds)]
    else:
        if along is None:
            raise ListenError("give a place: --at LAT,LON, or --along ROUTE.geojson for a walk")
        places = route_places(built, along, speed)
    if generator is not None:
        render = generator_renderer(chosen, load_generator(generator), generator, top_k)
    else:
        longest = max(place.seconds for place in places) + CROSSFADE_SECONDS
        render = mix_renderer(chosen, top_k, target_lufs, longest)
    track, facts = render_track(built, places, render, target_lufs)
    if not math.isfinite(measured_loudness(track)):
        raise ListenError(
            f"the sound made for {out.name} is silent (the recordings chosen hold no sound); build the gallery"
            f" {chosen.folder} again, which leaves silent recordings out"
        )
    sidecar = sidecar_of(built, chosen, facts, track, target_lufs)
    return Listening(out, write_listening(out, track, sidecar), sidecar)


def listening_lines(result: Listening) -> list[str]:
    """What `python -m pipeline listen` prints: the files, the loudness, and the recordings or prompts used."""
    sidecar = result.sidecar
    lines = [
        f"wrote {result.out} ({sidecar['seconds']:.1f} s, {sidecar['loudness_lufs']:.1f} LUFS, target"
        f" {sidecar['target_lufs']:g}; peak {sidecar['peak']:.3f}) and {result.sidecar_path}"
    ]
    lines += [
        f"{clip['weight']:6.1%}  {clip['caption']}  ({clip['licence']}; {clip['file']})" for clip in sidecar["clips"]
    ]
    lines += [
        f"prompt at {place['lat']:.5f},{place['lon']:.5f}: {place['prompt']}"
        for place in sidecar["places"]
        if "prompt" in place
    ]
    return lines

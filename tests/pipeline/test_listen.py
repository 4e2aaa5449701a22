"""`python -m pipeline listen`: a place's recordings mixed at a loudness target, soundwalks, the text-to-audio
plug-in and the bad inputs.

The builds are synthetic stores of the demo model's width (tests/support/gallery.py); the galleries hold the
shipped recordings with random embeddings (no model: listen loads none), so what is retrieved is known from numpy.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import mercantile
import numpy as np
import pytest
import soundfile
from support.gallery import (
    DEMO_DIM,
    DEMO_WEIGHTS,
    LOGIT_SCALES,
    ToneGenerator,
    demo_record,
    listen_build,
    shipped_items,
    vector_gallery,
)

from model.audio import SAMPLE_RATE
from pipeline import mix
from pipeline.__main__ import TARGET_LUFS, main
from pipeline.build import ERROR_STATUS
from pipeline.gallery import AUDIO, CAPTION, write_gallery
from pipeline.gallery_sources import AudioReader
from pipeline.listen import CROSSFADE_SECONDS
from pipeline.store.read import SoundscapeStore

GALLERY_SIZE = 12
TOP_K = 4
LOUDNESS_TOLERANCE_LU = 1.0
# One 16-bit step: what FLAC's quantisation may add to a sample.
PCM_STEP = 1 / 32768


class Setup:
    def __init__(self, root: Path) -> None:
        self.gallery = root / "gallery"
        self.embeddings = vector_gallery(self.gallery, GALLERY_SIZE)
        self.build = listen_build(root / "build", gallery=self.gallery)
        self.store = SoundscapeStore(self.build / "soundscape.zarr")
        rows, cols = np.nonzero(self.store.valid(slice(None), slice(None)))
        self.valid = list(zip(rows.tolist(), cols.tolist(), strict=True))

    def point(self, row: int, col: int) -> str:
        return point_of(self.store, row, col)

    def expected(self, row: int, col: int, k: int) -> tuple[list[int], np.ndarray]:
        """Brute force: the k best items by the composed logit and those logits."""
        tile = self.store.embeddings(slice(row, row + 1), slice(col, col + 1))[:, 0, 0].astype(np.float32)
        tile /= np.linalg.norm(tile)
        logits = sum(math.exp(LOGIT_SCALES[name]) * self.embeddings[name] @ tile for name in (AUDIO, CAPTION))
        order = np.argsort(-logits, kind="stable")[:k]
        return order.tolist(), logits[order]


def point_of(store: SoundscapeStore, row: int, col: int) -> str:
    """--at for the centre of a tile."""
    lon, lat = mercantile.lnglat(*(store.grid.transform @ (col + 0.5, row + 0.5)))
    return f"{lat:.7f},{lon:.7f}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return Setup(tmp_path_factory.mktemp("listen"))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(["listen", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def check_loudness(path: Path, target: float) -> np.ndarray:
    samples, rate = soundfile.read(path, dtype="float32")
    assert rate == SAMPLE_RATE and samples.ndim == 1
    assert abs(mix.measured_loudness(samples) - target) <= LOUDNESS_TOLERANCE_LU
    assert np.max(np.abs(samples)) <= mix.PEAK_CEILING + PCM_STEP
    return samples


def test_a_place_is_its_best_recordings_mixed_at_the_target_loudness(
    setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: list[str] = []
    clip = AudioReader.clip
    monkeypatch.setattr(
        AudioReader, "clip", lambda self, item, seconds: decoded.append(item.id) or clip(self, item, seconds)
    )
    row, col = setup.valid[len(setup.valid) // 3]
    out = tmp_path / "place.flac"
    status, printed, err = run(
        capsys,
        str(setup.build),
        "--at",
        setup.point(row, col),
        "--top-k",
        str(TOP_K),
        "--seconds",
        "12",
        "--out",
        str(out),
    )
    assert status == 0, err

    samples = check_loudness(out, TARGET_LUFS)
    assert len(samples) == 12 * SAMPLE_RATE
    sidecar = json.loads(out.with_suffix(".json").read_text())
    order, logits = setup.expected(row, col, TOP_K)
    items = json.loads((setup.gallery / "items.json").read_text())
    assert [clip["id"] for clip in sidecar["clips"]] == [items[i]["id"] for i in order] == decoded
    weights = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose([clip["weight"] for clip in sidecar["clips"]], weights, rtol=1e-4)
    assert all(
        clip["licence"] == "CC0-1.0" and clip["attribution"] and Path(clip["file"]).is_file()
        for clip in sidecar["clips"]
    )
    assert sidecar["target_lufs"] == TARGET_LUFS and sidecar["places"][0]["row"] == row
    assert str(out) in printed


def test_another_target_loudness_is_met_too(setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    row, col = setup.valid[0]
    out = tmp_path / "loud.flac"
    status, _, err = run(
        capsys,
        str(setup.build),
        "--at",
        setup.point(row, col),
        "--seconds",
        "5",
        "--target-lufs",
        "-16",
        "--gallery",
        str(setup.gallery),
        "--out",
        str(out),
    )
    assert status == 0, err
    check_loudness(out, -16.0)
    assert json.loads(out.with_suffix(".json").read_text())["target_lufs"] == -16.0


def test_a_soundwalk_crossfades_between_the_places_it_passes(
    setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    row = setup.valid[0][0]
    cols = sorted(col for r, col in setup.valid if r == row)
    start, end = (json.loads(f"[{setup.point(row, col)}]") for col in (cols[0], cols[-1]))
    route = tmp_path / "route.geojson"
    line = {"type": "LineString", "coordinates": [[start[1], start[0]], [end[1], end[0]]]}
    route.write_text(json.dumps({"type": "Feature", "properties": {}, "geometry": line}))
    out = tmp_path / "walk.flac"
    status, _, err = run(capsys, str(setup.build), "--along", str(route), "--speed", "400", "--out", str(out))
    assert status == 0, err

    samples = check_loudness(out, TARGET_LUFS)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    places = sidecar["places"]
    assert len(places) > 1
    assert [place["start_s"] for place in places] == sorted({place["start_s"] for place in places})
    assert len(samples) == round(sum(place["seconds"] for place in places) * SAMPLE_RATE)
    assert all(place["seconds"] >= 2 * CROSSFADE_SECONDS for place in places)
    assert {(place["row"], place["col"]) for place in places} <= set(setup.valid)
    mixed = {clip["id"] for place in places for clip in place["clips"]}
    assert {clip["id"] for clip in sidecar["clips"]} == mixed
    assert sum(clip["weight"] for clip in sidecar["clips"]) == pytest.approx(1.0)


def test_the_second_strategy_prompts_a_text_to_audio_model_with_the_best_captions(
    setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    row, col = setup.valid[-1]
    tile = setup.store.embeddings(slice(row, row + 1), slice(col, col + 1))[:, 0, 0].astype(np.float32)
    best = np.argsort(-(setup.embeddings[CAPTION] @ (tile / np.linalg.norm(tile))), kind="stable")[:TOP_K]
    items = json.loads((setup.gallery / "items.json").read_text())
    captions = list(dict.fromkeys(items[i]["caption"] for i in best))
    ToneGenerator.prompts.clear()
    out = tmp_path / "generated.flac"
    status, printed, err = run(
        capsys,
        str(setup.build),
        "--at",
        setup.point(row, col),
        "--top-k",
        str(TOP_K),
        "--seconds",
        "6",
        "--generator",
        "support.gallery:ToneGenerator",
        "--out",
        str(out),
    )
    assert status == 0, err

    assert ToneGenerator.prompts == ["; ".join(captions)]
    check_loudness(out, TARGET_LUFS)
    place = json.loads(out.with_suffix(".json").read_text())["places"][0]
    assert place["prompt"] == ToneGenerator.prompts[0] and place["generator"] == "support.gallery:ToneGenerator"
    assert [caption["id"] for caption in place["captions"]] == [items[i]["id"] for i in best]
    assert "prompt at" in printed


def test_a_recording_gone_since_the_gallery_was_built_is_left_out_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gallery = tmp_path / "gallery"
    vector_gallery(gallery, 3)
    items = json.loads((gallery / "items.json").read_text())
    gone = tmp_path / "gone.flac"
    shutil.copy(items[0]["audio"], gone)
    items[0]["audio"] = str(gone)
    (gallery / "items.json").write_text(json.dumps(items))
    gone.unlink()
    build = listen_build(tmp_path / "build", gallery=gallery)
    store = SoundscapeStore(build / "soundscape.zarr")
    row, col = (int(values[0]) for values in np.nonzero(store.valid(slice(None), slice(None))))
    out = tmp_path / "place.flac"
    argv = [str(build), "--at", point_of(store, row, col), "--top-k", "3", "--seconds", "4", "--out", str(out)]
    status, _, err = run(capsys, *argv)

    assert status == 0
    assert err.startswith(f"warning: left out {items[0]['id']}: audio file {gone} does not exist"), err
    assert len(err.splitlines()) == 1
    clips = json.loads(out.with_suffix(".json").read_text())["clips"]
    assert {clip["id"] for clip in clips} == {item["id"] for item in items[1:]}
    assert sum(clip["weight"] for clip in clips) == pytest.approx(1.0)
    check_loudness(out, TARGET_LUFS)


def test_a_short_clip_is_looped_with_crossfades_to_any_length() -> None:
    clip = np.ones(SAMPLE_RATE // 2, np.float32)
    looped = mix.fit_length(clip, 3 * SAMPLE_RATE, SAMPLE_RATE)
    assert len(looped) == 3 * SAMPLE_RATE
    # Equal-power crossfades of a constant: the joins rise to sqrt(2) at most, never drop to silence.
    assert looped.min() > 0.99 and looped.max() <= math.sqrt(2) + 1e-6
    np.testing.assert_array_equal(mix.fit_length(np.arange(10, dtype=np.float32), 4, 2), [0, 1, 2, 3])


def test_a_mix_too_loud_for_its_target_is_turned_down_not_clipped() -> None:
    square = np.sign(np.sin(np.linspace(0, 400 * np.pi, 4 * SAMPLE_RATE))).astype(np.float32)
    track = mix.mastered(square * 0.01, target_lufs=0.0)
    assert np.max(np.abs(track)) <= mix.PEAK_CEILING + 1e-6
    assert mix.measured_loudness(track) < 0.0


# --- bad inputs: one line, exit status 2, nothing written ---------------------------------------------------------


def _bad_cases(setup: Setup, root: Path) -> dict[str, tuple[list[str], str]]:
    row, col = setup.valid[0]
    point = setup.point(row, col)
    invalid = next(
        (r, c)
        for r in range(setup.store.grid.height)
        for c in range(setup.store.grid.width)
        if (r, c) not in set(setup.valid)
    )
    a_file = root / "a_file"
    a_file.write_text("not a folder")
    folder_flac = root / "folder.flac"
    folder_flac.mkdir()
    empty = root / "empty_gallery"
    write_gallery(
        empty, [], {name: np.zeros((0, DEMO_DIM), np.float32) for name in (AUDIO, CAPTION)}, "x", "0" * 64, LOGIT_SCALES
    )
    foreign = root / "foreign_gallery"
    vector_gallery(foreign, 3, sha256="1" * 64)
    # A gallery whose recordings went silent after it was built (a build now leaves silent ones out).
    silent = root / "silent_gallery"
    embeddings = vector_gallery(silent, 3)
    soundfile.write(root / "silence.wav", np.zeros(SAMPLE_RATE * 5, np.float32), SAMPLE_RATE)
    items = [replace(item, audio=str(root / "silence.wav")) for item in shipped_items(3)]
    write_gallery(silent, items, embeddings, str(DEMO_WEIGHTS), demo_record().sha256, LOGIT_SCALES)
    no_gallery = listen_build(root / "build_without_gallery")
    not_a_line = root / "points.geojson"
    not_a_line.write_text(json.dumps({"type": "Point", "coordinates": [2.4, 48.8]}))
    table = root / "route.csv"
    table.write_text("lat,lon\n48.8,2.4\n48.9,2.5\n")
    lat, lon = (float(part) for part in point.split(","))
    leaving = root / "leaving.geojson"  # from a tile of the build 5 degrees east, far past its edge
    leaving.write_text(json.dumps({"type": "LineString", "coordinates": [[lon, lat], [lon + 5.0, lat]]}))
    build, out = str(setup.build), str(root / "out.flac")
    return {
        "outside the build": ([build, "--at", "10.0,10.0", "--out", out], "lies outside the build"),
        "tile without prediction": ([build, "--at", setup.point(*invalid), "--out", out], "has no prediction"),
        "not a point": ([build, "--at", "north", "--out", out], "is not LAT,LON"),
        "no gallery": ([str(no_gallery), "--at", point, "--out", out], "has no gallery (outputs.gallery"),
        "missing gallery": ([build, "--at", point, "--gallery", str(root / "nope"), "--out", out], "no folder"),
        "empty gallery": ([build, "--at", point, "--gallery", str(empty), "--out", out], "is empty"),
        "silent gallery": (
            [build, "--at", point, "--gallery", str(silent), "--out", out],
            "the sound made for out.flac is silent (the recordings chosen hold no sound); build the gallery",
        ),
        "gallery of other weights": ([build, "--at", point, "--gallery", str(foreign), "--out", out], "other weights"),
        "unwritable output": ([build, "--at", point, "--out", str(a_file / "x.flac")], "cannot write"),
        "output a folder": ([build, "--at", point, "--out", str(root)], "is not a .flac file"),
        "output a folder named .flac": ([build, "--at", point, "--out", str(folder_flac)], "is a folder"),
        "output not flac": ([build, "--at", point, "--out", str(root / "x.wav")], "is not a .flac file"),
        "seconds too short": ([build, "--at", point, "--seconds", "0.5", "--out", out], "--seconds 0.5 is outside"),
        "no recordings": (
            [build, "--at", point, "--top-k", "0", "--out", out],
            "--top-k 0 is outside 1 to 50; ask for 1 or more recordings",
        ),
        "fewer than no recordings": (
            [build, "--at", point, "--top-k=-3", "--out", out],
            "--top-k -3 is outside 1 to 50; ask for 1 or more recordings",
        ),
        "too many recordings": (
            [build, "--at", point, "--top-k", "51", "--out", out],
            "--top-k 51 is outside 1 to 50; ask for 50 or fewer recordings",
        ),
        "target above the ceiling": (
            [build, "--at", point, "--target-lufs", "3", "--out", out],
            "--target-lufs 3 is outside -70 to -1 LUFS",
        ),
        "no route file": ([build, "--along", str(root / "none.geojson"), "--out", out], "no route file"),
        "route not a line": ([build, "--along", str(not_a_line), "--out", out], "holds no single line"),
        "route leaving the build": (
            [build, "--along", str(leaving), "--speed", "1000", "--out", out],
            "leaves the build there: draw it inside the build",
        ),
        "route a table": ([build, "--along", str(table), "--out", out], "(it holds no geometry column)"),
        "generator not importable": (
            [build, "--at", point, "--generator", "no_such_module:Model", "--out", out],
            "cannot import it",
        ),
        "generator without generate": (
            [build, "--at", point, "--generator", "support.gallery:NotAGenerator", "--out", out],
            "lacks sample_rate or generate",
        ),
        "generator needing arguments": (
            [build, "--at", point, "--generator", "math:sqrt", "--out", out],
            "math:sqrt cannot be called without arguments; name a class or function that takes no arguments",
        ),
        "generator no factory": (
            [build, "--at", point, "--generator", "math:pi", "--out", out],
            "math:pi is a float, not a factory",
        ),
    }


BAD_CASES = [
    "outside the build",
    "tile without prediction",
    "not a point",
    "no gallery",
    "missing gallery",
    "empty gallery",
    "gallery of other weights",
    "unwritable output",
    "output a folder",
    "output a folder named .flac",
    "output not flac",
    "seconds too short",
    "no recordings",
    "fewer than no recordings",
    "too many recordings",
    "target above the ceiling",
    "no route file",
    "route not a line",
    "route a table",
    "route leaving the build",
    "generator not importable",
    "generator without generate",
    "generator needing arguments",
    "generator no factory",
]


@pytest.fixture(scope="module")
def bad_cases(setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[list[str], str]]:
    return _bad_cases(setup, tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("case", BAD_CASES)
def test_a_bad_listen_input_is_one_line_and_writes_nothing(
    case: str,
    bad_cases: dict[str, tuple[list[str], str]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    argv, words = bad_cases[case]

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("audio was decoded")

    monkeypatch.setattr(AudioReader, "clip", refuse)
    out = Path(argv[argv.index("--out") + 1])
    status, printed, err = run(capsys, *argv)
    assert status == ERROR_STATUS and printed == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "; " in lines[0], err
    assert words in lines[0]
    assert not out.is_file() and not out.with_suffix(".json").exists()


def test_a_place_whose_recordings_are_silent_is_refused_and_writes_nothing(
    bad_cases: dict[str, tuple[list[str], str]], capsys: pytest.CaptureFixture[str]
) -> None:
    argv, words = bad_cases["silent gallery"]
    out = Path(argv[argv.index("--out") + 1])
    status, printed, err = run(capsys, *argv)
    assert (status, printed) == (ERROR_STATUS, "") and err.startswith(f"error: {words}") and err.count("\n") == 1
    assert not out.is_file() and not out.with_suffix(".json").exists()


def test_listen_needs_a_place(capsys: pytest.CaptureFixture[str], setup: Setup) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["listen", str(setup.build)])
    assert stopped.value.code == ERROR_STATUS
    assert "one of the arguments --at --along is required" in capsys.readouterr().err

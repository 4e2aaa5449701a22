"""`python -m pipeline gallery build`: the shipped gallery (examples/sounds, embedded by the demo model), retrieval
against brute-force numpy search, adding recordings, undecodable ones, the Parquet layout and the bad inputs."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from support.gallery import DEMO_DIM, DEMO_WEIGHTS, SOUNDS, demo_record, unit_rows, vector_gallery
from support.pair_data import geosound_row, geosound_schema, write_shard

from model.audio import SAMPLE_RATE
from model.inference import Sat2SoundEncoder
from pipeline import vectors
from pipeline.__main__ import main
from pipeline.build import ERROR_STATUS
from pipeline.config import load_build_config
from pipeline.errors import BuildConfigError
from pipeline.gallery import AUDIO, CAPTION, COMPOSED, check_build_gallery, open_gallery
from pipeline.gallery_sources import AudioReader, dataset_items

K = 5
NEAR_TIE = 1e-5


def build(capsys: pytest.CaptureFixture[str], source: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    status = main(["gallery", "build", str(source), "--checkpoint", str(DEMO_WEIGHTS), "--out", str(out), *extra])
    printed, err = capsys.readouterr()
    return status, printed, err


def brute_force(embeddings: dict[str, np.ndarray], scales: dict[str, float], query: np.ndarray, k: int) -> np.ndarray:
    composed = sum(math.exp(scales[name]) * embeddings[name] @ query for name in (AUDIO, CAPTION))
    return np.argsort(-composed, kind="stable")[:k]


def same_ranking(found: np.ndarray, expected: np.ndarray, scores: np.ndarray) -> bool:
    """Equal, or differing only where two scores are closer than float32 products can order."""
    return bool(np.array_equal(found, expected) or np.all(np.abs(np.diff(scores)) < NEAR_TIE))


# --- retrieval, on galleries of known vectors ----------------------------------------------------------------------


def test_tile_matches_are_the_brute_force_best_items_of_each_valid_tile_at_each_time(tmp_path: Path) -> None:
    embeddings = vector_gallery(tmp_path / "gallery", 40, seed=4)
    gallery = open_gallery(tmp_path / "gallery")
    tiles = unit_rows(2 * 30, DEMO_DIM, seed=8).reshape(2, 30, DEMO_DIM)
    valid = np.arange(30) % 4 != 0
    matches = gallery.tile_matches(tiles, valid, K)
    assert matches.item.shape == (2, K, 30) and matches.item.dtype == np.int32
    for time, per_time in enumerate(tiles):
        for tile in np.flatnonzero(valid):
            expected = brute_force(embeddings, gallery.record.logit_scale, per_time[tile], K)
            found = matches.item[time, :, tile]
            assert same_ranking(found, expected, matches.logit[time, :, tile])
            np.testing.assert_allclose(
                matches.audio_cosine[time, :, tile], embeddings[AUDIO][found] @ per_time[tile], atol=1e-5
            )
            np.testing.assert_allclose(
                matches.caption_cosine[time, :, tile], embeddings[CAPTION][found] @ per_time[tile], atol=1e-5
            )
            scales = {name: math.exp(gallery.record.logit_scale[name]) for name in (AUDIO, CAPTION)}
            logits = (
                scales[AUDIO] * matches.audio_cosine[time, :, tile]
                + scales[CAPTION] * matches.caption_cosine[time, :, tile]
            )
            np.testing.assert_allclose(matches.logit[time, :, tile], logits, rtol=1e-4)
    assert (matches.item[:, :, ~valid] == -1).all() and np.isnan(matches.logit[:, :, ~valid]).all()
    assert set(matches.arrays()) == {"gallery_item", "gallery_logit", "gallery_audio_cosine", "gallery_caption_cosine"}


def test_ranks_beyond_a_small_gallery_stay_empty(tmp_path: Path) -> None:
    vector_gallery(tmp_path / "gallery", 3)
    tiles = unit_rows(6, DEMO_DIM, seed=2)[None]
    matches = open_gallery(tmp_path / "gallery").tile_matches(tiles, np.ones(6, bool), K)
    assert (np.sort(matches.item[0, :3], axis=0) == np.arange(3)[:, None]).all()
    assert (matches.item[0, 3:] == -1).all() and np.isnan(matches.audio_cosine[0, 3:]).all()


def test_an_exact_gallery_index_finds_what_brute_force_finds(tmp_path: Path) -> None:
    embeddings = vector_gallery(tmp_path / "gallery", 300, seed=3)
    gallery = open_gallery(tmp_path / "gallery")
    queries = unit_rows(40, DEMO_DIM, seed=9)
    assert gallery.record.index_kind == vectors.FLAT
    _, found = gallery.search(queries, K, COMPOSED)
    for query, row in zip(queries, found, strict=True):
        assert np.array_equal(row, brute_force(embeddings, gallery.record.logit_scale, query, K))
    for name in (AUDIO, CAPTION):
        cosines, found = gallery.search(queries, K, name)
        expected = np.argsort(-(queries @ embeddings[name].T), axis=1, kind="stable")[:, :K]
        assert np.array_equal(found, expected)
        np.testing.assert_allclose(cosines, np.take_along_axis(queries @ embeddings[name].T, expected, 1), atol=1e-5)


def test_an_approximate_gallery_index_has_its_recall_measured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vectors, "EXACT_MAX_VALUES", 1000)
    embeddings = vector_gallery(tmp_path / "gallery", 2000, seed=4)
    gallery = open_gallery(tmp_path / "gallery")
    queries = unit_rows(50, DEMO_DIM, seed=5)
    assert gallery.record.index_kind == vectors.HNSW
    _, found = gallery.search(queries, 20, COMPOSED)
    exact = [brute_force(embeddings, gallery.record.logit_scale, query, 20) for query in queries]
    recall = np.mean([len(np.intersect1d(a, b)) / 20 for a, b in zip(found, exact, strict=True)])
    assert recall >= 0.95, recall


# --- the shipped gallery, embedded by the demo model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shipped") / "gallery"
    assert main(["gallery", "build", str(SOUNDS), "--checkpoint", str(DEMO_WEIGHTS), "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_the_shipped_gallery_holds_every_recording_with_its_caption_and_licence(shipped: Path) -> None:
    gallery = open_gallery(shipped)
    with open(SOUNDS / "recordings.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [item.id for item in gallery.items] == [row["file"] for row in rows]
    assert [item.caption for item in gallery.items] == [row["caption"] for row in rows]
    assert all(
        item.licence == "CC0-1.0" and row["source_url"] in item.attribution
        for item, row in zip(gallery.items, rows, strict=True)
    )
    seconds = [soundfile.info(SOUNDS / row["file"]).duration for row in rows]
    np.testing.assert_allclose([item.seconds for item in gallery.items], seconds, atol=1e-3)
    assert gallery.record.sha256 == demo_record().sha256 and gallery.record.count == len(rows)

    encoder = Sat2SoundEncoder.from_checkpoint(DEMO_WEIGHTS, device="cpu")
    audio = encoder.embed_audio([SOUNDS / row["file"] for row in rows]).embedding.numpy()
    captions = encoder.embed_texts([row["caption"] for row in rows]).embedding.numpy()
    np.testing.assert_allclose(gallery.embeddings[AUDIO], audio, atol=1e-5)
    np.testing.assert_allclose(gallery.embeddings[CAPTION], captions, atol=1e-5)
    scales = {AUDIO: float(encoder.model.logit_scale_ia), CAPTION: float(encoder.model.logit_scale_it)}
    assert gallery.record.logit_scale == pytest.approx(scales)


@pytest.mark.slow
def test_retrieval_on_the_shipped_gallery_is_brute_force_retrieval(shipped: Path) -> None:
    gallery = open_gallery(shipped)
    queries = np.concatenate([unit_rows(30, DEMO_DIM, seed=1), gallery.embeddings[AUDIO]])
    logits, found = gallery.search(queries, K, COMPOSED)
    for query, row, scores in zip(queries, found, logits, strict=True):
        assert same_ranking(row, brute_force(gallery.embeddings, gallery.record.logit_scale, query, K), scores)
    # Every recording's own audio finds it first.
    assert (found[30:, 0] == np.arange(gallery.record.count)).all()


@pytest.mark.slow
def test_building_again_embeds_only_the_new_recordings_and_skips_broken_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    source, out = tmp_path / "sounds", tmp_path / "gallery"
    source.mkdir()
    for name in ("duck.flac", "owl.flac"):
        shutil.copy(SOUNDS / name, source / name)
    assert build(capsys, source, out)[0] == 0
    first = open_gallery(out)

    embedded: list[int] = []
    waveforms = Sat2SoundEncoder.embed_waveforms
    monkeypatch.setattr(
        Sat2SoundEncoder, "embed_waveforms", lambda self, clips: embedded.append(len(clips)) or waveforms(self, clips)
    )
    shutil.copy(SOUNDS / "cow.flac", source / "cow_in_a_field.flac")
    (source / "broken.wav").write_bytes(b"RIFF, then nothing a decoder can read")
    soundfile.write(source / "silence.wav", np.zeros(SAMPLE_RATE * 5, np.float32), SAMPLE_RATE)
    soundfile.write(source / "click.wav", np.ones(100, np.float32) * 0.5, SAMPLE_RATE)
    status, printed, err = build(capsys, source, out)

    assert status == 0, err
    assert "1 recordings added, 2 kept, 3 skipped" in printed
    warned = err.splitlines()
    assert len(warned) == 3 and warned[0].startswith("warning: skipped broken.wav: ")
    silent = "are silent, or shorter than a loudness meter's 0.4 s, with nothing to listen to"
    assert warned[1:] == [
        f"warning: skipped {name}: its first 10 s {silent}; give a recording with sound"
        for name in ("click.wav", "silence.wav")
    ]
    assert embedded == [1]
    second = open_gallery(out)
    assert [item.id for item in second.items] == ["duck.flac", "owl.flac", "cow_in_a_field.flac"]
    assert second.items[2].caption == "cow in a field" and second.items[2].licence == "unknown"
    np.testing.assert_array_equal(second.embeddings[AUDIO][:2], first.embeddings[AUDIO])
    assert build(capsys, source, out)[1].startswith(f"gallery {out}: 0 recordings added, 3 kept")


@pytest.mark.slow
def test_a_geosound_split_in_its_parquet_layout_becomes_a_gallery(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [geosound_row(index) for index in range(3)]
    write_shard(tmp_path / "geosound" / "data" / "test-00000-of-00001.parquet", geosound_schema(), rows, 2)
    out = tmp_path / "gallery"
    status, _, err = build(capsys, tmp_path / "geosound", out, "--dataset", "geosound", "--split", "test")
    assert status == 0, err

    gallery = open_gallery(out)
    assert [item.id for item in gallery.items] == [row["sample_id"] for row in rows]
    assert [item.row for item in gallery.items] == [0, 1, 2]
    assert [item.caption for item in gallery.items] == [row["audio_caption"] for row in rows]
    assert all("not recorded in GeoSound" in item.licence and "yfcc" in item.attribution for item in gallery.items)
    np.testing.assert_allclose([item.seconds for item in gallery.items], 0.5)
    clip = AudioReader().clip(gallery.items[2], 10.0)
    assert len(clip) == 16_000


def test_parquet_items_list_every_row_of_every_shard(tmp_path: Path) -> None:
    write_shard(tmp_path / "data" / "val-00000-of-00002.parquet", geosound_schema(), [geosound_row(0)])
    write_shard(tmp_path / "data" / "val-00001-of-00002.parquet", geosound_schema(), [geosound_row(1)])
    items = dataset_items(tmp_path, "geosound", "val")
    assert [(Path(item.audio).name, item.row) for item in items] == [
        ("val-00000-of-00002.parquet", 0),
        ("val-00001-of-00002.parquet", 0),
    ]
    assert [(item.lat, item.lon) for item in items] == [(38.5, -90.25), (39.5, -91.25)]


def test_a_gallery_of_recordings_none_of_which_can_be_embedded_is_refused_and_not_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, out = tmp_path / "sounds", tmp_path / "new" / "gallery"
    source.mkdir()
    soundfile.write(source / "silence.wav", np.zeros(SAMPLE_RATE * 5, np.float32), SAMPLE_RATE)
    status, printed, err = build(capsys, source, out)
    assert (status, printed) == (ERROR_STATUS, "")
    assert err.splitlines()[-1] == (
        "error: none of the 1 recordings could be embedded (each warned about above); give recordings that decode,"
        " with sound and a caption"
    )
    assert not (tmp_path / "new").exists()


# --- bad inputs: one line, exit status 2, before the model loads, nothing written ----------------------------------


def _bad_cases(root: Path) -> dict[str, tuple[list[str], str]]:
    empty = root / "empty"
    empty.mkdir()
    headless = root / "headless"
    headless.mkdir()
    (headless / "recordings.csv").write_text("name,caption\nduck.flac,ducks\n")
    busy = root / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("someone's files")
    a_file = root / "a_file"
    a_file.write_text("not a folder")
    foreign = root / "foreign"
    vector_gallery(foreign, 2, sha256="1" * 64)
    far, lone, twice = root / "far", root / "lone", root / "twice"
    tables = (
        (far, "file,lat,lon\nduck.flac,-95,10\n"),
        (lone, "file,lon\nduck.flac,10\n"),
        (twice, "file,caption\nduck.flac,ducks\nowl.flac,an owl\nduck.flac,a duck at dawn\n"),
    )
    for folder, table in tables:
        folder.mkdir()
        (folder / "recordings.csv").write_text(table)
    sounds, out = str(SOUNDS), str(root / "new")
    return {
        "no source folder": ([str(root / "none"), "--out", out], "no folder"),
        "no recordings": ([str(empty), "--out", out], "holds no wav, flac, ogg or mp3 recordings"),
        "csv without file column": ([str(headless), "--out", out], "has no column 'file'"),
        "missing csv": ([sounds, "--csv", str(root / "none.csv"), "--out", out], "none.csv does not exist"),
        "out is a file": ([sounds, "--out", str(a_file)], "cannot write into"),
        "out holds other files": ([sounds, "--out", str(busy)], "holds files but no gallery"),
        "gallery of other weights": ([sounds, "--out", str(foreign)], "embedded with other weights"),
        "unknown dataset": ([sounds, "--dataset", "freesound", "--out", out], "unknown dataset 'freesound'"),
        "no shards": ([sounds, "--dataset", "geosound", "--out", out], "no GeoSound test shards"),
        "unknown split": ([sounds, "--dataset", "geosound", "--split", "dev", "--out", out], "unknown split 'dev'"),
        "split without dataset": ([sounds, "--split", "train", "--out", out], "--split train picks a split of"),
        "csv with dataset": ([sounds, "--dataset", "geosound", "--csv", "x.csv", "--out", out], "--csv is a folder's"),
        "latitude out of range": ([str(far), "--out", out], "duck.flac: lat -95 is outside -90 to 90"),
        "longitude without latitude": ([str(lone), "--out", out], "duck.flac: lon without lat; give both"),
        "a recording listed twice": ([str(twice), "--out", out], "lists duck.flac twice (a recording is one item)"),
        "text backbone not there": (
            [sounds, "--text-backbone", str(root / "no_t5"), "--out", out],
            "no T5 model directory at",
        ),
    }


BAD_CASES = [
    "a recording listed twice",
    "text backbone not there",
    "no source folder",
    "no recordings",
    "csv without file column",
    "missing csv",
    "out is a file",
    "out holds other files",
    "gallery of other weights",
    "unknown dataset",
    "no shards",
    "unknown split",
    "split without dataset",
    "csv with dataset",
    "latitude out of range",
    "longitude without latitude",
]


@pytest.fixture(scope="module")
def bad_cases(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[list[str], str]]]:
    root = tmp_path_factory.mktemp("bad")
    return root, _bad_cases(root)


@pytest.mark.parametrize("case", BAD_CASES)
def test_a_bad_gallery_input_is_one_line_before_the_model_loads(
    case: str,
    bad_cases: tuple[Path, dict[str, tuple[list[str], str]]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root, cases = bad_cases
    source, *options = cases[case][0]

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(Sat2SoundEncoder, "from_checkpoint", refuse)
    before = {path: path.stat().st_mtime_ns for path in root.rglob("*")}
    status = main(["gallery", "build", source, "--checkpoint", str(DEMO_WEIGHTS), *options])
    printed, err = capsys.readouterr()
    assert status == ERROR_STATUS and printed == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "; " in lines[0], err
    assert cases[case][1] in lines[0]
    assert {path: path.stat().st_mtime_ns for path in root.rglob("*")} == before


def test_the_record_names_what_embedded_the_gallery(tmp_path: Path) -> None:
    vector_gallery(tmp_path / "gallery", 4)
    record = json.loads((tmp_path / "gallery" / "gallery.json").read_text())
    assert record["sha256"] == demo_record().sha256 and record["count"] == 4 and record["dim"] == DEMO_DIM
    assert set(record["logit_scale"]) == {AUDIO, CAPTION}


def test_a_build_refuses_a_gallery_of_other_weights_when_it_starts(tmp_path: Path) -> None:
    vector_gallery(tmp_path / "foreign", 2, sha256="1" * 64)
    vector_gallery(tmp_path / "own", 2)
    model = load_build_config(
        {
            "name": "x",
            "region": "0,0,1,1",
            "queries": [{"id": "a", "text": "a"}],
            "model": {"checkpoint": str(DEMO_WEIGHTS)},
        }
    ).model
    check_build_gallery(str(tmp_path / "own"), model)
    with pytest.raises(BuildConfigError, match=r"config.outputs.gallery: .*foreign was embedded with other weights"):
        check_build_gallery(str(tmp_path / "foreign"), model)
    check_build_gallery(str(tmp_path / "foreign"), None)  # the plan's check, which reads no weights

"""A folder of one's own pairs: pairs.csv, images, recordings; every bad input is one line naming its row."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from support.pair_data import encode_image, synthetic_image, write_folder

from model.audio import CLIP_SAMPLES, SAMPLE_RATE, fit_clip
from model.data import folder as folder_module
from model.data.dataset import PairDataset, collate
from model.data.folder import OPTIONAL_COLUMNS, REQUIRED_COLUMNS, FolderPairs, recording_clips
from model.data.images import decode_image
from model.data.transforms import SampleTransform
from model.errors import DataError
from model.mel import log_mel

BING_ZOOM5_PX = 1500


def pair_line(key: str, **cells: str) -> dict[str, str]:
    line = {
        "key": key,
        "image": f"images/{key}.png",
        "audio": f"audio/{key}.wav",
        "audio_caption": f"recording {key}",
        "image_caption": f"soundscape {key}",
        "lat": "48.85",
        "lon": "2.35",
        "time": "2021-06-01T14:30:00",
        "split": "train",
    }
    return line | cells


def add_files(root: Path, key: str, image_px: int = BING_ZOOM5_PX, seconds: float = 12.0, rate: int = 16_000) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    (root / "images" / f"{key}.png").write_bytes(encode_image(synthetic_image(image_px, len(key))))
    stereo = np.random.default_rng(len(key)).uniform(-0.2, 0.2, (round(seconds * rate), 2)).astype(np.float32)
    soundfile.write(root / "audio" / f"{key}.wav", stereo, rate)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pairs")
    for key in ("a", "bb", "ccc"):
        add_files(root, key)
    lines = [
        pair_line("a"),
        pair_line("bb", time="2020-12-24", audio_source="freesound", sat_type="bingmap"),
        pair_line("ccc", time="", split="val", caption_source="qwen"),
    ]
    return write_folder(root, lines, [*REQUIRED_COLUMNS, "sat_type", "audio_source", "caption_source"])


def test_valid_folder_reads_its_split(folder: Path) -> None:
    train = FolderPairs(folder, "train")
    assert len(train) == 2
    assert train.zoom_levels == (1, 3, 5)
    first, second = train.record(0), train.record(1)
    assert (first.key, first.sat_type, first.split) == ("a", "bingmap", "train")
    assert train.pair_keys() == [first.key, second.key]
    assert np.array_equal(first.image, synthetic_image(BING_ZOOM5_PX, 1))
    assert first.image_captions == dict.fromkeys((1, 3, 5), "soundscape a")
    assert first.audio_caption == "recording a"
    assert (first.lat, first.lon, first.month, first.hour) == (48.85, 2.35, 6, 14)
    assert (first.audio_source, first.caption_source) == ("yfcc", "meta")
    assert (second.month, second.hour, second.audio_source) == (12, None, "freesound")
    val = FolderPairs(folder, "val").record(0)
    assert (val.key, val.month, val.hour, val.caption_source) == ("ccc", None, None, "qwen")


def test_mel_segments_come_from_the_recording(folder: Path) -> None:
    pair = FolderPairs(folder, "train").record(0)
    assert len(pair.mel) == 5
    last = pair.mel.segment(4)
    assert last.shape == (1001, 64)
    assert last.dtype == np.float32
    # A 12 s recording: its windows start 0, 0.5, ..., 2 s in, so the first and last differ.
    assert not np.array_equal(pair.mel.segment(0), last)


def test_recording_clips_spread_over_the_first_50_seconds() -> None:
    ramp = np.arange(60 * SAMPLE_RATE, dtype=np.float32)
    starts = [int(clip[0]) for clip in recording_clips(ramp[: 50 * SAMPLE_RATE])]
    assert starts == [0, 10 * SAMPLE_RATE, 20 * SAMPLE_RATE, 30 * SAMPLE_RATE, 40 * SAMPLE_RATE]
    overlapping = recording_clips(ramp[: 14 * SAMPLE_RATE])
    assert [int(clip[0]) for clip in overlapping] == [0, SAMPLE_RATE, 2 * SAMPLE_RATE, 3 * SAMPLE_RATE, 4 * SAMPLE_RATE]
    assert overlapping.shape == (5, CLIP_SAMPLES)
    short = recording_clips(ramp[: 4 * SAMPLE_RATE])
    assert all(np.array_equal(clip, fit_clip(ramp[: 4 * SAMPLE_RATE])) for clip in short)


def test_recording_segment_is_the_log_mel_of_its_window(tmp_path: Path) -> None:
    add_files(tmp_path, "x", image_px=256, seconds=30.0, rate=SAMPLE_RATE)
    write_folder(tmp_path, [pair_line("x", sat_type="sentinel")], [*REQUIRED_COLUMNS, "sat_type"])
    pair = FolderPairs(tmp_path, "train", zoom_levels=(1,)).record(0)
    mono = soundfile.read(tmp_path / "audio" / "x.wav", dtype="float32")[0].mean(axis=1)
    window = torch.from_numpy(np.ascontiguousarray(mono[15 * SAMPLE_RATE : 25 * SAMPLE_RATE]))[None]
    assert np.allclose(pair.mel.segment(3), log_mel(window)[0, 0].numpy(), atol=1e-3)


def test_the_mel_cache_serves_what_the_recording_gives_and_decodes_each_recording_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, seconds in (("long", 30.0), ("short", 7.0)):
        add_files(tmp_path, key, image_px=256, seconds=seconds, rate=SAMPLE_RATE)
    write_folder(
        tmp_path,
        [pair_line("long", sat_type="sentinel"), pair_line("short", sat_type="sentinel")],
        [*REQUIRED_COLUMNS, "sat_type"],
    )
    plain = FolderPairs(tmp_path, "train", zoom_levels=(1,))
    expected = [[plain.record(row).mel.segment(index) for index in range(5)] for row in range(2)]
    cache = tmp_path / "mel_cache"
    decoded: list[Path] = []
    decode = folder_module.decode_audio

    def counting(path: Path, seconds: float) -> np.ndarray:
        decoded.append(Path(path))
        return decode(path, seconds)

    monkeypatch.setattr(folder_module, "decode_audio", counting)
    for _ in range(2):  # the second source (another epoch, another worker) reads what the first wrote
        cached = FolderPairs(tmp_path, "train", zoom_levels=(1,), mel_cache=cache)
        for row in range(2):
            mel = cached.record(row).mel
            assert all(np.array_equal(mel.segment(index), expected[row][index]) for index in range(5))
    assert sorted(path.name for path in decoded) == ["long.wav", "short.wav"]
    stored = sorted(cache.glob("*/*.npz"))
    assert len(stored) == 2 and not list(cache.glob("**/*.part"))
    # The short recording's five segments are one zero-padded window, kept once.
    with np.load(next(path for path in stored if np.load(path)["mels"].shape[0] == 1)) as short:
        assert short["windows"].tolist() == [0] * 5
    # Other bytes, another entry: an edited recording is never served stale.
    add_files(tmp_path, "long", image_px=256, seconds=29.0, rate=SAMPLE_RATE)
    FolderPairs(tmp_path, "train", zoom_levels=(1,), mel_cache=cache).record(0).mel.segment(0)
    assert len(list(cache.glob("*/*.npz"))) == 3


def test_folder_pairs_through_the_dataset(folder: Path) -> None:
    source = FolderPairs(folder, "train")
    batch = collate([PairDataset(source, SampleTransform.for_source(source, train=True))[i] for i in range(2)])
    assert batch.mel.shape == (2, 1, 1001, 64)
    assert batch.images.shape == (2, 3, 224, 224)
    assert batch.month.tolist() == [6, 12]
    assert batch.hour.tolist() == [14, -1]


def test_the_image_spans_the_largest_zoom_at_any_pixel_size(tmp_path: Path) -> None:
    add_files(tmp_path, "small", image_px=900)
    write_folder(tmp_path, [pair_line("small")])
    record = FolderPairs(tmp_path, "train").record(0)
    assert record.image.shape == (900, 900, 3)
    assert record.tile_px == 900 / 5
    assert FolderPairs(tmp_path, "train", zoom_levels=(1, 3)).record(0).tile_px == 900 / 3


def test_a_zoom_level_cell_makes_the_image_that_levels_footprint_and_the_pair_seen_at_it(tmp_path: Path) -> None:
    add_files(tmp_path, "near", image_px=300)
    add_files(tmp_path, "far", image_px=900)
    write_folder(tmp_path, [pair_line("near", zoom_level="3"), pair_line("far")], [*REQUIRED_COLUMNS, "zoom_level"])
    near, far = (FolderPairs(tmp_path, "train", zoom_levels=(1, 3)).record(index) for index in range(2))
    assert (near.image_captions, near.tile_px) == ({3: "soundscape near"}, 100)
    assert (far.image_captions, far.tile_px) == (dict.fromkeys((1, 3), "soundscape far"), 300)
    sample = SampleTransform(train=False, zoom_levels=(1, 3))(near, torch.Generator().manual_seed(0))
    assert sample.zoom_level == 3 and sample.image.shape == (3, 224, 224)


def test_an_image_too_small_to_crop_is_one_line_error(tmp_path: Path) -> None:
    add_files(tmp_path, "tiny", image_px=4)
    write_folder(tmp_path, [pair_line("tiny")])
    with pytest.raises(DataError, match=r"tiny.png .*line 2\) is 4x4 px, too small to crop zoom levels 1 to 5"):
        FolderPairs(tmp_path, "train")
    write_folder(tmp_path, [pair_line("tiny", zoom_level="3")], [*REQUIRED_COLUMNS, "zoom_level"])
    assert FolderPairs(tmp_path, "train").record(0).tile_px == 4 / 3


Edit = Callable[[Path], None]


def set_cell(column: str, value: str, line: int = 0) -> Edit:
    def edit(root: Path) -> None:
        lines = [pair_line("a"), pair_line("bb")]
        lines[line] = lines[line] | {column: value}
        write_folder(root, lines, [*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS])

    return edit


def header(*columns: str) -> Edit:
    return lambda root: write_folder(root, [pair_line("a")], columns)


def no_csv(root: Path) -> None:
    (root / "pairs.csv").unlink(missing_ok=True)


def ragged(root: Path) -> None:
    write_folder(root, [pair_line("a")])
    with open(root / "pairs.csv", "a") as handle:
        handle.write("bb,images/bb.png,audio/bb.wav,x,y,1,2,,train,extra\n")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (no_csv, "pairs.csv does not exist; write the pairs CSV"),
        (header(*[c for c in REQUIRED_COLUMNS if c != "time"]), r"lacks columns \['time'\]"),
        (header(*REQUIRED_COLUMNS, "weather"), r"unknown columns \['weather'\]; the optional ones are sat_type"),
        (header(*REQUIRED_COLUMNS, "lat"), "has column 'lat' twice, and only the last would count; keep one"),
        (ragged, "line 3: its cells do not match the header's columns"),
        (set_cell("key", ""), "line 2: key is empty"),
        (set_cell("audio_caption", " "), "line 2: audio_caption is empty; describe what the recording sounds like"),
        (set_cell("image_caption", "", line=1), "line 3: image_caption is empty; describe how the place sounds"),
        (set_cell("key", "a", line=1), "line 3: key 'a' repeats line 2; make keys unique"),
        (set_cell("image", "images/missing.png"), r"line 2: image file .*images/missing.png does not exist"),
        (set_cell("audio", "", line=1), r"line 3: audio file .* does not exist; give a path relative to"),
        (set_cell("lat", "95"), r"line 2: lat '95' is not a number within ±90"),
        (set_cell("lon", "east"), r"line 2: lon 'east' is not a number within ±180"),
        (set_cell("lat", "nan"), r"line 2: lat 'nan' is not a number"),
        (set_cell("time", "01/06/2021"), r"line 2: time '01/06/2021' is not ISO 8601"),
        (set_cell("split", "validation"), r"line 2: split 'validation' is unknown; use one of \['train', 'val'"),
        (set_cell("sat_type", "landsat"), r"line 2: sat_type 'landsat' is unknown; use one of \['bingmap'"),
        (set_cell("audio_source", "youtube"), r"line 2: audio_source 'youtube' is unknown"),
        (set_cell("caption_source", "gpt"), r"line 2: caption_source 'gpt' is unknown"),
        (set_cell("zoom_level", "two"), r"line 2: zoom_level 'two' is not a whole number of 1 or more"),
        (set_cell("zoom_level", "0", line=1), r"line 3: zoom_level '0' is not a whole number of 1 or more"),
        (set_cell("zoom_level", "4"), r"line 2: zoom_level 4 is not among the data's zoom levels \[1, 3, 5\]"),
    ],
)
def test_bad_folder_is_one_line_error_naming_the_line(tmp_path: Path, edit: Edit, message: str) -> None:
    for key in ("a", "bb"):
        add_files(tmp_path, key, image_px=8, seconds=0.1)
    edit(tmp_path)
    with pytest.raises(DataError, match=message) as raised:
        FolderPairs(tmp_path, "train")
    assert "\n" not in str(raised.value)


def test_bad_constructor_arguments(folder: Path) -> None:
    with pytest.raises(DataError, match="unknown split 'dev'"):
        FolderPairs(folder, "dev")
    with pytest.raises(DataError, match="zoom levels must be positive"):
        FolderPairs(folder, "train", zoom_levels=(0, 1))
    with pytest.raises(DataError, match="line 2: sat_type 'aerial' is unknown"):
        FolderPairs(folder, "train", sat_type="aerial")


def test_lines_are_counted_in_the_file_when_a_caption_spans_lines(tmp_path: Path) -> None:
    for key in ("a", "bb"):
        add_files(tmp_path, key, image_px=8, seconds=0.1)
    write_folder(tmp_path, [pair_line("a", image_caption="birds,\nthen rain"), pair_line("bb", lat="-91")])
    with pytest.raises(DataError, match="line 4: lat '-91'"):
        FolderPairs(tmp_path, "train")


@pytest.mark.parametrize("mode", ["P", "L", "LA", "RGBA"])
def test_every_pixel_layout_decodes_to_the_colours_it_shows(mode: str) -> None:
    """A paletted PNG decodes through its palette (not to its indices as grey), grey is repeated, alpha dropped."""
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[:2], rgb[2:] = (200, 30, 10), (10, 60, 240)
    image = Image.fromarray(rgb).convert("L") if mode in ("L", "LA") else Image.fromarray(rgb)
    image = image.quantize(2) if mode == "P" else image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    shown = np.asarray(image.convert("RGB"))
    assert np.array_equal(decode_image(buffer.getvalue(), "test.png"), shown)

"""GeoSound and SoundingEarth readers on tiny shards in the exact Hub schema, dates, and the Hub download path
against a loopback stand-in of the Hub."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.hf_stub import HubStub, hub_environment
from support.pair_data import (
    IMAGE_PX,
    MEL_SHAPE,
    encode_image,
    geosound_row,
    geosound_schema,
    soundingearth_row,
    soundingearth_schema,
    synthetic_image,
    write_shard,
)

from model.data.parquet import GeoSoundParquet, SoundingEarthParquet
from model.data.sources import month_hour_from_text
from model.errors import DataError

CHILD = Path(__file__).resolve().parents[1] / "support" / "hf_dataset_child.py"
REPO = "MVRL/GeoSound"


@pytest.fixture(scope="module")
def geosound(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train: two shards (rows 0-2 in groups of 2, rows 3-4), one freesound row with a time; val: one row."""
    root = tmp_path_factory.mktemp("geosound")
    rows = [geosound_row(0), geosound_row(1, date="2018-11-02"), geosound_row(2, source="freesound")]
    write_shard(root / "data/train-00000-of-00002.parquet", geosound_schema(), rows, row_group_size=2)
    later = [geosound_row(3, source="aporee", audio_caption_source="pengi"), geosound_row(4, source="iNat", date="")]
    write_shard(root / "data/train-00001-of-00002.parquet", geosound_schema(), later)
    write_shard(root / "data/validation-00000-of-00001.parquet", geosound_schema(), [geosound_row(9)])
    return root


@pytest.fixture(scope="module")
def soundingearth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("soundingearth")
    write_shard(root / "test-00000-of-00001.parquet", soundingearth_schema(), [soundingearth_row(7)])
    return root


def test_geosound_rows_decode_in_shard_order(geosound: Path) -> None:
    source = GeoSoundParquet(geosound, "train")
    assert len(source) == 5
    assert source.zoom_levels == (1, 3, 5)
    assert source.blocks() == [range(0, 2), range(2, 3), range(3, 5)]
    records = [source.record(index) for index in range(len(source))]
    assert [record.key for record in records] == [f"yfcc-{i}" for i in range(3)] + ["yfcc-3", "yfcc-4"]
    assert source.pair_keys() == [record.key for record in records]
    first = records[0]
    assert first.image.shape == (IMAGE_PX["bingmap"], IMAGE_PX["bingmap"], 3)
    assert first.image.dtype == np.uint8
    # JPEG: close to what was encoded, not equal.
    assert np.abs(first.image.astype(int) - synthetic_image(IMAGE_PX["bingmap"], 0)).mean() < 2
    assert first.image_captions == {zoom: f"bingmap zl{zoom} 0" for zoom in (1, 3, 5)}
    assert (first.audio_caption, first.audio_source, first.caption_source) == ("audio caption 0", "yfcc", "qwen")
    assert (first.lat, first.lon) == pytest.approx((38.5, -90.25))
    assert (first.month, first.hour, first.split) == (6, 14, "train")
    assert len(first.mel) == MEL_SHAPE[0]
    for segment in range(MEL_SHAPE[0]):
        mel = first.mel.segment(segment)
        assert mel.shape == MEL_SHAPE[2:]
        assert mel.dtype == np.float32
        assert np.all(mel == segment)
    assert np.all(records[4].mel.segment(2) == 42)
    assert (records[3].audio_source, records[3].caption_source) == ("aporee", "pengi")


def test_dates_become_month_and_hour_with_validity(geosound: Path) -> None:
    source = GeoSoundParquet(geosound, "train")
    assert (source.record(1).month, source.record(1).hour) == (11, None)
    # Upstream never encodes the hour of a freesound recording, even when its date has one.
    assert (source.record(2).audio_source, source.record(2).month, source.record(2).hour) == ("freesound", 6, None)
    assert (source.record(4).month, source.record(4).hour) == (None, None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2013-06-15 14:23:00.0", (6, 14)),
        ("June 3, 2019 4:05 PM GMT+2", (6, 16)),
        ("Sat, 12 May 2012 09:10:11 GMT", (5, 9)),
        ("2019-07-04T22:15:00-07:00", (7, 22)),
        ("2018-11-02", (11, None)),
        ("2016", (None, None)),
        ("", (None, None)),
        (None, (None, None)),
        ("no date at all", (None, None)),
    ],
)
def test_month_hour_from_dataset_dates(text: str | None, expected: tuple[int | None, int | None]) -> None:
    assert month_hour_from_text(text) == expected


def test_sentinel_imagery_and_validation_split(geosound: Path) -> None:
    source = GeoSoundParquet(geosound, "val", sat_type="sentinel")
    record = source.record(0)
    assert record.key == "yfcc-9"
    assert record.sat_type == "sentinel"
    # PNG: lossless.
    assert np.array_equal(record.image, synthetic_image(IMAGE_PX["sentinel"], 9))
    assert record.image_captions[3] == "sentinel zl3 9"


def test_soundingearth_rows(soundingearth: Path) -> None:
    source = SoundingEarthParquet(soundingearth, "test")
    assert source.zoom_levels == (1,)
    record = source.record(0)
    assert (record.key, record.sat_type, record.audio_source, record.caption_source) == (
        "aporee-7",
        "googleEarth",
        "aporee",
        "meta",
    )
    assert record.image.shape == (IMAGE_PX["googleEarth"],) * 2 + (3,)
    assert record.image_captions == {1: "googleearth zl1 7"}
    assert (record.month, record.hour) == (5, None)
    assert np.all(record.mel.segment(4) == 74)


def test_mel_stored_as_datasets_extension_type(tmp_path: Path) -> None:
    """With `datasets` imported, Array4D columns read back as an extension type over the same lists."""

    class Array4DType(pa.ExtensionType):
        def __init__(self) -> None:
            super().__init__(geosound_schema().field("mel_features").type, "datasets.features.features.Array4DType")

        def __arrow_ext_serialize__(self) -> bytes:
            return json.dumps({"shape": list(MEL_SHAPE), "dtype": "float32"}).encode()

        @classmethod
        def __arrow_ext_deserialize__(cls, storage_type: pa.DataType, serialized: bytes) -> Array4DType:
            return cls()

    path = tmp_path / "data/test-00000-of-00001.parquet"
    write_shard(path, geosound_schema(), [geosound_row(5)])
    table = pq.read_table(path)
    mel = table.column("mel_features").combine_chunks()
    extended = table.set_column(
        table.schema.get_field_index("mel_features"), "mel_features", pa.ExtensionArray.from_storage(Array4DType(), mel)
    )
    pq.write_table(extended, path)
    pa.register_extension_type(Array4DType())
    try:
        assert isinstance(pq.read_table(path).column("mel_features").type, pa.ExtensionType)
        assert np.all(GeoSoundParquet(tmp_path, "test").record(0).mel.segment(1) == 51)
    finally:
        pa.unregister_extension_type("datasets.features.features.Array4DType")


def test_copies_for_workers_carry_no_cached_row_group(geosound: Path) -> None:
    source = GeoSoundParquet(geosound, "train")
    empty = len(pickle.dumps(source))
    source.record(0)
    copy = pickle.loads(pickle.dumps(source))
    assert len(pickle.dumps(source)) == empty
    assert copy.record(1).key == "yfcc-1"


def test_missing_split_is_one_line_error(geosound: Path) -> None:
    with pytest.raises(DataError, match=r"no GeoSound test shards under .*data/test-\*\.parquet") as raised:
        GeoSoundParquet(geosound, "test")
    assert "\n" not in str(raised.value)


def test_foreign_shard_is_one_line_error(soundingearth: Path) -> None:
    with pytest.raises(DataError, match=r"lacks columns \['source', 'bingmap_image'"):
        GeoSoundParquet(soundingearth, "test")


def test_bad_arguments_are_one_line_errors(geosound: Path) -> None:
    with pytest.raises(DataError, match="no 'googleEarth' imagery"):
        GeoSoundParquet(geosound, "train", sat_type="googleEarth")
    with pytest.raises(DataError, match="unknown split 'validation'"):
        GeoSoundParquet(geosound, "validation")


def test_row_without_image_bytes_is_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "train-00000-of-00001.parquet"
    write_shard(path, geosound_schema(), [geosound_row(0)])
    table = pq.read_table(path)
    index = table.schema.get_field_index("bingmap_image")
    empty = pa.array([{"bytes": None, "path": "0.jpeg"}], table.schema.field(index).type)
    pq.write_table(table.set_column(index, table.schema.field(index), empty), path)
    with pytest.raises(DataError, match="row 0 has no embedded bingmap_image bytes"):
        GeoSoundParquet(tmp_path, "train").record(0)


def _half(body: bytes) -> bytes:
    return body[: len(body) // 2]


@pytest.mark.parametrize(
    ("spoil", "words"),
    [
        (_half, "row 0's bingmap_image is truncated: the PNG lacks its closing IEND chunk"),  # GDAL decodes it
        (lambda body: body[8:], "does not decode as PNG, JPEG or GeoTIFF"),
    ],
)
def test_undecodable_image_is_one_line_error(tmp_path: Path, spoil: Callable[[bytes], bytes], words: str) -> None:
    path = tmp_path / "train-00000-of-00001.parquet"
    write_shard(path, geosound_schema(), [geosound_row(0)])
    table = pq.read_table(path)
    index = table.schema.get_field_index("bingmap_image")
    body = spoil(encode_image(synthetic_image(64, 0), "PNG"))
    cut = pa.array([{"bytes": body, "path": "0.png"}], table.schema.field(index).type)
    pq.write_table(table.set_column(index, table.schema.field(index), cut), path)
    with pytest.raises(DataError, match=words) as raised:
        GeoSoundParquet(tmp_path, "train").record(0)
    assert "\n" not in str(raised.value)


# --- from the Hub ----------------------------------------------------------------------------------------------


def hub_files(geosound: Path) -> dict[tuple[str, str], bytes]:
    files = {(REPO, str(path.relative_to(geosound))): path.read_bytes() for path in geosound.rglob("*.parquet")}
    return files | {(REPO, "README.md"): b"# GeoSound"}


@pytest.fixture
def hub(geosound: Path) -> Iterator[HubStub]:
    with HubStub(hub_files(geosound)) as stub:
        yield stub


def open_in_child(split: str, endpoint: str, home: Path, repo: str = REPO, offline: bool = False) -> tuple[int, str]:
    env = hub_environment(endpoint, home, offline) | {"PYTHONPATH": os.pathsep.join(sys.path)}
    completed = subprocess.run(
        [sys.executable, str(CHILD), "GeoSound", split, repo],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = completed.stdout.strip().splitlines()
    assert len(lines) == 1, (completed.stdout, completed.stderr)
    assert "Traceback" not in completed.stderr
    return completed.returncode, lines[0]


def test_hub_split_downloads_its_shards_only_then_serves_them_offline(hub: HubStub, tmp_path: Path) -> None:
    assert open_in_child("val", hub.url, tmp_path) == (0, "1 yfcc-9")
    # /datasets/OWNER/REPO/resolve/REVISION/PATH
    downloads = [path.split("/", 6)[-1] for method, path in hub.requests if method == "GET" and "/resolve/" in path]
    assert downloads == ["data/validation-00000-of-00001.parquet"]
    hub.requests.clear()
    assert open_in_child("val", hub.url, tmp_path, offline=True) == (0, "1 yfcc-9")
    assert hub.requests == []


def test_hub_without_the_split_is_one_line_error(hub: HubStub, tmp_path: Path) -> None:
    code, line = open_in_child("test", hub.url, tmp_path)
    assert code == 1
    assert line.startswith(f"DataError: Hub dataset {REPO} has no test shards (data/test-*.parquet)")


def test_unknown_hub_repo_is_one_line_error(hub: HubStub, tmp_path: Path) -> None:
    code, line = open_in_child("val", hub.url, tmp_path, repo="someone/else")
    assert code == 1
    assert line.startswith("DownloadError: Hub dataset repo someone/else does not exist")

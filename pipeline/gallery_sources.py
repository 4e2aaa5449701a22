"""Where a sound gallery's recordings come from, and their audio, decoded for embedding and for `listen`.

- A folder of audio files: with a CSV (`recordings.csv` in the folder, or `--csv`), the files its `file` column
  names, with the optional columns `caption`, `lat`, `lon`, `licence` and the attribution (`source_title`,
  `attribution`, `source_url`, joined); without one, every wav, flac, ogg and mp3 file directly in the folder.
  A missing caption is the file's name in words, a missing licence `unknown`. An item's id is its file name,
  its audio the file's absolute path.
- A GeoSound or SoundingEarth split in its Hugging Face Parquet layout (`model.data.parquet`): each row's
  `sample_id` (the id), `audio_caption`, `latitude`, `longitude` and encoded `audio`; an item's audio is its
  shard's path and its row in that shard. The datasets record no licence per recording: the item says so and
  names the recording's origin (GeoSound's `source`; SoundingEarth's Radio Aporee) and the dataset.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile

from common.tables import read_table
from model.audio import check_audio_file, decode_audio, decode_audio_from
from model.data.parquet import GeoSoundParquet, ParquetPairs, SoundingEarthParquet, find_shards
from model.data.sources import SPLITS
from model.errors import AudioDecodeError, first_line
from pipeline.errors import GalleryError
from pipeline.queries import AUDIO_SUFFIXES

RECORDINGS_CSV = "recordings.csv"
UNKNOWN_LICENCE = "unknown"
DATASETS: dict[str, type[ParquetPairs]] = {"geosound": GeoSoundParquet, "soundingearth": SoundingEarthParquet}
LISTED_COLUMNS = ("sample_id", "audio_caption", "latitude", "longitude")
AUDIO_COLUMN = "audio"
# A folder CSV's columns that attribute a recording, joined in this order.
ATTRIBUTION_COLUMNS = ("source_title", "attribution", "source_url")
ORIGIN_COLUMN = "source"  # GeoSound's: where each recording comes from


@dataclass(frozen=True)
class GalleryItem:
    """One recording of a gallery: what it is, where its audio is (`row`: its row in a Parquet shard, None for a
    file), its length, licence and attribution, and where it was recorded (None when unknown)."""

    id: str
    caption: str
    audio: str
    row: int | None
    seconds: float
    licence: str
    attribution: str
    lat: float | None
    lon: float | None


def folder_items(folder: Path, csv_path: Path | None) -> list[GalleryItem]:
    """The items of a folder of recordings (their `seconds` still 0: known once decoded); refused if it has none."""
    if not folder.is_dir():
        raise GalleryError(f"no folder {folder}; pass a folder of audio files, or --dataset for a Parquet split")
    table = csv_path if csv_path is not None else folder / RECORDINGS_CSV
    if csv_path is not None or table.is_file():
        return _csv_items(folder, table)
    files = sorted(path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise GalleryError(f"{folder} holds no wav, flac, ogg or mp3 recordings; add some, or give a {RECORDINGS_CSV}")
    return [_item(folder, {"file": path.name}) for path in files]


def _csv_items(folder: Path, table: Path) -> list[GalleryItem]:
    rows = read_table(table, ["file"], "give a UTF-8 CSV with a file column naming each recording", GalleryError)
    if not rows:
        raise GalleryError(f"the CSV {table} lists no recordings; name each recording in a file column")
    files = [row["file"] for row in rows]
    twice = next((name for index, name in enumerate(files) if name in files[:index]), None)
    if twice is not None:
        raise GalleryError(f"the CSV {table} lists {twice} twice (a recording is one item); keep one row of it")
    return [_item(folder, row) for row in rows]


def _item(folder: Path, row: dict[str, str]) -> GalleryItem:
    name = row["file"]
    lat, lon = _place(row, name)
    words = re.sub(r"[_\-]+", " ", Path(name).stem).strip()
    return GalleryItem(
        id=name,
        caption=row.get("caption") or words,
        audio=str((folder / name).resolve()),
        row=None,
        seconds=0.0,
        licence=row.get("licence") or UNKNOWN_LICENCE,
        attribution=", ".join(row[key] for key in ATTRIBUTION_COLUMNS if row.get(key)),
        lat=lat,
        lon=lon,
    )


def _place(row: dict[str, str], name: str) -> tuple[float | None, float | None]:
    """The recording's `lat` and `lon` (both None where the row gives neither); a lone one, a value that is no
    number or one out of range is refused."""
    lat, lon = _coordinate(row.get("lat"), name, "lat", 90.0), _coordinate(row.get("lon"), name, "lon", 180.0)
    if (lat is None) != (lon is None):
        given, missing = ("lat", "lon") if lon is None else ("lon", "lat")
        raise GalleryError(f"{name}: {given} without {missing}; give both or neither")
    return lat, lon


def _coordinate(text: str | None, name: str, key: str, limit: float) -> float | None:
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise GalleryError(f"{name}: {key} {text!r} is not a number; write lat and lon in decimal degrees") from None
    if not math.isfinite(value):
        return None
    if abs(value) > limit:
        raise GalleryError(f"{name}: {key} {value:g} is outside -{limit:g} to {limit:g}; write decimal degrees")
    return value


def dataset_items(root: Path, dataset: str, split: str) -> list[GalleryItem]:
    """The items of a GeoSound or SoundingEarth split (their `seconds` still 0)."""
    if split not in SPLITS:
        raise GalleryError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if dataset not in DATASETS:
        raise GalleryError(f"unknown dataset {dataset!r}; use one of {', '.join(DATASETS)}")
    kind = DATASETS[dataset]
    shards = find_shards(root, split)
    if not shards:
        raise GalleryError(
            f"no {kind.DATASET} {split} shards under {root}; point at a copy of the Hub repo {kind.HUB_REPO}"
        )
    columns = [*LISTED_COLUMNS, ORIGIN_COLUMN] if kind is GeoSoundParquet else list(LISTED_COLUMNS)
    items = []
    for shard in shards:
        try:
            table = pq.read_table(shard, columns=columns)
        except (OSError, pa.ArrowException) as exc:
            raise GalleryError(
                f"cannot read {shard} as a {kind.DATASET} shard ({first_line(exc)}); download it again"
            ) from None
        for row, values in enumerate(table.to_pylist()):
            items.append(_dataset_item(kind, shard, row, values))
    return items


def _dataset_item(kind: type[ParquetPairs], shard: Path, row: int, values: dict[str, Any]) -> GalleryItem:
    origin = values.get(ORIGIN_COLUMN) or getattr(kind, "AUDIO_SOURCE", kind.DATASET)
    return GalleryItem(
        id=str(values["sample_id"]),
        caption=values["audio_caption"] or "",
        audio=str(shard.resolve()),
        row=row,
        seconds=0.0,
        licence=f"{UNKNOWN_LICENCE}: not recorded in {kind.DATASET}; see the terms of {origin} and {kind.HUB_REPO}",
        attribution=f"{origin} recording {values['sample_id']}, {kind.DATASET} ({kind.HUB_REPO})",
        lat=values["latitude"],
        lon=values["longitude"],
    )


class AudioReader:
    """Decodes items' audio; the Parquet row group read last stays cached (items are read in shard order)."""

    def __init__(self) -> None:
        self._cached: tuple[str, int, pa.Table, int] | None = None  # shard, row group, its audio, first row

    def checked_seconds(self, item: GalleryItem) -> float:
        """The recording's length in seconds; AudioDecodeError if it cannot be decoded (whole) or holds nothing."""
        if item.row is None:
            check_audio_file(item.audio)
        source = Path(item.audio) if item.row is None else io.BytesIO(self._bytes(item.audio, item.row, _name(item)))
        try:
            with soundfile.SoundFile(source) as audio_file:
                return audio_file.frames / audio_file.samplerate
        except (RuntimeError, OSError) as exc:
            raise AudioDecodeError(f"cannot decode {_name(item)} ({first_line(exc)}); replace it") from None

    def clip(self, item: GalleryItem, seconds: float) -> np.ndarray:
        """The first `seconds` of the recording (all of it if shorter) as float32 mono samples at 32 kHz."""
        if item.row is None:
            return decode_audio(item.audio, seconds)
        return decode_audio_from(io.BytesIO(self._bytes(item.audio, item.row, _name(item))), _name(item), seconds)

    def _bytes(self, shard: str, row: int, name: str) -> bytes:
        audio, first = self._group_audio(shard, row)
        value = audio[row - first].as_py()
        if not value or not value.get("bytes"):
            raise AudioDecodeError(f"{name} has no embedded audio bytes; download the shard again")
        return bytes(value["bytes"])

    def _group_audio(self, shard: str, row: int) -> tuple[pa.ChunkedArray, int]:
        cached = self._cached
        if cached is not None and cached[0] == shard and cached[3] <= row < cached[3] + len(cached[2]):
            return cached[2].column(AUDIO_COLUMN), cached[3]
        try:
            parquet = pq.ParquetFile(shard)
            first = 0
            for group in range(parquet.metadata.num_row_groups):
                rows = parquet.metadata.row_group(group).num_rows
                if row < first + rows:
                    table = parquet.read_row_group(group, columns=[AUDIO_COLUMN])
                    self._cached = (shard, group, table, first)
                    return table.column(AUDIO_COLUMN), first
                first += rows
        except (OSError, pa.ArrowException, KeyError) as exc:
            raise AudioDecodeError(f"cannot read the audio of {shard} ({first_line(exc)}); download it again") from None
        raise AudioDecodeError(f"{shard} has no row {row}; build the gallery again from the shards as they are now")


def _name(item: GalleryItem) -> str:
    return f"audio file {item.audio}" if item.row is None else f"the audio of {item.audio} row {item.row}"

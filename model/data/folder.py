"""A user's own image-recording pairs in a plain folder, described by one CSV.

    DIR/pairs.csv      key,image,audio,audio_caption,image_caption,lat,lon,time,split
                       (+ optional sat_type, audio_source, caption_source, zoom_level)
    DIR/<image>        PNG, JPEG or GeoTIFF, 8-bit RGB, centred on the recording; its extent is the largest
                       zoom level's footprint (zoom x the sat_type's tile: 5 x 300 px x 0.6 m for bingmap at
                       zoom 5), at any pixel size: zoom z sees its centre z / largest zoom. With a zoom_level,
                       the image is that one level's footprint, and the pair is seen at that level only
    DIR/<audio>        WAV, FLAC, OGG or MP3, any rate and channel count (downmixed, resampled to 32 kHz)

`image` and `audio` are paths relative to DIR. `lat`/`lon` are degrees (EPSG:4326). `time` is ISO 8601: a date
(month known, hour unknown), a date-time, or empty (both unknown). `split` is train, val or test. `image_caption`
describes the image's soundscape at every zoom level. `zoom_level` must be one of the source's zoom levels.
Empty optional cells take the constructor's defaults.
The CSV (UTF-8, a byte-order mark allowed) is checked whole when the source is made, its split's images for
opening as PNG, JPEG or TIFF of 8 bits a sample, for being large enough to crop their zoom levels from (each level's
crop at least one pixel: the image's shorter side at least its largest zoom level) and its PNG files for being cut
short (what decodes without complaint), by their headers and last bytes, and its recordings for opening whole as
audio; each problem is one error naming its line. Captions must not be empty.

The mel segments come from the recording's first 50 s: MEL_SEGMENTS windows of 10 s spread evenly over it
(back to back for 50 s or more, overlapping when shorter, one zero-padded window repeated under 10 s), each
turned into a log-mel only when a transform picks it. Upstream drew its 5 windows at random positions.

With a `mel_cache` folder, a recording's log-mels are computed once, on its first use: its distinct windows'
log-mels and the window each segment takes are kept as `<folder>/<hash[:2]>/<hash>.npz`, the hash covering the
file's bytes and the front end's constants. Later epochs read them instead of decoding the recording and running
the front end (a log-mel costs ~33 ms of a CPU core, reading it back well under 1 ms).
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.atomic import atomic_path
from common.png import PNG_END, png_cut_short
from common.tables import check_unique_columns
from model.audio import (
    CLIP_SAMPLES,
    CLIP_SECONDS,
    HOP_LENGTH,
    N_FFT,
    N_MELS,
    check_audio_opens,
    decode_audio,
    fit_clip,
)
from model.config import (
    AUDIO_SOURCES,
    CAPTION_SOURCES,
    GSD_BY_SAT_TYPE,
    MODEL_INPUT_PX,
    TRAINED_ZOOM_LEVELS,
    Sat2SoundConfig,
)
from model.data.images import IMAGE_HEAD_BYTES, check_image_head, decode_image, image_size
from model.data.sources import (
    MEL_SEGMENTS,
    SPLITS,
    MelSegments,
    PairRecord,
    PairSource,
    RecordingMel,
    check_split,
    check_zoom_levels,
    month_hour_from_iso,
)
from model.errors import DataError, first_line

CSV_NAME = "pairs.csv"
REQUIRED_COLUMNS: tuple[str, ...] = (
    "key",
    "image",
    "audio",
    "audio_caption",
    "image_caption",
    "lat",
    "lon",
    "time",
    "split",
)
OPTIONAL_COLUMNS: tuple[str, ...] = ("sat_type", "audio_source", "caption_source", "zoom_level")
# What an empty caption should hold: both are what training teaches the recording and the image to meet.
CAPTION_FIXES = {
    "audio_caption": "describe what the recording sounds like (e.g. 'rain on leaves, a distant road')",
    "image_caption": "describe how the place sounds (e.g. 'birdsong in a quiet park')",
}
# Decoded recordings a source keeps (about 1.3 MB of mel each once all 5 segments are asked for).
RECORDINGS_KEPT = 64
# What a cached log-mel depends on besides the recording; a change of the front end misses every older entry.
MEL_FRONT_END = f"log-mel {CLIP_SAMPLES} {N_FFT} {HOP_LENGTH} {N_MELS} segments {MEL_SEGMENTS}"


@dataclass(frozen=True)
class FolderRow:
    """One checked line of pairs.csv."""

    line: int
    key: str
    image: Path
    audio: Path
    audio_caption: str
    image_caption: str
    lat: float
    lon: float
    month: int | None
    hour: int | None
    split: str
    sat_type: str
    audio_source: str
    caption_source: str
    zoom_level: int | None

    def zoom_levels(self, data_levels: tuple[int, ...]) -> tuple[int, ...]:
        """The zoom levels the pair is seen at: its own, or all of the data's (ascending)."""
        return data_levels if self.zoom_level is None else (self.zoom_level,)


class FolderPairs(PairSource):
    """The pairs of one split listed in DIR/pairs.csv (layout in the module docstring)."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        zoom_levels: tuple[int, ...] = TRAINED_ZOOM_LEVELS,
        sat_type: str = Sat2SoundConfig.sat_type,
        audio_source: str = AUDIO_SOURCES[0],
        caption_source: str = CAPTION_SOURCES[0],
        mel_cache: str | Path | None = None,
    ) -> None:
        check_split(split)
        check_zoom_levels(zoom_levels)
        self.root = Path(root)
        self.split = split
        self._zoom_levels = tuple(sorted(zoom_levels))
        defaults = {"sat_type": sat_type, "audio_source": audio_source, "caption_source": caption_source}
        rows = read_pairs_csv(self.root, defaults)
        _check_row_zooms(self.root, rows, self._zoom_levels)
        self.rows = [row for row in rows if row.split == split]
        _check_files(self.root, self.rows, self._zoom_levels)
        self.mel_cache = None if mel_cache is None else Path(mel_cache)
        self._recordings: dict[Path, MelSegments] = {}

    @property
    def zoom_levels(self) -> tuple[int, ...]:
        return self._zoom_levels

    def _recording(self, path: Path) -> MelSegments:
        """The recording's segments, decoded once per process for the most recently used recordings (pairs often
        share recordings)."""
        recording = self._recordings.pop(path, None)
        if recording is None and self.mel_cache is not None:
            recording = CachedMel(path, self.mel_cache)
        elif recording is None:
            recording = RecordingMel(recording_clips(decode_audio(path, MEL_SEGMENTS * CLIP_SECONDS)))
        self._recordings[path] = recording
        while len(self._recordings) > RECORDINGS_KEPT:
            del self._recordings[next(iter(self._recordings))]
        return recording

    def __len__(self) -> int:
        return len(self.rows)

    def pair_keys(self) -> list[str]:
        return [row.key for row in self.rows]

    def record(self, index: int) -> PairRecord:
        row = self.rows[index]
        where = f"{self.root / CSV_NAME} line {row.line}"
        image = decode_image(row.image, f"{row.image} ({where})")
        levels = row.zoom_levels(self._zoom_levels)
        return PairRecord(
            key=row.key,
            image=image,
            sat_type=row.sat_type,
            tile_px=min(image.shape[:2]) / levels[-1],
            mel=self._recording(row.audio),
            audio_caption=row.audio_caption,
            image_captions=dict.fromkeys(levels, row.image_caption),
            lat=row.lat,
            lon=row.lon,
            month=row.month,
            hour=row.hour,
            audio_source=row.audio_source,
            caption_source=row.caption_source,
            split=row.split,
        )


class CachedMel(MelSegments):
    """A recording's segments from the mel cache (module docstring), written there on its first use."""

    def __init__(self, path: Path, folder: Path) -> None:
        self.path = path
        self.folder = folder
        self._mels: np.ndarray | None = None
        self._windows: np.ndarray | None = None

    def segment(self, index: int) -> np.ndarray:
        if self._mels is None or self._windows is None:
            self._mels, self._windows = self._load()
        return self._mels[self._windows[index]]

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        content = self.path.read_bytes()
        key = hashlib.sha256(MEL_FRONT_END.encode() + b"\0" + content).hexdigest()
        cached = self.folder / key[:2] / f"{key}.npz"
        if cached.is_file():
            with np.load(cached) as stored:
                return stored["mels"], stored["windows"]
        recording = RecordingMel(recording_clips(decode_audio(self.path, MEL_SEGMENTS * CLIP_SECONDS)))
        # The first segment of each distinct window, by the window's samples.
        firsts: dict[bytes, int] = {}
        for index, clip in enumerate(recording.clips):
            firsts.setdefault(clip.tobytes(), index)
        windows = np.array([list(firsts).index(clip.tobytes()) for clip in recording.clips], np.int64)
        mels = np.stack([recording.segment(index) for index in firsts.values()])
        with atomic_path(cached) as tmp, tmp.open("wb") as handle:
            np.savez(handle, mels=mels, windows=windows)
        return mels, windows


def recording_clips(waveform: np.ndarray) -> np.ndarray:
    """(MEL_SEGMENTS, CLIP_SAMPLES) float32 windows spread evenly over `waveform` (zero-padded when shorter)."""
    span = max(len(waveform) - CLIP_SAMPLES, 0)
    starts = [round(segment * span / (MEL_SEGMENTS - 1)) for segment in range(MEL_SEGMENTS)]
    return np.stack([fit_clip(waveform[start : start + CLIP_SAMPLES]) for start in starts]).astype(np.float32)


def read_pairs_csv(root: Path, defaults: Mapping[str, str]) -> list[FolderRow]:
    """Every line of root/pairs.csv, checked; raises DataError naming the first bad line and its fix."""
    path = root / CSV_NAME
    if not path.is_file():
        raise DataError(f"{path} does not exist; write the pairs CSV (columns {','.join(REQUIRED_COLUMNS)})")
    # Read as common.tables.read_table reads CSV, not through it: its rows lose the line numbers and cell counts
    # checked here.
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            _check_header(path, reader.fieldnames or [])
            # line_num: the file line a record ends on (a quoted caption may span lines).
            rows = [_parse_row(root, reader.line_num, cells, defaults) for cells in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(
            f"cannot read the CSV {path} ({first_line(exc)}); save it as UTF-8 CSV with balanced quotes"
            " (a spreadsheet's 'CSV UTF-8')"
        ) from None
    seen: dict[str, int] = {}
    for row in rows:
        if row.key in seen:
            raise DataError(f"{path} line {row.line}: key {row.key!r} repeats line {seen[row.key]}; make keys unique")
        seen[row.key] = row.line
    return rows


def _check_header(path: Path, columns: Sequence[str]) -> None:
    check_unique_columns(path, columns, DataError)
    missing = [name for name in REQUIRED_COLUMNS if name not in columns]
    if missing:
        raise DataError(f"{path} lacks columns {missing}; its header must hold {','.join(REQUIRED_COLUMNS)}")
    unknown = [name for name in columns if name not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if unknown:
        raise DataError(f"{path} has unknown columns {unknown}; the optional ones are {','.join(OPTIONAL_COLUMNS)}")


def _parse_row(root: Path, line: int, cells: Mapping[str, str | None], defaults: Mapping[str, str]) -> FolderRow:
    where = f"{root / CSV_NAME} line {line}"
    if None in cells or any(cells[name] is None for name in REQUIRED_COLUMNS):
        raise DataError(f"{where}: its cells do not match the header's columns; fix the commas or quoting")
    text = {name: (value or "").strip() for name, value in cells.items() if isinstance(name, str)}
    if not text["key"]:
        raise DataError(f"{where}: key is empty; give every pair a unique key")
    for column, fix in CAPTION_FIXES.items():
        if not text[column]:
            raise DataError(f"{where}: {column} is empty; {fix}")
    choices = {"sat_type": tuple(GSD_BY_SAT_TYPE), "audio_source": AUDIO_SOURCES, "caption_source": CAPTION_SOURCES}
    chosen = {name: text.get(name) or defaults[name] for name in choices}
    for name, allowed in choices.items():
        if chosen[name] not in allowed:
            raise DataError(f"{where}: {name} {chosen[name]!r} is unknown; use one of {list(allowed)}")
    if text["split"] not in SPLITS:
        raise DataError(f"{where}: split {text['split']!r} is unknown; use one of {list(SPLITS)}")
    lat, lon = _coordinate(where, text, "lat", 90), _coordinate(where, text, "lon", 180)
    month, hour = _month_hour(where, text["time"])
    return FolderRow(
        line=line,
        key=text["key"],
        image=_existing_file(root, where, text, "image"),
        audio=_existing_file(root, where, text, "audio"),
        audio_caption=text["audio_caption"],
        image_caption=text["image_caption"],
        lat=lat,
        lon=lon,
        month=month,
        hour=hour,
        split=text["split"],
        sat_type=chosen["sat_type"],
        audio_source=chosen["audio_source"],
        caption_source=chosen["caption_source"],
        zoom_level=_zoom_level(where, text.get("zoom_level", "")),
    )


def _check_files(root: Path, rows: Sequence[FolderRow], zoom_levels: tuple[int, ...]) -> None:
    """Refuse files that are cut short, are not what they claim or are too small, where decoding would fail only at
    their first batch or not at all: an image that is no 8-bit PNG, JPEG or TIFF by its header
    (`check_image_head`, `image_size`), a PNG that lacks the IEND chunk it must end with, an image too small to
    crop its zoom levels from, audio that does not open or lacks the frames its header declares
    (`check_audio_opens`). Reads the header and last bytes of each image, the headers and last frame of each
    distinct recording."""
    where: dict[Path, str] = {}
    for row in rows:
        at = f"{root / CSV_NAME} line {row.line}"
        what = f"{row.image} ({at})"
        with row.image.open("rb") as image:
            head = image.read(IMAGE_HEAD_BYTES)
            image.seek(max(image.seek(0, os.SEEK_END) - len(PNG_END), 0))
            tail = image.read()
        check_image_head(head, what)
        if png_cut_short(head, tail):
            raise DataError(f"{what} is truncated: the PNG lacks its closing IEND chunk; export it again")
        width, height = image_size(head, row.image, what)
        largest = row.zoom_levels(zoom_levels)[-1]
        if min(width, height) < largest:
            raise DataError(
                f"{what} is {width}x{height} px, too small to crop zoom levels 1 to {largest} from; export it at"
                f" {MODEL_INPUT_PX} px or more"
            )
        where.setdefault(row.audio, at)
    for audio, at in where.items():
        check_audio_opens(audio, f"audio file {audio} ({at})", DataError)


def _zoom_level(where: str, text: str) -> int | None:
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise DataError(
            f"{where}: zoom_level {text!r} is not a whole number of 1 or more; write e.g. 3, or leave it empty"
        )
    return int(text)


def _check_row_zooms(root: Path, rows: Sequence[FolderRow], zoom_levels: tuple[int, ...]) -> None:
    for row in rows:
        if row.zoom_level is not None and row.zoom_level not in zoom_levels:
            raise DataError(
                f"{root / CSV_NAME} line {row.line}: zoom_level {row.zoom_level} is not among the data's zoom"
                f" levels {list(zoom_levels)}; add it to them (data.zooms) or change the row"
            )


def _existing_file(root: Path, where: str, text: Mapping[str, str], column: str) -> Path:
    path = root / text[column]
    if not text[column] or not path.is_file():
        raise DataError(f"{where}: {column} file {path} does not exist; give a path relative to {root}")
    return path


def _coordinate(where: str, text: Mapping[str, str], column: str, limit: float) -> float:
    try:
        value = float(text[column])
    except ValueError:
        value = float("nan")
    if not -limit <= value <= limit:
        raise DataError(
            f"{where}: {column} {text[column]!r} is not a number within ±{limit}; write degrees (EPSG:4326)"
        )
    return value


def _month_hour(where: str, time: str) -> tuple[int | None, int | None]:
    if not time:
        return None, None
    try:
        return month_hour_from_iso(time)
    except ValueError:
        raise DataError(
            f"{where}: time {time!r} is not ISO 8601; write e.g. 2021-06-01 or 2021-06-01T14:30, or leave it empty"
        ) from None

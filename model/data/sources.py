"""One training pair (image, sound, captions, metadata) and the abstract source of pairs every layout implements.

A `PairSource` answers for itself: its length, its records, the zoom levels its image captions exist at and
the blocks of rows it reads together. Layouts: `model.data.parquet` (GeoSound, SoundingEarth) and
`model.data.folder` (a user's own pairs).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime

import numpy as np
from dateutil import parser as date_parser

from model.audio import N_FRAMES, N_MELS
from model.config import AUDIO_SOURCES, CAPTION_SOURCES, GSD_BY_SAT_TYPE
from model.errors import DataError

SPLITS: tuple[str, ...] = ("train", "val", "test")
# 10 s mel segments per recording: the first axis of GeoSound's and SoundingEarth's `mel_features`.
MEL_SEGMENTS = 5
# Two fallbacks that differ in month and hour: a component the text leaves out comes out different.
_PROBE_DEFAULTS = (datetime(2001, 1, 1, 0), datetime(2002, 2, 2, 1))


class MelSegments(ABC):
    """The MEL_SEGMENTS log-mel segments of one recording, each (N_FRAMES, N_MELS) float32."""

    @abstractmethod
    def segment(self, index: int) -> np.ndarray: ...

    def __len__(self) -> int:
        return MEL_SEGMENTS


class PrecomputedMel(MelSegments):
    """Segments stored with the pair (the datasets' `mel_features`)."""

    def __init__(self, stack: np.ndarray) -> None:
        if stack.shape != (MEL_SEGMENTS, N_FRAMES, N_MELS):
            raise DataError(
                f"mel features shaped {stack.shape}, expected {(MEL_SEGMENTS, N_FRAMES, N_MELS)};"
                " rebuild them with the Sat2Sound front end (5 segments of 10 s, 64 mel bins)"
            )
        self.stack = stack.astype(np.float32, copy=False)

    def segment(self, index: int) -> np.ndarray:
        return self.stack[index]


class RecordingMel(MelSegments):
    """Segments of a decoded recording, each computed only when asked for: (MEL_SEGMENTS, CLIP_SAMPLES) clips."""

    def __init__(self, clips: np.ndarray) -> None:
        self.clips = clips
        self._segments: dict[int, np.ndarray] = {}

    def segment(self, index: int) -> np.ndarray:
        if index not in self._segments:
            # Here, not at the top: reading a gallery's recordings (a map's score job) does not load torch.
            import torch

            from model.mel import log_mel

            self._segments[index] = log_mel(torch.from_numpy(self.clips[index : index + 1]))[0, 0].numpy()
        return self._segments[index]


@dataclass(frozen=True)
class PairRecord:
    """One co-located image and recording with their captions and metadata, decoded but not transformed."""

    key: str
    image: np.ndarray  # (H, W, 3) uint8 RGB, centred on the recording
    sat_type: str
    tile_px: float  # image pixels across the zoom-level-1 crop; zoom z sees the centre z x tile_px
    mel: MelSegments
    audio_caption: str
    image_captions: Mapping[int, str]  # soundscape caption of the image, by zoom level
    lat: float
    lon: float
    month: int | None  # 1-12, None when unknown
    hour: int | None  # 0-23, None when unknown
    audio_source: str
    caption_source: str
    split: str

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem:
            raise DataError(f"pair {self.key!r}: {problem}")

    def _problem(self) -> str | None:
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            return f"image must be uint8 (H, W, 3), got {self.image.dtype} {self.image.shape}; store 8-bit RGB"
        checks = (
            (self.tile_px > 0, f"tile_px must be positive, got {self.tile_px}"),
            (self.sat_type in GSD_BY_SAT_TYPE, f"sat_type {self.sat_type!r} is not one of {list(GSD_BY_SAT_TYPE)}"),
            (self.audio_source in AUDIO_SOURCES, f"audio source {self.audio_source!r} is not one of {AUDIO_SOURCES}"),
            (
                self.caption_source in CAPTION_SOURCES,
                f"caption source {self.caption_source!r} is not one of {CAPTION_SOURCES}",
            ),
            (-90 <= self.lat <= 90 and -180 <= self.lon <= 180, f"lat/lon {self.lat}, {self.lon} out of range"),
            (self.split in SPLITS, f"split {self.split!r} is not one of {SPLITS}"),
        )
        return next((message + "; fix the data" for ok, message in checks if not ok), None)


class PairSource(ABC):
    """The pairs of one split of one dataset, readable by index."""

    @property
    @abstractmethod
    def zoom_levels(self) -> tuple[int, ...]:
        """The zoom levels (ascending) records are seen at: each record offers them all (an image caption and an
        image large enough for each), or, where a source pins a record to one level, that level."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def record(self, index: int) -> PairRecord: ...

    @abstractmethod
    def pair_keys(self) -> list[str]:
        """Every record's key, in index order, without decoding the records."""

    def blocks(self) -> list[range]:
        """Index ranges cheaper to read together than apart (one Parquet row group each); here every row alone."""
        return [range(index, index + 1) for index in range(len(self))]


def check_zoom_levels(zoom_levels: tuple[int, ...]) -> None:
    if not zoom_levels or any(zoom < 1 for zoom in zoom_levels):
        raise DataError(f"zoom levels must be positive integers, got {zoom_levels}")


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {list(SPLITS)}")


def month_hour_from_text(text: str | None) -> tuple[int | None, int | None]:
    """Month and hour of a free-form date as the datasets store it, read the way upstream reads it (text up to
    an am/pm marker, else before "gmt", parsed by dateutil); unparseable text gives (None, None).

    Unlike upstream, which fills what the text leaves out from today's date and midnight, a missing month or
    hour is returned as None (unknown), so a date without a time does not claim midnight.
    """
    cleaned = _upstream_clean(text)
    if not cleaned:
        return None, None
    try:
        first, second = (date_parser.parse(cleaned, default=default) for default in _PROBE_DEFAULTS)
    except (ValueError, OverflowError):
        return None, None
    return (first.month if first.month == second.month else None, first.hour if first.hour == second.hour else None)


def _upstream_clean(text: str | None) -> str:
    lowered = (text or "").lower().strip()
    for marker in ("am", "pm"):
        if marker in lowered:
            return lowered[: lowered.find(marker) + len(marker)].strip()
    if "gmt" in lowered:
        return lowered[: lowered.find("gmt")].strip()
    return lowered


def month_hour_from_iso(text: str) -> tuple[int | None, int | None]:
    """Month and hour of an ISO 8601 date (hour unknown) or date-time; raises ValueError otherwise."""
    try:
        return date.fromisoformat(text).month, None
    except ValueError:
        moment = datetime.fromisoformat(text)
        return moment.month, moment.hour

"""GeoSound and SoundingEarth in their Hugging Face Parquet layout, from a local folder or the Hub.

A dataset folder is a snapshot of the Hub repo: `data/<split>-NNNNN-of-NNNNN.parquet` (or the shards at its top),
with `val` also found as `validation`. Columns (as `datasets` writes them): images and audio are structs of
encoded `bytes` and a `path`; `mel_features` is a float32 (5, 1, 1001, 64) stack of list arrays (`Array4D`).

    GeoSound      sample_id, source, bingmap_image (1500 px), sentinel_image (1280 px), audio_caption,
                  audio_caption_source, mel_features, llava_caption_{bingmap,sentinel}_zl{1,3,5}, latitude,
                  longitude, date, (audio and metadata columns, not read)
    SoundingEarth sample_id, googleearth_image (1024 px), audio_caption, audio_caption_source, mel_features,
                  llava_caption_googleearth_zl1, latitude, longitude, date_recorded, (short_id, audio, not read)

Memory: a record is read with the rest of its Parquet row group (only the columns above), and the last group
read stays cached, so a source holds at most one row group's images and mel stacks (`datasets` writes 100
rows per group for image data: about 100 x (1 image + 1.3 MB of mel)). Read rows group by group
(`PairSource.blocks`, `model.data.dataset.BlockShuffleSampler`) to read each group once per epoch.
"""

from __future__ import annotations

import bisect
from abc import abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from model.audio import N_FRAMES, N_MELS
from model.config import TRAINED_ZOOM_LEVELS, crop_px
from model.data.images import decode_image
from model.data.sources import (
    MEL_SEGMENTS,
    PairRecord,
    PairSource,
    PrecomputedMel,
    check_split,
    month_hour_from_text,
)
from model.errors import DataError

# Names a split's shards may carry: `datasets` calls the validation split either way.
SHARD_NAMES: dict[str, tuple[str, ...]] = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
SHARD_FOLDER = "data"
MEL_COLUMN = "mel_features"
KEY_COLUMN = "sample_id"
# Upstream encodes no hour for these recordings (their upload times are not recording times).
UNTIMED_AUDIO_SOURCES: tuple[str, ...] = ("freesound",)


def shard_patterns(split: str) -> list[str]:
    """Repo paths (fnmatch) of a split's shards, in the layout `push_to_hub` writes."""
    return [f"{SHARD_FOLDER}/{name}-*.parquet" for name in SHARD_NAMES[split]]


def find_shards(root: Path, split: str) -> list[Path]:
    """A split's shards in a snapshot of the Hub repo (under data/ or at its top), sorted."""
    folders = (root / SHARD_FOLDER, root)
    return sorted(
        path for name in SHARD_NAMES[split] for folder in folders for path in folder.glob(f"{name}-*.parquet")
    )


def _looked_for(split: str) -> str:
    return ", ".join(shard_patterns(split))


class ParquetPairs(PairSource):
    """The rows of one split's shards, each made a record; subclasses name their date column, captioned zoom levels
    and audio source."""

    DATASET: ClassVar[str]
    HUB_REPO: ClassVar[str]
    SAT_TYPES: ClassVar[tuple[str, ...]]
    DATE_COLUMN: ClassVar[str]
    SOURCE_COLUMNS: ClassVar[tuple[str, ...]] = ()  # read beside the common columns to name the audio source

    def __init__(self, root: str | Path, split: str, sat_type: str | None = None) -> None:
        check_split(split)
        self.sat_type = sat_type or self.SAT_TYPES[0]
        if self.sat_type not in self.SAT_TYPES:
            raise DataError(f"{self.DATASET} has no {self.sat_type!r} imagery; use one of {list(self.SAT_TYPES)}")
        self.root = Path(root)
        self.split = split
        self.shards = find_shards(self.root, split)
        if not self.shards:
            raise DataError(
                f"no {self.DATASET} {split} shards under {self.root} (looked for {_looked_for(split)});"
                f" point at a copy of the Hub repo {self.HUB_REPO}"
            )
        self._groups: list[tuple[int, int]] = []  # (shard, row group) of each group, in reading order
        self._starts: list[int] = []  # index of each group's first row
        rows = 0
        for shard_index, path in enumerate(self.shards):
            metadata = self._check_schema(path)
            for group in range(metadata.num_row_groups):
                self._groups.append((shard_index, group))
                self._starts.append(rows)
                rows += metadata.row_group(group).num_rows
        self._rows = rows
        self._cached: tuple[int, pa.Table] | None = None

    @classmethod
    def from_hub(
        cls, split: str, sat_type: str | None = None, repo_id: str | None = None, revision: str | None = None
    ) -> Self:
        """The split from a Hub dataset repo (default: the official one), downloading only that split's shards
        into the Hugging Face cache on first use (`HF_ENDPOINT`, `HF_HUB_OFFLINE` apply)."""
        # Here, not at the top: a map's jobs read galleries through this module without loading huggingface_hub.
        from model.hub import download_dataset

        check_split(split)
        repo = repo_id or cls.HUB_REPO
        root = download_dataset(repo, shard_patterns(split), revision)
        if not find_shards(root, split):
            raise DataError(
                f"Hub dataset {repo} has no {split} shards ({_looked_for(split)}); check the repo and split"
            )
        return cls(root, split, sat_type)

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns a record is made from."""
        captions = tuple(self.caption_column(zoom) for zoom in self.zoom_levels)
        common = (KEY_COLUMN, *self.SOURCE_COLUMNS, self.image_column, "audio_caption", "audio_caption_source")
        return (*common, MEL_COLUMN, *captions, "latitude", "longitude", self.DATE_COLUMN)

    @abstractmethod
    def _audio_source(self, row: Mapping[str, Any]) -> str: ...

    def _record(self, row: Mapping[str, Any], mel: np.ndarray, image: np.ndarray) -> PairRecord:
        month, hour = month_hour_from_text(row[self.DATE_COLUMN])
        audio_source = self._audio_source(row)
        return PairRecord(
            key=row[KEY_COLUMN],
            image=image,
            sat_type=self.sat_type,
            tile_px=crop_px(1, self.sat_type),
            mel=PrecomputedMel(mel),
            audio_caption=row["audio_caption"] or "",
            image_captions={zoom: row[self.caption_column(zoom)] or "" for zoom in self.zoom_levels},
            lat=float(row["latitude"]),
            lon=float(row["longitude"]),
            month=month,
            hour=None if audio_source in UNTIMED_AUDIO_SOURCES else hour,
            audio_source=audio_source,
            caption_source=row["audio_caption_source"],
            split=self.split,
        )

    @property
    def image_column(self) -> str:
        return f"{self.sat_type.lower()}_image"

    def caption_column(self, zoom_level: int) -> str:
        return f"llava_caption_{self.sat_type.lower()}_zl{zoom_level}"

    def __len__(self) -> int:
        return self._rows

    def blocks(self) -> list[range]:
        return [range(start, stop) for start, stop in zip(self._starts, [*self._starts[1:], self._rows], strict=True)]

    def pair_keys(self) -> list[str]:
        return [str(key) for path in self.shards for key in pq.read_table(path, columns=[KEY_COLUMN])[KEY_COLUMN]]

    def record(self, index: int) -> PairRecord:
        if not 0 <= index < self._rows:
            raise IndexError(f"row {index} of a {self._rows}-row {self.DATASET} {self.split} split")
        group = bisect.bisect_right(self._starts, index) - 1
        table = self._group_table(group)
        offset = index - self._starts[group]
        shard_index, group_index = self._groups[group]
        where = f"{self.shards[shard_index]} row group {group_index} row {offset}"
        encoded = (self.image_column, MEL_COLUMN)
        row = {name: table.column(name)[offset].as_py() for name in self.columns if name not in encoded}
        image = table.column(self.image_column)[offset].as_py()
        if not image or not image.get("bytes"):
            raise DataError(f"{where} has no embedded {self.image_column} bytes; download the shard again")
        pixels = decode_image(image["bytes"], f"{where}'s {self.image_column}")
        return self._record(row, _mel_stack(table.column(MEL_COLUMN), offset, where), pixels)

    def _group_table(self, group: int) -> pa.Table:
        if self._cached is None or self._cached[0] != group:
            shard_index, group_index = self._groups[group]
            table = pq.ParquetFile(self.shards[shard_index]).read_row_group(group_index, columns=list(self.columns))
            self._cached = (group, table)
        return self._cached[1]

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get their own copy: send them no cached row group.
        return {**self.__dict__, "_cached": None}

    def _check_schema(self, path: Path) -> pq.FileMetaData:
        try:
            parquet = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{path} is not a readable Parquet file ({exc}); download it again") from None
        missing = [name for name in self.columns if name not in parquet.schema_arrow.names]
        if missing:
            raise DataError(
                f"{path} lacks columns {missing}; it is not a {self.DATASET} shard of the {self.HUB_REPO} layout"
            )
        return parquet.metadata


def _mel_stack(column: pa.ChunkedArray, offset: int, where: str) -> np.ndarray:
    """(MEL_SEGMENTS, N_FRAMES, N_MELS) float32 of one row's `mel_features`, whatever its nesting."""
    values = column.slice(offset, 1).combine_chunks()
    if isinstance(values.type, pa.ExtensionType):
        values = values.storage
    if values.null_count:
        raise DataError(f"{where} has no mel_features; download the shard again")
    while pa.types.is_list(values.type) or pa.types.is_fixed_size_list(values.type):
        values = values.flatten()
    flat = values.to_numpy(zero_copy_only=False)
    if flat.size != MEL_SEGMENTS * N_FRAMES * N_MELS:
        raise DataError(
            f"{where} holds {flat.size} mel values, expected {MEL_SEGMENTS} x {N_FRAMES} x {N_MELS};"
            " rebuild mel_features with the Sat2Sound front end"
        )
    return flat.reshape(MEL_SEGMENTS, N_FRAMES, N_MELS)


class GeoSoundParquet(ParquetPairs):
    """GeoSound: Bing Maps or Sentinel-2 imagery, captions at zoom levels 1, 3 and 5, four audio sources."""

    DATASET = "GeoSound"
    HUB_REPO = "MVRL/GeoSound"
    SAT_TYPES = ("bingmap", "sentinel")
    DATE_COLUMN = "date"
    SOURCE_COLUMNS = ("source",)

    @property
    def zoom_levels(self) -> tuple[int, ...]:
        return TRAINED_ZOOM_LEVELS

    def _audio_source(self, row: Mapping[str, Any]) -> str:
        return str(row["source"])


class SoundingEarthParquet(ParquetPairs):
    """SoundingEarth: Google Earth imagery captioned at zoom level 1 only, Radio Aporee recordings."""

    DATASET = "SoundingEarth"
    HUB_REPO = "MVRL/SoundingEarth"
    SAT_TYPES = ("googleEarth",)
    DATE_COLUMN = "date_recorded"

    @property
    def zoom_levels(self) -> tuple[int, ...]:
        return (1,)

    def _audio_source(self, row: Mapping[str, Any]) -> str:
        return "aporee"

"""A torch Dataset of prepared samples, their collation into training batches, and a shuffling sampler that
reads Parquet row groups whole.

Sample i of epoch e is drawn from a generator seeded by (seed, e, i) alone, so it is the same whatever the
number of DataLoader workers or the order of reading, and a resumed run sees the samples it would have seen.
Captions stay text: the trainer encodes them with its (cached) text backbone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from model.data.sources import PairSource
from model.data.transforms import Sample, SampleTransform
from model.metadata import Metadata
from model.sat2sound import Sat2SoundBatch

# First seed word of the two random streams, so that sample draws and reading orders never share a seed.
SAMPLE_STREAM, ORDER_STREAM = 0, 1
# Stands for an unknown month or hour in a batch (Metadata.from_values reads negatives as unknown).
UNKNOWN = -1


def mixed_seed(*parts: int) -> int:
    """A 63-bit seed that mixes its non-negative inputs (numpy's SeedSequence)."""
    state = np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1


class PairDataset(Dataset[Sample]):
    """`source`'s records, prepared by `transform`; call `set_epoch` before each epoch for fresh draws."""

    def __init__(self, source: PairSource, transform: SampleTransform, seed: int = 0) -> None:
        self.source = source
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Sample:
        generator = torch.Generator().manual_seed(mixed_seed(SAMPLE_STREAM, self.seed, self.epoch, index))
        return self.transform(self.source.record(index), generator)


@dataclass(frozen=True)
class TrainBatch:
    """Collated samples: model-space tensors, caption texts and raw metadata."""

    keys: tuple[str, ...]
    images: Tensor  # (B, 3, 224, 224) float32
    zoom_level: Tensor  # (B,) int64
    mel: Tensor  # (B, 1, N_FRAMES, N_MELS) float32
    audio_captions: list[str]
    image_captions: list[str]
    lat: Tensor  # (B,) float64 degrees
    lon: Tensor  # (B,) float64 degrees
    month: Tensor  # (B,) int64, 1-12 or UNKNOWN
    hour: Tensor  # (B,) int64, 0-23 or UNKNOWN
    audio_sources: tuple[str, ...]
    caption_sources: tuple[str, ...]
    turns: Tensor  # (B,) int64: each image's `dihedral_turn`, 0 where it was not turned

    def __len__(self) -> int:
        return len(self.keys)

    def metadata(self) -> Metadata:
        """The encoded metadata; training-time dropout happens in the model (`model.metadata.drop_metadata`)."""
        return Metadata.from_values(
            self.lat.numpy(),
            self.lon.numpy(),
            self.month.numpy(),
            self.hour.numpy(),
            self.audio_sources,
            self.caption_sources,
        )

    def to_model_batch(
        self, audio_caption: tuple[Tensor, Tensor], image_caption: tuple[Tensor, Tensor], with_metadata: bool
    ) -> Sat2SoundBatch:
        """The model's batch, given the captions' text hidden states and valid masks."""
        return Sat2SoundBatch(
            images=self.images,
            zoom_level=self.zoom_level,
            mel=self.mel,
            audio_caption=audio_caption,
            image_caption=image_caption,
            metadata=self.metadata() if with_metadata else None,
        )


def collate(samples: Sequence[Sample]) -> TrainBatch:
    return TrainBatch(
        keys=tuple(sample.key for sample in samples),
        images=torch.stack([sample.image for sample in samples]),
        zoom_level=torch.tensor([sample.zoom_level for sample in samples], dtype=torch.int64),
        mel=torch.stack([sample.mel for sample in samples]),
        audio_captions=[sample.audio_caption for sample in samples],
        image_captions=[sample.image_caption for sample in samples],
        lat=torch.tensor([sample.lat for sample in samples], dtype=torch.float64),
        lon=torch.tensor([sample.lon for sample in samples], dtype=torch.float64),
        month=torch.tensor([_known(sample.month) for sample in samples], dtype=torch.int64),
        hour=torch.tensor([_known(sample.hour) for sample in samples], dtype=torch.int64),
        audio_sources=tuple(sample.audio_source for sample in samples),
        caption_sources=tuple(sample.caption_source for sample in samples),
        turns=torch.tensor([sample.turn for sample in samples], dtype=torch.int64),
    )


def _known(value: int | None) -> int:
    return UNKNOWN if value is None else value


class BlockShuffleSampler(Sampler[int]):
    """Every index of `source` once per epoch: its blocks (row groups) in random order, each block's rows
    shuffled and read back to back, so a Parquet row group is read once instead of once per row."""

    def __init__(self, source: PairSource, seed: int = 0) -> None:
        self.blocks = source.blocks()
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(len(block) for block in self.blocks)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(mixed_seed(ORDER_STREAM, self.seed, self.epoch))
        for block in torch.randperm(len(self.blocks), generator=generator).tolist():
            rows = self.blocks[block]
            for offset in torch.randperm(len(rows), generator=generator).tolist():
                yield rows[offset]

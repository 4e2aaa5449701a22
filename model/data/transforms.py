"""From a decoded pair to a model-ready sample, as upstream's training and evaluation prepare them.

Training: a zoom level drawn from the source's levels (1, 3, 5 for GeoSound; 1 for SoundingEarth) that the
record offers (a record pinned to one level is seen at that one), the centre crop of zoom x the record's tile px,
a bicubic antialiased resize to 224 px, colour jitter (brightness, contrast and saturation 0.3, hue 0.2:
torchvision's ColorJitter, here kornia's port of it on float pixels), ImageNet normalisation, and one of the 5 mel
segments at random. Evaluation: a fixed zoom (the smallest the record offers: 1 for the reference's data) and mel
segment (0), no jitter. Optionally (`dihedral`; upstream does not) training also gives each image a random
quarter turn and mirror, as an overhead view has no up. Every draw comes from the generator passed in, so a
sample depends on its seed alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from kornia.augmentation import ColorJitter
from torch import Tensor

from model.data.sources import MEL_SEGMENTS, PairRecord, PairSource, check_zoom_levels
from model.errors import DataError
from model.preprocess import center_crop, normalize, resize_to_unit

# brightness, contrast, saturation, hue of upstream's training-only ColorJitter.
COLOR_JITTER = (0.3, 0.3, 0.3, 0.2)
SEED_BOUND = 2**62
DIHEDRAL_ORDER = 8  # quarter turns 0-3, each with or without a mirror


@dataclass(frozen=True)
class Sample:
    """One pair ready for collation: tensors in model space, captions and metadata still raw."""

    key: str
    image: Tensor  # (3, 224, 224) float32, ImageNet-normalised
    zoom_level: int
    mel: Tensor  # (1, N_FRAMES, N_MELS) float32 log-mel
    audio_caption: str
    image_caption: str
    lat: float
    lon: float
    month: int | None
    hour: int | None
    audio_source: str
    caption_source: str
    turn: int  # the element of the square's symmetry group the image was given (`dihedral_turn`); 0: none


@dataclass(frozen=True)
class SampleTransform:
    """Training (random zoom, mel segment and jitter) or evaluation (fixed zoom and segment) preparation."""

    train: bool
    zoom_levels: tuple[int, ...]
    eval_zoom: int | None = None  # None: the smallest of zoom_levels the record offers
    eval_mel_segment: int = 0
    dihedral: bool = False  # training: one of the 8 quarter turns and mirrors of each image
    color_jitter: tuple[float, ...] = COLOR_JITTER  # training; all 0: none

    def __post_init__(self) -> None:
        check_zoom_levels(self.zoom_levels)
        if not 0 <= self.eval_mel_segment < MEL_SEGMENTS:
            raise DataError(f"eval_mel_segment must be 0-{MEL_SEGMENTS - 1}, got {self.eval_mel_segment}")

    @classmethod
    def for_source(cls, source: PairSource, train: bool) -> SampleTransform:
        """The reference's preparation for `source`: its zoom levels, evaluated at the smallest."""
        return cls(train=train, zoom_levels=source.zoom_levels)

    def __call__(self, record: PairRecord, generator: torch.Generator) -> Sample:
        offered = [zoom for zoom in self.zoom_levels if zoom in record.image_captions]
        if not offered:
            raise DataError(
                f"pair {record.key!r} has no image caption at zoom {', '.join(map(str, self.zoom_levels))};"
                f" use zoom levels {sorted(record.image_captions)}"
            )
        if self.train:
            zoom = offered[_draw(len(offered), generator)]
            segment = _draw(len(record.mel), generator)
        else:
            zoom = min(offered) if self.eval_zoom is None else self.eval_zoom
            segment = self.eval_mel_segment
        if zoom not in record.image_captions:
            raise DataError(
                f"pair {record.key!r} has no image caption at zoom {zoom};"
                f" use zoom levels {sorted(record.image_captions)}"
            )
        pixels = resize_to_unit(_crop(record, zoom))
        turn = 0
        if self.train:
            if any(self.color_jitter):
                pixels = _jitter(pixels, self.color_jitter, _draw(SEED_BOUND, generator))
            if self.dihedral:
                turn = _draw(DIHEDRAL_ORDER, generator)
                pixels = dihedral_turn(pixels, turn)
        return Sample(
            key=record.key,
            image=normalize(pixels)[0],
            zoom_level=zoom,
            mel=torch.tensor(record.mel.segment(segment))[None],
            audio_caption=record.audio_caption,
            image_caption=record.image_captions[zoom],
            lat=record.lat,
            lon=record.lon,
            month=record.month,
            hour=record.hour,
            audio_source=record.audio_source,
            caption_source=record.caption_source,
            turn=turn,
        )


def _draw(count: int, generator: torch.Generator) -> int:
    return int(torch.randint(count, (), generator=generator))


def _crop(record: PairRecord, zoom: int) -> Tensor:
    """uint8 (3, size, size) centre crop that zoom level `zoom` sees of the record's image."""
    size = round(zoom * record.tile_px)
    height, width = record.image.shape[:2]
    if size > min(height, width):
        raise DataError(
            f"pair {record.key!r}: its {width}x{height} px image is smaller than the {size} px"
            f" crop of zoom {zoom}; use lower zoom levels or a larger image"
        )
    return center_crop(torch.from_numpy(record.image).permute(2, 0, 1), size)


def dihedral_turn(pixels: Tensor, which: int) -> Tensor:
    """Element `which` (0-7) of the square's symmetry group: `which % 4` quarter turns, mirrored if `which >= 4`."""
    turned = torch.rot90(pixels, which % 4, dims=(-2, -1))
    return turned.flip(-1) if which >= 4 else turned


@cache
def _color_jitter(strengths: tuple[float, ...]) -> ColorJitter:
    brightness, contrast, saturation, hue = strengths
    return ColorJitter(brightness, contrast, saturation, hue, p=1.0)


def _jitter(pixels: Tensor, strengths: tuple[float, ...], seed: int) -> Tensor:
    """kornia draws from torch's global generator: run it on a seeded fork of it, leaving the caller's intact."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _color_jitter(strengths)(pixels)

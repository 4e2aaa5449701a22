"""What the preview's popups say a tile probably sounds like: its best gallery recordings (`outputs.gallery`).

For each tile of the preview's lattice and each time, the PREVIEW_SOUND_RANKS best items the store holds
(`gallery_item`), as indexes into one list of the recordings they name: caption, licence and attribution, and,
for the PREVIEW_MAX_CLIPS recordings that are best for the most tiles, their first PREVIEW_CLIP_SECONDS inlined
as MP3 (about 54 kB each at 32 kHz mono), so the page plays them offline and stays within about 2 MB of sound.
Every browser plays MP3. A recording that no longer decodes is listed without a player, with a warning.
"""

from __future__ import annotations

import base64
import io
import warnings
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import soundfile

from model.audio import SAMPLE_RATE
from model.errors import AudioDecodeError
from pipeline.errors import GalleryWarning
from pipeline.store.read import SoundscapeStore

if TYPE_CHECKING:
    from pipeline.gallery_sources import AudioReader, GalleryItem

PREVIEW_SOUND_RANKS = 3
PREVIEW_MAX_CLIPS = 24
PREVIEW_CLIP_SECONDS = 10.0
NO_SOUND = -1


class PreviewSounds(NamedTuple):
    """`best` (T, ranks, rows, cols): each lattice tile's best recordings per time, as indexes into `sounds`
    (NO_SOUND for none); `sounds`: per recording its caption, licence, attribution and `src` (an MP3 data URL,
    or None where the page holds no clip of it)."""

    best: np.ndarray
    sounds: list[dict[str, Any]]


def preview_sounds(soundscape: SoundscapeStore, rows: np.ndarray, cols: np.ndarray) -> PreviewSounds | None:
    """The sounds of the lattice `rows` x `cols`; None for a store without gallery matches."""
    if soundscape.gallery is None:
        return None
    from pipeline.gallery import open_gallery
    from pipeline.gallery_sources import AudioReader

    gallery = open_gallery(soundscape.gallery)
    found = np.stack(
        [soundscape.gallery_items(rows, cols, time)[:PREVIEW_SOUND_RANKS] for time in range(len(soundscape.times.all))]
    )
    used, inverse, counts = np.unique(found[found >= 0], return_inverse=True, return_counts=True)
    best = np.full(found.shape, NO_SOUND, np.int32)
    best[found >= 0] = inverse
    clipped = set(used[np.argsort(-counts, kind="stable")[:PREVIEW_MAX_CLIPS]].tolist())
    reader = AudioReader()
    sounds = [_sound(gallery.items[position], reader if position in clipped else None) for position in used.tolist()]
    return PreviewSounds(best, sounds)


def _sound(item: GalleryItem, reader: AudioReader | None) -> dict[str, Any]:
    return {
        "caption": item.caption,
        "licence": item.licence,
        "attribution": item.attribution,
        "src": None if reader is None else _mp3_url(reader, item),
    }


def _mp3_url(reader: AudioReader, item: GalleryItem) -> str | None:
    try:
        clip = reader.clip(item, PREVIEW_CLIP_SECONDS)
    except AudioDecodeError as exc:
        warnings.warn(GalleryWarning(f"the preview plays no clip of {item.id}: {exc}"), stacklevel=3)
        return None
    encoded = io.BytesIO()
    soundfile.write(encoded, clip, SAMPLE_RATE, format="MP3", subtype="MPEG_LAYER_III")
    return "data:audio/mpeg;base64," + base64.b64encode(encoded.getvalue()).decode("ascii")

"""A sound gallery: recordings and their captions embedded once by a model, searched by tile embeddings.

`python -m pipeline gallery build SOURCE --checkpoint CKPT --out GALLERY` (sources: `pipeline.gallery_sources`).
Building again into the same folder embeds only the recordings it does not hold yet (by id); a recording that
cannot be decoded, is silent (or under 0.4 s) or has no caption is reported as a warning line and skipped, and the
summary counts it.

GALLERY/ holds, each file written atomically and the record last:
- `gallery.json`: the record: checkpoint and sha256 of the weights that embedded it (a build with other weights
  cannot use it), embedding width, item count, the model's logit scales of the image-audio (`logit_scale_ia`) and
  image-text (`logit_scale_it`) pairs, the index kind and faiss version.
- `items.json`: per item, in embedding order, `pipeline.gallery_sources.GalleryItem`: id, caption, the audio (a
  file, or a Parquet shard with the row), its seconds, licence, attribution, lat/lon.
- `audio.npy`, `caption.npy`: (count, dim) float32 L2-normalised embeddings of the recordings (their first 10 s,
  as queries are) and of their captions.
- `audio.faiss`, `caption.faiss`, `composed.faiss`: inner-product indexes (`pipeline.vectors`) of the audio, the
  caption and the composed vectors exp(logit_scale_ia) audio + exp(logit_scale_it) caption, whose inner product
  with a tile embedding is the sum of the image->audio and image->caption logits the model was trained with.

A build with `outputs.gallery` (`gallery_of_build`) searches a gallery made beforehand, or its own, embedded by its
`gallery` job from a folder of recordings into `<build>/gallery`; its score job keeps each tile's best items
(`Gallery.tile_matches`) for the store.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import faiss
import numpy as np

from common.atomic import atomic_path, atomic_write_bytes, unwritable_folder_reason
from model.audio import CLIP_SECONDS, fit_clip
from model.errors import AudioDecodeError, first_line
from pipeline.config import ModelSettings
from pipeline.errors import BuildConfigError, GalleryError, GalleryWarning
from pipeline.gallery_sources import RECORDINGS_CSV, AudioReader, GalleryItem, folder_items
from pipeline.mix import measured_loudness
from pipeline.store.layout import GALLERY_ATTRS, GALLERY_NONE
from pipeline.vectors import VectorSearch, index_of, kind_of, read_index, write_index

if TYPE_CHECKING:
    from model import Sat2SoundEncoder

RECORD_NAME = "gallery.json"
ITEMS_NAME = "items.json"
AUDIO, CAPTION, COMPOSED = "audio", "caption", "composed"
DIRECTIONS = (AUDIO, CAPTION, COMPOSED)
EMBEDDED = (AUDIO, CAPTION)
# The query kind (`pipeline.queries.LOGIT_SCALE_BY_KIND`) whose logit scale weighs each embedded direction.
SCALE_KIND = {AUDIO: "audio", CAPTION: "text"}
EMBED_BATCH = 16
BUILD_GALLERY_DIR = "gallery"


@dataclass(frozen=True)
class GalleryRecord:
    checkpoint: str
    sha256: str
    dim: int
    count: int
    logit_scale: dict[str, float]  # by embedded direction (audio, caption)
    index_kind: str
    faiss_version: str


def build_command(folder: Path | str, checkpoint: str = "CKPT") -> str:
    return f"python -m pipeline gallery build SOURCE --checkpoint {checkpoint} --out {folder}"


class Gallery:
    """An opened gallery: its record, items and embeddings, searched by `search`."""

    def __init__(
        self, folder: Path, record: GalleryRecord, items: list[GalleryItem], embeddings: dict[str, np.ndarray]
    ) -> None:
        self.folder = folder
        self.record = record
        self.items = items
        self.embeddings = embeddings
        self._searches: dict[str, VectorSearch] = {}

    def search(self, queries: np.ndarray, k: int, direction: str = COMPOSED) -> tuple[np.ndarray, np.ndarray]:
        """(n, k) similarities and item positions of the k best items for each tile embedding (n, dim), best
        first: cosines for `audio` and `caption`, the summed logits for `composed`."""
        if direction not in self._searches:
            try:
                self._searches[direction] = VectorSearch(read_index(self.folder / f"{direction}.faiss"))
            except (OSError, RuntimeError) as exc:
                raise GalleryError(
                    f"cannot read the {direction} index of {self.folder} ({first_line(exc)}); build it again"
                ) from None
        return self._searches[direction].search(queries, min(k, self.record.count))

    def tile_matches(self, embeddings: np.ndarray, valid: np.ndarray, k: int) -> TileMatches:
        """The k best items of each valid tile by composed logit, from a chunk's per-time tile embeddings
        (T, N, dim) and (N,) valid mask: (T, k, N) arrays, -1 / NaN where a tile is not valid or the gallery has
        fewer than k items."""
        times, count = embeddings.shape[:2]
        item = np.full((times, k, count), GALLERY_NONE, np.int32)
        logit, audio, caption = (np.full((times, k, count), np.nan, np.float32) for _ in range(3))
        for time, per_time in enumerate(embeddings):
            vectors = per_time[valid].astype(np.float32)
            if not len(vectors) or not self.record.count:
                continue
            logits, found = self.search(vectors, k)
            kept = found.shape[1]
            item[time, :kept][:, valid] = found.T
            logit[time, :kept][:, valid] = logits.T
            for out, name in ((audio, AUDIO), (caption, CAPTION)):
                out[time, :kept][:, valid] = np.einsum("nd,nkd->kn", vectors, self.embeddings[name][found])
        return TileMatches(item, logit, audio, caption)


class TileMatches(NamedTuple):
    """Each tile's best gallery items, (T, k, N) per time: their positions in `items`, composed logits and the
    cosines of the tile with their recordings and captions (the store's gallery_* variables, in order)."""

    item: np.ndarray
    logit: np.ndarray
    audio_cosine: np.ndarray
    caption_cosine: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        """By the name of the store variable that holds them."""
        return dict(zip(GALLERY_ATTRS, self, strict=True))


class BuildGallery(NamedTuple):
    """The gallery a build searches, and the folder of recordings the build embeds into it (None: the gallery
    was made beforehand, with `python -m pipeline gallery build`)."""

    folder: Path
    recordings: Path | None

    @property
    def record_path(self) -> Path:
        return self.folder / RECORD_NAME

    def recording_files(self) -> list[str]:
        """The files the build embeds (its rerun triggers): the recordings and their CSV."""
        if self.recordings is None:
            return []
        table = self.recordings / RECORDINGS_CSV
        return [item.audio for item in folder_items(self.recordings, None)] + ([str(table)] if table.is_file() else [])


def gallery_of_build(setting: str, build_dir: Path) -> BuildGallery:
    """`outputs.gallery` of a build in `build_dir`: a gallery is used as it is; any other folder holds recordings
    that the build embeds with its own weights into `<build>/gallery`."""
    given = Path(setting)
    if is_gallery(given):
        return BuildGallery(given, None)
    return BuildGallery(build_dir / BUILD_GALLERY_DIR, given)


def is_gallery(folder: Path) -> bool:
    """Whether `folder` holds a gallery (its record), not recordings to embed."""
    return (folder / RECORD_NAME).is_file()


class BuildSummary(NamedTuple):
    added: int
    kept: int
    skipped: int
    record: GalleryRecord


def composed_vectors(embeddings: dict[str, np.ndarray], logit_scale: dict[str, float]) -> np.ndarray:
    """Each item's exp(logit_scale_ia) audio + exp(logit_scale_it) caption embedding."""
    audio, caption = (math.exp(logit_scale[name]) * embeddings[name] for name in EMBEDDED)
    return (audio + caption).astype(np.float32)


def open_gallery(folder: Path) -> Gallery:
    """The gallery in `folder`, refused in one line if there is none or it is damaged (it may be empty)."""
    if not is_gallery(folder):
        what = "no folder" if not folder.is_dir() else f"no gallery ({RECORD_NAME})"
        raise GalleryError(f"{folder}: {what}; build a gallery there with {build_command(folder)}")
    try:
        record = GalleryRecord(**json.loads((folder / RECORD_NAME).read_text()))
        items = [GalleryItem(**item) for item in json.loads((folder / ITEMS_NAME).read_text())]
        embeddings = {name: np.load(folder / f"{name}.npy") for name in EMBEDDED}
    except (OSError, ValueError, TypeError) as exc:
        raise GalleryError(f"cannot read the gallery {folder} ({exc}); build it again") from None
    shapes = {name: values.shape for name, values in embeddings.items()}
    if len(items) != record.count or any(shape != (record.count, record.dim) for shape in shapes.values()):
        raise GalleryError(
            f"the gallery {folder} is damaged ({record.count} items recorded, {len(items)} listed, embeddings"
            f" {shapes}); build it again"
        )
    return Gallery(folder, record, items, embeddings)


def open_filled_gallery(folder: Path) -> Gallery:
    gallery = open_gallery(folder)
    if gallery.record.count == 0:
        raise GalleryError(f"the gallery {folder} is empty; add recordings with {build_command(folder)}")
    return gallery


def check_gallery_folder(folder: Path, sha256: str) -> Gallery | None:
    """Before any embedding: `folder` can be written and is new, empty or a gallery of the same weights (which
    it returns, to be added to)."""
    if reason := unwritable_folder_reason(folder):
        raise GalleryError(f"cannot write into {folder} ({reason}); pass --out a writable folder")
    if not folder.is_dir():  # made when the gallery is written, not before: a refusal leaves nothing behind
        return None
    if not is_gallery(folder):
        if any(folder.iterdir()):
            raise GalleryError(f"{folder} holds files but no gallery; pass --out an empty or new folder")
        return None
    gallery = open_gallery(folder)
    if gallery.record.sha256 != sha256:
        raise GalleryError(
            f"the gallery {folder} was embedded with other weights ({gallery.record.checkpoint}, sha256"
            f" {gallery.record.sha256[:12]}); pass those with --checkpoint, or --out a new folder"
        )
    return gallery


def build_gallery(
    items: list[GalleryItem], checkpoint: str, out: Path, device: str = "auto", text_backbone: str = "auto"
) -> BuildSummary:
    """Embed the `items` the gallery in `out` lacks (all of them for a new one) with the weights `checkpoint`
    names and write the gallery; refused in one line before the model loads if `out` cannot take them."""
    from model import Sat2SoundEncoder, read_config, resolve_checkpoint, sha256_file
    from model.text_specs import check_text_backbone

    path = resolve_checkpoint(checkpoint)
    sha256 = sha256_file(path)
    existing = check_gallery_folder(out, sha256)
    check_text_backbone(text_backbone, read_config(path).text_dim)
    known = set() if existing is None else {item.id for item in existing.items}
    new = [item for item in _unique(items) if item.id not in known]
    if existing is not None and not new:
        return BuildSummary(0, existing.record.count, 0, existing.record)
    encoder = Sat2SoundEncoder.from_checkpoint(path, device=device, text_backbone=text_backbone)
    every, embeddings, skipped = _with_new(new, encoder, existing)
    if not every:
        raise GalleryError(
            f"none of the {len(new)} recordings could be embedded (each warned about above); give recordings that"
            " decode, with sound and a caption"
        )
    record = write_gallery(out, every, embeddings, checkpoint, sha256, model_logit_scales(encoder))
    kept = 0 if existing is None else existing.record.count
    return BuildSummary(record.count - kept, kept, skipped, record)


def _with_new(
    new: list[GalleryItem], encoder: Sat2SoundEncoder, existing: Gallery | None
) -> tuple[list[GalleryItem], dict[str, np.ndarray], int]:
    """The gallery's items and embeddings with `new` added, and how many of them were skipped."""
    kept = existing.items if existing is not None else []
    dim = existing.record.dim if existing is not None else encoder.cfg.codebook_dim
    parts = {
        name: [existing.embeddings[name] if existing is not None else np.zeros((0, dim), np.float32)]
        for name in EMBEDDED
    }
    added: list[GalleryItem] = []
    skipped = 0
    reader = AudioReader()
    for start in range(0, len(new), EMBED_BATCH):
        decoded = [_decoded(reader, item) for item in new[start : start + EMBED_BATCH]]
        ready = [pair for pair in decoded if pair is not None]
        skipped += len(decoded) - len(ready)
        if not ready:
            continue
        parts[AUDIO].append(encoder.embed_waveforms(np.stack([clip for _, clip in ready])).embedding.numpy())
        parts[CAPTION].append(encoder.embed_texts([item.caption for item, _ in ready]).embedding.numpy())
        added.extend(item for item, _ in ready)
    embeddings = {name: np.concatenate(values).astype(np.float32) for name, values in parts.items()}
    return [*kept, *added], embeddings, skipped


def _unique(items: list[GalleryItem]) -> list[GalleryItem]:
    """The first item of each id, in order."""
    first: dict[str, GalleryItem] = {}
    for item in items:
        first.setdefault(item.id, item)
    return list(first.values())


def _decoded(reader: AudioReader, item: GalleryItem) -> tuple[GalleryItem, np.ndarray] | None:
    """The item with its length and its first 10 s as the model hears them; None (with a warning) if it cannot
    be decoded or has no caption."""
    if not item.caption.strip():
        warnings.warn(GalleryWarning(f"skipped {item.id}: it has no caption; give it one"), stacklevel=3)
        return None
    try:
        seconds = reader.checked_seconds(item)
        heard = reader.clip(item, CLIP_SECONDS)
    except AudioDecodeError as exc:
        warnings.warn(GalleryWarning(f"skipped {item.id}: {exc}"), stacklevel=3)
        return None
    if not math.isfinite(measured_loudness(heard)):
        warnings.warn(
            GalleryWarning(
                f"skipped {item.id}: its first {CLIP_SECONDS} s are silent, or shorter than a loudness meter's"
                " 0.4 s, with nothing to listen to; give a recording with sound"
            ),
            stacklevel=3,
        )
        return None
    return GalleryItem(**{**asdict(item), "seconds": round(seconds, 3)}), fit_clip(heard)


def write_gallery(
    folder: Path,
    items: list[GalleryItem],
    embeddings: dict[str, np.ndarray],
    checkpoint: str,
    sha256: str,
    logit_scale: dict[str, float],
) -> GalleryRecord:
    """Every file of the gallery, the record last."""
    indexes = {name: index_of(embeddings[name]) for name in EMBEDDED}
    indexes[COMPOSED] = index_of(composed_vectors(embeddings, logit_scale))
    for name, values in embeddings.items():
        with atomic_path(folder / f"{name}.npy") as tmp, tmp.open("wb") as handle:
            np.save(handle, values)
    for name, index in indexes.items():
        write_index(folder / f"{name}.faiss", index)
    atomic_write_bytes(folder / ITEMS_NAME, json.dumps([asdict(item) for item in items], indent=1).encode())
    record = GalleryRecord(
        checkpoint=checkpoint,
        sha256=sha256,
        dim=int(embeddings[AUDIO].shape[1]),
        count=len(items),
        logit_scale=logit_scale,
        index_kind=kind_of(indexes[COMPOSED]),
        faiss_version=faiss.__version__,
    )
    atomic_write_bytes(folder / RECORD_NAME, json.dumps(asdict(record), indent=1).encode())
    return record


def model_logit_scales(encoder: Sat2SoundEncoder) -> dict[str, float]:
    from pipeline.queries import logit_scale

    return {name: logit_scale(encoder, kind) for name, kind in SCALE_KIND.items()}


def item_facts(item: GalleryItem) -> dict[str, Any]:
    """What a listener's sidecar says of a recording it used."""
    return {
        "id": item.id,
        "file": item.audio,
        "row": item.row,
        "caption": item.caption,
        "licence": item.licence,
        "attribution": item.attribution,
    }


def check_build_gallery(setting: str, model: ModelSettings | None) -> None:
    """Refuse, before a build, an `outputs.gallery` that is neither a gallery nor a folder of recordings, or a
    gallery that other weights than the build's `model` embedded (untrained weights are made by the build: their
    gallery is checked by `listen`; without a model, as `python -m pipeline plan` reads no weights, not checked)."""
    given = Path(setting)
    try:
        if not is_gallery(given):  # recordings the build embeds
            _check_recordings(given)
            return
        gallery = open_gallery(given)
    except GalleryError as exc:
        raise BuildConfigError(f"config.outputs.gallery: {exc}") from None
    if model is None or model.untrained:
        return
    from model import resolve_checkpoint, sha256_file

    if sha256_file(resolve_checkpoint(model.checkpoint)) != gallery.record.sha256:
        raise BuildConfigError(
            f"config.outputs.gallery: {setting} was embedded with other weights ({gallery.record.checkpoint}) than"
            f" model.checkpoint; build one with {build_command(Path('NEW_GALLERY'), model.checkpoint)}, or name its"
            " recordings' folder"
        )


def _check_recordings(folder: Path) -> None:
    """A folder of recordings the build can embed: refused in one line if it is missing, has none, or its
    recordings CSV names a file it does not hold (a recording that does not decode is skipped with a warning)."""
    if not folder.is_dir():
        raise GalleryError(f"{folder} is neither a gallery nor a folder of recordings; name one of them")
    missing = [item.id for item in folder_items(folder, None) if not Path(item.audio).is_file()]
    if missing:
        raise GalleryError(
            f"{folder / RECORDINGS_CSV} names {missing[0]}, which is not in {folder}"
            f"{f' (nor are {len(missing) - 1} more)' if len(missing) > 1 else ''}; add it or drop its row"
        )

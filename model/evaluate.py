"""Retrieval evaluation of paired embeddings, with the reference protocol (mvrl/sat2sound src/evaluate.py).

Rows of `image`, `audio` and `audio_caption` belong together (one pair per row); the gallery is the whole
split. Every embedding is L2-normalised (x / (‖x‖ + 1e-8), `model.loss.l2_normalize`) and scored by cosine
similarity in float32. Each row is first scaled by the power of two that brings its largest magnitude into
[1, 2): exact, and what keeps the result independent of the embeddings' scale (a float32 norm of 1e20-sized
values overflows, one of 1e-10-sized ones sinks under the 1e-8). Rows that are all zero are refused.
A query's rank of its own pair is 1-based with ties averaged:
1 + #(gallery items scoring strictly higher) + #(other items scoring exactly the same) / 2.
R@k is the share of queries whose rank is strictly below k = 10 % of the gallery size, not rounded
(gallery 15: k = 1.5, so a pair tied with one other at the top does not count); the median rank is the
median of the queries' ranks (the mean of the two middle ones for an even count).

Directions: I2S (image queries, audio gallery) and S2I (audio queries, image gallery). Settings, where
"caption added" means normalise(normalise(x) + normalise(caption)), the caption being the pair's own:
    none   nothing added
    audio  caption added to the audio side, as query (S2I) and as gallery (I2S)
    query  caption added to both queries; both galleries plain

Queries are scored in blocks of rows, so memory stays bounded whatever the gallery size.
"""

from __future__ import annotations

import json
import math
import tokenize
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import Tensor

from common.atomic import atomic_write_bytes
from model.errors import InputError
from model.loss import l2_normalize

EMBEDDING_KEYS = ("image", "audio", "audio_caption")
# The fewest pairs retrieval is scored on: a gallery of one ranks every query first.
MIN_GALLERY = 2
SETTINGS = {"none": "nothing added", "audio": "caption added to audio", "query": "caption added to queries"}
DIRECTIONS = ("I2S", "S2I")
RECALL_AT_PERCENT = 10
# Similarity scores held at once: 2**22 float32 values (16 MiB) per block of query rows (blocks of
# 64 MiB ran 25 % slower on 2 cores, the comparisons then missing the caches).
BLOCK_SCORES = 2**22

Metrics = dict[str, dict[str, dict[str, float]]]


class Retrieval(NamedTuple):
    """One direction's result: R@k (a share of the queries) and the median rank."""

    recall: float
    median_rank: float


class Sides(NamedTuple):
    """A setting's normalised queries and galleries on each side."""

    image_query: Tensor
    image_gallery: Tensor
    audio_query: Tensor
    audio_gallery: Tensor


def check_embeddings(arrays: Mapping[str, ArrayLike], source: str) -> dict[str, np.ndarray]:
    """The three arrays as float32 rows scaled by `_peak_scaled`, or InputError if they are not row-aligned
    finite 2-D embeddings with a direction in every row."""
    checked = {}
    for key in EMBEDDING_KEYS:
        array = np.asarray(arrays[key])
        if array.ndim != 2 or not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise InputError(f"{source}: {key!r} is {array.dtype} {array.shape}; pass a 2-D real array (pairs, width)")
        checked[key] = array.astype(np.float64, copy=False)
    shapes = {key: array.shape for key, array in checked.items()}
    if len(set(shapes.values())) != 1:
        raise InputError(f"{source}: shapes differ {shapes}; pass row-aligned pairs of one embedding width")
    rows, width = shapes["image"]
    if rows < MIN_GALLERY:
        raise InputError(f"{source}: {rows} pair(s); retrieval needs a gallery of at least {MIN_GALLERY} pairs")
    if width == 0:
        raise InputError(f"{source}: the embeddings are 0 wide; pass arrays of shape (pairs, width >= 1)")
    for key, array in checked.items():
        if not np.isfinite(array).all():
            raise InputError(f"{source}: {key!r} holds NaN or infinite values; pass finite embeddings")
        zero = np.flatnonzero(~array.any(axis=1))
        if len(zero):
            raise InputError(
                f"{source}: {len(zero)} of the {rows} rows of {key!r} are all zero (first: row {zero[0]}), with no"
                " direction to rank by; drop those pairs or recompute their embeddings"
            )
    return {key: _peak_scaled(array) for key, array in checked.items()}


def _peak_scaled(rows: np.ndarray) -> np.ndarray:
    """Nonzero float64 rows as float32, each scaled as the module docstring says."""
    _, exponent = np.frexp(np.abs(rows).max(axis=1, keepdims=True))
    return np.ldexp(rows, 1 - exponent).astype(np.float32)


def read_npz(path: Path, holding: str) -> dict[str, np.ndarray]:
    """Every array of an .npz file; a missing file, a folder, one array (.npy) or a file numpy cannot read without
    pickle is refused in one line, which says what it should hold (`holding`)."""
    if path.is_dir():
        raise InputError(f"{path} is a folder, not an .npz; pass an .npz with {holding}")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass an .npz with {holding}")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise InputError(f"{path} holds one array, not an .npz; save {holding} with np.savez")
        with data:
            assert data.zip is not None  # an NpzFile holds its zip until closed
            _check_declared_sizes(data.zip, path, holding)
            return {name: data[name] for name in data.files}
    # EOFError: an empty file; zlib.error and TokenError: a compressed member or an array header that is garbled.
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, tokenize.TokenError) as exc:
        raise InputError(
            f"{path} is not a readable .npz of numeric arrays ({type(exc).__name__}); save {holding} with np.savez"
        ) from exc


def _check_declared_sizes(archive: zipfile.ZipFile, path: Path, holding: str) -> None:
    """Refuse an array whose header declares more data than its member of the .npz `archive` holds: numpy would
    first allocate what a garbled header declares (a MemoryError, or terabytes of address space)."""
    for info in archive.infolist():
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(member)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(member)
            held = info.file_size - member.tell()
        declared = math.prod(shape) * dtype.itemsize
        if not dtype.hasobject and declared > held:
            raise InputError(
                f"{path}: array {info.filename.removesuffix('.npy')!r} declares shape {shape} of {dtype}"
                f" ({declared:,} bytes) but holds {held:,} bytes; save {holding} with np.savez again"
            )


def load_embeddings(path: Path) -> dict[str, np.ndarray]:
    """Checked float32 `image`, `audio` and `audio_caption` arrays from an .npz file."""
    arrays = read_npz(path, ", ".join(EMBEDDING_KEYS))
    missing = [key for key in EMBEDDING_KEYS if key not in arrays]
    if missing:
        raise InputError(f"{path} lacks {', '.join(missing)} (has {', '.join(arrays) or 'nothing'})")
    return check_embeddings({key: arrays[key] for key in EMBEDDING_KEYS}, str(path))


def recall_cutoff(gallery_size: int) -> float:
    """k of R@k: 10 % of the gallery, not rounded."""
    return gallery_size * RECALL_AT_PERCENT / 100


def pair_ranks(queries: Tensor, gallery: Tensor, block_rows: int | None = None) -> np.ndarray:
    """Rank (1-based, ties averaged) of gallery row i among all gallery rows for query row i, as float64."""
    size = len(gallery)
    rows = block_rows or max(1, BLOCK_SCORES // size)
    ranks = []
    for start in range(0, len(queries), rows):
        scores = queries[start : start + rows] @ gallery.T
        own = scores.diagonal(offset=start)[:, None]
        higher = (scores > own).sum(dim=1)
        tied_others = (scores == own).sum(dim=1) - 1
        ranks.append((1 + higher.double() + tied_others.double() / 2).numpy())
    return np.concatenate(ranks)


def setting_sides(image: Tensor, audio: Tensor, audio_caption: Tensor) -> dict[str, Sides]:
    img, aud, cap = l2_normalize(image), l2_normalize(audio), l2_normalize(audio_caption)
    img_cap, aud_cap = l2_normalize(img + cap), l2_normalize(aud + cap)
    return {
        "none": Sides(image_query=img, image_gallery=img, audio_query=aud, audio_gallery=aud),
        "audio": Sides(image_query=img, image_gallery=img, audio_query=aud_cap, audio_gallery=aud_cap),
        "query": Sides(image_query=img_cap, image_gallery=img, audio_query=aud_cap, audio_gallery=aud),
    }


@torch.no_grad()
def ranks_by_setting(
    image: ArrayLike, audio: ArrayLike, audio_caption: ArrayLike, block_rows: int | None = None
) -> dict[str, dict[str, np.ndarray]]:
    """Every query's rank of its own pair, for each setting and direction."""
    arrays = check_embeddings({"image": image, "audio": audio, "audio_caption": audio_caption}, "embeddings")
    tensors = [torch.from_numpy(arrays[key]) for key in EMBEDDING_KEYS]
    return {
        setting: {
            "I2S": pair_ranks(sides.image_query, sides.audio_gallery, block_rows),
            "S2I": pair_ranks(sides.audio_query, sides.image_gallery, block_rows),
        }
        for setting, sides in setting_sides(*tensors).items()
    }


def summarise(ranks: np.ndarray) -> Retrieval:
    return Retrieval(recall=float(np.mean(ranks < recall_cutoff(len(ranks)))), median_rank=float(np.median(ranks)))


def retrieval_metrics(
    image: ArrayLike, audio: ArrayLike, audio_caption: ArrayLike, block_rows: int | None = None
) -> Metrics:
    """{setting: {direction: {"recall", "median_rank"}}} for settings none/audio/query, directions I2S/S2I."""
    return {
        setting: {direction: summarise(ranks)._asdict() for direction, ranks in by_direction.items()}
        for setting, by_direction in ranks_by_setting(image, audio, audio_caption, block_rows).items()
    }


def evaluate_embeddings(
    image: ArrayLike, audio: ArrayLike, audio_caption: ArrayLike, out: Path | None = None
) -> Metrics:
    """The retrieval metrics of row-aligned embeddings, also written to `out` (JSON, atomically) if given."""
    metrics = retrieval_metrics(image, audio, audio_caption)
    if out is not None:
        atomic_write_bytes(out, (json.dumps(metrics, indent=2) + "\n").encode())
    return metrics


def format_table(metrics: Metrics, gallery_size: int) -> str:
    """A plain-text table of the metrics, one row per setting."""
    k = recall_cutoff(gallery_size)
    header = f"{'setting':<34}" + "".join(f"{d + ' R@k':>10}{d + ' median':>12}" for d in DIRECTIONS)
    lines = [
        f"gallery of {gallery_size} pairs; I2S: image queries, S2I: audio queries; "
        f"R@k: share of queries ranking their pair below k = {k:g}",
        header,
    ]
    for setting, label in SETTINGS.items():
        cells = "".join(
            f"{metrics[setting][d]['recall']:>10.4f}{metrics[setting][d]['median_rank']:>12g}" for d in DIRECTIONS
        )
        lines.append(f"{f'{setting} ({label})':<34}{cells}")
    return "\n".join(lines)

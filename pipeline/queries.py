"""The queries of a build: text, audio files, or audio + text composed, embedded once into queries.npz.

Each query keeps the logit scale the model was trained with for its kind of pair: image-text
(`logit_scale_it`) for text, image-audio (`logit_scale_ia`) for audio and image-(audio + text)
(`logit_scale_i_at`, or `logit_scale_ia` for checkpoints trained without it) for composed queries.
The softmax normalisation across queries uses them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from common.atomic import atomic_save_npz
from pipeline.config import Query
from pipeline.errors import QueryError

if TYPE_CHECKING:
    from model import Sat2SoundEncoder

AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".ogg", ".mp3"})
# Each kind of query keeps the scale its pair was trained with. The reference makes no zero-shot map itself; its
# image-text term (image vs audio caption, src/engine.py `get_loss`) is trained with logit_scale_it, so a softmax of
# text queries with it is the image->text zero-shot classification the model learnt (as CLIP's, with its one scale).
LOGIT_SCALE_BY_KIND = {"text": "logit_scale_it", "audio": "logit_scale_ia", "composed": "logit_scale_i_at"}
FALLBACK_COMPOSED_SCALE = "logit_scale_ia"


def check_query_files(queries: Sequence[Query]) -> None:
    """Raise a QueryError for the first audio file that is missing, of an unknown type, undecodable, empty,
    truncated, or silent where the model listens."""
    audio_queries = [query for query in queries if query.audio is not None]
    if not audio_queries:
        return
    # model.audio imports torch: only builds with audio queries pay for it when they start.
    from model.audio import CLIP_SECONDS, SILENT_DBFS, check_audio_file, decode_audio, peak_dbfs
    from model.errors import AudioDecodeError

    for query in audio_queries:
        path = Path(str(query.audio))
        if path.suffix.lower() not in AUDIO_SUFFIXES:
            raise QueryError(f"query {query.id!r}: {path} is not a wav, flac, ogg or mp3 file; convert it to one")
        try:
            check_audio_file(path)
            heard = decode_audio(path, CLIP_SECONDS)
        except AudioDecodeError as exc:
            raise QueryError(f"query {query.id!r}: {exc}") from None
        if peak_dbfs(heard) < SILENT_DBFS:
            raise QueryError(
                f"query {query.id!r}: {path} is silent in its first {CLIP_SECONDS} s, all the model hears of it (no"
                f" sample reaches {SILENT_DBFS:g} dBFS), so its map would score silence; trim the silence from its"
                " start or pick a recording of the sound to map"
            )


class QueryEmbeddings(NamedTuple):
    queries: tuple[Query, ...]
    embedding: np.ndarray  # (Q, D) float32, L2-normalised
    logit_scale: np.ndarray  # (Q,) float32, log of the multiplier applied to cosines in training

    @property
    def ids(self) -> list[str]:
        return [query.id for query in self.queries]


def embed_queries(encoder: Sat2SoundEncoder, queries: Sequence[Query]) -> QueryEmbeddings:
    rows: dict[str, np.ndarray] = {}
    by_kind = {kind: [query for query in queries if query.kind == kind] for kind in LOGIT_SCALE_BY_KIND}
    if by_kind["text"]:
        out = encoder.embed_texts([str(query.text) for query in by_kind["text"]])
        rows.update(zip((query.id for query in by_kind["text"]), out.embedding.numpy(), strict=True))
    if by_kind["audio"]:
        out = encoder.embed_audio([str(query.audio) for query in by_kind["audio"]])
        rows.update(zip((query.id for query in by_kind["audio"]), out.embedding.numpy(), strict=True))
    if by_kind["composed"]:
        composed = by_kind["composed"]
        out = encoder.embed_composed([str(query.audio) for query in composed], [str(query.text) for query in composed])
        rows.update(zip((query.id for query in composed), out.embedding.numpy(), strict=True))
    return QueryEmbeddings(
        queries=tuple(queries),
        embedding=np.stack([rows[query.id] for query in queries]).astype(np.float32),
        logit_scale=np.array([logit_scale(encoder, query.kind) for query in queries], dtype=np.float32),
    )


def logit_scale(encoder: Sat2SoundEncoder, kind: str) -> float:
    """The log of the multiplier the model applies to cosines of image embeddings and a query of `kind`."""
    name = LOGIT_SCALE_BY_KIND[kind]
    if not hasattr(encoder.model, name):
        name = FALLBACK_COMPOSED_SCALE
    return float(getattr(encoder.model, name).detach())


def write_queries(path: Path, queries: QueryEmbeddings) -> None:
    """queries.npz: each query's id, text and audio ("" where absent), its embedding and logit scale."""
    atomic_save_npz(
        path,
        {
            "ids": np.array(queries.ids),
            "texts": np.array([query.text or "" for query in queries.queries]),
            "audio": np.array([query.audio or "" for query in queries.queries]),
            "embedding": queries.embedding,
            "logit_scale": queries.logit_scale,
        },
    )


def read_queries(path: Path) -> QueryEmbeddings:
    with np.load(path) as data:
        fields = zip(data["ids"].tolist(), data["texts"].tolist(), data["audio"].tolist(), strict=True)
        return QueryEmbeddings(
            queries=tuple(Query(query_id, text or None, audio or None) for query_id, text, audio in fields),
            embedding=data["embedding"],
            logit_scale=data["logit_scale"],
        )

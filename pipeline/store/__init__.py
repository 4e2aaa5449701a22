"""The region-wide `soundscape.zarr`: scores of every kind, the writer (the one place invalid tiles become nodata),
and the reader the exports use. The layout is described in `pipeline.store.layout`."""

from pipeline.store.layout import gdal_path
from pipeline.store.read import SoundscapeStore, StoreGrid, open_store
from pipeline.store.scores import SCORE_KINDS, RegionScores, ScoreKind, score_chunk
from pipeline.store.write import ChunkFiles, write_store

__all__ = [
    "SCORE_KINDS",
    "ChunkFiles",
    "RegionScores",
    "ScoreKind",
    "SoundscapeStore",
    "StoreGrid",
    "gdal_path",
    "open_store",
    "score_chunk",
    "write_store",
]

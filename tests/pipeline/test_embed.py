"""Embed jobs: strips of imagery in loader processes, views cut from them, chunks kept across runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from support.paths import LANDSAT

from model import Sat2Sound, Sat2SoundConfig, Sat2SoundEncoder
from pipeline.build import plan_build
from pipeline.config import ImagerySettings, load_plan_inputs
from pipeline.embed import EmbedOptions, chunk_stamp, embed_chunks, is_done, largest_batch, top_concepts
from pipeline.geometry import Bounds
from pipeline.imagery import LocalRasterReader
from pipeline.plan import ChunkTiles, embed_jobs

IMAGERY = ImagerySettings(
    source=str(LANDSAT),
    options={"bands": [3, 2, 1]},
    cache_dir="unused",
    offline=True,
    native_gsd_m=None,
    min_coverage=0.5,
)
OPTIONS = EmbedOptions(month=None, hour=None, batch_size=16, loader_workers=0, top_k=3)


@pytest.fixture(scope="module")
def chunks() -> list[ChunkTiles]:
    inputs = load_plan_inputs(
        {
            "region": "-54.60,-25.45,-54.40,-25.25",
            "imagery": {"source": str(LANDSAT), "options": {"bands": [3, 2, 1]}},
            "model": {"checkpoint": "untrained", "sat_type": "sentinel", "zoom_level": 3},
            "tiling": {"tile_zoom_offset": 1, "chunk_zoom": 10},
        }
    )
    planned = plan_build(inputs)
    assert len(planned.chunks) >= 2
    return planned.chunks


@pytest.fixture(scope="module")
def encoder() -> Sat2SoundEncoder:
    torch.manual_seed(0)
    return Sat2SoundEncoder(Sat2Sound(Sat2SoundConfig.small("none")).eval(), device="cpu")


def test_top_concepts_mark_empty_ranks_with_minus_one() -> None:
    weights = torch.tensor([[0.0, 0.7, 0.3, 0.0], [0.25, 0.25, 0.25, 0.25]])
    indices, values = top_concepts(weights, 3)
    assert indices[0].tolist() == [1, 2, -1] and values[0].tolist() == pytest.approx([0.7, 0.3, 0.0])
    assert len(set(indices[1].tolist())) == 3 and values[1].tolist() == pytest.approx([0.25] * 3)


def test_auto_batch_size_is_the_largest_that_fits() -> None:
    assert largest_batch(lambda size: size <= 700, start=64, limit=4096) == 512
    assert largest_batch(lambda size: False, start=64, limit=4096) == 64
    assert largest_batch(lambda size: True, start=64, limit=4096) == 4096


def test_jobs_group_whole_chunks_in_plan_order(chunks: list[ChunkTiles]) -> None:
    inputs = load_plan_inputs({"region": "Portugal", "model": {"zoom_level": 5}, "tiling": {"chunk_zoom": 5}})
    plan = plan_build(inputs, survey=True).plan
    jobs = embed_jobs(plan, 2000)
    assert [chunk for job in jobs for chunk in job] == list(plan.chunk_ids)
    sizes = dict(zip(plan.chunk_ids, plan.chunk_sizes, strict=True))
    assert all(sum(sizes[chunk] for chunk in job) <= 2000 or len(job) == 1 for job in jobs)
    assert len(embed_jobs(plan, 10**9)) == 1 and len(embed_jobs(plan, 1)) == len(plan.chunk_ids)


def test_embedded_tiles_are_those_of_per_view_reads(
    chunks: list[ChunkTiles], encoder: Sat2SoundEncoder, tmp_path: Path
) -> None:
    chunk = chunks[0]
    [report] = embed_chunks([chunk], 3, encoder, IMAGERY, OPTIONS, tmp_path, lambda chunk: "stamp")
    with np.load(tmp_path / f"{chunk.id}.npz") as stored:
        coverage, valid, embedding = stored["coverage"], stored["valid"], stored["embedding"].astype(np.float32)
    assert report.valid == int(valid.sum()) > 0 and not report.reused
    with LocalRasterReader(LANDSAT, bands=(3, 2, 1)) as reader:
        reads = [reader.part(Bounds(*view), 224, 224) for view in chunk.views]
    np.testing.assert_allclose(coverage, [read.coverage for read in reads], atol=1e-4)
    rows = np.flatnonzero(valid)
    images = np.stack([np.ma.filled(reads[row].array, 0) for row in rows])
    expected = encoder.embed_images(images, zoom_level=3).embedding.numpy()
    # Scores are cosines with unit queries: within 1e-3 of the per-view path wherever the distance is.
    assert np.linalg.norm(embedding[rows] - expected, axis=1).max() < 2e-3  # float16 storage included
    assert not embedding[~valid].any()


def test_a_rerun_keeps_finished_chunks_and_redoes_stale_ones(
    chunks: list[ChunkTiles], encoder: Sat2SoundEncoder, tmp_path: Path
) -> None:
    first, second = chunks[:2]
    embed_chunks([first, second], 3, encoder, IMAGERY, OPTIONS, tmp_path, lambda chunk: "v1")
    (tmp_path / f"{second.id}.npz").write_bytes(b"cut short")  # a job killed while writing
    reports = embed_chunks([first, second], 3, encoder, IMAGERY, OPTIONS, tmp_path, lambda chunk: "v1")
    assert [report.reused for report in reports] == [True, False]
    assert is_done(tmp_path / f"{second.id}.npz", "v1")
    reports = embed_chunks([first, second], 3, encoder, IMAGERY, OPTIONS, tmp_path, lambda chunk: "v2")
    assert [report.reused for report in reports] == [False, False]


def test_loader_processes_give_the_same_chunk(
    chunks: list[ChunkTiles], encoder: Sat2SoundEncoder, tmp_path: Path
) -> None:
    chunk = chunks[1]
    embed_chunks([chunk], 3, encoder, IMAGERY, OPTIONS, tmp_path / "inline", lambda chunk: "s")
    embed_chunks([chunk], 3, encoder, IMAGERY, OPTIONS._replace(loader_workers=2), tmp_path / "workers", lambda c: "s")
    with np.load(tmp_path / "inline" / f"{chunk.id}.npz") as a, np.load(tmp_path / "workers" / f"{chunk.id}.npz") as b:
        for name in ("coverage", "valid", "embedding", "concept_index"):
            np.testing.assert_array_equal(a[name], b[name])


def test_stamps_change_with_settings_weights_and_tiles(chunks: list[ChunkTiles]) -> None:
    first, second = chunks[:2]
    stamps = {
        chunk_stamp(first, "settings", "weights"),
        chunk_stamp(first, "settings2", "weights"),
        chunk_stamp(first, "settings", "weights2"),
        chunk_stamp(second, "settings", "weights"),
    }
    assert len(stamps) == 4

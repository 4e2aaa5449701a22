"""Embed jobs: strips of imagery in loader processes, views cut from them, chunks kept across runs."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import mercantile
import numpy as np
import pytest
import torch
from support.imagery_servers import SCENE_PATH, Fault, SceneTiles, TileServer
from support.paths import LANDSAT

import pipeline.embed
from model import Sat2Sound, Sat2SoundConfig, Sat2SoundEncoder
from pipeline.build import plan_build
from pipeline.config import ImagerySettings, Time, load_plan_inputs
from pipeline.embed import (
    PROGRESS_SECONDS,
    ChunkReport,
    EmbedOptions,
    Progress,
    chunk_stamp,
    embed_chunks,
    is_done,
    largest_batch,
    stage_line,
)
from pipeline.errors import FetchError
from pipeline.fetch import fetch_chunks, fetch_stamp
from pipeline.geometry import Bounds
from pipeline.imagery import LocalRasterReader, TileCache, XYZReader
from pipeline.imagery.http import RetryPolicy
from pipeline.plan import ChunkTiles, embed_jobs
from pipeline.store.write import ImageryGaps, imagery_gaps
from pipeline.views import ViewBatch, cut_views

IMAGERY = ImagerySettings(
    source=str(LANDSAT),
    options={"bands": [3, 2, 1]},
    cache_dir="unused",
    offline=True,
    native_gsd_m=None,
    min_coverage=0.5,
)
FAST_RETRY = RetryPolicy(attempts=3, backoff_s=0.01, max_backoff_s=0.02, connect_timeout_s=1.0, read_timeout_s=0.5)
OPTIONS = EmbedOptions(times=(Time(None, None),), batch_size=16, loader_workers=0, top_k=3)
# Chunk-file arrays with a leading time axis.
PER_TIME = ("embedding", "concept_index", "concept_weight")


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
        coverage, valid, embedding = stored["coverage"], stored["valid"], stored["embedding"][0].astype(np.float32)
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


@pytest.mark.parametrize("cut_in_loaders", [False, True], ids=["read in loaders", "read and cut in loaders"])
def test_loader_processes_give_the_same_chunk(
    chunks: list[ChunkTiles],
    encoder: Sat2SoundEncoder,
    tmp_path: Path,
    cut_in_loaders: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    chunk = chunks[1]
    embed_chunks([chunk], 3, encoder, IMAGERY, OPTIONS, tmp_path / "inline", lambda chunk: "s")
    cutters = tmp_path / "cutters"
    cutters.mkdir()

    def cut_views_noting_the_process(*args: Any, **kwargs: Any) -> ViewBatch:
        (cutters / str(os.getpid())).touch()
        return cut_views(*args, **kwargs)

    monkeypatch.setattr(pipeline.embed, "cut_views", cut_views_noting_the_process)  # loader processes fork it
    workers = OPTIONS._replace(loader_workers=2, cut_in_loaders=cut_in_loaders)
    embed_chunks([chunk], 3, encoder, IMAGERY, workers, tmp_path / "workers", lambda c: "s")
    processes = {int(path.name) for path in cutters.iterdir()}
    assert processes and (os.getpid() not in processes) == cut_in_loaders
    with np.load(tmp_path / "inline" / f"{chunk.id}.npz") as a, np.load(tmp_path / "workers" / f"{chunk.id}.npz") as b:
        for name in ("coverage", "valid", "embedding", "concept_index"):
            np.testing.assert_array_equal(a[name], b[name])


def test_stamps_change_with_settings_weights_and_tiles(chunks: list[ChunkTiles]) -> None:
    first, second = chunks[:2]
    stamps = {
        chunk_stamp(first, "settings", "weights", OPTIONS.times),
        chunk_stamp(first, "settings2", "weights", OPTIONS.times),
        chunk_stamp(first, "settings", "weights2", OPTIONS.times),
        chunk_stamp(second, "settings", "weights", OPTIONS.times),
        chunk_stamp(first, "settings", "weights", (Time(6, None), Time(7, None))),
        chunk_stamp(first, "settings", "weights", (Time(6, None), Time(8, None))),
    }
    assert len(stamps) == 6


# --- imagery that cannot be had (imagery.on_missing: leave_empty) ---------------------------------------

SCENE_REGION = "-72.2160,18.5110,-72.2095,18.5175"  # a 700 m square in the loopback scene's centre
SCENE_ZOOM = 16


@pytest.fixture(scope="module")
def scene_server() -> Iterator[TileServer]:
    with TileServer(SceneTiles.from_raster(SCENE_PATH, zooms=(SCENE_ZOOM,))) as running:
        yield running


def _scene_imagery(server: TileServer, cache: Path, **changes: object) -> ImagerySettings:
    options = {"max_zoom": SCENE_ZOOM, "retry": FAST_RETRY._asdict()}
    settings = ImagerySettings(f"xyz:{server.url}/png/{{z}}/{{x}}/{{y}}.png", options, str(cache), False, None, 0.5)
    return replace(settings, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def scene_chunks(scene_server: TileServer, tmp_path_factory: pytest.TempPathFactory) -> list[ChunkTiles]:
    imagery = _scene_imagery(scene_server, tmp_path_factory.mktemp("plan-cache"))
    inputs = load_plan_inputs(
        {
            "region": SCENE_REGION,
            "imagery": {"source": imagery.source, "options": dict(imagery.options), "cache_dir": imagery.cache_dir},
            "model": {"checkpoint": "untrained", "sat_type": "bingmap", "zoom_level": 5},
            "tiling": {"tile_zoom_offset": 2, "chunk_zoom": 15},
        }
    )
    return plan_build(inputs).chunks


def _edge_tile(
    chunks: list[ChunkTiles], keep: Callable[[mercantile.Tile], bool] = lambda tile: True
) -> tuple[mercantile.Tile, np.ndarray]:
    """The zoom-16 source tile (of those to `keep`) touched by the fewest model views (but some), and which
    views reach it."""
    views = np.concatenate([chunk.views for chunk in chunks])
    tiles = {
        tile
        for view in views
        for tile in mercantile.tiles(*mercantile.lnglat(view[0], view[1]), *mercantile.lnglat(view[2], view[3]), 16)
    }

    def reaching(tile: mercantile.Tile) -> np.ndarray:
        left, bottom, right, top = mercantile.xy_bounds(tile)
        return (views[:, 0] < right) & (views[:, 2] > left) & (views[:, 1] < top) & (views[:, 3] > bottom)

    tile = min((tile for tile in tiles if keep(tile) and reaching(tile).any()), key=lambda tile: reaching(tile).sum())
    return tile, reaching(tile)


def _stored(out: Path, chunks: list[ChunkTiles], name: str) -> np.ndarray:
    """`name` of every tile of `chunks`, at the first time for per-time arrays."""
    arrays = [np.load(out / f"{chunk.id}.npz")[name] for chunk in chunks]
    return np.concatenate(arrays, axis=1)[0] if name in PER_TIME else np.concatenate(arrays)


def test_views_touching_a_tile_that_fails_every_retry_are_empty_and_the_rest_unchanged(
    scene_chunks: list[ChunkTiles], scene_server: TileServer, encoder: Sat2SoundEncoder, tmp_path: Path
) -> None:
    tile, reaching = _edge_tile(scene_chunks)
    clean = _scene_imagery(scene_server, tmp_path / "clean")
    embed_chunks(scene_chunks, 5, encoder, clean, OPTIONS, tmp_path / "a", lambda chunk: "s")
    scene_server.add_fault(Fault("status", path=f"/{tile.z}/{tile.x}/{tile.y}.", status=503))
    failing = _scene_imagery(scene_server, tmp_path / "failing")
    with pytest.raises(FetchError, match=r"^1 tile\(s\) .*; rerun to retry, or set imagery\.on_missing: leave_empty"):
        embed_chunks(scene_chunks, 5, encoder, failing, OPTIONS, tmp_path / "fail", lambda chunk: "s")
    leave = replace(failing, on_missing="leave_empty")
    reports = embed_chunks(scene_chunks, 5, encoder, leave, OPTIONS, tmp_path / "b", lambda chunk: "s")
    scene_server.clear()

    valid_a, valid_b = _stored(tmp_path / "a", scene_chunks, "valid"), _stored(tmp_path / "b", scene_chunks, "valid")
    unavailable = _stored(tmp_path / "b", scene_chunks, "unavailable")
    assert valid_a.all() and reaching.any() and not reaching.all()
    np.testing.assert_array_equal(unavailable, reaching)  # the kernel's reach adds no view here
    np.testing.assert_array_equal(valid_b, valid_a & ~reaching)
    for name in ("embedding", "concept_index", "concept_weight"):
        a, b = _stored(tmp_path / "a", scene_chunks, name), _stored(tmp_path / "b", scene_chunks, name)
        np.testing.assert_array_equal(b[~reaching], a[~reaching])
        assert not np.any(b[reaching] > 0)
    assert sum(report.empty_unavailable for report in reports) == reaching.sum()
    gaps = imagery_gaps([chunk.id for chunk in scene_chunks], tmp_path / "b")
    assert gaps == ImageryGaps(int(reaching.sum()), 1)
    assert (
        gaps.line
        == f"{reaching.sum()} tiles left empty: imagery unavailable (1 source tiles failed or corrupt); rerun to retry"
    )
    assert imagery_gaps([chunk.id for chunk in scene_chunks], tmp_path / "a").line is None

    # A rerun retries the chunks that lacked imagery and keeps the others.
    lacking = [bool(np.load(tmp_path / "b" / f"{chunk.id}.npz")["unavailable"].any()) for chunk in scene_chunks]
    reports = embed_chunks(scene_chunks, 5, encoder, leave, OPTIONS, tmp_path / "b", lambda chunk: "s")
    assert [not report.reused for report in reports] == lacking
    np.testing.assert_array_equal(_stored(tmp_path / "b", scene_chunks, "valid"), valid_a)


def test_a_chunks_fetch_stamp_follows_its_views_and_the_imagery_settings(scene_chunks: list[ChunkTiles]) -> None:
    first, second = scene_chunks[:2]
    same_views = first._replace(views=first.views.copy())
    assert fetch_stamp(first, "a") == fetch_stamp(same_views, "a")
    assert len({fetch_stamp(first, "a"), fetch_stamp(first, "b"), fetch_stamp(second, "a")}) == 3


def test_a_corrupt_cached_tile_read_offline_leaves_its_views_empty_and_counted(
    scene_chunks: list[ChunkTiles], scene_server: TileServer, encoder: Sat2SoundEncoder, tmp_path: Path
) -> None:
    online = _scene_imagery(scene_server, tmp_path / "cache")
    fetch_chunks(scene_chunks, online, tmp_path / "imagery", lambda chunk: "s")
    with XYZReader(f"{scene_server.url}/png/{{z}}/{{x}}/{{y}}.png", cache=TileCache(tmp_path / "cache")) as reader:
        tile, reaching = _edge_tile(scene_chunks, lambda tile: reader.cache_key(tile) in reader.cache)
        cached_file = reader.cache.path_of(reader.cache_key(tile))
    cached_file.write_bytes(cached_file.read_bytes()[:1000])
    offline = replace(online, offline=True, on_missing="leave_empty")
    recorded = fetch_chunks(scene_chunks, offline, tmp_path / "again", lambda chunk: "s")
    assert [tuple(item) for chunk in recorded for item in chunk.record["unavailable"]] == [tuple(tile)]
    # A rerun keeps the chunks fetched whole for the same stamp and fetches the others again.
    again = fetch_chunks(scene_chunks, offline, tmp_path / "again", lambda chunk: "s")
    assert [chunk.kept for chunk in again] == [not chunk.unavailable for chunk in recorded]
    assert not any(chunk.kept for chunk in fetch_chunks(scene_chunks, offline, tmp_path / "again", lambda chunk: "t"))
    served = len(scene_server.requests)
    embed_chunks(scene_chunks, 5, encoder, offline, OPTIONS, tmp_path / "chunks", lambda chunk: "s")
    # Views cut in a loader process carry what they touched, and the source tiles that could not be had.
    in_loader = OPTIONS._replace(loader_workers=1, cut_in_loaders=True)
    reports = embed_chunks(scene_chunks, 5, encoder, offline, in_loader, tmp_path / "in-loader", lambda chunk: "s")
    assert len(scene_server.requests) == served
    np.testing.assert_array_equal(_stored(tmp_path / "chunks", scene_chunks, "unavailable"), reaching)
    for name in ("unavailable", "valid", "embedding"):
        np.testing.assert_array_equal(
            _stored(tmp_path / "in-loader", scene_chunks, name), _stored(tmp_path / "chunks", scene_chunks, name)
        )
    assert sum(report.unavailable_source_tiles for report in reports) == 1
    assert not (_stored(tmp_path / "chunks", scene_chunks, "valid") & reaching).any()
    gaps = imagery_gaps([chunk.id for chunk in scene_chunks], tmp_path / "chunks")
    assert gaps == ImageryGaps(int(reaching.sum()), 1)


# --- several times (model.month / model.hour lists) -------------------------------------------------------------

SWEEP = (Time(6, 14), Time(12, None), Time(None, 3))


@pytest.fixture(scope="module")
def withmeta_encoder() -> Sat2SoundEncoder:
    torch.manual_seed(0)
    return Sat2SoundEncoder(Sat2Sound(Sat2SoundConfig.small("latlong_month_time")).eval(), device="cpu")


def _count_calls(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[int]:
    """Patch `owner.name` to count its calls (in this process: run with loader_workers 0)."""
    calls = [0]
    original = getattr(owner, name)

    def counted(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_a_time_sweep_equals_separate_runs_of_each_time_and_reads_and_runs_the_vit_once(
    chunks: list[ChunkTiles], withmeta_encoder: Sat2SoundEncoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.embed as embed_module

    chunk = chunks[0]
    cuts = _count_calls(monkeypatch, embed_module, "cut_views")
    vit = _count_calls(monkeypatch, withmeta_encoder.model, "patch_tokens")
    swept = OPTIONS._replace(times=SWEEP)
    [report] = embed_chunks([chunk], 3, withmeta_encoder, IMAGERY, swept, tmp_path / "sweep", lambda c: "s")
    sweep_counts = (cuts[0], vit[0])
    with np.load(tmp_path / "sweep" / f"{chunk.id}.npz") as stored:
        sweep = {name: stored[name] for name in (*PER_TIME, "valid", "month", "hour")}
    assert sweep["embedding"].shape[0] == len(SWEEP)
    assert sweep["month"].tolist() == [6, 12, -1] and sweep["hour"].tolist() == [14, -1, 3]
    for index, moment in enumerate(SWEEP):
        cuts[0] = vit[0] = 0
        alone = OPTIONS._replace(times=(moment,))
        embed_chunks([chunk], 3, withmeta_encoder, IMAGERY, alone, tmp_path / str(index), lambda c: "s")
        assert (cuts[0], vit[0]) == sweep_counts, "a sweep reads, cuts and runs the ViT as often as one time"
        with np.load(tmp_path / str(index) / f"{chunk.id}.npz") as single:
            for name in PER_TIME:
                np.testing.assert_allclose(sweep[name][index], single[name][0], atol=2e-3, err_msg=name)
    valid = sweep["valid"]
    embeddings = sweep["embedding"][:, valid].astype(np.float32)
    assert np.abs(embeddings[0] - embeddings[1]).max() > 1e-2, "the times give different embeddings"
    assert report.first_time_s > 0 and report.extra_times_s > 0


def test_time_costs_give_the_first_step_and_each_extra_step_per_tile() -> None:
    from pipeline.embed import ChunkReport, TimeCosts

    reports = [
        ChunkReport("a", 10, 8, False, first_time_s=0.8, extra_times_s=0.16),
        ChunkReport("b", 10, None, True, first_time_s=5.0, extra_times_s=5.0),
        ChunkReport("c", 4, 2, False, first_time_s=0.2, extra_times_s=0.04),
    ]
    line = TimeCosts.of_job(reports, 3).line()
    assert line == "first time step 100.00 ms/tile, each extra time step 10.00 ms/tile (0.10 of the first; 3 times)"
    assert TimeCosts.of_job(reports, 1).line() is None


def test_the_stage_line_sums_the_made_chunks_only() -> None:
    reports = [
        ChunkReport("a", 10, 8, False, first_time_s=0.8, extra_times_s=0.2, imagery_wait_s=1.5, cut_s=0.25),
        ChunkReport("b", 10, None, True, first_time_s=5.0, imagery_wait_s=5.0, cut_s=5.0),
        ChunkReport("c", 4, 2, False, first_time_s=1.0, imagery_wait_s=0.5, cut_s=0.25),
    ]
    assert stage_line(reports) == "waited 2.0 s for imagery, cut views 0.5 s, model 2.0 s"
    assert stage_line(reports[1:2]) is None


def test_progress_lines_give_the_rate_since_the_line_before_and_the_last_the_tiles_left_unreported(
    capsys: pytest.CaptureFixture[str],
) -> None:
    now = [0.0]
    progress = Progress(12_000, clock=lambda: now[0])
    # A slow first strip (first reads, kernels compiled), then 400 tiles/s, then a short last stretch.
    steps = ((PROGRESS_SECONDS, 1_000), (PROGRESS_SECONDS, 4_000), (PROGRESS_SECONDS / 2, 2_000), (7.5, 3_000))
    for seconds, tiles in (*steps, (4.0, 2_000)):
        now[0] += seconds
        progress.advance(tiles)
    progress.close()
    progress.close()
    assert capsys.readouterr().out.splitlines() == [
        "embed: 1,000/12,000 tiles, 100.0 tiles/s, 110 s left",
        "embed: 5,000/12,000 tiles, 400.0 tiles/s, 18 s left",
        "embed: 10,000/12,000 tiles, 400.0 tiles/s, 5 s left",
        "embed: 12,000/12,000 tiles, 500.0 tiles/s, 0 s left",
    ]

"""Fetching politely: the request-rate cap (shared by threads, retries included), connection reuse, and the
provider's terms and the time at the cap in the fetch estimate.

Timing assertions are lower bounds on wall time, or counts on the server's log with a full request spacing
of slack, so that a loaded machine (which only delays requests) cannot fail them.
"""

from __future__ import annotations

import itertools
import multiprocessing
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import mercantile
import pytest
from support.imagery_servers import SCENE_PATH, Fault, SceneTiles, TileServer

from pipeline.errors import ImageryError
from pipeline.geometry import Bounds
from pipeline.imagery import FetchEstimate, TileCache, XYZReader, open_reader
from pipeline.imagery import xyz as xyz_module
from pipeline.imagery.http import HttpClient, RateLimiter, RetryPolicy
from pipeline.imagery.xyz import DEFAULT_MAX_REQUESTS_PER_S, ESRI_BULK_TERMS, ESRI_BULK_TILE_LIMIT

ZOOM = 16
FAST_RETRY = RetryPolicy(
    attempts=4, backoff_s=0.01, max_backoff_s=0.05, connect_timeout_s=1.0, read_timeout_s=1.0, max_retry_after_s=5.0
)
SCENE_CENTRE = mercantile.xy(-72.2128, 18.5143)


class FakeClock:
    """A monotonic clock that only moves when someone sleeps on it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self.now += seconds


@pytest.fixture(scope="module")
def scene_tiles() -> SceneTiles:
    return SceneTiles.from_raster(SCENE_PATH, zooms=(ZOOM, ZOOM + 1), formats=("PNG",))


@pytest.fixture(scope="module")
def server(scene_tiles: SceneTiles) -> Iterator[TileServer]:
    with TileServer(scene_tiles) as running:
        yield running


@pytest.fixture(autouse=True)
def _fresh_server(server: TileServer) -> None:
    server.clear()


def _tiles(scene_tiles: SceneTiles, count: int) -> list[mercantile.Tile]:
    tiles = sorted(scene_tiles.rgba)[:count]
    assert len(tiles) == count
    return tiles


def _most_in_one_second(times: Sequence[float]) -> int:
    ordered = sorted(times)
    return max(sum(1 for later in ordered[i:] if later - first <= 1.0) for i, first in enumerate(ordered))


def _reader(server: TileServer, tmp_path: Path, **options: object) -> XYZReader:
    options = {"cache": TileCache(tmp_path / "cache"), "retry": FAST_RETRY, **options}
    return XYZReader(server.url + "/png/{z}/{x}/{y}.png", **options)  # type: ignore[arg-type]


# --- the limiter ----------------------------------------------------------------------------------------------


def test_limiter_spaces_starts_by_one_over_the_cap_without_real_waiting() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10.0, clock=clock, sleep=clock.sleep)
    slots = [limiter.wait() for _ in range(5)]
    assert slots == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert clock.now == pytest.approx(0.4)
    clock.sleep(2.0)  # idle time earns no burst: the next start is now, the one after one spacing later
    assert limiter.wait() == pytest.approx(2.4)
    assert limiter.wait() == pytest.approx(2.5)


def test_limiter_is_shared_by_threads() -> None:
    limiter = RateLimiter(100.0)
    slots: list[float] = []
    lock = threading.Lock()

    def start_three() -> None:
        for _ in range(3):
            slot = limiter.wait()
            with lock:
                slots.append(slot)

    threads = [threading.Thread(target=start_three) for _ in range(8)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(slots) == 24
    gaps = [later - earlier for earlier, later in zip(sorted(slots), sorted(slots)[1:], strict=False)]
    assert min(gaps) >= 0.01 - 1e-9
    assert time.monotonic() - started >= 23 * 0.01


def test_limiters_sharing_a_file_share_the_cap(tmp_path: Path) -> None:
    clock, shared = FakeClock(), tmp_path / "cache" / "slots"
    first, second = (RateLimiter(10.0, shared=shared, clock=clock, sleep=clock.sleep) for _ in range(2))
    assert [first.wait(), second.wait(), first.wait(), second.wait()] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    clock.sleep(5.0)
    assert second.wait() == pytest.approx(5.3)
    # A slot hours ahead is a clock set back since: it does not stall every fetch until then.
    shared.write_bytes(struct.pack("<d", clock.now + 7200.0))
    assert first.wait() == pytest.approx(clock.now)
    # At a cap of one request in two hours, the next slot lies two hours ahead, and is kept.
    slow = RateLimiter(1 / 7200, shared=tmp_path / "slow", clock=clock, sleep=clock.sleep)
    start = slow.wait()
    assert slow.wait() == pytest.approx(start + 7200.0)


def _waits_in_a_process(shared: Path, count: int, out: multiprocessing.Queue[list[float]]) -> None:
    limiter = RateLimiter(50.0, shared=shared)
    out.put([limiter.wait() for _ in range(count)])


def test_processes_sharing_a_file_keep_to_one_cap(tmp_path: Path) -> None:
    shared, context = tmp_path / "slots", multiprocessing.get_context("fork")
    out: multiprocessing.Queue[list[float]] = context.Queue()
    workers = [context.Process(target=_waits_in_a_process, args=(shared, 6, out)) for _ in range(3)]
    for worker in workers:
        worker.start()
    slots = sorted(slot for _ in workers for slot in out.get(timeout=60))
    for worker in workers:
        worker.join(timeout=60)
    assert len(slots) == 18
    assert min(later - earlier for earlier, later in itertools.pairwise(slots)) >= 1 / 50.0 - 1e-6


@pytest.mark.parametrize("cap", [-1.0, float("nan"), float("inf")])
def test_limiter_rejects_caps_that_are_not_positive_numbers(cap: float) -> None:
    with pytest.raises(ImageryError, match="not a positive number"):
        RateLimiter(cap)


# --- the cap on real fetches ------------------------------------------------------------------------------------


def test_cap_holds_across_threads_of_a_real_fetch(server: TileServer, scene_tiles: SceneTiles, tmp_path: Path) -> None:
    cap, count = 5.0, 9
    with _reader(server, tmp_path, concurrency=8, max_requests_per_s=cap) as reader:
        started = time.monotonic()
        assert reader.fetch_tiles(_tiles(scene_tiles, count)) > 0
        elapsed = time.monotonic() - started
    starts = [record.time for record in server.requests]
    assert len(starts) == count
    assert _most_in_one_second(starts) <= cap + 1
    assert elapsed >= (count - 1) / cap


def test_cap_holds_across_readers_of_one_cache(server: TileServer, scene_tiles: SceneTiles, tmp_path: Path) -> None:
    """Two readers fetching the same source into one cache (two fetch jobs of a build) share its cap."""
    cap, tiles = 5.0, _tiles(scene_tiles, 10)
    readers = [_reader(server, tmp_path, concurrency=4, max_requests_per_s=cap) for _ in range(2)]
    with readers[0], readers[1]:
        threads = [
            threading.Thread(target=reader.fetch_tiles, args=(part,))
            for reader, part in zip(readers, (tiles[:5], tiles[5:]), strict=True)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    starts = [record.time for record in server.requests]
    assert len(starts) == len(tiles)
    assert _most_in_one_second(starts) <= cap + 1
    assert max(starts) - min(starts) >= (len(tiles) - 2) / cap


def test_retries_count_against_the_cap(server: TileServer, scene_tiles: SceneTiles) -> None:
    tile = _tiles(scene_tiles, 1)[0]
    path = f"/png/{tile.z}/{tile.x}/{tile.y}.png"
    server.add_fault(Fault("status", path=path, status=503, times=2))
    clock = FakeClock()
    client = HttpClient(concurrency=1, policy=FAST_RETRY, max_requests_per_s=10.0, clock=clock, sleep=clock.sleep)
    try:
        assert client.fetch(server.url + path, len) is not None
    finally:
        client.close()
    assert len(server.requests_to(path)) == 3
    # Three starts 0.1 s apart on the fake clock; the backoff alone (<= 0.02 s) would not get that far.
    assert clock.now == pytest.approx(0.2)


def test_one_thread_reuses_one_connection(server: TileServer, scene_tiles: SceneTiles, tmp_path: Path) -> None:
    tiles = _tiles(scene_tiles, 12)
    with _reader(server, tmp_path, concurrency=1) as reader:
        reader.fetch_tiles(tiles)
    assert len(server.requests) == 12
    assert len(server.client_ports()) == 1


def test_threads_keep_their_connections(server: TileServer, scene_tiles: SceneTiles, tmp_path: Path) -> None:
    with _reader(server, tmp_path, concurrency=3) as reader:
        reader.fetch_tiles(_tiles(scene_tiles, 15))
    assert len(server.requests) == 15
    assert len(server.client_ports()) <= 3


# --- defaults and options ---------------------------------------------------------------------------------------


def test_esri_is_capped_and_carries_its_bulk_terms_by_default(tmp_path: Path) -> None:
    with open_reader("esri", cache_dir=tmp_path) as reader:
        assert isinstance(reader, XYZReader)
        assert reader.max_requests_per_s == DEFAULT_MAX_REQUESTS_PER_S == 20.0
        assert (reader.bulk_tile_limit, reader.bulk_terms) == (ESRI_BULK_TILE_LIMIT, ESRI_BULK_TERMS)
    with open_reader("esri", cache_dir=tmp_path, max_requests_per_s=4) as reader:
        assert reader.max_requests_per_s == 4.0  # type: ignore[attr-defined]
    with open_reader("esri", cache_dir=tmp_path, max_requests_per_s=None) as reader:
        assert reader.max_requests_per_s is None  # type: ignore[attr-defined]


def test_generic_servers_are_capped_unless_on_loopback_or_told_otherwise(tmp_path: Path) -> None:
    public = "xyz:https://tiles.example.com/{z}/{x}/{y}.png"
    with open_reader(public, cache_dir=tmp_path) as reader:
        assert reader.max_requests_per_s == DEFAULT_MAX_REQUESTS_PER_S  # type: ignore[attr-defined]
    with open_reader(public, cache_dir=tmp_path, max_requests_per_s=0) as reader:
        assert reader.max_requests_per_s is None  # type: ignore[attr-defined]
    with open_reader("xyz:http://localhost:8080/{z}/{x}/{y}.png", cache_dir=tmp_path) as reader:
        assert reader.max_requests_per_s is None  # type: ignore[attr-defined]
    for wrong, message in ((-1, "-1 is less than the minimum of 0"), ("fast", "'fast' is not valid")):
        with pytest.raises(ImageryError, match=message):
            open_reader(public, cache_dir=tmp_path, max_requests_per_s=wrong)


def test_the_cap_plumbs_through_open_reader_into_the_estimate(server: TileServer, tmp_path: Path) -> None:
    spec = "xyz:" + server.url + "/png/{z}/{x}/{y}.png"
    views = [_square(SCENE_CENTRE, 600.0)]
    with open_reader(spec, cache_dir=tmp_path, max_requests_per_s=7.5) as reader:
        assert reader.max_requests_per_s == 7.5  # type: ignore[attr-defined]
        estimate = reader.estimate(views, 224)
    assert estimate is not None
    assert estimate.max_requests_per_s == 7.5
    assert estimate.tiles > 0
    assert estimate.seconds_at_cap == pytest.approx(estimate.tiles / 7.5)
    assert estimate.terms_note is None  # a generic server has no published bulk terms
    with open_reader(spec, cache_dir=tmp_path) as reader:
        uncapped = reader.estimate(views, 224)
    assert uncapped is not None
    assert (uncapped.max_requests_per_s, uncapped.seconds_at_cap) == (None, None)


# --- terms in the estimate --------------------------------------------------------------------------------------


def test_esri_terms_note_appears_above_the_threshold_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    views = [_square(SCENE_CENTRE, 2000.0)]
    with open_reader("esri", cache_dir=tmp_path) as reader:
        tiles = reader.estimate(views, 224).tiles  # type: ignore[union-attr]
    assert tiles > 1
    for limit, noted in ((tiles, False), (tiles - 1, True)):
        monkeypatch.setattr(xyz_module, "ESRI_BULK_TILE_LIMIT", limit)
        with open_reader("esri", cache_dir=tmp_path) as reader:
            estimate = reader.estimate(views, 224)
        assert estimate is not None
        assert (estimate.terms_note == ESRI_BULK_TERMS) is noted
        assert estimate.terms_note is None or "stac:" in estimate.terms_note
    assert estimate.seconds_at_cap == pytest.approx(tiles / 20.0)


def test_terms_note_counts_only_tiles_still_to_fetch_and_survives_scaling() -> None:
    estimate = FetchEstimate(16, 16, 19, 150, 100, 50 * 25_000, 20.0, 100, "terms")
    assert (estimate.tiles_to_fetch, estimate.terms_note, estimate.seconds_at_cap) == (50, None, 2.5)
    scaled = estimate._replace(tiles=1500, cached=1000)  # as pipeline.plan scales a sampled estimate
    assert (scaled.tiles_to_fetch, scaled.terms_note, scaled.seconds_at_cap) == (500, "terms", 25.0)
    assert FetchEstimate(15, 17, 17, 3, 0, 0) == (15, 17, 17, 3, 0, 0, None, None, None)


def _square(centre: tuple[float, float], size_m: float) -> Bounds:
    x, y = centre
    return Bounds(x - size_m / 2, y - size_m / 2, x + size_m / 2, y + size_m / 2)

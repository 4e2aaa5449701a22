"""TileCache: keys, atomic writes under concurrent processes, stats and pruning."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from pipeline.errors import CacheError
from pipeline.imagery.cache import CacheStats, TileCache

DAY_S = 86400.0


def _age(cache: TileCache, key: str, days: float) -> None:
    stamp = time.time() - days * DAY_S
    os.utime(cache.path_of(key), (stamp, stamp))


def test_put_get_contains_and_stats(tmp_path: Path) -> None:
    cache = TileCache(tmp_path / "cache")
    assert cache.get("src/1/2/3.jpg") is None
    assert "src/1/2/3.jpg" not in cache
    assert cache.stats() == CacheStats(0, 0)
    cache.put("src/1/2/3.jpg", b"abc")
    cache.put("src/1/2/4.jpg", b"defgh")
    cache.put("src/1/2/3.jpg", b"xyz1")  # overwrite
    assert cache.get("src/1/2/3.jpg") == b"xyz1"
    assert "src/1/2/3.jpg" in cache
    assert cache.path_of("src/1/2/3.jpg") == tmp_path / "cache" / "src" / "1" / "2" / "3.jpg"
    assert cache.stats() == CacheStats(2, 9)
    assert not list((tmp_path / "cache").rglob(".tmp-*"))


@pytest.mark.parametrize("key", ["../escape.jpg", "/abs/1.jpg", "a/./b.jpg", "", "a//b.jpg"])
def test_keys_outside_the_cache_are_refused(tmp_path: Path, key: str) -> None:
    with pytest.raises(CacheError, match="not a relative path"):
        TileCache(tmp_path).put(key, b"x")


def test_dotfiles_such_as_gitkeep_are_not_cache_entries(tmp_path: Path) -> None:
    (tmp_path / ".gitkeep").write_bytes(b"")
    cache = TileCache(tmp_path)
    cache.put("s/0/0/0.png", b"1234")
    assert cache.stats() == CacheStats(1, 4)
    assert cache.prune(max_bytes=0) == CacheStats(1, 4)
    assert (tmp_path / ".gitkeep").exists()


def test_prune_by_age_then_least_recently_used_by_size(tmp_path: Path) -> None:
    cache = TileCache(tmp_path)
    for name, days in (("old", 40), ("a", 3), ("b", 2), ("c", 1)):
        cache.put(f"s/9/1/{name}.png", b"x" * 100)
        _age(cache, f"s/9/1/{name}.png", days)
    cache.get("s/9/1/a.png")  # reading makes 'a' the most recently used
    removed = cache.prune(max_bytes=150, older_than_days=30)
    assert removed == CacheStats(3, 300)
    assert [key for key in ("old", "a", "b", "c") if f"s/9/1/{key}.png" in cache] == ["a"]


def test_prune_removes_emptied_folders_and_stale_temp_files(tmp_path: Path) -> None:
    cache = TileCache(tmp_path)
    cache.put("s/3/1/1.png", b"x")
    stale = tmp_path / "s" / "3" / "2" / ".tmp-dead"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"partial")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert cache.prune(older_than_days=0) == CacheStats(1, 1)
    assert not stale.exists()
    assert list(tmp_path.iterdir()) == []


def test_prune_needs_a_limit(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="size limit or an age"):
        TileCache(tmp_path).prune()


def _write_repeatedly(root: str, key: str, fill: int, count: int) -> None:
    cache = TileCache(Path(root))
    for _ in range(count):
        cache.put(key, bytes([fill]) * 200_000)


def test_concurrent_writers_never_expose_partial_files(tmp_path: Path) -> None:
    key = "s/1/1/1.png"
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_write_repeatedly, args=(str(tmp_path), key, fill, 150)) for fill in (1, 2)]
    for writer in writers:
        writer.start()
    cache = TileCache(tmp_path)
    seen = set()
    while any(writer.is_alive() for writer in writers):
        data = cache.get(key)
        if data is not None:
            assert len(data) == 200_000
            assert data.count(data[:1]) == len(data)
            seen.add(data[0])
    for writer in writers:
        writer.join()
        assert writer.exitcode == 0
    assert seen
    assert cache.stats() == CacheStats(1, 200_000)

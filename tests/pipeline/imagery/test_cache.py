"""TileCache: keys, atomic writes under concurrent processes, stats and pruning."""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from support.imagery_servers import SCENE_PATH, SceneTiles, TileServer

from common.atomic import TEMP_PREFIX
from pipeline.__main__ import main
from pipeline.errors import CacheError
from pipeline.imagery import XYZReader
from pipeline.imagery import cache as cache_module
from pipeline.imagery.cache import SOURCE_MARKER, CacheStats, TileCache, part_key, tile_key

DAY_S = 86400.0


def _age(cache: TileCache, key: str, days: float) -> None:
    _age_file(cache.path_of(key), days)


def _age_file(path: Path, days: float) -> None:
    stamp = time.time() - days * DAY_S
    os.utime(path, (stamp, stamp))


def _tree(root: Path) -> list[str]:
    return sorted(path.relative_to(root).as_posix() for path in root.rglob("*"))


def test_held_lists_each_folder_once_and_agrees_with_contains(tmp_path: Path) -> None:
    cache = TileCache(tmp_path / "cache")
    for key in ("src/5/1/1.jpg", "src/5/1/2.missing", "src/5/2/7.jpg"):
        cache.put(key, b"")
    (tmp_path / "cache" / "src" / "5" / "1" / "9.jpg").mkdir()  # a folder, not a tile
    asked = ["src/5/1/1.jpg", "src/5/1/2.jpg", "src/5/1/2.missing", "src/5/1/9.jpg", "src/5/2/7.jpg", "src/6/0/0.jpg"]
    held = {"src/5/1/1.jpg", "src/5/1/2.missing", "src/5/2/7.jpg"}
    assert cache.held(asked) == {key for key in asked if key in cache} == held
    assert cache.held([]) == set()
    with pytest.raises(CacheError, match="not a relative path"):
        cache.held(["src/../5/1/1.jpg"])


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
    ages = {"s/9/1/0.png": 40, "s/9/1/1.png": 3, "s/9/1/2.png": 2, "s/9/1/3.png": 1}
    for key, days in ages.items():
        cache.put(key, b"x" * 100)
        _age(cache, key, days)
    cache.get("s/9/1/1.png")  # reading makes it the most recently used
    removed = cache.prune(max_bytes=150, older_than_days=30)
    assert removed == CacheStats(3, 300)
    assert [key for key in ages if key in cache] == ["s/9/1/1.png"]


def test_files_that_are_not_tiles_are_neither_counted_nor_pruned(tmp_path: Path) -> None:
    """A --cache-dir mistyped as a folder of the user's own loses nothing: only the cache's layouts count."""
    theirs = ["report.docx", "notes/plan.md", "a/1/2/draft.png", "src/1/2/3.png.bak", "src/parts/summary.png"]
    for name in theirs:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"mine")
    cache = TileCache(tmp_path)
    for key in (tile_key("src", 1, 2, 3, "png"), tile_key("src", 1, 2, 4, "missing"), part_key("stac", "0af3")):
        cache.put(key, b"tile")
    assert cache.stats() == CacheStats(3, 12)
    assert cache.prune(max_bytes=0) == CacheStats(3, 12)
    assert all((tmp_path / name).read_bytes() == b"mine" for name in theirs)


def test_prune_removes_emptied_folders_and_stale_temp_files(tmp_path: Path) -> None:
    cache = TileCache(tmp_path)
    cache.put("s/3/1/1.png", b"x")
    stale = tmp_path / "s" / "3" / "2" / ".tmp-dead"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"partial")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert cache.prune(older_than_days=0) == CacheStats(1, 1)
    assert not stale.exists()
    assert _tree(tmp_path) == ["s", f"s/{SOURCE_MARKER}"]  # the source folder stays, marked


def _photos(folder: Path) -> list[str]:
    """A folder of the user's own whose photo is named like a tile, with an empty folder beside it."""
    (folder / "notes" / "empty").mkdir(parents=True)
    photo = folder / "photos" / "2023" / "12" / "25.jpg"
    photo.parent.mkdir(parents=True)
    photo.write_bytes(b"mine")
    _age_file(photo, 400)
    return _tree(folder)


@pytest.mark.parametrize("action", [["info"], ["prune", "--older-than-days", "30"], ["prune", "--max-size", "2GB"]])
def test_cli_cache_refuses_a_folder_the_cache_did_not_write(
    action: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    before = _photos(tmp_path)
    status = main(["cache", *action, "--cache-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert (status, out) == (2, "")
    assert err == (
        f"error: {tmp_path} is not a tile cache (no folder in it holds {SOURCE_MARKER}); give the folder"
        " imagery.cache_dir names (a cache from an older version: run a build with it once to adopt it)\n"
    )
    assert _tree(tmp_path) == before


def test_a_new_cache_holding_files_but_no_folders_is_empty_not_refused(tmp_path: Path) -> None:
    (tmp_path / ".gitkeep").write_bytes(b"")  # as the repository's tiles_cache/ holds
    assert TileCache(tmp_path).stats() == CacheStats(0, 0)
    assert TileCache(tmp_path).prune(max_bytes=0) == CacheStats(0, 0)
    assert (tmp_path / ".gitkeep").is_file()


def test_a_cache_prunes_only_its_source_folders_and_the_tile_folders_it_empties(tmp_path: Path) -> None:
    cache = TileCache(tmp_path)
    cache.put(tile_key("src", 1, 2, 3, "png"), b"tile")
    _photos(tmp_path)
    _photos(tmp_path / "src")
    before = _tree(tmp_path)
    assert cache.stats() == CacheStats(1, 4)
    assert cache.prune(max_bytes=0) == CacheStats(1, 4)
    assert _tree(tmp_path) == [path for path in before if path not in ("src/1", "src/1/2", "src/1/2/3.png")]


def test_reading_a_tile_adopts_a_source_folder_written_before_the_marker(tmp_path: Path) -> None:
    old = tmp_path / "esri-world-imagery" / "17" / "1" / "2.jpg"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"tile")
    with pytest.raises(CacheError, match="is not a tile cache"):
        TileCache(tmp_path).stats()
    assert TileCache(tmp_path).get("esri-world-imagery/17/1/2.jpg") == b"tile"
    assert TileCache(tmp_path).prune(max_bytes=0) == CacheStats(1, 4)


def test_fetched_tiles_are_marked_and_prunable(tmp_path: Path) -> None:
    scene = SceneTiles.from_raster(SCENE_PATH, zooms=(15,))
    tile = next(iter(scene.rgba))
    with (
        TileServer(scene) as server,
        XYZReader(f"{server.url}/png/{{z}}/{{x}}/{{y}}.png", cache=TileCache(tmp_path)) as reader,
    ):
        reader.tile(*tile)
    assert (tmp_path / reader.source_id / SOURCE_MARKER).is_file()
    assert TileCache(tmp_path).prune(older_than_days=0).files == 1


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


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_files_and_folders_follow_the_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        cache = TileCache(tmp_path / "cache")
        cache.put("s/2/1/1.png", b"tile")
    finally:
        os.umask(previous)
    path = cache.path_of("s/2/1/1.png")
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable by a group sharing the cache
    assert path.parent.stat().st_mode & 0o777 == 0o777 & ~umask


def test_parallel_writers_keep_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        cache = TileCache(tmp_path)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda index: cache.put(f"s/9/{index}/0.png", b"x" * 5000), range(3000)))
        assert os.umask(0o022) == 0o022
    finally:
        os.umask(previous)
    assert {path.stat().st_mode & 0o777 for path in tmp_path.rglob("*.png")} == {0o644}
    assert {path.stat().st_mode & 0o777 for path in tmp_path.rglob("*") if path.is_dir()} == {0o755}


def test_a_write_into_a_folder_pruned_meanwhile_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = cache_module.atomic_write_bytes
    calls = []

    def pruned_once(path: Path, data: bytes) -> None:
        calls.append(path)
        if len(calls) == 1:
            raise FileNotFoundError(2, "No such file or directory")
        real_write(path, data)

    cache = TileCache(tmp_path)
    cache.put("s/0/0/0.png", b"")  # marks the source folder, which a prune never removes
    monkeypatch.setattr(cache_module, "atomic_write_bytes", pruned_once)
    cache.put("s/1/1/1.png", b"abc")
    assert cache.get("s/1/1/1.png") == b"abc"
    assert len(calls) == 2


def test_prune_removes_stale_temp_files_of_atomic_writes(tmp_path: Path) -> None:
    cache = TileCache(tmp_path)
    cache.put("s/3/1/1.png", b"x")
    target = cache.path_of("s/3/1/2.png")
    stale = target.with_name(f"{TEMP_PREFIX}{target.name}.abc123.part")
    fresh = target.with_name(f"{TEMP_PREFIX}{target.name}.def456.part")
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"being written")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    cache.prune(older_than_days=30)
    assert not stale.exists()
    assert fresh.exists()  # a live writer's file stays
    assert cache.stats() == CacheStats(1, 1)

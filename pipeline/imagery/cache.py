"""A directory of fetched tiles shared by runs and by concurrent jobs.

Keys are relative POSIX paths such as `esri-world-imagery/17/38000/49000.jpg`, in a folder per source named by
its id. The cache marks a source folder with a SOURCE_MARKER file when it first stores or reads a tile there, and
counts and prunes only tile-named files in marked folders: a folder of the user's own given as the cache loses
nothing, and a cache written before the marker existed is adopted source by source as builds use it.

Writes go through common.atomic (a temporary file beside the target, renamed into place), so a reader in another
process sees either no file or a whole one, and files get the umask's mode, so a group sharing the cache can read
them. There is no fsync: a file cut short by a crash is caught when its bytes fail to decode, and fetched
again. Reads refresh a file's modification time, so pruning by size drops the least recently used tiles
first.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from common.atomic import TEMP_PREFIX, atomic_write_bytes, nearest_existing
from pipeline.errors import CacheError

# Temporary files older than this belong to a writer that died; pruning removes them.
_STALE_TEMP_S = 3600.0
_SECONDS_PER_DAY = 86400.0
SOURCE_MARKER = ".sat2sound-tile-source"
REQUEST_SLOTS_PREFIX = ".sat2sound-requests-"
_MARKER_TEXT = b"A Sat2Sound tile cache source folder: `python -m pipeline cache prune` deletes its tiles.\n"
# Paths in a source folder of the two layouts below: other files are not the cache's, and are never counted or pruned.
_TILE_PATH = re.compile(r"\d+/\d+/\d+\.[A-Za-z0-9]+|parts/[0-9a-f]+\.png")


def tile_key(source_id: str, z: int, x: int, y: int, suffix: str) -> str:
    """The key of a server tile (or, with another suffix, of a marker about it)."""
    return f"{source_id}/{z}/{x}/{y}.{suffix}"


def part_key(source_id: str, digest: str) -> str:
    """The key of a mosaicked part of a source, by the hex digest of its request."""
    return f"{source_id}/parts/{digest}.png"


def check_cache_dir(folder: Path, name: str, fix: str, *, existing: bool = False) -> None:
    """Refuse a tile cache `folder` (given as `name`, a flag or config key) that is a file or lies under one, and,
    when `existing`, one that is not there (a mistyped path would report an empty cache)."""
    there = nearest_existing(folder)
    if there.is_dir() and (there == folder or not existing):
        return
    under = "" if there == folder or there.is_dir() else f" (it lies under {there}, a file)"
    raise CacheError(f"{name} {folder} is no folder{under}; {fix}")


class CacheStats(NamedTuple):
    files: int
    bytes: int


class _Entry(NamedTuple):
    path: Path
    size: int
    mtime: float


class TileCache:
    """Tile bytes stored under `root`, one file per key."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._marked: set[str] = set()

    def path_of(self, key: str) -> Path:
        """File that holds `key`; raises CacheError for keys that would escape the cache directory or that name
        no source folder."""
        parts = key.split("/")
        if len(parts) < 2 or any(part in ("", ".", "..") or "\\" in part for part in parts):
            raise CacheError(f"cache key {key!r} is not a relative path inside the cache; use 'source/z/x/y.ext'")
        return self.root.joinpath(*parts)

    def get(self, key: str) -> bytes | None:
        path = self.path_of(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CacheError(f"cannot read cached tile {key}: {exc.strerror}; check permissions on the cache") from exc
        with contextlib.suppress(OSError):  # a cache shared read-only
            os.utime(path)
            self._mark_source(key)  # adopts a source folder written before the marker existed
        return data

    def put(self, key: str, data: bytes) -> None:
        path = self.path_of(key)
        try:
            self._mark_source(key)
            try:
                atomic_write_bytes(path, data)
            except FileNotFoundError:  # a concurrent prune removed the directory just created
                atomic_write_bytes(path, data)
        except OSError as exc:
            raise CacheError(f"cannot write cached tile {key}: {exc.strerror}; check space and permissions") from exc

    def discard(self, key: str) -> None:
        """Remove `key` if present (a corrupt tile that cannot be fetched again now)."""
        with contextlib.suppress(FileNotFoundError):
            self.path_of(key).unlink()

    def request_slots(self, source_id: str) -> Path:
        """The file through which every process fetching `source_id` into this cache shares the source's request
        rate cap (fetch jobs run side by side). It lies beside the source folders, where counting and pruning
        never look."""
        return self.root / f"{REQUEST_SLOTS_PREFIX}{source_id}"

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.path_of(key).is_file()

    def held(self, keys: Iterable[str]) -> set[str]:
        """The `keys` the cache holds. Looks at each folder once and at the keys of folders that exist: a plan
        counting a region's cached tiles in a cold cache makes one system call a column of tiles, not two a tile
        (and keeps no listing of a warm cache's folders, which can hold a whole column of a continent)."""
        folders: dict[str, bool] = {}
        found = set()
        for key in keys:
            folder = key.rpartition("/")[0]
            there = folders.get(folder)
            if there is None:
                there = folders[folder] = self.path_of(folder).is_dir()
            if there and os.path.isfile(os.path.join(self.root, key)):
                found.add(key)
        return found

    def stats(self) -> CacheStats:
        entries = self._entries(self._sources())
        return CacheStats(len(entries), sum(entry.size for entry in entries))

    def prune(self, max_bytes: int | None = None, older_than_days: float | None = None) -> CacheStats:
        """Delete tiles unused for `older_than_days`, then least recently used ones down to `max_bytes`.

        Returns what was removed. Stale temporary files of crashed writers go too.
        """
        if max_bytes is None and older_than_days is None:
            raise CacheError("prune needs a size limit or an age; pass max_bytes and/or older_than_days")
        if max_bytes is not None and max_bytes < 0:
            raise CacheError(f"cache size limit {max_bytes} is negative; pass 0 or more bytes")
        sources = self._sources()
        now = time.time()
        self._remove_stale_temp_files(sources, now)
        entries = sorted(self._entries(sources), key=lambda entry: entry.mtime)
        doomed: list[_Entry] = []
        if older_than_days is not None:
            cutoff = now - older_than_days * _SECONDS_PER_DAY
            doomed = [entry for entry in entries if entry.mtime < cutoff]
            entries = entries[len(doomed) :]
        if max_bytes is not None:
            excess = sum(entry.size for entry in entries) - max_bytes
            for entry in entries:
                if excess <= 0:
                    break
                doomed.append(entry)
                excess -= entry.size
        removed = [entry for entry in doomed if self._unlink(entry.path)]
        return CacheStats(len(removed), sum(entry.size for entry in removed))

    def _mark_source(self, key: str) -> None:
        """Write the marker of `key`'s source folder unless this cache has seen it there."""
        source = key.split("/", 1)[0]
        if source not in self._marked:
            marker = self.root / source / SOURCE_MARKER
            if not marker.is_file():
                atomic_write_bytes(marker, _MARKER_TEXT)
            self._marked.add(source)

    def _sources(self) -> list[Path]:
        """The marked source folders; refuses a folder that holds folders but none of them (files beside them, such
        as a .gitkeep, are never the cache's)."""
        try:
            children = [child for child in self.root.iterdir() if child.is_dir()]
        except FileNotFoundError:
            return []
        sources = [child for child in children if (child / SOURCE_MARKER).is_file()]
        if children and not sources:
            raise CacheError(
                f"{self.root} is not a tile cache (no folder in it holds {SOURCE_MARKER}); give the folder"
                " imagery.cache_dir names (a cache from an older version: run a build with it once to adopt it)"
            )
        return sources

    @staticmethod
    def _entries(sources: list[Path]) -> list[_Entry]:
        entries = []
        for source in sources:
            for directory, _, names in os.walk(source):
                for name in names:
                    path = Path(directory, name)
                    if not _TILE_PATH.fullmatch(path.relative_to(source).as_posix()):
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        status = path.stat()
                        entries.append(_Entry(path, status.st_size, status.st_mtime))
        return entries

    def _remove_stale_temp_files(self, sources: list[Path], now: float) -> None:
        for source in sources:
            for path in list(source.rglob(f"{TEMP_PREFIX}*")):  # removing folders while globbing upsets it
                with contextlib.suppress(FileNotFoundError):
                    if path.stat().st_mtime < now - _STALE_TEMP_S:
                        self._unlink(path)

    def _unlink(self, path: Path) -> bool:
        """Remove `path` and the tile folders it leaves empty (never its source folder, which keeps its marker)."""
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        for folder in path.parents:
            if folder.parent == self.root:
                break
            try:
                folder.rmdir()
            except OSError:  # not empty, or removed by another process
                break
        return True

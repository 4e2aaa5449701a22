"""Turn a checkpoint or data URI into a local file: local paths as given, `hf://` files via the Hugging Face cache;
fetch the files of a Hub dataset that match a pattern; open an `hf://` file where it lies, to read a few parts of it.

An `hf://` URI reads `hf://OWNER/REPO[@REVISION]/PATH/IN/REPO`, with an optional `datasets/` or `spaces/`
prefix before OWNER for those repo types (the `HfFileSystem` convention). Downloads land in the standard
cache (`HF_HUB_CACHE` / `HF_HOME`), `HF_ENDPOINT` picks a mirror and `HF_HUB_OFFLINE=1` serves the cache alone.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, NamedTuple
from urllib.parse import unquote

from model.errors import DownloadError, first_line

# huggingface_hub and its HTTP client load only when the Hub is asked (0.37 s of a process's start): every map
# job resolves its checkpoint here, most of them a local file.

HF_SCHEME = "hf://"
HUB_DATASETS = f"{HF_SCHEME}datasets/"
OFFICIAL_REPO = "MVRL/sat2sound"
OFFICIAL_CHECKPOINTS: tuple[str, ...] = tuple(
    f"{imagery}_{metadata}"
    for imagery in ("bingmap", "sentinel", "SoundingEarth")
    for metadata in ("nometa", "withmeta")
)
REPO_TYPE_BY_PREFIX = {"datasets": "dataset", "spaces": "space"}
URI_FORM = "hf://OWNER/REPO[@REVISION]/PATH/IN/REPO"
# huggingface_hub's own logger of the retries it makes, and its two lines for one retry.
HUB_HTTP_LOGGER = "huggingface_hub.utils._http"
FAILED_LINE = re.compile(r"'?(?P<reason>.*?)'? thrown while requesting ")
RETRY_LINE = re.compile(r"Retrying in (?P<wait>[\d.]+)s \[Retry (?P<attempt>\d+)/(?P<attempts>\d+)\]")
# What one HTTP range request of a file opened where it lies asks for.
REMOTE_BLOCK_BYTES = 1 << 18


class HubFile(NamedTuple):
    """One file of a Hub repo, as an hf:// URI names it."""

    repo_id: str
    filename: str
    revision: str | None
    repo_type: str

    @property
    def fs_path(self) -> str:
        """The file's path in `HfFileSystem`."""
        prefix = next((prefix for prefix, kind in REPO_TYPE_BY_PREFIX.items() if kind == self.repo_type), None)
        return "/".join([*([prefix] if prefix else []), self.repo_id, self.filename])

    def describe(self) -> str:
        at_revision = f"@{self.revision}" if self.revision else ""
        return f"{self.repo_type} repo {self.repo_id}{at_revision}"


def official_checkpoint_uri(name: str) -> str:
    """The `hf://` URI of an official checkpoint, e.g. "bingmap_withmeta"."""
    if name not in OFFICIAL_CHECKPOINTS:
        raise DownloadError(f"no official checkpoint named {name!r}; use one of {list(OFFICIAL_CHECKPOINTS)}")
    return f"{HF_SCHEME}{OFFICIAL_REPO}/sat2sound/{name}.ckpt"


def is_hub_uri(uri: str | Path) -> bool:
    """Whether `uri` names a file on the Hugging Face Hub (hf://...) rather than a local path."""
    return str(uri).startswith(HF_SCHEME)


def parse_hf_uri(uri: str) -> HubFile:
    """Split an hf:// URI into repo id, path in repo, revision (None for the default branch) and repo type."""
    if not is_hub_uri(uri):
        raise DownloadError(f"{uri!r} is not an hf:// URI; write it as {URI_FORM}")
    parts = uri[len(HF_SCHEME) :].split("/")
    repo_type = REPO_TYPE_BY_PREFIX.get(parts[0], "model")
    if parts[0] in REPO_TYPE_BY_PREFIX:
        parts = parts[1:]
    if len(parts) < 3 or not all(parts):
        raise DownloadError(f"malformed Hub URI {uri!r}; write it as {URI_FORM}")
    owner, repo_and_revision, *path = parts
    repo, _, revision = repo_and_revision.partition("@")
    if not repo:
        raise DownloadError(f"malformed Hub URI {uri!r}; write it as {URI_FORM}")
    # A revision such as refs/pr/3 has to be percent-encoded to fit between two slashes.
    return HubFile(f"{owner}/{repo}", "/".join(path), unquote(revision) or None, repo_type)


def resolve(uri: str | Path) -> Path:
    """The local file behind `uri`, downloading an `hf://` file into the Hugging Face cache on first use."""
    text = str(uri)
    if not is_hub_uri(text):
        path = Path(text).expanduser()
        if not path.is_file():
            raise DownloadError(f"{path} is not a file; check the path, or give an {URI_FORM} URI")
        return path
    from huggingface_hub import hf_hub_download

    hub_file = parse_hf_uri(text)
    with _hub_errors(text, hub_file):
        local = hf_hub_download(
            hub_file.repo_id, hub_file.filename, repo_type=hub_file.repo_type, revision=hub_file.revision
        )
    return Path(local)


def in_cache(uri: str) -> bool:
    """Whether the Hugging Face cache holds the hf:// file `uri` at the revision it names."""
    from huggingface_hub import try_to_load_from_cache

    hub_file = parse_hf_uri(uri)
    found = try_to_load_from_cache(
        hub_file.repo_id, hub_file.filename, revision=hub_file.revision, repo_type=hub_file.repo_type
    )
    return isinstance(found, str)


@contextmanager
def open_remote(uri: str) -> Iterator[IO[bytes]]:
    """The hf:// file `uri` opened where it lies, read-only and seekable: each read is an HTTP range request of
    `REMOTE_BLOCK_BYTES`, so reading a few parts of a large file (a checkpoint's hyper-parameters) downloads those
    alone. Nothing is cached."""
    from huggingface_hub import HfFileSystem, is_offline_mode

    hub_file = parse_hf_uri(uri)
    if is_offline_mode():
        raise DownloadError(_unreachable_message(uri))
    with _hub_errors(uri, hub_file):
        try:
            remote = HfFileSystem().open(
                hub_file.fs_path, "rb", revision=hub_file.revision, block_size=REMOTE_BLOCK_BYTES
            )
        except FileNotFoundError as exc:
            # HfFileSystem's answer, with the Hub's own error as its cause; none when the repo lacks the file.
            raise exc.__cause__ or DownloadError(_missing_message(uri, hub_file)) from None
        with remote:
            yield remote


def download_dataset(repo_id: str, patterns: list[str], revision: str | None = None) -> Path:
    """The snapshot folder of Hub dataset `repo_id` holding its files that match `patterns` (fnmatch), downloaded
    into the Hugging Face cache on first use; other files are not fetched."""
    from huggingface_hub import snapshot_download

    at_revision = f"@{revision}" if revision else ""
    uri = f"{HUB_DATASETS}{repo_id}{at_revision}"
    with _hub_errors(uri, HubFile(repo_id, "", revision, "dataset")):
        return Path(snapshot_download(repo_id, repo_type="dataset", revision=revision, allow_patterns=patterns))


@contextmanager
def _hub_errors(uri: str, hub_file: HubFile) -> Iterator[None]:
    """Turn huggingface_hub's and httpx's exceptions into one-line DownloadErrors about `uri`."""
    try:
        with retry_lines(uri):
            yield
    except Exception as exc:
        error = _download_error(exc, uri, hub_file)
        if error is None:
            raise
        raise error from None


def _download_error(exc: BaseException, uri: str, hub_file: HubFile) -> DownloadError | None:
    """The one line for a Hub client's exception; None for one that is no Hub error."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, LocalEntryNotFoundError | httpx2.ConnectError):
        return DownloadError(_unreachable_message(uri))
    if isinstance(exc, RemoteEntryNotFoundError):
        return DownloadError(_missing_message(uri, hub_file))
    if isinstance(exc, RevisionNotFoundError):
        return DownloadError(
            f"revision {hub_file.revision!r} does not exist in Hub repo {hub_file.repo_id}; fix it in {uri}"
        )
    if isinstance(exc, RepositoryNotFoundError):
        return DownloadError(
            f"Hub {hub_file.describe()} does not exist or needs access rights;"
            " check the name, or log in with 'hf auth login'"
        )
    if isinstance(exc, HfHubHTTPError):
        return DownloadError(f"the Hub answered HTTP {exc.response.status_code} for {uri}; retry later")
    if isinstance(exc, HFValidationError):
        return DownloadError(f"{hub_file.repo_id!r} is not a valid Hub repo id; fix it in {uri}")
    if isinstance(exc, httpx2.HTTPError):
        return DownloadError(f"download of {uri} failed ({first_line(exc)}); retry once the connection is stable")
    if isinstance(exc, OSError):
        return DownloadError(
            f"cannot store {uri} in the Hugging Face cache {constants.HF_HUB_CACHE} ({first_line(exc)});"
            " check free space and write access, or set HF_HUB_CACHE"
        )
    return None


@contextmanager
def retry_lines(what: str) -> Iterator[None]:
    """While inside, each retry huggingface_hub makes is logged on one line that names `what` (see RetryLines)."""
    lines = RetryLines(what)
    logger = logging.getLogger(HUB_HTTP_LOGGER)
    logger.addFilter(lines)
    try:
        yield
    finally:
        logger.removeFilter(lines)


class RetryLines(logging.Filter):
    """huggingface_hub logs each retry as two lines, the error and the wait; people get one, naming `what`.
    Lines of other wording (another release, a rate limit) pass unchanged."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what
        self.reason = "the request failed"

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if failed := FAILED_LINE.match(message):
            self.reason = failed["reason"]
            return False
        if retry := RETRY_LINE.match(message):
            record.msg = (
                f"Hugging Face Hub: {self.reason} for {self.what}; retry {retry['attempt']} of {retry['attempts']}"
                f" in {retry['wait']} s"
            )
            record.args = ()
        return True


def _missing_message(uri: str, hub_file: HubFile) -> str:
    return f"{hub_file.filename} is not in Hub {hub_file.describe()}; check the path in {uri}"


def _unreachable_message(uri: str) -> str:
    from huggingface_hub import constants, is_offline_mode

    if is_offline_mode():
        return (
            f"{uri} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set;"
            " unset HF_HUB_OFFLINE to download it once, or give a local path"
        )
    return (
        f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} for {uri} and it is not cached;"
        " check the network (or HF_ENDPOINT) and retry, or give a local path"
    )

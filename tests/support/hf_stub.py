"""A loopback stand-in for the Hugging Face Hub's file-resolve API, for tests that must not touch the network.

It answers `HEAD|GET /[datasets/]{owner}/{repo}/resolve/{revision}/{path}` with the headers `hf_hub_download`
relies on (`X-Repo-Commit`, `ETag`, `Content-Length`) and the Hub's error codes (`X-Error-Code`), plus the two
listing calls `snapshot_download` makes first (`/api/{type}s/{repo}/revision/{revision}` and
`/api/{type}s/{repo}/tree/{revision}`), and records every request so that tests can tell a download from a
cache hit. Repo types are not told apart: a repo id names the same files as a model or a dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import TypeGuard
from urllib.parse import parse_qs, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
RESOLVE_PATH = re.compile(
    r"^/(?:datasets/|spaces/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<filename>.+)$"
)
API_PATH = re.compile(
    r"^/api/(?:models|datasets|spaces)/(?P<repo>[^/]+/[^/?]+)"
    r"(?:/(?P<call>revision|tree)/(?P<revision>[^/?]+)(?:/(?P<folder>[^?]*))?)?(?:\?.*)?$"
)
RANGE_HEADER = re.compile(r"bytes=(?P<first>\d+)-(?P<last>\d*)")


def hub_environment(endpoint: str, home: Path, offline: bool = False) -> dict[str, str]:
    """This process's environment for a child that talks to `endpoint` (a stub's URL) as its Hub, with its own
    cache under `home`; every HF_ and HUGGINGFACE_ variable of this process left out."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
    return env | {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_HUB_OFFLINE": "1" if offline else "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


def _tree(files: dict[tuple[str, str], bytes], repo: str, folder: str, recursive: bool) -> list[dict[str, object]]:
    """The Hub's tree listing of `folder` in `repo`: its files, and its subfolders unless `recursive`."""
    prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
    entries: dict[str, dict[str, object]] = {}
    for (owner, name), content in sorted(files.items()):
        if owner != repo or not name.startswith(prefix):
            continue
        inner = name[len(prefix) :]
        if "/" in inner and not recursive:
            path = prefix + inner.split("/")[0]
            entries[path] = {"type": "directory", "path": path, "oid": COMMIT}
        else:
            entries[name] = {
                "type": "file",
                "path": name,
                "size": len(content),
                "oid": hashlib.sha1(content).hexdigest(),
            }
    return list(entries.values())


def cached_blobs(home: Path) -> list[Path]:
    """The files the Hugging Face cache of `hub_environment(..., home)` holds (downloads land as blobs)."""
    return [path for path in (home / "hub").rglob("*") if path.is_file() and "blobs" in path.parts]


class HubStub:
    """Serves `files`, keyed by (repo id, path in repo), from one commit reachable as "main" or its hash.

    With `truncate=True` every GET body stops halfway while `Content-Length` promises the whole file,
    the way a dropped connection looks to the client.
    """

    def __init__(self, files: dict[tuple[str, str], bytes], truncate: bool = False) -> None:
        self.files = files
        self.truncate = truncate
        self.requests: list[tuple[str, str]] = []
        # The byte ranges (first, last) of every ranged GET.
        self.ranges: list[tuple[int, int]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def gets(self) -> int:
        return sum(1 for method, _ in self.requests if method == "GET")

    def __enter__(self) -> HubStub:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class ResolveHandler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                self._answer(send_body=False)

            def do_GET(self) -> None:
                self._answer(send_body=True)

            def _answer(self, send_body: bool) -> None:
                stub.requests.append((self.command, self.path))
                if self.path.startswith("/api/"):
                    self._listing()
                    return
                match = RESOLVE_PATH.match(self.path)
                if not self._found(match):
                    return
                content = stub.files.get((match["repo"], match["filename"]))
                if content is None:
                    self._error(404, "EntryNotFound")
                    return
                etag = f'"{hashlib.sha256(content).hexdigest()}"'
                total = len(content)
                if wanted := RANGE_HEADER.fullmatch(self.headers.get("Range", "")):
                    first = int(wanted["first"])
                    last = min(int(wanted["last"] or total - 1), total - 1)
                    stub.ranges.append((first, last))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {first}-{last}/{total}")
                    content = content[first : last + 1]
                else:
                    self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", etag)
                self.send_header("Content-Length", str(len(content)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if send_body:
                    self.wfile.write(content[: len(content) // 2] if stub.truncate else content)

            def _found(self, match: re.Match[str] | None) -> TypeGuard[re.Match[str]]:
                """Whether the repo and revision `match` names exist; answers the Hub's error if not."""
                if match is None or not any(repo == match["repo"] for repo, _ in stub.files):
                    # The Hub answers 401 for a repo that does not exist when the client is anonymous.
                    self._error(401, "RepoNotFound")
                    return False
                if match["revision"] not in (None, "main", COMMIT):
                    self._error(404, "RevisionNotFound")
                    return False
                return True

            def _listing(self) -> None:
                match = API_PATH.match(self.path)
                if not self._found(match):
                    return
                repo = match["repo"]
                names = sorted(path for owner, path in stub.files if owner == repo)
                if match["call"] != "tree":
                    answer: object = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": name} for name in names]}
                else:
                    recursive = parse_qs(urlsplit(self.path).query).get("recursive", [""])[0].lower() == "true"
                    answer = _tree(stub.files, repo, match["folder"] or "", recursive)
                body = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _error(self, status: int, error_code: str) -> None:
                self.send_response(status)
                self.send_header("X-Error-Code", error_code)
                if error_code == "EntryNotFound":
                    self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                """Keep test output clean; `HubStub.requests` is the log."""

        return ResolveHandler

"""model.hub: URI parsing, local paths, and hf:// downloads against a loopback stand-in of the Hub."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.hf_stub import COMMIT, HubStub, cached_blobs, hub_environment
from support.upstream_ckpt import hparams_checkpoint_bytes

from model import Sat2Sound, Sat2SoundConfig, save_safetensors
from model.errors import DownloadError
from model.hub import HubFile, official_checkpoint_uri, parse_hf_uri, resolve

REPO = "MVRL/sat2sound"
FILENAME = "sat2sound/bingmap_withmeta.ckpt"
URI = f"hf://{REPO}/{FILENAME}"
PAYLOAD = bytes(range(256)) * 64
CHILD = Path(__file__).resolve().parents[1] / "support" / "hf_resolve_child.py"


class Resolved:
    """Outcome of resolving a URI in a child interpreter."""

    def __init__(self, completed: subprocess.CompletedProcess[str]) -> None:
        self.returncode = completed.returncode
        self.lines = completed.stdout.strip().splitlines()
        self.stderr = completed.stderr

    @property
    def path(self) -> Path:
        assert self.returncode == 0, (self.lines, self.stderr)
        assert len(self.lines) == 1
        return Path(self.lines[0])

    @property
    def error(self) -> str:
        assert self.returncode == 1, (self.lines, self.stderr)
        assert len(self.lines) == 1, self.lines
        assert "Traceback" not in self.stderr
        kind, _, message = self.lines[0].partition(": ")
        assert kind in ("DownloadError", "CheckpointError"), self.lines
        return message


def resolve_in_child(uri: str, endpoint: str, home: Path, offline: bool = False, *, config: bool = False) -> Resolved:
    """`uri` resolved in a child interpreter talking to `endpoint`; with `config`, its architecture read instead."""
    env = hub_environment(endpoint, home, offline)
    command = [sys.executable, str(CHILD), *(["config"] if config else []), uri]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    return Resolved(completed)


@pytest.fixture
def hub() -> Iterator[HubStub]:
    with HubStub({(REPO, FILENAME): PAYLOAD}) as stub:
        yield stub


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_first_call_downloads_and_second_is_served_from_cache(hub: HubStub, tmp_path: Path) -> None:
    first = resolve_in_child(URI, hub.url, tmp_path).path
    assert first.read_bytes() == PAYLOAD
    assert first.is_relative_to(tmp_path / "hub")
    assert hub.gets() == 1

    second = resolve_in_child(URI, hub.url, tmp_path).path
    assert second == first
    assert hub.gets() == 1


def test_pinned_revision_is_served_from_cache_without_any_request(hub: HubStub, tmp_path: Path) -> None:
    pinned = f"hf://{REPO}@{COMMIT}/{FILENAME}"
    first = resolve_in_child(pinned, hub.url, tmp_path).path
    assert first.read_bytes() == PAYLOAD
    hub.requests.clear()

    assert resolve_in_child(pinned, hub.url, tmp_path).path == first
    assert hub.requests == []


def test_offline_mode_uses_the_cache(hub: HubStub, tmp_path: Path) -> None:
    downloaded = resolve_in_child(URI, hub.url, tmp_path).path
    hub.requests.clear()

    assert resolve_in_child(URI, hub.url, tmp_path, offline=True).path == downloaded
    assert hub.requests == []


def test_offline_mode_without_cached_copy_is_one_line_error(hub: HubStub, tmp_path: Path) -> None:
    message = resolve_in_child(URI, hub.url, tmp_path, offline=True).error
    assert "HF_HUB_OFFLINE" in message
    assert hub.requests == []


def test_missing_file_is_one_line_error(hub: HubStub, tmp_path: Path) -> None:
    message = resolve_in_child(f"hf://{REPO}/sat2sound/nope.ckpt", hub.url, tmp_path).error
    assert "sat2sound/nope.ckpt is not in Hub model repo MVRL/sat2sound" in message
    assert hub.gets() == 0


def test_missing_repo_is_one_line_error(hub: HubStub, tmp_path: Path) -> None:
    message = resolve_in_child(f"hf://someone/else/{FILENAME}", hub.url, tmp_path).error
    assert "someone/else does not exist" in message


def test_unknown_revision_is_one_line_error(hub: HubStub, tmp_path: Path) -> None:
    message = resolve_in_child(f"hf://{REPO}@v9/{FILENAME}", hub.url, tmp_path).error
    assert "revision 'v9' does not exist" in message


def test_unreachable_hub_is_one_line_error(tmp_path: Path) -> None:
    endpoint = closed_port_url()
    resolved = resolve_in_child(URI, endpoint, tmp_path)
    assert f"cannot reach the Hugging Face Hub at {endpoint}" in resolved.error
    # huggingface_hub's retries, one line each (it logs two: the error, then the wait).
    retries = resolved.stderr.strip().splitlines()
    assert len(retries) == 5, retries
    for attempt, line in enumerate(retries, start=1):
        assert re.fullmatch(
            rf"Hugging Face Hub: .*Connection refused for {re.escape(URI)}; retry {attempt} of 5 in \d+ s", line
        )


def test_connection_dropped_mid_download_is_one_line_error(tmp_path: Path) -> None:
    with HubStub({(REPO, FILENAME): PAYLOAD}, truncate=True) as hub:
        message = resolve_in_child(URI, hub.url, tmp_path).error
    assert f"download of {URI} failed" in message
    assert hub.gets() > 1, "huggingface_hub should have retried the interrupted download"


def test_unwritable_cache_is_one_line_error(hub: HubStub, tmp_path: Path) -> None:
    (tmp_path / "hub").write_text("a file where the cache directory should be")
    message = resolve_in_child(URI, hub.url, tmp_path).error
    assert "cannot store" in message
    assert "HF_HUB_CACHE" in message


def test_parse_hf_uri_reads_repo_type_revision_and_nested_path() -> None:
    assert parse_hf_uri(URI) == HubFile(REPO, FILENAME, None, "model")
    assert parse_hf_uri("hf://datasets/MVRL/GeoSound@refs%2Fpr%2F3/demo/a.h5") == HubFile(
        "MVRL/GeoSound", "demo/a.h5", "refs/pr/3", "dataset"
    )


@pytest.mark.parametrize("uri", ["hf://MVRL/sat2sound", "hf://MVRL//x.ckpt", "hf://MVRL/@main/x.ckpt", "s3://a/b/c"])
def test_malformed_hf_uri_is_rejected(uri: str) -> None:
    with pytest.raises(DownloadError, match="URI"):
        parse_hf_uri(uri)


def test_official_checkpoint_uri_follows_upstream_repo_layout() -> None:
    # Upstream README: checkpoints live at sat2sound/{bingmap,sentinel,SoundingEarth}_{nometa,withmeta}.ckpt
    # in the Hub repo MVRL/sat2sound.
    assert official_checkpoint_uri("bingmap_withmeta") == "hf://MVRL/sat2sound/sat2sound/bingmap_withmeta.ckpt"
    assert official_checkpoint_uri("SoundingEarth_nometa").endswith("/sat2sound/SoundingEarth_nometa.ckpt")
    with pytest.raises(DownloadError, match="bingmap_nometa"):
        official_checkpoint_uri("bingmap")


def test_local_path_passes_through(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"x")
    assert resolve(checkpoint) == checkpoint
    assert resolve(str(checkpoint)) == checkpoint


def test_missing_local_path_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(DownloadError) as raised:
        resolve(tmp_path / "missing.ckpt")
    assert "missing.ckpt is not a file" in str(raised.value)
    assert "\n" not in str(raised.value)


def test_the_architecture_of_a_checkpoint_not_yet_downloaded_is_read_in_place(manifest: dict, tmp_path: Path) -> None:
    content = hparams_checkpoint_bytes("bingmap_nometa", 24, manifest)
    with HubStub({(REPO, FILENAME): content}) as hub:
        remote = resolve_in_child(URI, hub.url, tmp_path, config=True)
        assert remote.lines == ["bingmap none 16000"], (remote.lines, remote.stderr)
        file_gets = [path for method, path in hub.requests if method == "GET" and "/resolve/" in path]
        # Every read of the file was a range request, and together they fetched a sliver of it.
        assert len(hub.ranges) == len(file_gets) >= 1
        assert sum(last - first + 1 for first, last in hub.ranges) < len(content) / 20
        assert cached_blobs(tmp_path) == []

        # Once downloaded, the cached file answers (the Hub asked only whether it is still current).
        resolve_in_child(URI, hub.url, tmp_path)
        hub.requests.clear()
        assert resolve_in_child(URI, hub.url, tmp_path, config=True).lines == remote.lines
        assert hub.gets() == 0


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        (f"hf://{REPO}/sat2sound/nope.ckpt", f"sat2sound/nope.ckpt is not in Hub model repo {REPO}"),
        (f"hf://someone/else/{FILENAME}", "Hub model repo someone/else does not exist or needs access rights"),
        (f"hf://{REPO}@v9/{FILENAME}", f"revision 'v9' does not exist in Hub repo {REPO}"),
        (URI, f"{URI} is not a torch checkpoint (not a zip archive"),
    ],
)
def test_reading_an_architecture_in_place_fails_in_one_line(
    uri: str, message: str, hub: HubStub, tmp_path: Path
) -> None:
    assert resolve_in_child(uri, hub.url, tmp_path, config=True).error.startswith(message)


def test_reading_an_architecture_in_place_needs_the_hub(hub: HubStub, tmp_path: Path) -> None:
    offline = resolve_in_child(URI, hub.url, tmp_path, offline=True, config=True).error
    assert "HF_HUB_OFFLINE is set" in offline
    endpoint = closed_port_url()
    assert (
        f"cannot reach the Hugging Face Hub at {endpoint}"
        in resolve_in_child(URI, endpoint, tmp_path, config=True).error
    )


def test_a_safetensors_checkpoint_on_the_hub_comes_with_its_config(tmp_path: Path) -> None:
    weights, config = save_safetensors(Sat2Sound(Sat2SoundConfig.small("none")).eval(), tmp_path / "small.safetensors")
    files = {(REPO, "demo/small.safetensors"): weights.read_bytes(), (REPO, "demo/small.json"): config.read_bytes()}
    uri = f"hf://{REPO}/demo/small.safetensors"
    with HubStub(files) as hub:
        # Its architecture alone downloads the config alone.
        assert resolve_in_child(uri, hub.url, tmp_path, config=True).lines == ["bingmap none 256"]
        fetched = [path.rsplit("/", 1)[-1] for method, path in hub.requests if method == "GET" and "/resolve/" in path]
        assert fetched == ["small.json"]
        path = resolve_in_child(uri, hub.url, tmp_path).path
    assert path.read_bytes() == weights.read_bytes()
    assert path.with_suffix(".json").read_bytes() == config.read_bytes()

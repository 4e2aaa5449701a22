"""Resolve one URI in a fresh interpreter and print the local path, or the error on one line; with `config`
first, print the architecture `checkpoint_config` reads (sat type, metadata, codebook size) instead.

huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE when it is imported, so tests that vary
them run this script in a subprocess with the environment they need.
"""

from __future__ import annotations

import sys
import time

from model.checkpoint import checkpoint_config, resolve_checkpoint
from model.errors import CheckpointError, DownloadError


def main(*argv: str) -> int:
    # huggingface_hub sleeps 23 s in all between its retries of a refused connection; the loopback server
    # answers at once, so the waits would only slow the tests down.
    time.sleep = lambda seconds: None
    *command, uri = argv
    try:
        if command == ["config"]:
            cfg = checkpoint_config(uri)
            print(cfg.sat_type, "_".join(cfg.metadata) or "none", cfg.codebook_size)
        else:
            print(resolve_checkpoint(uri))
    except (DownloadError, CheckpointError) as exc:
        print(f"{type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

"""Resolve one URI in a fresh interpreter and print the local path, or the DownloadError on one line.

huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE when it is imported, so tests that vary
them run this script in a subprocess with the environment they need.
"""

from __future__ import annotations

import sys
import time

from model.errors import DownloadError
from model.hub import resolve


def main(uri: str) -> int:
    # huggingface_hub sleeps 23 s in all between its retries of a refused connection; the loopback server
    # answers at once, so the waits would only slow the tests down.
    time.sleep = lambda seconds: None
    try:
        print(resolve(uri))
    except DownloadError as exc:
        print(f"DownloadError: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

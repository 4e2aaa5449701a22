"""Open one split of a Hub dataset in a fresh interpreter; print its row count and first key, or the error on one line.

huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE when it is imported, so tests that vary
them run this script in a subprocess with the environment they need.
"""

from __future__ import annotations

import sys
import time

from model.data.parquet import GeoSoundParquet, SoundingEarthParquet
from model.errors import Sat2SoundError

DATASETS = {"GeoSound": GeoSoundParquet, "SoundingEarth": SoundingEarthParquet}


def main(dataset: str, split: str, repo_id: str) -> int:
    # huggingface_hub sleeps between retries of a refused connection; the loopback server answers at once.
    time.sleep = lambda seconds: None
    try:
        source = DATASETS[dataset].from_hub(split, repo_id=repo_id)
        print(len(source), source.record(0).key)
    except Sat2SoundError as exc:
        print(f"{type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))

"""Time of the retrieval evaluation (3 settings x 2 directions) for galleries of full-size embeddings.

    python benchmarks/bench_evaluate.py [--pairs 1000 10000] [--repeats 3]

Prints seconds per evaluation for each gallery size (best of the repeats, after a warm-up on the smallest)
and the process peak RSS. Embeddings are random: the time does not depend on their values.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from model.config import Sat2SoundConfig
from model.evaluate import retrieval_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    width = Sat2SoundConfig().codebook_dim
    rng = np.random.default_rng(0)
    print(f"cpu ({torch.get_num_threads()} threads), embeddings of width {width}")
    retrieval_metrics(*(rng.standard_normal((min(args.pairs), width), dtype=np.float32) for _ in range(3)))
    for pairs in args.pairs:
        arrays = [rng.standard_normal((pairs, width), dtype=np.float32) for _ in range(3)]
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            retrieval_metrics(*arrays)
            times.append(time.perf_counter() - start)
        print(f"gallery {pairs:6d}: {min(times):7.2f} s per evaluation (6 rankings of {pairs} queries)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()

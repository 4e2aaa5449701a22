"""Image-branch throughput of the full-size (1024-d, 16000-code) Sat2Sound model.

    python benchmarks/bench_model.py [--device auto] [--batches 1 8 32] [--metadata] [--repeats 3] [--times N]
                                     [--compile]

Prints images/s per batch size (after a warm-up batch: with `--compile`, the seconds it took to compile) and
peak memory: CUDA allocator peak on GPU, process peak RSS on CPU. Weights are random: speed does not depend on
their values. Below fp32, or compiled, it also prints how close the first batch's embeddings come to eager fp32
ones (the least cosine similarity).

`--times N` (withmeta) embeds each batch at N months as a build of N times does (`image_concepts`: the ViT
once, the fusion and the codebook pooling per time) and prints, per batch size, "first time step X ms/tile,
each extra time step Y ms/tile": what each extra month or hour of `model.month`/`model.hour` costs.
"""

from __future__ import annotations

import argparse
import copy
import resource
import time

import numpy as np
import torch

from common.memory import keep_freed_memory
from model import Metadata, Sat2Sound, Sat2SoundConfig, Sat2SoundEncoder
from model.config import MONTHS
from model.devices import pick_device
from model.inference import pick_precision
from pipeline.config import load_plan_inputs
from pipeline.embed import TimeCosts


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--metadata", action="store_true", help="benchmark the withmeta (fusion) variant")
    parser.add_argument("--compile", action="store_true", help="torch.compile the image path (`compiled=True`)")
    parser.add_argument(
        "--times", type=int, choices=range(2, len(MONTHS) + 1), metavar="N", help="cost of N months (withmeta)"
    )
    args = parser.parse_args()
    keep_freed_memory()
    if args.times:
        args.metadata = True

    device = pick_device(args.device)
    torch.manual_seed(0)
    cfg = Sat2SoundConfig(metadata_type="latlong_month_time_asource_tsource" if args.metadata else "none")
    model = Sat2Sound(cfg)
    check = torch.randint(0, 256, (min(args.batches), 3, 224, 224), dtype=torch.uint8)
    check_meta = metadata(len(check)) if args.metadata else None
    exact = None
    if args.compile or pick_precision(args.precision, device) != torch.float32:
        # An eager fp32 twin (compiling works in place), dropped before the timed encoder is made.
        twin = Sat2SoundEncoder(copy.deepcopy(model), device=str(device), precision="fp32")
        exact = twin.embed_images(check, 1, check_meta).embedding
        del twin
    encoder = Sat2SoundEncoder(model, device=str(device), precision=args.precision, compiled=args.compile)
    variant = "withmeta" if args.metadata else "nometa"
    compiled = ", compiled" if args.compile else ""
    print(f"device {device} ({torch.get_num_threads()} threads), precision {encoder.dtype}{compiled}, {variant}")
    if exact is not None:
        start = time.perf_counter()
        embedding = encoder.embed_images(check, 1, check_meta).embedding
        cosine = float((embedding * exact).sum(dim=1).min())
        print(f"least cosine similarity to eager fp32: {cosine:.6f} (first call {time.perf_counter() - start:.1f} s)")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for batch in args.batches:
        images = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8)
        meta = metadata(batch) if args.metadata else None
        start = time.perf_counter()
        encoder.embed_images(images, 1, meta)
        if args.compile:
            print(f"batch {batch:3d}: warm-up (compiling) {time.perf_counter() - start:.1f} s")
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.repeats):
            encoder.embed_images(images, 1, meta)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.repeats
        print(f"batch {batch:3d}: {batch / seconds:8.1f} images/s  ({seconds * 1000:7.1f} ms/batch)")
        if args.times:
            print(f"batch {batch:3d}: {time_steps(encoder, images, args.times, args.repeats)}")
    print(f"peak memory {peak_memory_mb(device):.0f} MB")


def metadata(count: int, month: int = 6) -> Metadata:
    """`count` tiles at one place (St. Louis), in `month` at noon."""
    return Metadata.from_values(np.full(count, 38.6), np.full(count, -90.2), month=month, hour=12)


def time_steps(encoder: Sat2SoundEncoder, images: torch.Tensor, times: int, repeats: int) -> str | None:
    """The first time step's and each extra one's cost per tile, over `repeats` sweeps of `times` months."""
    count = len(images)
    metas = [metadata(count, month) for month in MONTHS[:times]]
    top_k = load_plan_inputs({"region": "0,0,1,1"}).concepts_top_k  # what a default build keeps
    costs = TimeCosts()
    for _ in range(repeats):
        steps = encoder.image_concepts(images, 1, metas, top_k)
        for step in range(times):
            start = time.perf_counter()
            next(steps)  # its embeddings are on the CPU: the device has finished the step
            costs.record(step, time.perf_counter() - start)
        costs.count(count, times)
    return costs.line()


if __name__ == "__main__":
    main()

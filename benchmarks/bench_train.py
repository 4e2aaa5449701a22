"""Training throughput: samples/s of `python -m model train` on a folder of synthetic pairs.

    python -m benchmarks.bench_train [--architecture small] [--pairs 256] [--batch-size 32] [--steps 20]

Writes `--pairs` pairs (224 px PNG images, 10 s recordings) in the folder layout, then trains for `--steps`
steps through the real loop (data loading, cached captions, forward, backward, AdamW) and prints samples/s
in the first epoch, after its first step (which pays for start-up and the captions' first encoding), while the
mel cache fills, and in the later epochs, which read it; the device and the model's parameter count. Captions
repeat, as a real data set's audio captions largely do.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import soundfile
import torch

from common.memory import keep_freed_memory
from model.launch import training_launch
from model.train_config import parse_settings
from model.training import Sat2SoundTraining, initial_model, text_cache, trainer
from tests.support.pair_data import encode_image, write_folder

RATE = 32_000
SECONDS = 10


class StepClock(pl.Callback):
    """When each step ends, and in which epoch."""

    def __init__(self) -> None:
        self.ends: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.ends.append((trainer.current_epoch, time.perf_counter()))

    def rate(self, batch_size: int, later: bool) -> str:
        """Samples/s over the steps of the first epoch (after its first) or of the later epochs."""
        epochs = np.array([epoch for epoch, _ in self.ends])
        steps = np.diff([end for _, end in self.ends])[(epochs[1:] > 0) == later]
        return f"{batch_size * len(steps) / steps.sum():.1f} samples/s over {len(steps)} steps" if len(steps) else "-"


def write_pairs(root: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "audio").mkdir()
    lines = []
    for index in range(count):
        key = f"p{index}"
        image = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
        (root / "images" / f"{key}.png").write_bytes(encode_image(image))
        soundfile.write(root / "audio" / f"{key}.wav", rng.uniform(-0.3, 0.3, RATE * SECONDS).astype(np.float32), RATE)
        lines.append(
            {
                "key": key,
                "image": f"images/{key}.png",
                "audio": f"audio/{key}.wav",
                "audio_caption": f"recording of kind {index % 20}",
                "image_caption": f"a place of kind {index % 50}",
                "lat": "10",
                "lon": "20",
                "time": "2020-05-18",
                "split": "val" if index < 8 else "train",
            }
        )
    write_folder(root, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="small", choices=("small", "full"))
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    keep_freed_memory()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_pairs(root / "pairs", args.pairs)
        settings = parse_settings(
            {
                "out_dir": str(root / "run"),
                "data": {"format": "folder", "root": str(root / "pairs"), "zooms": [1], "num_workers": args.workers},
                "model": {"architecture": args.architecture},
                "batch_size": args.batch_size,
                "max_steps": args.steps,
                "max_epochs": 1000,
            }
        )
        clock = StepClock()
        model = initial_model(settings)
        module = Sat2SoundTraining(model, settings, text_cache(settings, model.cfg.text_dim))
        options = {"callbacks": [clock], "limit_val_batches": 0, "enable_checkpointing": False, "logger": False}
        trainer(settings, training_launch(settings.devices), [], enable_progress_bar=False, **options).fit(module)
        parameters = sum(p.numel() for p in model.parameters())
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(
        f"{args.architecture} model ({parameters / 1e6:.1f} M parameters), {device}, batch {args.batch_size},"
        f" {args.workers} loader worker(s)"
    )
    print(f"first epoch (mel cache filling): {clock.rate(args.batch_size, later=False)}")
    print(f"later epochs (mel cache read): {clock.rate(args.batch_size, later=True)}")


if __name__ == "__main__":
    main()

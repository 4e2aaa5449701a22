"""Training with PyTorch Lightning, as the reference trains (`python -m model train --config train.yaml`).

Lightning runs the loop: mixed precision on GPUs, several GPUs through DDP, gradient clipping, resume from
`<out_dir>/checkpoints/last.ckpt` (weights, optimiser, scheduler, step and the RNG states), TensorBoard and
CSV logs under `<out_dir>/logs`, and a progress bar with the loss and samples/s. After each validation the
retrieval metrics of the whole validation split are computed (`model.evaluate`, R@k and median rank), and
the best checkpoints by mean image<->audio recall are kept. At the end the best one is exported in the
project's format (`<out_dir>/model.safetensors` + `.json`), which the map pipeline loads, and, for the full
architecture, in upstream's Lightning layout too (`<out_dir>/model.ckpt`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch import Tensor

from model.checkpoint import build_model, read_checkpoint, save_safetensors
from model.evaluate import retrieval_metrics
from model.loss import l2_normalize
from model.sat2sound import Sat2Sound, Sat2SoundBatch
from model.text import TextBackbone, load_text_backbone
from model.text_cache import TextCache
from model.text_specs import backbone_spec
from model.train_config import TrainSettings

MONITOR = "val/recall"
CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
EXPORT_NAME = "model"


class PairEmbeddings(NamedTuple):
    """Row-aligned L2-normalised embeddings of a split, as `model.evaluate` takes them."""

    image: Tensor
    audio: Tensor
    audio_caption: Tensor


def text_cache(settings: TrainSettings, text_dim: int, device: str = "cpu") -> TextCache:
    spec = backbone_spec(settings.model.text_backbone, text_dim)

    def load() -> TextBackbone:
        return load_text_backbone(spec, device=device)

    return TextCache(spec, text_dim, load, settings.text_cache_path)


def model_batch(batch: Any, texts: TextCache, device: torch.device) -> Sat2SoundBatch:
    """A collated batch of pairs, with its captions turned into token states, on `device`."""
    audio_caption = texts.encode(batch.audio_captions)
    image_caption = texts.encode(batch.image_captions)
    metadata = batch.metadata()
    return Sat2SoundBatch(
        images=batch.images.to(device, non_blocking=True),
        zoom_level=batch.zoom_level.to(device),
        mel=batch.mel.to(device, non_blocking=True),
        audio_caption=(audio_caption.hidden.to(device), audio_caption.mask.to(device)),
        image_caption=(image_caption.hidden.to(device), image_caption.mask.to(device)),
        metadata=None if metadata is None else metadata.to(device),
    )


def pair_embeddings(model: Sat2Sound, batches: Sequence[Sat2SoundBatch] | Iterator[Sat2SoundBatch]) -> PairEmbeddings:
    """The image, audio and audio-caption embeddings of every batch, normalised, on the CPU."""
    parts: dict[str, list[Tensor]] = {"image": [], "audio": [], "audio_caption": []}
    for batch in batches:
        out = model(batch)
        for name in parts:
            parts[name].append(l2_normalize(getattr(out, name).embedding.float()).cpu())
    return PairEmbeddings(*(torch.cat(parts[name]) for name in PairEmbeddings._fields))


class Sat2SoundTraining(pl.LightningModule):
    """The model under training; submodule `model` is a plain `Sat2Sound`."""

    def __init__(self, model: Sat2Sound, settings: TrainSettings, texts: TextCache) -> None:
        super().__init__()
        self.model = model
        self.settings = settings
        self.texts = texts
        self._val_outputs: list[PairEmbeddings] = []
        self._tick: tuple[float, int] | None = None

    def _batch(self, batch: Any) -> Sat2SoundBatch:
        return model_batch(batch, self.texts, self.device)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        out = self.model(self._batch(batch))
        losses = self.model.loss(out)
        size = len(batch.images)
        self.log("train/loss", losses.loss, prog_bar=True, batch_size=size)
        self.log_dict(
            {"train/multimodal_loss": losses.multimodal_loss, "train/fdt_loss": losses.fdt_loss}, batch_size=size
        )
        self._log_rate(size)
        return losses.loss

    def _log_rate(self, size: int) -> None:
        now = time.perf_counter()
        if self._tick is not None:
            start, count = self._tick
            self.log("samples_per_s", count / max(now - start, 1e-9), prog_bar=True, batch_size=size)
        self._tick = (now, size)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        model_input = self._batch(batch)
        out = self.model(model_input)
        self.log("val/loss", self.model.loss(out).loss, batch_size=len(batch.images), sync_dist=True)
        self._val_outputs.append(pair_embeddings(self.model, [model_input]))

    def on_validation_epoch_end(self) -> None:
        if not self._val_outputs:
            return
        embeddings = PairEmbeddings(*(torch.cat(parts) for parts in zip(*self._val_outputs, strict=True)))
        self._val_outputs.clear()
        metrics = retrieval_metrics(
            embeddings.image.numpy(),
            embeddings.audio.numpy(),
            embeddings.audio_caption.numpy(),
            recall_at_percent=self.settings.recall_at_percent,
        )
        plain = metrics["none"]
        recall = (plain["I2S"]["recall"] + plain["S2I"]["recall"]) / 2
        self.log(MONITOR, recall, prog_bar=True, sync_dist=True)
        for setting, directions in metrics.items():
            for direction, values in directions.items():
                for name, value in values.items():
                    self.log(f"val/{setting}/{direction}/{name}", float(value), sync_dist=True)

    def configure_optimizers(self) -> Any:
        optim = self.settings.optim
        optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=optim.restart_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng"] = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        checkpoint["sat2sound_config"] = self.model.cfg.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng")
        if not states:
            return
        random.setstate(states["python"])
        np.random.set_state(states["numpy"])
        torch.set_rng_state(states["torch"])
        if states["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])


def initial_model(settings: TrainSettings) -> Sat2Sound:
    """The architecture of the settings, fresh, or the weights of `model.init` to go on from."""
    if settings.model.init is None:
        return Sat2Sound(settings.model_config(), meta_droprate=settings.model.meta_droprate)
    cfg, state_dict, _ = read_checkpoint(Path(settings.model.init))
    return build_model(cfg, state_dict, source=settings.model.init)


def trainer(settings: TrainSettings, callbacks: Sequence[pl.Callback], **overrides: Any) -> pl.Trainer:
    logs = settings.out_path / "logs"
    precision = settings.precision
    if precision == "auto":
        precision = "bf16-mixed" if torch.cuda.is_available() else "32"
    options: dict[str, Any] = {
        "default_root_dir": settings.out_dir,
        "max_epochs": settings.max_epochs,
        "max_steps": settings.max_steps,
        "check_val_every_n_epoch": settings.val_every_epochs,
        "gradient_clip_val": settings.optim.grad_clip,
        "gradient_clip_algorithm": "norm",
        "precision": precision,
        "devices": "auto" if settings.devices is None else settings.devices,
        "logger": [TensorBoardLogger(logs, name="tensorboard"), CSVLogger(logs, name="csv")],
        "callbacks": list(callbacks),
        "log_every_n_steps": 1,
        "num_sanity_val_steps": 0,
    }
    return pl.Trainer(**{**options, **overrides})


def best_checkpoints(settings: TrainSettings) -> ModelCheckpoint:
    return ModelCheckpoint(
        dirpath=settings.out_path / CHECKPOINTS,
        filename="best-{epoch}-{step}",
        monitor=MONITOR,
        mode="max",
        save_top_k=settings.keep_best,
        save_last=True,
    )


def export(module_state: dict[str, Tensor], model: Sat2Sound, settings: TrainSettings, source: Path) -> list[Path]:
    """Write the trained weights as `<out_dir>/model.safetensors` (+ `.json`), and upstream's `.ckpt` when full."""
    weights = {key.removeprefix("model."): value for key, value in module_state.items() if key.startswith("model.")}
    model.load_state_dict(weights)
    hparams = upstream_hparams(settings, model)
    provenance = {"trained_by": "python -m model train", "from_checkpoint": source.name}
    written = list(save_safetensors(model, settings.out_path / f"{EXPORT_NAME}.safetensors", hparams, provenance))
    if (settings.model.architecture == "full" and settings.model.init is None) or model.cfg == type(model.cfg)():
        from common.atomic import atomic_path

        target = settings.out_path / f"{EXPORT_NAME}.ckpt"
        with atomic_path(target) as tmp:
            torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams}, tmp)
        written.append(target)
    return written


def upstream_hparams(settings: TrainSettings, model: Sat2Sound) -> dict[str, Any]:
    """The hyper-parameters under upstream's names (those that shape the model, and the training ones)."""
    cfg, optim = model.cfg, settings.optim
    return {
        "fc_dim": cfg.fc_dim,
        "codebook_dim": cfg.codebook_dim,
        "codebook_size": cfg.codebook_size,
        "sat_type": cfg.sat_type,
        "metadata_type": cfg.metadata_type,
        "combined_modality_loss": int(cfg.combined_modality_loss),
        "fdt_weight": cfg.fdt_weight,
        "pseudo_match_alpha": cfg.pseudo_match_alpha,
        "meta_droprate": settings.model.meta_droprate,
        "learning_rate": optim.lr,
        "weight_decay": optim.weight_decay,
        "warm_up_iterations": optim.restart_steps,
        "batch_size": settings.batch_size,
        "recall_at": settings.recall_at_percent,
    }


def seed_everything(seed: int) -> None:
    pl.seed_everything(seed, workers=True, verbose=False)


ProgressFn = Callable[[str], None]

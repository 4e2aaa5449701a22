"""Training with PyTorch Lightning, as the reference trains (`python -m model train --config train.yaml`).

Lightning runs the loop: mixed precision on GPUs, several GPUs through DDP, gradient clipping, resume from
`<out_dir>/checkpoints/last.ckpt` or a SLURM requeue's `<out_dir>/hpc_ckpt_N.ckpt`, whichever went further
(weights, optimiser, scheduler, step and the RNG states), TensorBoard and
CSV logs under `<out_dir>/logs`, and a progress bar with the loss and samples/s. After each validation the
retrieval metrics of the whole validation split are computed (`model.evaluate`, R@k and median rank; under DDP
the ranks' embeddings are gathered first, so the gallery is still the whole split), and
the best checkpoints by mean image<->audio recall are kept. At the end the best one is exported (by rank 0) in the
project's format (`<out_dir>/model.safetensors` + `.json`), which the map pipeline loads, and, for the full
architecture, in upstream's Lightning layout too (`<out_dir>/model.ckpt`). With `image_pretraining` set, the image
side first learns land cover alone (`ImageTowerPretraining`) and then stays frozen.
"""

from __future__ import annotations

import logging
import math
import pickle
import random
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytorch_lightning as pl
import rasterio
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from torch import Tensor, nn
from torch.utils.data import DataLoader

from common.atomic import atomic_path, unwritable_folder_reason
from common.errors import first_line
from common.tables import read_table
from model.audio import load_audio
from model.checkpoint import DESCRIPTION_KEY, build_model, read_checkpoint, save_safetensors
from model.config import Sat2SoundConfig
from model.data.dataset import BlockShuffleSampler, PairDataset, TrainBatch, collate
from model.data.folder import FolderPairs
from model.data.parquet import GeoSoundParquet, SoundingEarthParquet
from model.data.sources import PairSource
from model.data.transforms import COLOR_JITTER, SampleTransform, dihedral_turn
from model.devices import cuda_devices
from model.errors import ConfigError, DataError
from model.evaluate import MIN_GALLERY, retrieval_metrics
from model.hub import HUB_DATASETS
from model.launch import Launch, training_launch
from model.loss import l2_normalize, similarity, soft_cross_entropy, symmetric_cross_entropy
from model.mel import log_mel
from model.sat2sound import Sat2Sound, Sat2SoundBatch, Sat2SoundOutput
from model.text import TextBackbone, TextTokens, load_text_backbone
from model.text_cache import TextCache
from model.text_specs import backbone_spec, check_text_backbone
from model.train_config import DataSettings, RecordingSettings, TowerSettings, TrainSettings

MONITOR = "val/recall"
RECORDINGS_LOSS = "train/recordings_loss"
DIRECTIONS_LOSS = "train/directions_loss"
AUDIO_PROTOTYPES_LOSS = "train/audio_prototypes_loss"
CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
PROTOTYPES_SEED = 0  # `class_prototypes`: fixed, so that every run draws the same
# Lightning's checkpoint when SLURM signals a job before its time limit, in the trainer's root folder.
REQUEUED = "hpc_ckpt_*.ckpt"
EXPORT_NAME = "model"
# Lightning's notices that say nothing about a run, in every run's log: torch's deprecation of the `LeafSpec` that
# Lightning's loop still builds, and a tip for a cloud logger.
LEAFSPEC_DEPRECATED = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
LIGHTNING_TIP = "💡 Tip:"
LIGHTNING_NOTICES = logging.getLogger("pytorch_lightning.utilities.rank_zero")


class PairEmbeddings(NamedTuple):
    """Row-aligned L2-normalised embeddings of a split, as `model.evaluate` takes them."""

    image: Tensor
    audio: Tensor
    audio_caption: Tensor


def open_pairs(data: DataSettings, split: str, mel_cache: Path | None = None) -> PairSource:
    """The pairs of `split` in the layout `data.format` names, from a folder or `hf://datasets/OWNER/NAME[@REV]`;
    a folder's log-mels are kept in `mel_cache` (the Hub layouts store theirs)."""
    if data.format == "folder":
        if data.root.startswith(HUB_DATASETS):
            raise ConfigError("data.format folder reads a local folder; Hub datasets are geosound or soundingearth")
        zooms = data.zooms or (1, 3, 5)
        return FolderPairs(data.root, split, zoom_levels=zooms, sat_type=data.sat_type, mel_cache=mel_cache)
    reader = GeoSoundParquet if data.format == "geosound" else SoundingEarthParquet
    sat_type = data.sat_type if data.format == "geosound" else None
    if data.root.startswith(HUB_DATASETS):
        repo, _, revision = data.root.removeprefix(HUB_DATASETS).partition("@")
        return reader.from_hub(split, sat_type=sat_type, repo_id=repo, revision=revision or None)
    return reader(data.root, split, sat_type)


def transform_for(source: PairSource, data: DataSettings, train: bool) -> SampleTransform:
    return SampleTransform(
        train=train,
        zoom_levels=data.zooms or source.zoom_levels,
        dihedral=data.dihedral,
        color_jitter=COLOR_JITTER if data.color_jitter is None else data.color_jitter,
    )


def text_cache(settings: TrainSettings, text_dim: int, device: str = "cpu") -> TextCache:
    spec = backbone_spec(settings.model.text_backbone, text_dim)

    def load() -> TextBackbone:
        return load_text_backbone(spec, device=device)

    return TextCache(spec, text_dim, load, settings.text_cache_path)


def model_batch(batch: TrainBatch, texts: TextCache, cfg: Sat2SoundConfig, device: torch.device) -> Sat2SoundBatch:
    """A collated batch with its captions turned into token states, on `device`."""
    audio_caption = texts.encode(batch.audio_captions)
    image_caption = texts.encode(batch.image_captions)
    plain = batch.to_model_batch(
        (audio_caption.hidden, audio_caption.mask), (image_caption.hidden, image_caption.mask), bool(cfg.metadata)
    )
    return Sat2SoundBatch(
        images=plain.images.to(device, non_blocking=True),
        zoom_level=plain.zoom_level.to(device),
        mel=plain.mel.to(device, non_blocking=True),
        audio_caption=(plain.audio_caption[0].to(device), plain.audio_caption[1].to(device)),
        image_caption=(plain.image_caption[0].to(device), plain.image_caption[1].to(device)),
        metadata=None if plain.metadata is None else plain.metadata.to(device),
    )


def pair_embeddings(out: Sat2SoundOutput) -> PairEmbeddings:
    return PairEmbeddings(
        *(l2_normalize(getattr(out, name).embedding.float()).cpu() for name in PairEmbeddings._fields)
    )


def concat(parts: Iterable[PairEmbeddings]) -> PairEmbeddings:
    return PairEmbeddings(*(torch.cat(column) for column in zip(*parts, strict=True)))


def loader(pairs: PairDataset, settings: TrainSettings, **options: Any) -> DataLoader:
    return DataLoader(
        pairs,
        batch_size=settings.batch_size,
        collate_fn=collate,
        num_workers=settings.data.num_workers,
        pin_memory=torch.cuda.is_available(),
        **options,
    )


def train_loader(pairs: PairDataset, settings: TrainSettings) -> DataLoader:
    sampler = BlockShuffleSampler(pairs.source, seed=settings.seed)
    return loader(pairs, settings, sampler=sampler, drop_last=True)


def train_pairs(settings: TrainSettings) -> PairDataset:
    source = open_pairs(settings.data, settings.data.train_split, settings.mel_cache_path)
    return PairDataset(source, transform_for(source, settings.data, train=True), seed=settings.seed)


def val_pairs(settings: TrainSettings) -> PairDataset:
    source = open_pairs(settings.data, settings.data.val_split, settings.mel_cache_path)
    return PairDataset(source, transform_for(source, settings.data, train=False), seed=settings.seed)


class Splits(NamedTuple):
    train: PairDataset
    val: PairDataset


def open_splits(settings: TrainSettings) -> Splits:
    return Splits(train_pairs(settings), val_pairs(settings))


class RecordingCaptions:
    """The recordings of `recordings.table`, each heard alone (its first 10 s, as a query reads it) and taught its
    own caption among the others' and, with `land_covers` (indices into the image pretraining's classes), pulled
    with its caption towards its class's direction (`RecordingSettings`)."""

    def __init__(
        self, mel: Tensor, captions: Sequence[str], settings: RecordingSettings, land_covers: Tensor | None = None
    ) -> None:
        self.mel = mel  # (N, 1, frames, mels)
        self.captions = list(captions)
        self.settings = settings
        self.land_covers = land_covers  # (N,) class indices; None while `directions` is 0
        # mel, caption tokens and land covers on the model's device, made at the first step
        self._inputs: tuple[Tensor, TextTokens, Tensor | None] | None = None

    @classmethod
    def read(cls, settings: RecordingSettings, classes: Sequence[str]) -> RecordingCaptions | None:
        if settings.table is None:
            return None
        table = Path(settings.table)
        columns = ("file", "caption", "land_cover") if settings.directions else ("file", "caption")
        rows = read_table(table, columns, f"give recordings.table a CSV of {', '.join(columns)}", DataError)
        if len(rows) < 2:
            raise DataError(f"{table} lists {len(rows)} recordings; the term contrasts them, list at least 2")
        empty = next((row["file"] for row in rows if not row["caption"]), None)
        if empty is not None:
            raise DataError(f"{table}: {empty} has no caption; give every recording one")
        land_covers = None
        if settings.directions:
            unknown = next((row for row in rows if row["land_cover"] not in classes), None)
            if unknown is not None:
                raise DataError(
                    f"{table}: {unknown['file']}'s land_cover {unknown['land_cover']!r} is not one of"
                    f" image_pretraining.classes ({', '.join(classes)}); name one of them"
                )
            land_covers = torch.tensor([list(classes).index(row["land_cover"]) for row in rows])
        clips = np.stack([load_audio(table.parent / row["file"]) for row in rows])
        return cls(log_mel(torch.from_numpy(clips)), [row["caption"] for row in rows], settings, land_covers)

    def losses(self, model: Sat2Sound, texts: TextCache, directions: Tensor | None) -> dict[str, Tensor]:
        """The terms by their log names, unweighted: captions, and with `directions` ((C, D), unit rows) the pull
        towards them. The audio tower normalises by its running statistics as it does for a query: normalised by
        these few recordings' own statistics, as training mode would, they tell apart in training and not in use."""
        device = model.logit_scale_at.device
        if self._inputs is None:
            # Once, at the first step (after that step's captions, so a fresh cache loads the backbone where a run
            # without this term loads it): all are constants of the run.
            tokens = texts.encode(self.captions)
            land_covers = None if self.land_covers is None else self.land_covers.to(device)
            self._inputs = (
                self.mel.to(device),
                TextTokens(tokens.hidden.to(device), tokens.mask.to(device)),
                land_covers,
            )
        mel, tokens, land_covers = self._inputs
        tower = model.audio_encoder
        training = tower.training
        tower.eval()
        try:
            audio = model.encode_audio(mel).embedding
        finally:
            tower.train(training)
        caption = model.encode_text(tokens.hidden, tokens.mask).embedding
        identity = torch.eye(len(self.captions), device=device)
        terms = {RECORDINGS_LOSS: symmetric_cross_entropy(similarity(audio, caption, model.logit_scale_at), identity)}
        if directions is not None and land_covers is not None:
            toward = directions[land_covers]
            cosines = torch.cat([F.cosine_similarity(audio, toward), F.cosine_similarity(caption, toward)])
            terms[DIRECTIONS_LOSS] = 1 - cosines.mean()
        return terms

    def weighted(self, terms: Mapping[str, Tensor]) -> Tensor:
        weights = {RECORDINGS_LOSS: self.settings.weight, DIRECTIONS_LOSS: self.settings.directions}
        return torch.stack([weights[name] * term for name, term in terms.items()]).sum()


def class_directions(head: nn.Linear) -> Tensor:
    """(C, D) unit rows: each class's row of a linear class head over the embedding, less the mean row. A softmax
    over the head's logits depends only on these differences."""
    rows = head.weight.detach()
    return l2_normalize(rows - rows.mean(dim=0, keepdim=True))


class Sat2SoundTraining(pl.LightningModule):
    """The model under training (submodule `model`, a plain `Sat2Sound`) and its data. `directions`, the image
    pretraining's class directions the recordings are pulled to, is a buffer, so a resumed run reads it back from
    its checkpoint (pass zeros of its shape then). `goals` (with `audio_prototypes`) gives each train pair's point
    its audio is drawn to."""

    def __init__(
        self,
        model: Sat2Sound,
        settings: TrainSettings,
        texts: TextCache,
        recordings: RecordingCaptions | None = None,
        splits: Splits | None = None,
        directions: Tensor | None = None,
        goals: AudioGoals | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.settings = settings
        self.texts = texts
        self.recordings = recordings
        self.goals = goals
        self.directions: Tensor | None
        self.register_buffer("directions", directions)
        self.train_pairs, self.val_pairs = open_splits(settings) if splits is None else splits
        self._val_outputs: list[PairEmbeddings] = []
        self._tick: float | None = None

    def train_dataloader(self) -> DataLoader:
        return train_loader(self.train_pairs, self.settings)

    def val_dataloader(self) -> DataLoader:
        return loader(self.val_pairs, self.settings, shuffle=False)

    def on_train_epoch_start(self) -> None:
        # Before the epoch's workers start: each draws its samples from (seed, epoch, index).
        self.train_pairs.set_epoch(self.current_epoch)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch  # moved in `_batch`, once the captions are encoded

    def _batch(self, batch: TrainBatch) -> Sat2SoundBatch:
        return model_batch(batch, self.texts, self.model.cfg, self.device)

    def training_step(self, batch: TrainBatch, batch_idx: int) -> Tensor:
        out = self.model(self._batch(batch))
        losses = self.model.loss(out)
        size = len(batch)
        parts = {"train/multimodal_loss": losses.multimodal_loss, "train/fdt_loss": losses.fdt_loss}
        loss = losses.loss
        if self.goals is not None:
            parts[AUDIO_PROTOTYPES_LOSS] = self.goals.loss(out.audio.embedding, batch, self.device)
            loss = loss + self.settings.audio_prototypes * parts[AUDIO_PROTOTYPES_LOSS]
        if self.recordings is not None:
            terms = self.recordings.losses(self.model, self.texts, self.directions)
            parts.update(terms)
            loss = loss + self.recordings.weighted(terms)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log_dict(parts, batch_size=size)
        now = time.perf_counter()
        if self._tick is not None:
            self.log("samples_per_s", size / max(now - self._tick, 1e-9), prog_bar=True, batch_size=size)
        self._tick = now
        return loss

    def validation_step(self, batch: TrainBatch, batch_idx: int) -> None:
        model_input = self._batch(batch)
        out = self.model(model_input)
        self.log("val/loss", self.model.loss(out).loss, batch_size=len(batch), sync_dist=True)
        self._val_outputs.append(pair_embeddings(out))

    def on_validation_epoch_end(self) -> None:
        if len(self._val_outputs) == 0:
            return
        embeddings = self._whole_split(concat(self._val_outputs))
        self._val_outputs.clear()
        if len(embeddings.image) < 2:
            return
        metrics = retrieval_metrics(embeddings.image, embeddings.audio, embeddings.audio_caption)
        plain = metrics["none"]
        self.log(MONITOR, (plain["I2S"]["recall"] + plain["S2I"]["recall"]) / 2, prog_bar=True, sync_dist=True)
        for setting, directions in metrics.items():
            for direction, values in directions.items():
                for name, value in values.items():
                    self.log(f"val/{setting}/{direction}/{name}", float(value), sync_dist=True)

    def _whole_split(self, local: PairEmbeddings) -> PairEmbeddings:
        """Every rank's embeddings in split order: the gallery is the whole split, as the reference evaluates.
        Under DDP, rank r held samples r, r + W, r + 2W, ... with the last ones repeated to even the ranks."""
        if self.trainer.world_size == 1:
            return local
        return PairEmbeddings(*(self._interleaved(column) for column in local))

    def _interleaved(self, column: Tensor) -> Tensor:
        gathered = self.all_gather(column.to(self.device))
        assert isinstance(gathered, Tensor)
        return gathered.cpu().transpose(0, 1).reshape(-1, column.shape[-1])[: len(self.val_pairs)]

    def trained_parameters(self) -> list[nn.Parameter]:
        """What the optimiser steps: the model's parameters but the frozen ones (the image side after its
        pretraining)."""
        return [param for param in self.model.parameters() if param.requires_grad]

    def configure_optimizers(self) -> Any:
        optim = self.settings.optim
        optimizer = torch.optim.AdamW(
            self.trained_parameters(),
            lr=optim.lr,
            betas=optim.betas,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
        )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=optim.restart_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Plain types and tensors only, so the checkpoint loads with weights_only=True.
        kind, keys, position, has_gauss, cached = np.random.get_state()
        checkpoint["rng"] = {
            "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(np.asarray(keys).copy()), position, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        checkpoint["sat2sound_config"] = self.model.cfg.to_dict()
        # A resumed run keeps the image side it pretrained: `check_resumable` refuses other pretraining settings.
        checkpoint["image_pretraining"] = self.settings.recipe()["image_pretraining"]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng")
        if not states:
            return
        random.setstate(states["python"])
        kind, keys, position, has_gauss, cached = states["numpy"]
        np.random.set_state((kind, keys.numpy(), position, has_gauss, cached))
        torch.set_rng_state(states["torch"])
        if states["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])


def image_side(model: Sat2Sound, tower: TowerSettings) -> list[nn.Parameter]:
    """What image pretraining teaches and then freezes: the image tower (ViT and projector), and with `codebook` the
    image's codebook queries and the codebook itself."""
    taught = list(model.satmae_backbone.parameters())
    if tower.codebook:
        taught += [*model.fdt.img_query_model.parameters(), model.fdt.space_dict]
    return taught


class ViewShares:
    """Each pair's class shares (`image_pretraining.shares`): every patch token, and the pooled embedding, learn
    the whole view's shares. The codebook pools tokens by their maximum, so each token must tell how much of each
    class the view holds, not only whether its own patch shows one."""

    def __init__(self, shares: Mapping[str, Tensor]) -> None:
        self.shares = shares

    @classmethod
    def read(cls, path: Path, keys: Sequence[str], classes: Sequence[str]) -> ViewShares:
        shares = read_class_shares(path, classes)
        missing = [key for key in keys if key not in shares]
        if missing:
            raise DataError(f"{path} has no row for pair {missing[0]!r} ({len(missing)} missing); add the train pairs")
        return cls(shares)

    def patches(self, batch: TrainBatch, device: torch.device) -> tuple[Tensor, Tensor]:
        """(B, 1, C) each view's shares, which every token learns alike, and (B, 1) validity (all)."""
        shares = torch.stack([self.shares[key] for key in batch.keys]).to(device)
        return shares[:, None, :], torch.ones(len(shares), 1, dtype=torch.bool, device=device)


class PatchShares:
    """Each pair's class raster (`image_pretraining.landcover`) averaged over the token grid's patches: every patch
    token learns its own patch's class shares (patches without imagery left out), the pooled embedding the view's
    shares (the mean over its patches). Taught per patch, a town's tokens are a town's wherever it lies, not tokens
    that learnt their view's context; taught the view's shares, the embedding tells how much of a class a view holds,
    not only whether some patch shows it."""

    def __init__(self, means: Mapping[str, Tensor]) -> None:
        self.means = means  # key -> (C, grid, grid) float: each class's raster averaged over each patch

    @classmethod
    def read(cls, folder: Path, keys: Sequence[str], classes: Sequence[str], grid: int) -> PatchShares:
        if not folder.is_dir():
            raise ConfigError(f"image_pretraining.landcover {folder} is not a folder; give the folder of class rasters")
        return cls({key: read_patch_means(folder / f"{key}.tif", classes, grid) for key in keys})

    def patches(self, batch: TrainBatch, device: torch.device) -> tuple[Tensor, Tensor]:
        """(B, T, C) shares of each token's patch, row by row as the tower orders its tokens, and (B, T) validity;
        each raster turned as its image was."""
        means = torch.stack(
            [dihedral_turn(self.means[key], int(turn)) for key, turn in zip(batch.keys, batch.turns, strict=True)]
        )
        means = means.flatten(2).transpose(1, 2).to(device)
        total = means.sum(dim=-1, keepdim=True)
        return means / total.clamp_min(1e-6), total[..., 0] > 0


def token_shares_loss(token_logits: Tensor, shares: Tensor, valid: Tensor) -> Tensor:
    """Soft cross-entropy of (B, T, C) token logits with a target's `patches` (shares and validity per token, or one
    row of each for all tokens alike), over the valid tokens."""
    valid = valid.expand(token_logits.shape[:2])
    return soft_cross_entropy(token_logits[valid], shares.expand_as(token_logits)[valid])


def mean_of_patches(shares: Tensor, valid: Tensor) -> Tensor:
    """(B, C) each view's shares: the mean of a target's `patches` over the valid ones."""
    return shares.masked_fill(~valid[..., None], 0.0).sum(dim=1) / valid.sum(dim=1, keepdim=True).clamp_min(1)


def class_prototypes(classes: int, dim: int) -> Tensor:
    """(classes, dim) orthonormal rows, the same in every run: each class's point in the embedding space, which
    `image_pretraining.prototypes` draws a view's pooled embedding towards, mixed by the view's shares."""
    generator = torch.Generator().manual_seed(PROTOTYPES_SEED)
    basis, _ = torch.linalg.qr(torch.randn(dim, classes, generator=generator))
    return basis.T.contiguous()


def prototypes_loss(embedding: Tensor, shares: Tensor, prototypes: Tensor) -> Tensor:
    """One minus the mean cosine of (B, D) normalised pooled embeddings with their views' points: the (C, D)
    `prototypes` mixed by the views' (B, C) shares."""
    goal = l2_normalize(shares @ prototypes.to(embedding))
    return 1 - (embedding * goal).sum(dim=-1).mean()


class AudioGoals:
    """Each train pair's point in the embedding space (`audio_prototypes`): the class prototypes the image
    pretraining drew the pooled image embedding to, mixed by the view's shares from the same target, so that a
    view's sound is drawn where its image was."""

    def __init__(self, shares: PatchShares | ViewShares, prototypes: Tensor) -> None:
        self.shares = shares
        self.prototypes = prototypes

    def loss(self, audio: Tensor, batch: TrainBatch, device: torch.device) -> Tensor:
        """`prototypes_loss` of the pairs' (B, D) audio embeddings."""
        shares = mean_of_patches(*self.shares.patches(batch, device))
        return prototypes_loss(l2_normalize(audio), shares, self.prototypes)


def read_patch_means(path: Path, classes: Sequence[str], grid: int) -> Tensor:
    """(C, grid, grid): the raster at `path` (one band per class, over the pair's image) averaged over grid x grid
    patches, as the tower cuts its input into tokens."""
    if not path.is_file():
        raise DataError(f"{path} does not exist; give every train pair a class raster <key>.tif")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as raster:
                names, bands = raster.descriptions, raster.read()
    except RasterioError as exc:
        raise DataError(f"{path} is not a readable raster ({first_line(exc)}); rewrite it as a GeoTIFF") from None
    if len(bands) != len(classes) or (all(names) and tuple(names) != tuple(classes)):
        named = f" ({', '.join(names)})" if all(names) else ""
        raise DataError(f"{path} has {len(bands)} bands{named}; image_pretraining.classes must name them in order")
    return F.adaptive_avg_pool2d(torch.from_numpy(bands.astype(np.float32)), grid)


class ImageTowerPretraining(pl.LightningModule):
    """The image side alone, every patch token taught land cover (`PatchShares`, `ViewShares`, or both) through a
    linear head per target that is dropped afterwards (soft cross-entropy). With `codebook`, the pooled embedding
    learns the view's shares by the first target too (one more head), and the main run aligns audio and text with
    image embeddings fixed by it."""

    def __init__(
        self,
        model: Sat2Sound,
        settings: TrainSettings,
        pairs: PairDataset | None = None,
        targets: list[PatchShares | ViewShares] | None = None,
    ) -> None:
        super().__init__()
        tower = settings.image_pretraining
        if tower.codebook and model.cfg.metadata:
            raise ConfigError(
                "image_pretraining.codebook teaches the codebook tokens without metadata fused in;"
                " use it with metadata_type none, or leave codebook off"
            )
        dim = model.cfg.codebook_dim
        if tower.prototypes and len(tower.classes) > dim:
            raise ConfigError(
                f"image_pretraining.prototypes gives each of {len(tower.classes)} classes its own direction of the"
                f" {dim}-d embedding; name at most {dim} classes, or leave prototypes 0"
            )
        self.tower = model.satmae_backbone
        self.gsd = model.ground_sample_distance
        self.settings = settings
        self.pairs = train_pairs(settings) if pairs is None else pairs
        self.targets = shares_targets(settings, self.pairs, model.cfg.vit.grid_size) if targets is None else targets
        # A head per target, made before the embedding's so that a run with one target draws its initial weights
        # in the order it always has (the shipped weights' recipe rebuilds to the same model).
        self.heads = nn.ModuleList(nn.Linear(model.cfg.fc_dim, len(tower.classes)) for _ in self.targets)
        self.embedding_head = nn.Linear(dim, len(tower.classes)) if tower.codebook else None
        self.prototypes = class_prototypes(len(tower.classes), dim) if tower.prototypes else None
        self.encode_image = model.fdt.encode_image
        # The model's own tensors, registered here so that the optimiser and DDP see them.
        self.taught = nn.ParameterList(image_side(model, tower))

    def train_dataloader(self) -> DataLoader:
        return train_loader(self.pairs, self.settings)

    def on_train_epoch_start(self) -> None:
        self.pairs.set_epoch(self.current_epoch)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch  # a frozen dataclass: its tensors are moved in `training_step`

    def training_step(self, batch: TrainBatch, batch_idx: int) -> Tensor:
        tokens = self.tower(batch.images.to(self.device), self.gsd(batch.zoom_level).to(self.device))
        patches = [targets.patches(batch, self.device) for targets in self.targets]
        losses = [token_shares_loss(head(tokens), *read) for head, read in zip(self.heads, patches, strict=True)]
        if self.embedding_head is not None:
            # The pooled embedding learns the first target's view shares.
            embedding = l2_normalize(self.encode_image(tokens).embedding)
            view = mean_of_patches(*patches[0])
            losses.append(soft_cross_entropy(self.embedding_head(embedding), view))
            if self.prototypes is not None:
                term = prototypes_loss(embedding, view, self.prototypes)
                self.log("image_pretraining/prototypes_loss", term, batch_size=len(batch))
                losses.append(self.settings.image_pretraining.prototypes * term)
        loss = torch.stack(losses).sum()
        self.log("image_pretraining/loss", loss, prog_bar=True, batch_size=len(batch))
        return loss

    def configure_optimizers(self) -> Any:
        tower = self.settings.image_pretraining
        optim = self.settings.optim
        return torch.optim.AdamW(
            self.parameters(), lr=tower.lr, betas=optim.betas, eps=optim.eps, weight_decay=tower.weight_decay
        )


def shares_targets(settings: TrainSettings, pairs: PairDataset, grid: int) -> list[PatchShares | ViewShares]:
    """The image pretraining's targets for the `pairs`: `landcover`'s (per patch of a grid x grid token grid),
    then `shares`'."""
    tower = settings.image_pretraining
    keys = pairs.source.pair_keys()
    targets: list[PatchShares | ViewShares] = []
    if tower.landcover is not None:
        targets.append(PatchShares.read(settings.in_data(tower.landcover), keys, tower.classes, grid))
    if tower.shares is not None:
        targets.append(ViewShares.read(settings.in_data(tower.shares), keys, tower.classes))
    return targets


def read_class_shares(path: Path, classes: Sequence[str]) -> dict[str, Tensor]:
    """Each key's class shares, in the order of `classes`, from the CSV at `path`."""
    fix = "give image_pretraining.shares a CSV of key and one column per class"
    rows = read_table(path, ("key", *classes), fix, DataError)
    shares = {}
    for line, row in enumerate(rows, start=2):
        try:
            values = [float(row[name]) for name in classes]
        except ValueError:
            raise DataError(f"{path} line {line}: class shares must be numbers") from None
        if not all(0.0 <= value <= 1.0 for value in values):
            raise DataError(f"{path} line {line}: class shares must lie in [0, 1]")
        shares[row["key"]] = torch.tensor(values)
    return shares


def pretrain_image_tower(
    model: Sat2Sound,
    settings: TrainSettings,
    launch: Launch,
    *,
    pairs: PairDataset,
    targets: list[PatchShares | ViewShares],
    **trainer_overrides: Any,
) -> Tensor | None:
    """`ImageTowerPretraining` on the train `pairs` for `image_pretraining.epochs`, logged beside the main run's
    logs; with `codebook`, it returns the classes' directions the recordings are pulled to: the points the pooled
    embedding was drawn to (`class_prototypes`) with `prototypes`, else the `class_directions` of its head. Its own
    root folder keeps the checkpoint Lightning saves when SLURM requeues the job (`hpc_ckpt_N.ckpt`) apart from the
    main run's: a fit without a checkpoint path resumes from the one in its root."""
    module = ImageTowerPretraining(model, settings, pairs, targets)
    logger = CSVLogger(settings.out_path / "logs", name="image_pretraining")
    options = {
        "max_epochs": settings.image_pretraining.epochs,
        "max_steps": -1,
        "logger": logger,
        "default_root_dir": settings.out_path / "image_pretraining",
    }
    trainer(settings, launch, [], **{**trainer_overrides, **options, "enable_checkpointing": False}).fit(module)
    if module.embedding_head is None:
        return None
    return module.prototypes if module.prototypes is not None else class_directions(module.embedding_head)


def initial_model(settings: TrainSettings) -> Sat2Sound:
    """The architecture of the settings, fresh, or the weights of `model.init` to go on from, trainable where a
    fresh model is (the STFT and mel matrices official checkpoints carry stay frozen)."""
    if settings.model.init is None:
        return Sat2Sound(settings.model_config())
    cfg, state_dict, _ = read_checkpoint(Path(settings.model.init))
    return build_model(settings.with_droprate(cfg), state_dict, source=settings.model.init, trainable=True)


def trainer(
    settings: TrainSettings, launch: Launch, checkpoints: Sequence[ModelCheckpoint], **overrides: Any
) -> pl.Trainer:
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
        "devices": launch.devices,
        "num_nodes": launch.num_nodes,
        "logger": [TensorBoardLogger(logs, name="tensorboard"), CSVLogger(logs, name="csv")],
        "callbacks": list(checkpoints),
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
    )


def last_checkpoint(settings: TrainSettings) -> ModelCheckpoint:
    """`last.ckpt` after every epoch (a monitored callback's `save_last` writes it only when a best one is saved)."""
    return ModelCheckpoint(
        dirpath=settings.out_path / CHECKPOINTS, filename=LAST.removesuffix(".ckpt"), enable_version_counter=False
    )


def resume_checkpoint(settings: TrainSettings) -> Path | None:
    """The main run's checkpoint that went furthest: the last epoch's, or one Lightning saved when SLURM requeued
    the job, possibly mid-epoch after it (Lightning itself looks at the latter only when given no path)."""
    found = [*settings.out_path.glob(REQUEUED), settings.out_path / CHECKPOINTS / LAST]
    steps = {path: step for path in found if path.is_file() and (step := checkpoint_step(path)) is not None}
    return max(steps, key=steps.__getitem__, default=None)


def check_resumable(path: Path, module: Sat2SoundTraining) -> None:
    """Refuse a checkpoint that the run these settings make cannot go on from: one of another architecture, with
    other state (`recordings.directions` turned on or off) or other trained parameters (`image_pretraining` turned
    on or off), where Lightning would stop at loading it with a traceback; or one whose image side was pretrained
    by other `image_pretraining` settings, which a resumed run would keep while its weights' config named these."""
    saved = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    state, made = saved["state_dict"], module.state_dict()
    held = sum(len(group["params"]) for group in saved["optimizer_states"][0]["param_groups"])
    trained = len(module.trained_parameters())
    pretraining = module.settings.recipe()["image_pretraining"]
    if lacked := sorted(made.keys() - state.keys()):
        detail = f"it lacks tensors these settings make ({len(lacked)}, e.g. {lacked[0]})"
    elif extra := sorted(state.keys() - made.keys()):
        detail = f"it holds tensors these settings do not make ({len(extra)}, e.g. {extra[0]})"
    elif reshaped := [key for key in sorted(made) if state[key].shape != made[key].shape]:
        key = reshaped[0]
        detail = f"{key} is {tuple(state[key].shape)} there, {tuple(made[key].shape)} here"
    elif held != trained:
        detail = f"it trains {held} parameter tensors, these settings {trained}"
    elif pretrained := list(
        config_changes(saved.get("image_pretraining", pretraining), pretraining, "image_pretraining.")
    ):
        detail = "its image side was pretrained otherwise: " + ", ".join(pretrained)
    else:
        return
    if changed := list(config_changes(saved.get("sat2sound_config", {}), module.model.cfg.to_dict())):
        detail += "; " + ", ".join(changed)
    raise ConfigError(
        f"{path} was saved by a run of other settings ({detail}); resume with that run's settings,"
        " or give out_dir a new folder"
    )


def config_changes(theirs: Mapping[str, Any], ours: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    """`NAME A there, B here` for each field of a model config (`Sat2SoundConfig.to_dict`) or a recipe section
    (`TrainSettings.recipe`) that differs from another's; nested fields by their dotted names."""
    for name, value in ours.items():
        if name not in theirs or theirs[name] == value:
            continue
        if isinstance(value, dict) and isinstance(theirs[name], dict):
            yield from config_changes(theirs[name], value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name} {theirs[name]!r} there, {value!r} here"


def checkpoint_step(path: Path) -> int | None:
    """The global step a checkpoint was saved at; None, with a warning, for one that cannot be read (a job killed
    while saving it)."""
    try:
        return int(torch.load(path, map_location="cpu", mmap=True, weights_only=True)["global_step"])
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as error:
        rank_zero_warn(f"{path} cannot be read ({first_line(error)}); resuming without it")
        return None


class TrainResult(NamedTuple):
    best: Path
    best_recall: float | None
    exported: list[Path]
    steps: int
    seconds: float
    global_zero: bool  # the process that exports and reports (the only one but under DDP)


def check_folders(settings: TrainSettings) -> None:
    """Refuse an out_dir, text_cache or mel_cache that no file can be written in."""
    if reason := unwritable_folder_reason(settings.out_path):
        raise ConfigError(f"cannot write in out_dir {settings.out_dir} ({reason}); give out_dir a writable folder")
    check_cache_folder(settings.text_cache_path, "text_cache")
    if settings.data.format == "folder":  # the Hub layouts store their log-mels
        check_cache_folder(settings.mel_cache_path, "mel_cache")


def check_cache_folder(folder: Path, setting: str) -> None:
    """Refuse a cache that cannot be made at `folder`. One that is there is taken as it is: it may be a shared,
    read-only cache that holds every entry already."""
    if not folder.is_dir() and (reason := unwritable_folder_reason(folder)):
        raise ConfigError(f"cannot keep {setting} in {folder} ({reason}); give {setting} a writable folder")


def check_training_batches(settings: TrainSettings, splits: Splits, launch: Launch) -> None:
    """Refuse a train split too small for one batch: Lightning would stop at once, leaving no checkpoint. And a val
    split too small for a retrieval gallery: it would log no validation recall to choose the best checkpoints by,
    failing the run after its first epoch (a val split of no pairs trains without validation)."""
    devices = launch.devices if isinstance(launch.devices, int) else max(cuda_devices(), 1)
    world = devices * launch.num_nodes
    # As the train loader batches: each process reads its share of the split (Lightning pads the shares to one
    # length) and drops the last, partial batch.
    if math.ceil(len(splits.train) / world) // settings.batch_size == 0:
        split = settings.data.train_split
        across = f" for {world} processes" if world > 1 else ""
        raise ConfigError(
            f"the {split} split holds {len(splits.train)} pairs{across}, too few for one batch of batch_size"
            f" {settings.batch_size}; lower batch_size or add {split} pairs"
        )
    if 0 < len(splits.val) < MIN_GALLERY:
        split = settings.data.val_split
        raise ConfigError(
            f"the {split} split holds {len(splits.val)} pair(s); validation retrieval needs a gallery of at least"
            f" {MIN_GALLERY}: add {split} pairs, or move its pairs to another split to train without validation"
        )


@contextmanager
def lightning_notices_muted() -> Iterator[None]:
    def not_a_tip(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(LIGHTNING_TIP)

    LIGHTNING_NOTICES.addFilter(not_a_tip)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", LEAFSPEC_DEPRECATED, FutureWarning)
            yield
    finally:
        LIGHTNING_NOTICES.removeFilter(not_a_tip)


@lightning_notices_muted()
def train(settings: TrainSettings, **trainer_overrides: Any) -> TrainResult:
    """Train (resuming from the run's furthest checkpoint when there is one) and export the best weights. What
    the settings, data or launch make impossible is refused before any work."""
    check_folders(settings)
    launch = training_launch(settings.devices)
    splits = open_splits(settings)
    check_training_batches(settings, splits, launch)
    if launch.note:
        rank_zero_info(launch.note)
    pl.seed_everything(settings.seed, workers=True, verbose=False)
    model = initial_model(settings)
    check_text_backbone(settings.model.text_backbone, model.cfg.text_dim)
    tower = settings.image_pretraining
    # Before pretraining: a bad table is refused at once.
    recordings = RecordingCaptions.read(settings.recordings, tower.classes)
    last = settings.out_path / CHECKPOINTS / LAST
    resume = resume_checkpoint(settings)
    started = time.perf_counter()
    directions = None
    targets: list[PatchShares | ViewShares] = []
    if tower.enabled:
        # Read once for the pretraining and the audio's goals; a resumed run's checkpoint holds the taught tower.
        if resume is None or settings.audio_prototypes:
            targets = shares_targets(settings, splits.train, model.cfg.vit.grid_size)
        if resume is None:
            directions = pretrain_image_tower(
                model, settings, launch, pairs=splits.train, targets=targets, **trainer_overrides
            )
        for param in image_side(model, tower):
            param.requires_grad_(False)
    pulled = None  # the directions the recordings are pulled to
    if settings.recordings.directions:
        # A resumed run reads them back from its checkpoint into these zeros.
        pulled = torch.zeros(len(tower.classes), model.cfg.codebook_dim) if directions is None else directions
    goals = None
    if settings.audio_prototypes:  # which needs image_pretraining.prototypes, so targets were read
        goals = AudioGoals(targets[0], class_prototypes(len(tower.classes), model.cfg.codebook_dim))
    texts = text_cache(settings, model.cfg.text_dim)
    module = Sat2SoundTraining(model, settings, texts, recordings, splits, pulled, goals)
    if resume is not None:
        check_resumable(resume, module)
    checkpoints = best_checkpoints(settings)
    fit = trainer(settings, launch, [checkpoints, last_checkpoint(settings)], **trainer_overrides)
    fit.fit(module, ckpt_path=resume)
    best = Path(checkpoints.best_model_path) if checkpoints.best_model_path else last
    chosen = best if settings.export == "best" else last
    exported = []
    if fit.is_global_zero:
        state = torch.load(chosen, map_location="cpu", weights_only=True)["state_dict"]
        exported = export(state, model, settings, chosen)
    score = checkpoints.best_model_score
    seconds = time.perf_counter() - started
    recall = None if score is None else float(score)
    return TrainResult(best, recall, exported, fit.global_step, seconds, fit.is_global_zero)


def export(module_state: dict[str, Tensor], model: Sat2Sound, settings: TrainSettings, source: Path) -> list[Path]:
    """`<out_dir>/model.safetensors` (+ `.json`), and upstream's `.ckpt` layout when its hyper-parameters
    describe the model whole (the full architecture)."""
    # The module's other state (the recordings' directions) is the run's, not the model's.
    weights = {key.removeprefix("model."): value for key, value in module_state.items() if key.startswith("model.")}
    model.load_state_dict(weights)
    hparams = upstream_hparams(settings, model.cfg)
    provenance = {
        "trained_by": "python -m model train",
        "from_checkpoint": source.name,
        DESCRIPTION_KEY: settings.description,
        "training": settings.recipe(),
    }
    written = list(save_safetensors(model, settings.out_path / f"{EXPORT_NAME}.safetensors", hparams, provenance))
    if Sat2SoundConfig.from_hparams(hparams) == model.cfg:
        target = settings.out_path / f"{EXPORT_NAME}.ckpt"
        with atomic_path(target) as tmp:
            torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams}, tmp)
        written.append(target)
    return written


def upstream_hparams(settings: TrainSettings, cfg: Sat2SoundConfig) -> dict[str, Any]:
    """The hyper-parameters under upstream's names: those that shape the model, and the training ones."""
    optim = settings.optim
    return {
        "fc_dim": cfg.fc_dim,
        "codebook_dim": cfg.codebook_dim,
        "codebook_size": cfg.codebook_size,
        "sat_type": cfg.sat_type,
        "metadata_type": cfg.metadata_type,
        "combined_modality_loss": int(cfg.combined_modality_loss),
        "fdt_weight": cfg.fdt_weight,
        "pseudo_match_alpha": cfg.pseudo_match_alpha,
        "meta_droprate": cfg.meta_droprate,
        "learning_rate": optim.lr,
        "weight_decay": optim.weight_decay,
        "warm_up_iterations": optim.restart_steps,
        "batch_size": settings.batch_size,
    }


@torch.inference_mode()
def split_embeddings(
    model: Sat2Sound, texts: TextCache, data: DataSettings, split: str, batch_size: int = 64
) -> PairEmbeddings:
    """Every pair of `split` through the evaluation transform and the model (in eval mode), normalised."""
    source = open_pairs(data, split)
    if len(source) < MIN_GALLERY:
        raise DataError(
            f"the {split} split of {data.root} holds {len(source)} pair(s); retrieval needs a gallery of at least"
            f" {MIN_GALLERY}: add pairs to it or evaluate another split"
        )
    pairs = PairDataset(source, transform_for(source, data, train=False))
    loader = DataLoader(pairs, batch_size=batch_size, collate_fn=collate, num_workers=data.num_workers)
    model.eval()
    device = next(model.parameters()).device
    return concat(pair_embeddings(model(model_batch(batch, texts, model.cfg, device))) for batch in loader)

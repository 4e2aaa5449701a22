"""Galleries and builds for the gallery and listen tests: a build folder around a synthetic store whose model is
the demo model (so that a gallery of its weights fits it), galleries written from known vectors without a model,
and a stand-in text-to-audio model."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from model import sha256_file
from pipeline.gallery import AUDIO, CAPTION, write_gallery
from pipeline.gallery_sources import GalleryItem, folder_items
from pipeline.model_setup import ModelRecord
from support.paths import REPO
from support.synthetic_store import DEFAULT_QUERIES, write_synthetic_store

DEMO_WEIGHTS = REPO / "model" / "weights" / "demo.safetensors"
SOUNDS = REPO / "examples" / "sounds"
DEMO_DIM = 64  # the demo model's embedding width
LOGIT_SCALES = {AUDIO: 2.6, CAPTION: 2.5}


@cache
def demo_record() -> ModelRecord:
    return ModelRecord(str(DEMO_WEIGHTS), str(DEMO_WEIGHTS), sha256_file(DEMO_WEIGHTS), False, "sentinel", "none")


def listen_build(folder: Path, gallery: Path | None = None, seed: int = 0) -> Path:
    """A folder laid out as a finished build of the demo model around a synthetic store, `gallery` its own."""
    folder.mkdir(parents=True, exist_ok=True)
    write_synthetic_store(folder / "soundscape.zarr", dim=DEMO_DIM, seed=seed, model=demo_record(), gallery=gallery)
    (folder / "model.json").write_text(json.dumps(demo_record()._asdict()))
    queries = [{key: value for key, value in vars(query).items() if value is not None} for query in DEFAULT_QUERIES]
    settings: dict[str, Any] = {"name": "synthetic", "region": "2.1,48.9,2.6,49.0", "queries": queries}
    if gallery is not None:
        settings["outputs"] = {"gallery": str(gallery)}
    (folder / "settings.json").write_text(json.dumps(settings))
    return folder


def unit_rows(count: int, dim: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def shipped_items(count: int) -> list[GalleryItem]:
    """`count` items that are the shipped recordings over and over, each with an id of its own."""
    items = folder_items(SOUNDS, None)
    return [replace(items[i % len(items)], id=f"{i}-{items[i % len(items)].id}", seconds=1.0) for i in range(count)]


def vector_gallery(folder: Path, count: int, seed: int = 0, sha256: str | None = None) -> dict[str, np.ndarray]:
    """A gallery of the shipped recordings with random unit embeddings (no model), and those embeddings."""
    embeddings = {AUDIO: unit_rows(count, DEMO_DIM, seed), CAPTION: unit_rows(count, DEMO_DIM, seed + 1)}
    folder.mkdir(parents=True, exist_ok=True)
    checksum = demo_record().sha256 if sha256 is None else sha256
    write_gallery(folder, shipped_items(count), embeddings, str(DEMO_WEIGHTS), checksum, LOGIT_SCALES)
    return embeddings


class ToneGenerator:
    """A stand-in text-to-audio model: a tone whose pitch follows the prompt; it keeps every prompt it was given."""

    sample_rate = 16_000
    prompts: ClassVar[list[str]] = []

    def generate(self, prompt: str, seconds: float) -> np.ndarray:
        ToneGenerator.prompts.append(prompt)
        pitch = 200.0 + sum(prompt.encode()) % 600
        time = np.arange(round(seconds * self.sample_rate)) / self.sample_rate
        return (0.3 * np.sin(2 * np.pi * pitch * time)).astype(np.float32)


class NotAGenerator:
    """Lacks `generate`."""

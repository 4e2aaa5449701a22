"""Audio front end of Sat2Sound: file decoding, 10 s clipping and the HTS-AT log-mel spectrogram.

Nothing here is learned. `log_mel` reproduces upstream's torchlibrosa path (a Conv1d DFT with a periodic
Hann window, power spectrum, librosa's Slaney mel filterbank, 10*log10 with a 1e-10 floor) so its output
can be fed to `model.htsat.HTSATAudioEncoder` as the official model saw it in training.
"""

from __future__ import annotations

import math
import os
import struct
from functools import cache
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile
import soxr
import torch
import torch.nn.functional as F
from torch import Tensor

from model.errors import AudioDecodeError, InputError, first_line

SAMPLE_RATE = 32_000
CLIP_SECONDS = 10
CLIP_SAMPLES = SAMPLE_RATE * CLIP_SECONDS
N_FFT = 1024
HOP_LENGTH = 320
N_FREQ_BINS = N_FFT // 2 + 1
N_MELS = 64
F_MIN_HZ = 50.0
F_MAX_HZ = 14_000.0
POWER_FLOOR = 1e-10
DECODE_BLOCK_FRAMES = 1 << 16
# WAV writers that stream put one of these in the data chunk's size field: the length is not declared.
WAV_UNDECLARED_SIZES = (0, 0xFFFFFFFF)
N_FRAMES = 1 + CLIP_SAMPLES // HOP_LENGTH
# Extra input decoded past the clip end so the resampler's filter tail does not reach the kept samples.
RESAMPLER_MARGIN_SECONDS = 0.1

# Slaney mel scale (librosa's default): linear below 1 kHz, logarithmic above.
_SLANEY_HZ_PER_MEL = 200.0 / 3
_SLANEY_LOG_START_HZ = 1000.0
_SLANEY_LOG_START_MEL = _SLANEY_LOG_START_HZ / _SLANEY_HZ_PER_MEL
_SLANEY_LOG_STEP = math.log(6.4) / 27.0


def dft_kernels(n_fft: int = N_FFT) -> tuple[Tensor, Tensor]:
    """Real and imaginary (n_fft//2+1, 1, n_fft) float32 Conv1d kernels: periodic Hann times cos / -sin."""
    sample = torch.arange(n_fft, dtype=torch.float64)
    hann = 0.5 - 0.5 * torch.cos(2.0 * math.pi * sample / n_fft)
    # k·n reduced modulo n_fft in integers keeps every angle below 2π before the float64 cos/sin.
    phase = torch.remainder(torch.arange(n_fft // 2 + 1)[:, None] * torch.arange(n_fft)[None, :], n_fft)
    angle = 2.0 * math.pi * phase.to(torch.float64) / n_fft
    real = (torch.cos(angle) * hann).to(torch.float32)
    imag = (-torch.sin(angle) * hann).to(torch.float32)
    return real[:, None, :].contiguous(), imag[:, None, :].contiguous()


def _hz_to_slaney_mel(hz: float) -> float:
    if hz >= _SLANEY_LOG_START_HZ:
        return _SLANEY_LOG_START_MEL + math.log(hz / _SLANEY_LOG_START_HZ) / _SLANEY_LOG_STEP
    return hz / _SLANEY_HZ_PER_MEL


def _slaney_mel_to_hz(mel: float) -> float:
    if mel >= _SLANEY_LOG_START_MEL:
        return _SLANEY_LOG_START_HZ * math.exp(_SLANEY_LOG_STEP * (mel - _SLANEY_LOG_START_MEL))
    return _SLANEY_HZ_PER_MEL * mel


def slaney_mel_filterbank(
    sample_rate: int = SAMPLE_RATE,
    n_fft: int = N_FFT,
    n_mels: int = N_MELS,
    f_min: float = F_MIN_HZ,
    f_max: float = F_MAX_HZ,
) -> Tensor:
    """(n_fft//2+1, n_mels) float32 triangular filters with Slaney area normalisation, as librosa builds them.

    The rounding follows librosa step by step (linspace edges, float32 triangles scaled by a float64 norm),
    which makes the matrix bit-identical to the `melW` stored in official checkpoints.
    """
    bin_hz = np.arange(n_fft // 2 + 1, dtype=np.float64) * (sample_rate / n_fft)
    mel_low, mel_high = _hz_to_slaney_mel(f_min), _hz_to_slaney_mel(f_max)
    mel_step = (mel_high - mel_low) / (n_mels + 1)
    edge_mels = [mel_low + i * mel_step for i in range(n_mels + 1)] + [mel_high]
    edge_hz = np.array([_slaney_mel_to_hz(mel) for mel in edge_mels])
    edge_gap = np.diff(edge_hz)
    offset = edge_hz[:, None] - bin_hz[None, :]
    rising = -offset[:-2] / edge_gap[:-1, None]
    falling = offset[2:] / edge_gap[1:, None]
    triangles = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
    area_norm = 2.0 / (edge_hz[2:] - edge_hz[:-2])
    weights = (triangles.astype(np.float64) * area_norm[:, None]).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(weights.T))


@cache
def _front_end_matrices() -> tuple[Tensor, Tensor]:
    """Stacked [real; imag] DFT kernels (2*bins, 1, n_fft) and the mel matrix (bins, mels), built once."""
    real, imag = dft_kernels()
    return torch.cat([real, imag]), slaney_mel_filterbank()


def log_mel(waveform: Tensor) -> Tensor:
    """(B, N) float waveforms at 32 kHz -> (B, 1, 1 + N // 320, 64) log-mel in dB (1001 frames for 10 s)."""
    if waveform.ndim != 2 or not waveform.is_floating_point():
        raise InputError(
            f"log_mel takes a (batch, samples) float tensor, got {tuple(waveform.shape)} {waveform.dtype};"
            " stack mono clips from load_audio into one float32 tensor"
        )
    if waveform.shape[1] <= N_FFT // 2:
        raise InputError(
            f"waveforms of {waveform.shape[1]} samples are too short for the STFT; pad them to 10 s with fit_clip"
        )
    kernels, mel_matrix = (m.to(waveform.device) for m in _front_end_matrices())
    padded = F.pad(waveform.to(torch.float32)[:, None, :], (N_FFT // 2, N_FFT // 2), mode="reflect")
    spectrum = F.conv1d(padded, kernels, stride=HOP_LENGTH)
    real, imag = spectrum[:, :N_FREQ_BINS], spectrum[:, N_FREQ_BINS:]
    power = (real**2 + imag**2).transpose(1, 2)
    mel_power = torch.matmul(power, mel_matrix)
    return (10.0 * torch.log10(torch.clamp(mel_power, min=POWER_FLOOR)))[:, None]


def fit_clip(waveform: np.ndarray) -> np.ndarray:
    """Crop (from sample 0) or zero-pad at the end the last axis to exactly CLIP_SAMPLES."""
    length = waveform.shape[-1]
    if length >= CLIP_SAMPLES:
        return waveform[..., :CLIP_SAMPLES]
    padding = [(0, 0)] * (waveform.ndim - 1) + [(0, CLIP_SAMPLES - length)]
    return np.pad(waveform, padding)


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
    samples at 32 kHz; only that much of the file is decoded."""
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
        raise AudioDecodeError(
            f"cannot decode {name} ({first_line(exc)}); convert it to WAV, FLAC, OGG or MP3"
        ) from None
    if samples.shape[0] == 0:
        raise AudioDecodeError(f"{name} holds no samples; use a file with at least some audio")
    return resample(samples.mean(axis=1, dtype=np.float32), rate)[: round(seconds * SAMPLE_RATE)]


def check_audio_file(path: str | os.PathLike[str]) -> None:
    """Raise AudioDecodeError unless `path` decodes to at least one frame and holds all the audio its header
    declares: a WAV cut short by a failed copy opens and decodes without complaint, only shorter."""
    path = Path(path)
    if not path.is_file():
        raise AudioDecodeError(f"audio file {path} does not exist; check the path")
    try:
        with soundfile.SoundFile(path) as audio_file:
            declared, kind = audio_file.frames, audio_file.format
            decoded = sum(len(block) for block in audio_file.blocks(DECODE_BLOCK_FRAMES, dtype="float32"))
    except (RuntimeError, OSError) as exc:
        raise AudioDecodeError(
            f"cannot read {path} as audio ({first_line(exc)}); check the file or convert it to WAV, FLAC, OGG or MP3"
        ) from None
    if decoded == 0:
        raise AudioDecodeError(f"audio file {path} holds no samples; use a file with at least some audio")
    again = "copy or export it again"
    # Without a Xing header an MP3's frame count is estimated from its bit rate, so it cannot show a cut.
    if decoded < declared and kind != "MP3":
        raise AudioDecodeError(
            f"audio file {path} is truncated: its header declares {declared:,} frames but {decoded:,} decode; {again}"
        )
    if kind == "WAV":
        sizes = _wav_data_sizes(path)
        if sizes is not None and sizes[1] < sizes[0]:
            raise AudioDecodeError(
                f"audio file {path} is truncated: its header declares {sizes[0]:,} bytes of audio but the file"
                f" holds {sizes[1]:,}; {again}"
            )


def _wav_data_sizes(path: Path) -> tuple[int, int] | None:
    """The bytes a RIFF/RIFX WAV's data chunk declares and those the file holds; None where it declares none."""
    size = path.stat().st_size
    with open(path, "rb") as wav:
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

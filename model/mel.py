"""The HTS-AT log-mel spectrogram of Sat2Sound, on any torch device.

Nothing here is learned. `log_mel` reproduces upstream's torchlibrosa path (a Conv1d DFT with a periodic
Hann window, power spectrum, librosa's Slaney mel filterbank, 10*log10 with a 1e-10 floor) so its output
can be fed to `model.htsat.HTSATAudioEncoder` as the official model saw it in training.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from model.audio import HOP_LENGTH, N_FFT, N_MELS, SAMPLE_RATE
from model.errors import InputError

N_FREQ_BINS = N_FFT // 2 + 1
F_MIN_HZ = 50.0
F_MAX_HZ = 14_000.0
POWER_FLOOR = 1e-10

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

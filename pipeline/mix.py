"""Mixing recordings into one track: loudness-normalised clips, looped or trimmed with crossfades, weighted and
summed, the sum brought to a target loudness and never clipped.

Loudness is integrated loudness after EBU R128 / ITU-R BS.1770 (K-weighting, 400 ms gated blocks), measured with
`pyloudnorm`. Every clip is first fitted to the track's length (looped with equal-power crossfades where shorter,
trimmed where longer), then brought to the target loudness, so a clip's weight, not its recording level, sets
its share of the mix. The mix is brought to the target too; where that would put a sample above PEAK_CEILING, the
whole track is turned down to it instead (its loudness, measured again, is then below the target), so no sample
reaches full scale. Tracks are mono at the model's sample rate (32 kHz).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pyloudnorm

from model.audio import SAMPLE_RATE

# The highest sample a track may hold: -1 dBFS, the headroom EBU R128 asks of true peaks.
PEAK_CEILING_DBFS = -1.0
PEAK_CEILING = 10 ** (PEAK_CEILING_DBFS / 20)
# The targets a track can be brought to: BS.1770's absolute gate (the meter hears nothing quieter) up to the
# ceiling (a louder one would always be turned down).
LOUDNESS_RANGE_LUFS = (-70.0, PEAK_CEILING_DBFS)
CROSSFADE_SECONDS = 1.0
# Fades at a track's ends, so that it starts and stops without a click.
EDGE_FADE_SECONDS = 0.05


def measured_loudness(samples: np.ndarray) -> float:
    """Integrated loudness (LUFS) of mono samples at SAMPLE_RATE; -inf for silence, and for fewer samples than the
    meter's one gating block (0.4 s) measures."""
    meter = pyloudnorm.Meter(SAMPLE_RATE)
    if len(samples) <= meter.block_size * SAMPLE_RATE:
        return -math.inf
    return float(meter.integrated_loudness(np.asarray(samples, dtype=np.float64)))


def to_loudness(samples: np.ndarray, target_lufs: float) -> np.ndarray:
    """`samples` scaled to `target_lufs` (unchanged where silent)."""
    loudness = measured_loudness(samples)
    if not np.isfinite(loudness):
        return samples
    return (samples * 10 ** ((target_lufs - loudness) / 20)).astype(np.float32)


def crossfade_join(first: np.ndarray, second: np.ndarray, overlap: int) -> np.ndarray:
    """`first` then `second`, the last `overlap` samples of one faded into the first of the other at equal power."""
    overlap = min(overlap, len(first), len(second))
    if overlap == 0:
        return np.concatenate([first, second])
    angle = np.linspace(0.0, np.pi / 2, overlap, dtype=np.float32)
    blended = first[len(first) - overlap :] * np.cos(angle) + second[:overlap] * np.sin(angle)
    return np.concatenate([first[: len(first) - overlap], blended, second[overlap:]]).astype(np.float32)


def fit_length(samples: np.ndarray, length: int, crossfade: int) -> np.ndarray:
    """`samples` trimmed to `length`, or looped to it, each repeat crossfaded over at most half the clip."""
    if len(samples) >= length:
        return samples[:length]
    overlap = min(crossfade, len(samples) // 2)
    looped = samples
    while len(looped) < length:
        looped = crossfade_join(looped, samples, overlap)
    return looped[:length]


def softmax(values: np.ndarray) -> np.ndarray:
    shifted = np.exp(values - np.max(values))
    return shifted / shifted.sum()


def mix(clips: Sequence[np.ndarray], weights: Sequence[float], length: int, target_lufs: float) -> np.ndarray:
    """The clips, each fitted to `length` samples and brought to `target_lufs`, summed with `weights`."""
    crossfade = round(CROSSFADE_SECONDS * SAMPLE_RATE)
    track = np.zeros(length, np.float32)
    for clip, weight in zip(clips, weights, strict=True):
        track += np.float32(weight) * to_loudness(fit_length(clip, length, crossfade), target_lufs)
    return track


def mastered(track: np.ndarray, target_lufs: float) -> np.ndarray:
    """The track at `target_lufs`, turned down where a sample would pass PEAK_CEILING, with faded ends."""
    track = to_loudness(track, target_lufs)
    peak = float(np.max(np.abs(track), initial=0.0))
    if peak > PEAK_CEILING:
        track = track * np.float32(PEAK_CEILING / peak)
    edge = min(round(EDGE_FADE_SECONDS * SAMPLE_RATE), len(track) // 2)
    ramp = np.linspace(0.0, 1.0, edge, dtype=np.float32)
    track = track.copy()
    track[:edge] *= ramp
    track[len(track) - edge :] *= ramp[::-1]
    return track.astype(np.float32)

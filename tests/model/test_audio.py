"""Audio branch: HTS-AT checkpoint layout and output parity with upstream, the log-mel front end, and file
loading (formats, resampling, downmix, clip length, decode errors)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
import torch
from support.upstream_ckpt import tensor_sha256

from model.audio import (
    CLIP_SAMPLES,
    N_FRAMES,
    N_MELS,
    SAMPLE_RATE,
    check_audio_file,
    fit_clip,
    load_audio,
)
from model.config import HTSATConfig
from model.errors import AudioDecodeError, InputError
from model.htsat import HTSATAudioEncoder
from model.mel import log_mel

PARITY_CONFIG = "bingmap_nometa"
AUDIO_PREFIX = "audio_encoder."
TINY_CONFIG = HTSATConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))
TONE_HZ = 1000.0
TONE_AMPLITUDE = 0.5


def tone(rate: int, seconds: float, hz: float = TONE_HZ) -> np.ndarray:
    return (TONE_AMPLITUDE * np.sin(2 * np.pi * hz * np.arange(round(rate * seconds)) / rate)).astype(np.float32)


def dominant_frequency(clip: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(clip * np.hanning(len(clip))))
    return float(np.argmax(spectrum)) * SAMPLE_RATE / len(clip)


def rms(clip: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(clip, dtype=np.float64))))


@pytest.fixture(scope="module")
def tiny_encoder() -> HTSATAudioEncoder:
    torch.manual_seed(0)
    return HTSATAudioEncoder(TINY_CONFIG).eval()


# --- HTS-AT encoder -----------------------------------------------------------------------------------


def test_state_dict_layout_and_fixed_tensors_match_upstream(manifest: dict[str, Any]) -> None:
    entry = manifest["configs"][PARITY_CONFIG]
    expected = [
        (key.removeprefix(AUDIO_PREFIX), tuple(shape), dtype)
        for key, shape, dtype in entry["state_dict"]
        if key.startswith(AUDIO_PREFIX)
    ]
    state = HTSATAudioEncoder(HTSATConfig()).state_dict(keep_vars=True)
    got = [(key, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")) for key, tensor in state.items()]
    assert got == expected
    assert len(got) == 200

    # Architecture-fixed tensors are built, not loaded: they must equal upstream's bytes as recorded.
    front_end = [key for key in entry["tensor_sha256"] if ".audio_feats_extractor." in key]
    fixed = [key for key in entry["buffer_keys"] if not key.endswith(("running_mean", "running_var"))]
    assert len(front_end) == 3 and len(fixed) == 18
    for key in front_end + fixed:
        assert tensor_sha256(state[key.removeprefix(AUDIO_PREFIX)]) == entry["tensor_sha256"][key], key
    assert not any(state[key.removeprefix(AUDIO_PREFIX)].requires_grad for key in front_end)


@pytest.mark.slow
def test_audio_tokens_match_upstream(
    upstream_state_dict: Callable[[str], OrderedDict[str, torch.Tensor]], parity: dict[str, np.ndarray]
) -> None:
    weights = OrderedDict(
        (key.removeprefix(AUDIO_PREFIX), tensor)
        for key, tensor in upstream_state_dict(PARITY_CONFIG).items()
        if key.startswith(AUDIO_PREFIX)
    )
    encoder = HTSATAudioEncoder(HTSATConfig()).eval()
    encoder.load_state_dict(weights, strict=True)
    with torch.inference_mode():
        tokens = encoder(torch.from_numpy(parity["in/mel"]))
    expected = torch.from_numpy(parity["inter/audio_tokens"])
    assert tokens.shape == expected.shape == (4, 32, 768)
    torch.testing.assert_close(tokens, expected, atol=1e-4, rtol=1e-4)


def test_tiny_config_gives_32_tokens_per_clip_independent_of_batch(tiny_encoder: HTSATAudioEncoder) -> None:
    mel = torch.randn(3, 1, N_FRAMES, N_MELS) * 10.0
    with torch.inference_mode():
        batched = tiny_encoder(mel)
        single = tiny_encoder(mel[1:2])
    assert batched.shape == (3, 32, TINY_CONFIG.out_dim) == (3, 32, 128)
    assert torch.isfinite(batched).all()
    torch.testing.assert_close(batched[1:2], single, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched[0], batched[1])


@pytest.mark.parametrize("shape", [(2, 64, N_FRAMES), (2, 1, N_FRAMES, 32), (2, 1, 1025, N_MELS)])
def test_encoder_rejects_badly_shaped_features(tiny_encoder: HTSATAudioEncoder, shape: tuple[int, ...]) -> None:
    with pytest.raises(InputError):
        tiny_encoder(torch.zeros(shape))


# --- log-mel front end --------------------------------------------------------------------------------


def test_log_mel_matches_upstream(parity: dict[str, np.ndarray]) -> None:
    waveform = torch.from_numpy(parity["in/waveform_int16"].astype(np.float32) / 32768)
    mel = log_mel(waveform)
    expected = torch.from_numpy(parity["in/mel"])
    assert mel.shape == expected.shape == (4, 1, N_FRAMES, N_MELS)
    torch.testing.assert_close(mel, expected, atol=1e-3, rtol=0.0)


def test_log_mel_puts_a_tone_in_the_right_band() -> None:
    # 66 band edges are evenly spaced in Slaney mel from 0.75 (50 Hz) to 53.39 (14 kHz), 0.81 apart; band i
    # peaks at edge i+1. 1 kHz is 15 mel, so band 17 (peak 15.32 mel, 1022 Hz) responds most.
    mel = log_mel(torch.from_numpy(tone(SAMPLE_RATE, 10.0))[None])
    assert int(mel[0, 0, N_FRAMES // 2].argmax()) == 17


@pytest.mark.parametrize(
    "waveform", [torch.zeros(CLIP_SAMPLES), torch.zeros(2, 100), torch.zeros(2, 1000, dtype=torch.int16)]
)
def test_log_mel_rejects_unusable_waveforms(waveform: torch.Tensor) -> None:
    with pytest.raises(InputError):
        log_mel(waveform)


# --- clip length ----------------------------------------------------------------------------------------


def test_fit_clip_crops_from_start_and_zero_pads_at_end() -> None:
    long = np.arange(CLIP_SAMPLES + 5, dtype=np.float32)
    np.testing.assert_array_equal(fit_clip(long), long[:CLIP_SAMPLES])
    short = np.ones((2, 7), dtype=np.float32)
    padded = fit_clip(short)
    assert padded.shape == (2, CLIP_SAMPLES)
    assert padded[:, :7].sum() == 14.0 and not padded[:, 7:].any()


# --- file loading ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("suffix", "subtype", "atol"), [("wav", "FLOAT", 0.0), ("flac", "PCM_16", 1 / 32768)])
def test_load_audio_round_trips_lossless_files(tmp_path: Path, suffix: str, subtype: str, atol: float) -> None:
    clip = (np.random.default_rng(0).uniform(-0.5, 0.5, CLIP_SAMPLES)).astype(np.float32)
    path = tmp_path / f"clip.{suffix}"
    soundfile.write(path, clip, SAMPLE_RATE, subtype=subtype)
    loaded = load_audio(path)
    assert loaded.dtype == np.float32 and loaded.shape == (CLIP_SAMPLES,)
    np.testing.assert_allclose(loaded, clip, rtol=0.0, atol=atol)


@pytest.mark.parametrize("suffix", ["ogg", "mp3"])
def test_load_audio_decodes_lossy_files(tmp_path: Path, suffix: str) -> None:
    if suffix == "mp3" and "MP3" not in soundfile.available_formats():
        pytest.skip("this libsndfile build has no MP3 support")
    path = tmp_path / f"tone.{suffix}"
    soundfile.write(path, tone(SAMPLE_RATE, 10.0), SAMPLE_RATE)
    loaded = load_audio(path)
    assert loaded.dtype == np.float32 and loaded.shape == (CLIP_SAMPLES,)
    assert dominant_frequency(loaded) == pytest.approx(TONE_HZ, abs=0.5)
    # libsndfile's MP3 encode/decode round trip comes back about 1 dB quieter.
    assert rms(loaded) == pytest.approx(TONE_AMPLITUDE / np.sqrt(2), rel=0.15)


@pytest.mark.parametrize("rate", [44_100, 16_000])
def test_load_audio_resamples_to_32k(tmp_path: Path, rate: int) -> None:
    path = tmp_path / f"tone_{rate}.wav"
    soundfile.write(path, tone(rate, 10.0), rate, subtype="FLOAT")
    loaded = load_audio(path)
    assert loaded.shape == (CLIP_SAMPLES,)
    assert dominant_frequency(loaded) == pytest.approx(TONE_HZ, abs=0.5)
    # Away from the clip edges the resampled tone is the same tone sampled at 32 kHz, phase included.
    inner = slice(SAMPLE_RATE // 10, CLIP_SAMPLES - SAMPLE_RATE // 10)
    np.testing.assert_allclose(loaded[inner], tone(SAMPLE_RATE, 10.0)[inner], atol=1e-4)


def test_load_audio_averages_channels(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    stereo = rng.uniform(-0.5, 0.5, (CLIP_SAMPLES, 2)).astype(np.float32)
    path = tmp_path / "stereo.wav"
    soundfile.write(path, stereo, SAMPLE_RATE, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(path), stereo.mean(axis=1), rtol=0.0, atol=1e-7)


@pytest.mark.parametrize("seconds", [2.5, 12.0])
def test_load_audio_keeps_the_first_ten_seconds(tmp_path: Path, seconds: float) -> None:
    clip = np.random.default_rng(2).uniform(-0.5, 0.5, round(SAMPLE_RATE * seconds)).astype(np.float32)
    path = tmp_path / "clip.wav"
    soundfile.write(path, clip, SAMPLE_RATE, subtype="FLOAT")
    loaded = load_audio(path)
    kept = min(len(clip), CLIP_SAMPLES)
    assert loaded.shape == (CLIP_SAMPLES,)
    np.testing.assert_array_equal(loaded[:kept], clip[:kept])
    assert not loaded[kept:].any()


def _write_garbage(path: Path) -> None:
    path.write_bytes(b"RIFF not really a wave file" * 10)


def _write_empty_file(path: Path) -> None:
    path.write_bytes(b"")


def _write_silent_header(path: Path) -> None:
    soundfile.write(path, np.zeros(0, dtype=np.float32), SAMPLE_RATE)


@pytest.mark.parametrize("write", [None, _write_garbage, _write_empty_file, _write_silent_header])
def test_load_audio_reports_unusable_files(tmp_path: Path, write: Callable[[Path], None] | None) -> None:
    path = tmp_path / "broken.wav"
    if write is not None:
        write(path)
    with pytest.raises(AudioDecodeError) as caught:
        load_audio(path)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message


# --- whole-file check ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("suffix", "subtype"), [("wav", "PCM_16"), ("wav", "FLOAT"), ("flac", None), ("ogg", None)])
def test_check_audio_file_passes_whole_files(tmp_path: Path, suffix: str, subtype: str | None) -> None:
    path = tmp_path / f"tone.{suffix}"
    soundfile.write(path, tone(16_000, 2.0), 16_000, subtype=subtype)
    check_audio_file(path)


def test_check_audio_file_passes_a_streamed_wav_that_declares_no_length(tmp_path: Path) -> None:
    path = tmp_path / "stream.wav"
    soundfile.write(path, tone(16_000, 1.0), 16_000, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    size_field = data.index(b"data") + 4
    data[size_field : size_field + 4] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(data))
    check_audio_file(path)


@pytest.mark.parametrize("endian", ["LITTLE", "BIG"])
def test_check_audio_file_refuses_a_wav_cut_short(tmp_path: Path, endian: str) -> None:
    whole = tmp_path / "whole.wav"
    soundfile.write(whole, tone(16_000, 2.0), 16_000, subtype="PCM_16", endian=endian)
    cut = tmp_path / "cut.wav"
    cut.write_bytes(whole.read_bytes()[:200])
    # What a build used to accept silently: the header opens, and the 78 frames left decode.
    assert soundfile.info(str(cut)).frames == 78
    with pytest.raises(AudioDecodeError) as caught:
        check_audio_file(cut)
    message = str(caught.value)
    assert f"audio file {cut} is truncated: its header declares 64,000 bytes of audio but the file holds 156" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("write", "words"),
    [
        (lambda path: soundfile.write(path, np.zeros(0, np.float32), 16_000), "holds no samples"),
        (lambda path: path.write_bytes(b"RIFF not really a wave file" * 10), "cannot read"),
        (lambda path: None, "does not exist"),
    ],
    ids=["no frames", "garbage", "missing"],
)
def test_check_audio_file_refuses_empty_undecodable_and_missing_files(
    tmp_path: Path, write: Callable[[Path], None], words: str
) -> None:
    path = tmp_path / "clip.wav"
    write(path)
    with pytest.raises(AudioDecodeError, match=words):
        check_audio_file(path)


def test_check_audio_file_refuses_a_flac_cut_short(tmp_path: Path) -> None:
    whole = tmp_path / "whole.flac"
    soundfile.write(whole, tone(16_000, 2.0), 16_000)
    cut = tmp_path / "cut.flac"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(
        AudioDecodeError, match=r"cut.flac is truncated: its header declares 32,000 frames but the last cannot be read"
    ):
        check_audio_file(cut)

"""Bad input is refused in one line naming the file or array and the fix, before it is used: a pairs.csv that is
not UTF-8 or not CSV, images and recordings cut short, NaN audio, degenerate embeddings to evaluate, and `embed`
input arrays of the wrong shape, dtype or range."""

from __future__ import annotations

import io
import shutil
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile
from support.model_cli import refused
from support.pair_data import encode_image, synthetic_image, wav_bytes, write_folder

from model import Sat2Sound, Sat2SoundConfig, save_safetensors
from model.__main__ import main
from model.audio import check_audio_file, decode_audio_from
from model.data.folder import FolderPairs
from model.errors import AudioDecodeError, DataError
from model.evaluate import retrieval_metrics

SAMPLES, TOKENS = 2, 5


def one_line(error: pytest.ExceptionInfo[Exception], *words: str) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message


# --- a folder of pairs ----------------------------------------------------------------------------------------


def one_pair(root: Path, caption: str = "sound", audio: str = "p.wav") -> Path:
    (root / "files").mkdir(parents=True)
    (root / "files" / "p.png").write_bytes(encode_image(synthetic_image(64, 0)))
    samples, rate = soundfile.read(io.BytesIO(wav_bytes(0.5)))
    soundfile.write(root / "files" / audio, samples, rate)
    line = {"key": "p", "image": "files/p.png", "audio": f"files/{audio}", "audio_caption": caption}
    return write_folder(root, [line | {"image_caption": "image", "lat": "10", "lon": "20", "split": "train"}])


def read(root: Path) -> FolderPairs:
    return FolderPairs(root, "train", zoom_levels=(1,))


def test_a_pairs_csv_with_a_byte_order_mark_reads(tmp_path: Path) -> None:
    csv_path = one_pair(tmp_path) / "pairs.csv"
    csv_path.write_bytes(b"\xef\xbb\xbf" + csv_path.read_bytes())
    assert read(tmp_path).pair_keys() == ["p"]


def _latin1(csv_path: Path) -> None:
    csv_path.write_bytes(csv_path.read_text().replace("sound", "café").encode("latin-1"))


def _huge_field(csv_path: Path) -> None:
    csv_path.write_text(csv_path.read_text().replace("sound", '"' + "x" * 200_000 + '"'))


@pytest.mark.parametrize(("spoil", "words"), [(_latin1, "can't decode byte 0xe9"), (_huge_field, "field limit")])
def test_a_pairs_csv_that_is_not_utf8_csv_is_one_line(
    tmp_path: Path, spoil: Callable[[Path], None], words: str
) -> None:
    csv_path = one_pair(tmp_path) / "pairs.csv"
    spoil(csv_path)
    with pytest.raises(DataError) as error:
        read(tmp_path)
    one_line(error, f"cannot read the CSV {csv_path}", words, "save it as UTF-8")


@pytest.mark.parametrize("name", ["p.png", "p.wav"])
def test_a_file_cut_short_is_refused_when_the_folder_is_read(tmp_path: Path, name: str) -> None:
    path = one_pair(tmp_path) / "files" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError) as error:
        read(tmp_path)
    one_line(error, str(path), "pairs.csv line 2", "is truncated", "again")


def raster_bytes(driver: str, count: int = 3, dtype: str = "uint8", **options: str) -> bytes:
    """A 64 px image as GDAL writes it with `driver`: `count` bands of `dtype`."""
    with warnings.catch_warnings(), MemoryFile() as memfile:
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with memfile.open(driver=driver, width=64, height=64, count=count, dtype=dtype, **options) as dataset:
            dataset.write(np.full((count, 64, 64), 7, dtype))
        return bytes(memfile.read())


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (lambda: b"root:x:0:0:root:/root:/bin/bash\n", "does not decode as PNG, JPEG or GeoTIFF (it opens with none"),
        (lambda: b"", "does not decode as PNG, JPEG or GeoTIFF"),
        (lambda: raster_bytes("PNG", dtype="uint16"), "holds 16-bit pixels; export it as 8-bit RGB"),
        (lambda: raster_bytes("GTiff", dtype="uint16"), "holds uint16 pixels; export it as 8-bit RGB"),
        (lambda: b"\xff\xd8\xff" + b"\0" * 40, "does not decode as PNG, JPEG or GeoTIFF"),
    ],
    ids=["text", "empty", "16-bit-png", "16-bit-tiff", "jpeg-signature-only"],
)
def test_a_file_that_is_no_8_bit_image_is_refused_when_the_folder_is_read(
    tmp_path: Path, body: Callable[[], bytes], words: str
) -> None:
    """Found by its first bytes when the split is opened, not at its first batch (after the image pretraining)."""
    path = one_pair(tmp_path) / "files" / "p.png"
    path.write_bytes(body())
    with pytest.raises(DataError) as error:
        read(tmp_path)
    one_line(error, f"{path} (", "pairs.csv line 2", words)


@pytest.mark.parametrize("driver", ["PNG", "JPEG", "GTiff"])
def test_an_image_too_small_for_the_zoom_levels_is_refused_when_the_folder_is_read(tmp_path: Path, driver: str) -> None:
    """Its size is read from its header when the split is opened, not found at its first batch."""
    path = one_pair(tmp_path) / "files" / "p.png"
    with warnings.catch_warnings(), MemoryFile() as memfile:
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with memfile.open(driver=driver, width=4, height=2, count=3, dtype="uint8") as dataset:
            dataset.write(np.full((3, 2, 4), 7, np.uint8))
        path.write_bytes(bytes(memfile.read()))
    with pytest.raises(DataError) as error:
        FolderPairs(tmp_path, "train", zoom_levels=(1, 3))
    one_line(error, f"{path} (", "pairs.csv line 2", "is 4x2 px, too small to crop zoom levels 1 to 3")


@pytest.mark.parametrize(
    ("driver", "count", "options"),
    [
        ("PNG", 2, {}),
        ("JPEG", 3, {}),
        ("GTiff", 3, {}),
        ("GTiff", 3, {"ENDIANNESS": "BIG"}),
        ("GTiff", 1, {"BIGTIFF": "YES"}),
    ],
    ids=["grey-alpha-png", "jpeg", "tiff", "big-endian-tiff", "bigtiff"],
)
def test_every_image_format_that_decodes_passes_the_check_of_its_first_bytes(
    tmp_path: Path, driver: str, count: int, options: dict[str, str]
) -> None:
    (one_pair(tmp_path) / "files" / "p.png").write_bytes(raster_bytes(driver, count, **options))
    assert read(tmp_path).record(0).image.shape == (64, 64, 3)


@pytest.mark.parametrize(
    ("audio", "spoil", "words"),
    [
        ("p.flac", lambda body: body[: len(body) // 2], "is truncated: its header declares 16,000 frames"),
        ("p.flac", lambda body: b"\0" + body, "cannot read"),
        ("p.wav", lambda body: b"", "cannot read"),
    ],
)
def test_a_recording_that_does_not_open_whole_is_refused_when_the_folder_is_read(
    tmp_path: Path, audio: str, spoil: Callable[[bytes], bytes], words: str
) -> None:
    """Found when the split is opened, not at the recording's first batch (after the image pretraining)."""
    path = one_pair(tmp_path, audio=audio) / "files" / audio
    path.write_bytes(spoil(path.read_bytes()))
    with pytest.raises(DataError) as error:
        read(tmp_path)
    one_line(error, f"audio file {path} (", "pairs.csv line 2", words)


def test_nan_audio_is_refused_when_its_pair_is_read(tmp_path: Path) -> None:
    path = one_pair(tmp_path) / "files" / "p.wav"
    soundfile.write(path, np.full(800, np.nan, np.float32), 16_000, subtype="FLOAT")
    pairs = read(tmp_path)
    with pytest.raises(AudioDecodeError) as error:
        pairs.record(0)
    one_line(error, str(path), "NaN")
    with pytest.raises(AudioDecodeError) as error:
        check_audio_file(path)
    one_line(error, str(path), "NaN")


def test_audio_bytes_cut_short_are_refused() -> None:
    whole = wav_bytes(1.0)
    with pytest.raises(AudioDecodeError) as error:
        decode_audio_from(io.BytesIO(whole[: len(whole) // 2]), "row 7's audio", 10.0)
    one_line(error, "row 7's audio is truncated")


# --- evaluate --embeddings ------------------------------------------------------------------------------------


def embeddings(rows: int = 12, width: int = 6) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    image = rng.standard_normal((rows, width)).astype(np.float32)
    return [image, image + 0.3 * rng.standard_normal((rows, width)).astype(np.float32), image[::-1].copy()]


def test_evaluate_refuses_zero_width_and_all_zero_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image, audio, caption = embeddings()
    narrow = tmp_path / "narrow.npz"
    np.savez(narrow, image=image[:, :0], audio=audio[:, :0], audio_caption=caption[:, :0])
    refused(capsys, ["evaluate", "--embeddings", str(narrow)], "0 wide")
    image[[4, 7]] = 0
    zero = tmp_path / "zero.npz"
    np.savez(zero, image=image, audio=audio, audio_caption=caption)
    refused(capsys, ["evaluate", "--embeddings", str(zero)], "2 of the 12 rows of 'image' are all zero", "row 4")


@pytest.mark.parametrize(("scale", "dtype"), [(1e20, np.float32), (1e-25, np.float32), (1e300, np.float64)])
def test_metrics_do_not_depend_on_the_embeddings_scale(scale: float, dtype: type[np.floating]) -> None:
    image, audio, caption = embeddings()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaled = retrieval_metrics(image.astype(dtype) * scale, audio, caption)
    assert scaled == retrieval_metrics(image, audio, caption)


def test_evaluate_refuses_float64_beyond_float32_only_if_infinite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image, audio, caption = embeddings()
    path = tmp_path / "inf.npz"
    huge = image.astype(np.float64) * 1e300
    huge[2, 1] = np.inf
    np.savez(path, image=huge, audio=audio, audio_caption=caption)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        refused(capsys, ["evaluate", "--embeddings", str(path)], "'image' holds NaN or infinite values")


# --- embed ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small model that fuses metadata (so every in/... array is read)."""
    weights, _ = save_safetensors(Sat2Sound(Sat2SoundConfig.small()), tmp_path_factory.mktemp("ckpt") / "s.safetensors")
    return weights


def embed_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "in/sat": rng.standard_normal((SAMPLES, 3, 224, 224)).astype(np.float32),
        "in/sat_zoom_level": np.array([1, 3]),
        "in/mel": rng.standard_normal((SAMPLES, 1, 1001, 64)).astype(np.float32),
        "in/audio_caption_hidden": rng.standard_normal((SAMPLES, TOKENS, 384)).astype(np.float32),
        "in/audio_caption_mask": np.ones((SAMPLES, TOKENS), bool),
        "in/llava_caption_hidden": rng.standard_normal((SAMPLES, TOKENS, 384)).astype(np.float32),
        "in/llava_caption_mask": np.ones((SAMPLES, TOKENS), bool),
        "in/latlong": rng.uniform(-1, 1, (SAMPLES, 4)).astype(np.float32),
        "in/month": rng.uniform(-1, 1, (SAMPLES, 2)).astype(np.float32),
        "in/time": rng.uniform(-1, 1, (SAMPLES, 2)).astype(np.float32),
        "in/month_valid": np.ones(SAMPLES, np.int64),
        "in/time_valid": np.array([1, 0]),
        "in/audio_source": np.array([0, 3]),
        "in/caption_source": np.array([1, 0]),
        "in/waveform_int16": rng.integers(-3000, 3000, (SAMPLES, 16_000)).astype(np.int16),
        "in/sample_rate": np.array(16_000),
    }


def embed(checkpoint: Path, tmp_path: Path, changes: dict[str, np.ndarray], *flags: str) -> list[str]:
    inputs = tmp_path / "in.npz"
    arrays: dict[str, Any] = embed_inputs() | changes  # Any: numpy's stubs read ** as its allow_pickle flag
    np.savez(inputs, **arrays)
    return [
        "embed",
        "--checkpoint",
        str(checkpoint),
        "--inputs",
        str(inputs),
        "--out",
        str(tmp_path / "out.npz"),
        *flags,
    ]


def test_embed_reads_well_formed_inputs(checkpoint: Path, tmp_path: Path) -> None:
    assert main(embed(checkpoint, tmp_path, {}, "--audio-from-waveform")) == 0
    with np.load(tmp_path / "out.npz") as out:
        assert out["ctotal"].shape[0] == SAMPLES and np.isfinite(out["ctotal"]).all()


BAD_ARRAYS: dict[str, tuple[dict[str, np.ndarray], tuple[str, ...]]] = {
    "mask shorter than its states": ({"in/audio_caption_mask": np.ones((2, 3), bool)}, ("(2, 5) 0/1 flags",)),
    "source out of range": ({"in/audio_source": np.array([99, 0])}, ("values from 0 to 99", "indices 0 to 3")),
    "flag of 2": ({"in/time_valid": np.array([2, 1])}, ("'in/time_valid'", "0/1 flags")),
    "metadata too narrow": ({"in/latlong": np.zeros((2, 3), np.float32)}, ("'in/latlong'", "(2, 4)")),
    "strings for images": ({"in/sat": np.array(["x", "y"])}, ("'in/sat' is <U1 (2,)", "real numbers")),
    "NaN images": ({"in/sat": np.full((2, 3, 224, 224), np.nan, np.float32)}, ("'in/sat' holds NaN",)),
    "infinite caption states": ({"in/llava_caption_hidden": np.full((2, 5, 384), np.inf)}, ("holds NaN or inf",)),
    "a caption per image missing": ({"in/audio_caption_hidden": np.zeros((1, 5, 384))}, ("(2, any, any)",)),
}


@pytest.mark.parametrize("case", list(BAD_ARRAYS))
def test_embed_refuses_malformed_arrays(
    case: str, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    changes, words = BAD_ARRAYS[case]
    refused(capsys, embed(checkpoint, tmp_path, changes), "input array", *words)
    assert not (tmp_path / "out.npz").exists()


def _npz_declaring(path: Path, shape: tuple[int, ...]) -> None:
    """An .npz whose one array's header declares `shape` but holds four floats."""
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False, "shape": shape})
    member.write(np.zeros(4, np.float32).tobytes())
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("in/sat.npy", member.getvalue())


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda path: path.write_bytes(b""), "is not a readable .npz of numeric arrays (EOFError); save in/... arrays"),
        (lambda path: path.mkdir(), "is a folder, not an .npz; pass an .npz with in/... arrays"),
        (
            lambda path: _npz_declaring(path, (10**12, 512)),
            "array 'in/sat' declares shape (1000000000000, 512) of float32 (2,048,000,000,000,000 bytes) but holds 16"
            " bytes; save in/... arrays",
        ),
    ],
    ids=["empty-file", "folder", "header-declaring-petabytes"],
)
def test_embed_refuses_inputs_that_are_no_npz(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Callable[[Path], Any], words: str
) -> None:
    argv = embed(checkpoint, tmp_path, {})
    inputs = Path(argv[argv.index("--inputs") + 1])
    inputs.unlink()
    make(inputs)
    refused(capsys, argv, str(inputs), words)
    assert not (tmp_path / "out.npz").exists()


def test_embed_checks_its_arrays_before_it_loads_the_weights(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only the checkpoint's config is read first: weights that would not load are not what is reported."""
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not weights")
    shutil.copy(checkpoint.with_suffix(".json"), broken.with_suffix(".json"))
    refused(capsys, embed(broken, tmp_path, BAD_ARRAYS["NaN images"][0]), "'in/sat' holds NaN")
    refused(capsys, embed(broken, tmp_path, {}), str(broken))


BAD_WAVEFORMS: dict[str, tuple[dict[str, np.ndarray], tuple[str, ...]]] = {
    "two sample rates": ({"in/sample_rate": np.array([32_000, 16_000])}, ("'in/sample_rate'", "one whole number")),
    "one waveform, 1-D": ({"in/waveform_int16": np.zeros(16_000, np.int16)}, ("int16 (16000,)", "(2, any)")),
    "float samples": ({"in/waveform_int16": np.zeros((2, 100), np.float32)}, ("float32 (2, 100)", "int16 samples")),
}


@pytest.mark.parametrize("case", list(BAD_WAVEFORMS))
def test_embed_refuses_malformed_waveforms(
    case: str, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    changes, words = BAD_WAVEFORMS[case]
    refused(capsys, embed(checkpoint, tmp_path, changes, "--audio-from-waveform"), "input array", *words)

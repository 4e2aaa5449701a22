"""Retrieval evaluation: hand-computed ranks with ties, R@k with a fractional k, the three settings, the CLI."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from model import evaluate
from model.__main__ import main
from model.evaluate import (
    pair_ranks,
    ranks_by_setting,
    recall_cutoff,
    retrieval_metrics,
    summarise,
)


def basis(dim: int, *indices: int, scale: float = 1.0) -> np.ndarray:
    """Rows of the `dim`-D standard basis, times `scale`."""
    return np.eye(dim, dtype=np.float32)[list(indices)] * scale


def test_ranks_are_one_based_with_ties_averaged() -> None:
    gallery = torch.from_numpy(np.stack([*basis(2, 0, 0, 1), -basis(2, 0)[0]]))
    queries = torch.from_numpy(basis(2, 0, 1, 0, 1))
    # Query 0 ties its pair with gallery 1 at the top; query 1's pair ties gallery 0 and 3 below gallery 2;
    # query 2's pair has two above it; query 3's pair ties gallery 0 and 1 below gallery 2.
    np.testing.assert_array_equal(pair_ranks(queries, gallery), [1.5, 3.0, 3.0, 3.0])
    np.testing.assert_array_equal(pair_ranks(queries, gallery, block_rows=3), [1.5, 3.0, 3.0, 3.0])


def test_recall_counts_ranks_strictly_below_a_fractional_k() -> None:
    # 15 pairs: 6 unique (rank 1), a pair of duplicates (1.5), a triple (2), a quadruple (2.5).
    rows = basis(15, 0, 1, 2, 3, 4, 5, 6, 6, 8, 8, 8, 11, 11, 11, 11)
    ranks = ranks_by_setting(rows, rows, rows)
    expected = [1.0] * 6 + [1.5] * 2 + [2.0] * 3 + [2.5] * 4
    for by_direction in ranks.values():
        for direction_ranks in by_direction.values():
            np.testing.assert_array_equal(direction_ranks, expected)
    assert recall_cutoff(15) == 1.5
    metrics = retrieval_metrics(rows, rows, rows)
    assert metrics == {
        setting: {direction: {"recall": 6 / 15, "median_rank": 1.5} for direction in ("I2S", "S2I")}
        for setting in ("none", "audio", "query")
    }


def test_median_of_an_even_count_averages_the_middle_ranks() -> None:
    ranks = np.array([3.0] * 10 + [1.0] * 3 + [2.0] * 5 + [1.5] * 2)
    assert recall_cutoff(20) == 2.0
    assert summarise(ranks) == (5 / 20, 2.5)


def hand_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three pairs in 3-D whose scales would change the ranks if captions were added before normalising."""
    image = np.concatenate([basis(3, 0, scale=3.0), basis(3, 1), basis(3, 2)])
    audio = np.concatenate([basis(3, 0, scale=4.0), basis(3, 2), basis(3, 1)])
    caption = np.concatenate([basis(3, 1), basis(3, 2, scale=0.5), basis(3, 0, scale=2.0)])
    return image, audio, caption


HAND_RANKS = {
    # none: I = [e0, e1, e2], A = [e0, e2, e1].
    "none": {"I2S": [1.0, 2.5, 2.5], "S2I": [1.0, 2.5, 2.5]},
    # audio: A + C = [e0+e1, e2, e0+e1] (normalised) on both sides of the audio; images plain.
    "audio": {"I2S": [1.5, 3.0, 2.5], "S2I": [1.5, 2.5, 3.0]},
    # query: image queries I + C = [e0+e1, e1+e2, e2+e0], audio queries [e0+e1, e2, e0+e1]; galleries plain.
    "query": {"I2S": [1.5, 1.5, 3.0], "S2I": [1.5, 2.5, 3.0]},
}


def test_three_settings_both_directions_hand_computed() -> None:
    ranks = ranks_by_setting(*hand_case())
    assert {s: {d: r.tolist() for d, r in by_d.items()} for s, by_d in ranks.items()} == HAND_RANKS
    metrics = retrieval_metrics(*hand_case())
    assert recall_cutoff(3) == pytest.approx(0.3)
    assert metrics == {
        setting: {d: {"recall": 0.0, "median_rank": float(np.median(r))} for d, r in by_direction.items()}
        for setting, by_direction in HAND_RANKS.items()
    }
    assert metrics["query"]["I2S"]["median_rank"] == 1.5


def unit(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-8)


def reference_ranks(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Full similarity matrix, each row ranked by pandas (descending, ties averaged), as upstream does."""
    scores = queries @ gallery.T
    return np.array([pd.Series(row).rank(ascending=False).iloc[i] for i, row in enumerate(scores)])


def test_blocked_ranks_equal_a_full_matrix_computation(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    image, audio, caption = (rng.normal(size=(37, 6)).astype(np.float32) for _ in range(3))
    img, aud, cap = unit(image), unit(audio), unit(caption)
    img_cap, aud_cap = unit(img + cap), unit(aud + cap)
    full = {
        "none": {"I2S": reference_ranks(img, aud), "S2I": reference_ranks(aud, img)},
        "audio": {"I2S": reference_ranks(img, aud_cap), "S2I": reference_ranks(aud_cap, img)},
        "query": {"I2S": reference_ranks(img_cap, aud), "S2I": reference_ranks(aud_cap, img)},
    }
    monkeypatch.setattr(evaluate, "BLOCK_SCORES", 37 * 4)
    for blocked in (ranks_by_setting(image, audio, caption, block_rows=5), ranks_by_setting(image, audio, caption)):
        for setting, by_direction in full.items():
            for direction, expected in by_direction.items():
                np.testing.assert_array_equal(blocked[setting][direction], expected, err_msg=f"{setting}/{direction}")


def save_embeddings(path: Path, image: np.ndarray, audio: np.ndarray, caption: np.ndarray) -> Path:
    np.savez(path, image=image, audio=audio, audio_caption=caption)
    return path


def test_cli_writes_metrics_json_and_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    embeddings = save_embeddings(tmp_path / "emb.npz", *hand_case())
    out = tmp_path / "results" / "metrics.json"
    assert main(["evaluate", "--embeddings", str(embeddings), "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written == retrieval_metrics(*hand_case())
    assert {f"{s}/{d}/{m}" for s in written for d in written[s] for m in written[s][d]} == {
        f"{s}/{d}/{m}" for s in ("none", "audio", "query") for d in ("I2S", "S2I") for m in ("recall", "median_rank")
    }
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "no temporary files left behind"
    printed = capsys.readouterr().out
    assert "gallery of 3 pairs" in printed
    assert "query (caption added to queries)      0.0000         1.5    0.0000         2.5" in printed


def test_cli_prints_the_table_without_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    embeddings = save_embeddings(tmp_path / "emb.npz", *hand_case())
    assert main(["evaluate", "--embeddings", str(embeddings)]) == 0
    assert "none (nothing added)" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["emb.npz"]


def bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    image, audio, caption = hand_case()
    nan = image.copy()
    nan[1, 2] = np.nan
    npy = tmp_path / "one.npy"
    np.save(npy, image)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")
    missing_key = tmp_path / "missing.npz"
    np.savez(missing_key, image=image, audio=audio)
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    text = tmp_path / "text.npz"
    text.write_text("image,audio,audio_caption\n")
    folder = tmp_path / "folder.npz"
    folder.mkdir()
    garbled_header = tmp_path / "header.npz"
    with zipfile.ZipFile(garbled_header, "w") as archive:
        archive.writestr("image.npy", b"\x93NUMPY\x01\x00\x76\x00" + b"((((".ljust(117) + b"\n")
    garbled_member = tmp_path / "deflated.npz"
    with zipfile.ZipFile(garbled_member, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("image.npy", b"x" * 1000)
    body = bytearray(garbled_member.read_bytes())
    body[body.index(b"image.npy") + len("image.npy") + 2] ^= 0xFF  # a bit of the compressed data
    garbled_member.write_bytes(bytes(body))
    readable = "is not a readable .npz of numeric arrays"
    fix = "; save image, audio, audio_caption with np.savez"
    return {
        "missing file": (tmp_path / "absent.npz", "absent.npz does not exist"),
        "missing key": (missing_key, "lacks audio_caption"),
        "mismatched rows": (save_embeddings(tmp_path / "rows.npz", image, audio[:2], caption), "shapes differ"),
        "mismatched width": (save_embeddings(tmp_path / "w.npz", image, audio, caption[:, :2]), "shapes differ"),
        "one-dimensional": (save_embeddings(tmp_path / "1d.npz", image[:, 0], audio, caption), "2-D"),
        "NaN": (save_embeddings(tmp_path / "nan.npz", nan, audio, caption), "NaN"),
        "one pair": (save_embeddings(tmp_path / "one.npz", image[:1], audio[:1], caption[:1]), "at least 2"),
        "not numeric": (save_embeddings(tmp_path / "str.npz", image.astype(str), audio, caption), "real array"),
        "an .npy": (npy, "one array"),
        "not a zip": (garbage, "not a readable .npz"),
        "empty file": (empty, f"{readable} (EOFError){fix}"),
        "text file": (text, f"{readable} (ValueError){fix}"),
        "a folder": (folder, "folder.npz is a folder, not an .npz; pass an .npz with image, audio, audio_caption"),
        "garbled array header": (garbled_header, f"{readable} (TokenError){fix}"),
        "garbled compressed array": (garbled_member, f"{readable} (error){fix}"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing file",
        "missing key",
        "mismatched rows",
        "mismatched width",
        "one-dimensional",
        "NaN",
        "one pair",
        "not numeric",
        "an .npy",
        "not a zip",
        "empty file",
        "text file",
        "a folder",
        "garbled array header",
        "garbled compressed array",
    ],
)
def test_cli_refuses_bad_embeddings_in_one_line(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, expected = bad_inputs(tmp_path)[case]
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--embeddings", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not out.exists()

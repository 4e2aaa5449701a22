"""Batched inference API on a small model with the offline MiniLM text backbone."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from model.config import Sat2SoundConfig
from model.errors import InputError, TextBackboneError
from model.inference import Sat2SoundEncoder, top_concepts
from model.metadata import Metadata
from model.sat2sound import Sat2Sound


@pytest.fixture(scope="module")
def encoder() -> Sat2SoundEncoder:
    torch.manual_seed(0)
    return Sat2SoundEncoder(Sat2Sound(Sat2SoundConfig.small("none")), text_backbone="minilm", device="cpu")


def assert_unit_rows(x: torch.Tensor) -> None:
    torch.testing.assert_close(x.norm(dim=-1), torch.ones(len(x)))


def test_images_give_normalised_embeddings_and_codebook_weights(encoder: Sat2SoundEncoder) -> None:
    images = torch.randint(0, 256, (3, 3, 300, 300), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = encoder.embed_images(images, zoom_level=1)
    assert out.embedding.shape == (3, 64) and out.weights.shape == (3, 256)
    assert_unit_rows(out.embedding)
    assert (out.weights >= 0).all()
    torch.testing.assert_close(out.weights.sum(dim=1), torch.ones(3))
    alone = encoder.embed_images(images[1:2], zoom_level=1)
    torch.testing.assert_close(alone.embedding[0], out.embedding[1], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_a_compiled_encoder_gives_the_eager_embeddings_at_every_batch_size() -> None:
    torch.manual_seed(0)
    model = Sat2Sound(Sat2SoundConfig.small("latlong_month_time_asource_tsource"))
    names = list(model.state_dict())
    eager = Sat2SoundEncoder(copy.deepcopy(model), device="cpu")
    compiled = Sat2SoundEncoder(model, device="cpu", compiled=True)
    assert list(model.state_dict()) == names, "compiling keeps the checkpoint's names"
    images = torch.randint(0, 256, (5, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    lat, lon = np.linspace(-60, 60, 5), np.linspace(-170, 170, 5)
    for count in (5, 3, 2):
        part = Metadata.from_values(lat[:count], lon[:count], month=4, hour=None)
        want, got = eager.embed_images(images[:count], 2, part), compiled.embed_images(images[:count], 2, part)
        torch.testing.assert_close(got.embedding, want.embedding, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got.weights, want.weights, atol=1e-5, rtol=1e-4)
    with pytest.raises(InputError, match="NaN or infinite"):
        compiled.embed_images(torch.full((2, 3, 224, 224), float("nan")), 2, part)


def test_texts_are_embedded_independently_of_padding(encoder: Sat2SoundEncoder) -> None:
    texts = ["birds singing in a park", "heavy traffic on a wet highway with horns and engines"]
    both = encoder.embed_texts(texts)
    assert_unit_rows(both.embedding)
    alone = encoder.embed_texts(texts[:1])
    torch.testing.assert_close(alone.embedding[0], both.embedding[0], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(both.embedding[0], both.embedding[1])


def test_audio_files_and_composed_queries(encoder: Sat2SoundEncoder, tmp_path: Path) -> None:
    rate = 44_100
    t = np.arange(rate * 2) / rate
    paths = []
    for i, freq in enumerate((440.0, 2000.0)):
        path = tmp_path / f"tone{i}.flac"
        soundfile.write(path, 0.3 * np.sin(2 * np.pi * freq * t), rate)
        paths.append(path)
    audio = encoder.embed_audio(paths)
    assert audio.embedding.shape == (2, 64)
    assert_unit_rows(audio.embedding)
    composed = encoder.embed_composed(paths, ["a beep", "a whistle"])
    assert_unit_rows(composed.embedding)
    assert not torch.allclose(composed.embedding, audio.embedding)
    with pytest.raises(InputError, match="one text per audio file"):
        encoder.embed_composed(paths, ["a beep"])


def test_metadata_model_takes_per_tile_locations() -> None:
    torch.manual_seed(0)
    encoder = Sat2SoundEncoder(Sat2Sound(Sat2SoundConfig.small()), text_backbone="minilm", device="cpu")
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    near = Metadata.from_values(np.array([38.6, 38.6]), np.array([-90.2, -90.2]), month=6, hour=12)
    far = Metadata.from_values(np.array([38.6, -33.9]), np.array([-90.2, 151.2]), month=6, hour=12)
    a, b = encoder.embed_images(images, 1, near), encoder.embed_images(images, 1, far)
    torch.testing.assert_close(a.embedding[0], b.embedding[0])
    assert not torch.allclose(a.embedding[1], b.embedding[1])


def test_text_backbone_width_must_match_the_checkpoint() -> None:
    model = Sat2Sound(Sat2SoundConfig(fc_dim=64, codebook_dim=64, codebook_size=32, metadata_type="none"))
    encoder = Sat2SoundEncoder(model, text_backbone="minilm", device="cpu")
    with pytest.raises(TextBackboneError, match="384-d states but the checkpoint expects 1024-d"):
        encoder.embed_texts(["rain"])


def test_cuda_request_without_cuda_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(InputError, match="CUDA is not available"):
        Sat2SoundEncoder(Sat2Sound(Sat2SoundConfig.small("none")), device="cuda")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_autocast_stays_close_to_fp32(precision: str) -> None:
    torch.manual_seed(0)
    model = Sat2Sound(Sat2SoundConfig.small("none"))
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    full = Sat2SoundEncoder(model, text_backbone="minilm", device="cpu", precision="fp32").embed_images(images, 1)
    reduced = Sat2SoundEncoder(model, text_backbone="minilm", device="cpu", precision=precision)
    assert reduced.dtype != torch.float32
    out = reduced.embed_images(images, 1)
    assert out.embedding.dtype == torch.float32
    cosine = (out.embedding * full.embedding).sum(dim=1)
    assert (cosine > 0.99).all(), cosine


def test_scores_that_overflow_stop_with_one_line_not_an_index_error() -> None:
    torch.manual_seed(0)
    model = Sat2Sound(Sat2SoundConfig.small("none"))
    with torch.no_grad():
        model.fdt.img_query_model.q_map[-1].weight.fill_(3e38)  # finite, but every score overflows
    encoder = Sat2SoundEncoder(model, text_backbone="minilm", device="cpu")
    with pytest.raises(InputError, match="codebook scores are NaN or infinite") as raised:
        encoder.embed_images(torch.zeros(1, 3, 224, 224, dtype=torch.uint8), zoom_level=1)
    assert "\n" not in str(raised.value)


def test_top_concepts_mark_empty_ranks_with_minus_one() -> None:
    weights = torch.tensor([[0.0, 0.7, 0.3, 0.0], [0.25, 0.25, 0.25, 0.25]])
    indices, values = top_concepts(weights, 3)
    assert indices.dtype == torch.int32
    assert indices[0].tolist() == [1, 2, -1] and values[0].tolist() == pytest.approx([0.7, 0.3, 0.0])
    assert len(set(indices[1].tolist())) == 3 and values[1].tolist() == pytest.approx([0.25] * 3)


def test_a_time_sweep_runs_the_vit_once_and_equals_one_forward_per_time() -> None:
    torch.manual_seed(0)
    encoder = Sat2SoundEncoder(Sat2Sound(Sat2SoundConfig.small("latlong_month_time")), device="cpu")
    images = torch.randint(0, 256, (4, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    lat, lon = np.array([10.0, -20.0, 45.0, 0.0]), np.array([5.0, 100.0, -60.0, 0.0])
    metas = [Metadata.from_values(lat, lon, month=month, hour=hour) for month, hour in ((6, 14), (12, None), (1, 3))]
    calls = []
    encoder.model.satmae_backbone.register_forward_hook(lambda *args: calls.append(1))
    swept = list(encoder.image_concepts(images, 1, metas, top_k=3))
    assert len(calls) == 1
    for meta, out in zip(metas, swept, strict=True):
        alone = encoder.embed_images(images, 1, meta)
        torch.testing.assert_close(out.embedding, alone.embedding, atol=1e-6, rtol=1e-5)
        index, weight = top_concepts(alone.weights, 3)
        assert torch.equal(out.concept_index, index)
        torch.testing.assert_close(out.concept_weight, weight, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(swept[0].embedding, swept[1].embedding, atol=1e-3)

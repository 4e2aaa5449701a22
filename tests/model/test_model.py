"""Model building blocks on small configs: codebook, loss, metadata encodings, training step."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import pytest
import torch

from model.config import Sat2SoundConfig
from model.errors import ConfigError, InputError
from model.fdt import sparsemax
from model.loss import pseudo_positive_loss
from model.metadata import Metadata, MetadataEmbedder, drop_metadata
from model.sat2sound import Sat2Sound, Sat2SoundBatch


def test_sparsemax_known_values() -> None:
    out = sparsemax(torch.tensor([[1.0, 0.5, -1.0], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(out, torch.tensor([[0.75, 0.25, 0.0], [1 / 3, 1 / 3, 1 / 3]]))


def test_sparsemax_is_a_sparse_distribution() -> None:
    scores = torch.randn(5, 1000, generator=torch.Generator().manual_seed(0)) * 3
    weights = sparsemax(scores)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(5))
    assert (weights >= 0).all() and ((weights > 0).sum(dim=-1) < 1000).all()
    assert torch.equal(weights.argmax(dim=-1), scores.argmax(dim=-1))


def test_pseudo_positive_loss_by_hand() -> None:
    logits = torch.tensor([[2.0, 3.0], [0.5, 1.0]])
    alpha = 0.1
    log_rows = np.log(np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(1, keepdims=True))
    log_cols = np.log(np.exp(logits.numpy().T) / np.exp(logits.numpy().T).sum(1, keepdims=True))
    clip = 0.5 * -np.mean(np.diag(log_rows)) + 0.5 * -np.mean(np.diag(log_cols))
    # Row 0: logit 3.0 >= diagonal 2.0 makes (0, 1) a pseudo-positive; row 1 has none.
    pseudo = np.array([[1.0, 1.0], [0.0, 1.0]])
    pseudo_clip = 0.5 * -np.mean((pseudo * log_rows).sum(1)) + 0.5 * -np.mean((pseudo.T * log_cols).sum(1))
    expected = clip + alpha * pseudo_clip
    assert pseudo_positive_loss(logits, alpha).item() == pytest.approx(expected, rel=1e-6)


def test_metadata_encoding_matches_reference(parity: Mapping[str, np.ndarray]) -> None:
    meta = Metadata.from_values(
        parity["in/lat"], parity["in/lon"], month=parity["in/month_of_year"], hour=parity["in/hour"]
    )
    np.testing.assert_array_equal(meta.latlong.numpy(), parity["in/latlong"])
    np.testing.assert_allclose(meta.month.numpy(), parity["in/month"], atol=1e-7)
    np.testing.assert_allclose(meta.time.numpy(), parity["in/time"], atol=1e-7)
    assert meta.time_valid.tolist() == [1, 1, 1, 1]


def test_unknown_metadata_is_zero_and_invalid() -> None:
    meta = Metadata.from_values(np.array([10.0, 20.0]), np.array([0.0, 1.0]), month=np.array([3, -1]), hour=None)
    assert meta.month_valid.tolist() == [1, 0] and meta.time_valid.tolist() == [0, 0]
    assert (meta.month[1] == 0).all() and (meta.time == 0).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"month": 13}, "month must be 1-12"),
        ({"hour": 24}, "hour must be 0-23"),
        ({"audio_source": "x"}, "unknown source"),
    ],
)
def test_bad_metadata_values(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        Metadata.from_values(np.array([1.0]), np.array([1.0]), **kwargs)


def test_latitude_out_of_range() -> None:
    with pytest.raises(InputError, match="latitude"):
        Metadata.from_values(np.array([91.0]), np.array([0.0]))


def test_config_rejects_unknown_names() -> None:
    with pytest.raises(ConfigError, match="sat_type"):
        Sat2SoundConfig(sat_type="landsat")
    with pytest.raises(ConfigError, match="metadata"):
        Sat2SoundConfig(metadata_type="latlong_weather")


def test_config_from_official_hparams(manifest: dict) -> None:
    cfg = Sat2SoundConfig.from_hparams(manifest["configs"]["bingmap_withmeta"]["hyper_parameters"])
    assert cfg.metadata == ("asource", "tsource", "latlong", "month", "time")
    assert (cfg.fc_dim, cfg.codebook_size, cfg.gsd) == (1024, 16000, 0.6)
    assert Sat2SoundConfig.from_dict(cfg.to_dict()) == cfg


def small_batch(cfg: Sat2SoundConfig, size: int = 3) -> Sat2SoundBatch:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(size, 7, dtype=torch.bool)
    mask[0, 4:] = False
    return Sat2SoundBatch(
        images=torch.randn(size, 3, 224, 224, generator=g),
        zoom_level=torch.tensor([1, 3, 5][:size]),
        mel=torch.randn(size, 1, 1001, 64, generator=g) * 10 - 20,
        audio_caption=(torch.randn(size, 7, cfg.text_dim, generator=g), mask),
        image_caption=(torch.randn(size, 7, cfg.text_dim, generator=g), mask),
        metadata=Metadata.from_values(np.array([38.6, -1.3, 48.9][:size]), np.array([-90.2, 36.8, 2.3][:size]), 6, 12),
    )


@pytest.mark.slow
def test_training_step_reaches_every_used_parameter() -> None:
    torch.manual_seed(0)
    cfg = Sat2SoundConfig.small()
    model = Sat2Sound(cfg).train()
    out = model(small_batch(cfg))
    losses = model.loss(out)
    assert torch.isfinite(losses.loss)
    losses.loss.backward()
    # Never read by the forward pass: HTS-AT's classifier head, its frozen STFT/mel matrices and the
    # last block's attention/MLP (the token path uses only its value projection), and logit_scale_it_a.
    unused = ("audio_enc.tscam_conv", "audio_enc.head", "audio_feats_extractor", "logit_scale_it_a")
    missing = [
        name
        for name, p in model.named_parameters()
        if p.requires_grad
        and p.grad is None
        and not any(part in name for part in unused)
        and ".layers.3.blocks.1." not in name
    ]
    assert not missing, f"parameters without gradient: {missing[:5]}"


def test_codebook_weights_and_embedding_agree() -> None:
    torch.manual_seed(0)
    cfg = Sat2SoundConfig.small("none")
    model = Sat2Sound(cfg).eval()
    batch = small_batch(cfg)
    with torch.inference_mode():
        out = model.encode_image(batch.images, batch.zoom_level)
    torch.testing.assert_close(out.weights.sum(dim=1), torch.ones(3))
    torch.testing.assert_close(out.embedding, out.weights @ model.fdt.space_dict.detach())


def test_zoom_level_changes_the_image_embedding() -> None:
    torch.manual_seed(0)
    model = Sat2Sound(Sat2SoundConfig.small("none")).eval()
    images = torch.randn(1, 3, 224, 224).expand(2, -1, -1, -1)
    with torch.inference_mode():
        tokens = model.image_tokens(images, [1, 4])
    assert not torch.allclose(tokens[0], tokens[1])


def test_image_shape_and_zoom_errors() -> None:
    model = Sat2Sound(Sat2SoundConfig.small("none")).eval()
    with pytest.raises(InputError, match=r"\(B, 3, 224, 224\)"):
        model.image_tokens(torch.zeros(1, 3, 100, 100), [1])
    with pytest.raises(InputError, match="zoom levels"):
        model.image_tokens(torch.zeros(2, 3, 224, 224), [1])
    with pytest.raises(InputError, match="positive"):
        model.image_tokens(torch.zeros(1, 3, 224, 224), [0])


def test_withmeta_model_requires_metadata() -> None:
    model = Sat2Sound(Sat2SoundConfig.small()).eval()
    with pytest.raises(InputError, match="fuses metadata"):
        model.image_tokens(torch.zeros(1, 3, 224, 224), [1])


def test_metadata_dropout_fills_its_quota_with_rows_still_valid() -> None:
    valid = torch.ones(10, dtype=torch.bool)
    dropped = drop_metadata(valid, 0.5, torch.Generator().manual_seed(0))
    assert int((~dropped).sum()) == 5
    assert torch.equal(dropped, drop_metadata(valid, 0.5, torch.Generator().manual_seed(0)))
    assert not torch.equal(dropped, drop_metadata(valid, 0.5, torch.Generator().manual_seed(1)))
    some_unknown = torch.tensor([False, False] + [True] * 8)
    topped_up = drop_metadata(some_unknown, 0.5)
    assert int((~topped_up).sum()) == 5
    assert not topped_up[:2].any()
    many_unknown = torch.tensor([False] * 6 + [True] * 4)
    assert torch.equal(drop_metadata(many_unknown, 0.5), many_unknown)
    assert torch.equal(drop_metadata(valid, 0.0), valid)


def test_metadata_dropout_only_while_training() -> None:
    cfg = Sat2SoundConfig.small()
    embedder = MetadataEmbedder(cfg)
    meta = Metadata.from_values(np.linspace(-60, 60, 400), np.zeros(400), 6, 12, "iNat", "qwen")
    tokens, valid = embedder.train()(meta)
    assert valid.shape == (400, len(cfg.metadata))
    assert valid.float().mean(dim=0).tolist() == [0.5] * len(cfg.metadata)
    assert torch.all(tokens[~valid] == 0)
    assert torch.all(embedder.eval()(meta)[1])
    assert Sat2SoundConfig.small().meta_droprate == 0.5
    assert MetadataEmbedder(replace(cfg, meta_droprate=0.0)).train()(meta)[1].all()
    with pytest.raises(ConfigError, match="meta_droprate"):
        replace(cfg, meta_droprate=1.5)


def test_metadata_takes_one_source_per_sample() -> None:
    meta = Metadata.from_values(np.zeros(3), np.zeros(3), None, None, ["aporee", "yfcc", "freesound"], "pengi")
    assert meta.audio_source.tolist() == [2, 0, 3]
    assert meta.caption_source.tolist() == [2, 2, 2]
    with pytest.raises(InputError, match="2 source names for 3 samples"):
        Metadata.from_values(np.zeros(3), np.zeros(3), audio_source=["yfcc", "iNat"])


def test_config_reads_meta_droprate_from_hparams(manifest: dict) -> None:
    hparams = dict(manifest["configs"]["bingmap_withmeta"]["hyper_parameters"], meta_droprate=0.25)
    assert Sat2SoundConfig.from_hparams(hparams).meta_droprate == 0.25

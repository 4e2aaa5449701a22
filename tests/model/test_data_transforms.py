"""Sample preparation as upstream trains and evaluates, the seeded dataset, collation and the block sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from support.pair_data import IMAGE_PX, geosound_row, geosound_schema, mel_stack, synthetic_image, write_shard
from torch.utils.data import DataLoader

from model.audio import N_FRAMES, N_MELS
from model.config import TILE_PX_BY_SAT_TYPE, crop_px
from model.data.dataset import BlockShuffleSampler, PairDataset, collate
from model.data.parquet import GeoSoundParquet
from model.data.sources import PairRecord, PairSource, PrecomputedMel
from model.data.transforms import SampleTransform, dihedral_turn
from model.errors import DataError
from model.preprocess import normalize, resize_to_unit


def record(
    seed: int = 3, sat_type: str = "sentinel", zooms: tuple[int, ...] = (1, 3, 5), **fields: object
) -> PairRecord:
    values: dict[str, object] = {
        "key": f"pair-{seed}",
        "image": synthetic_image(IMAGE_PX[sat_type], seed),
        "sat_type": sat_type,
        "tile_px": crop_px(1, sat_type),
        "mel": PrecomputedMel(mel_stack(seed)[:, 0]),
        "audio_caption": f"sound {seed}",
        "image_captions": {zoom: f"zoom {zoom}" for zoom in zooms},
        "lat": 10.0,
        "lon": 20.0,
        "month": 4,
        "hour": None,
        "audio_source": "iNat",
        "caption_source": "pengi",
        "split": "train",
    }
    return PairRecord(**(values | fields))  # type: ignore[arg-type]


class ListSource(PairSource):
    def __init__(self, records: list[PairRecord], blocks: list[range] | None = None) -> None:
        self.records = records
        self._blocks = blocks

    @property
    def zoom_levels(self) -> tuple[int, ...]:
        return (1, 3, 5)

    def __len__(self) -> int:
        return len(self.records)

    def record(self, index: int) -> PairRecord:
        return self.records[index]

    def pair_keys(self) -> list[str]:
        return [record.key for record in self.records]

    def blocks(self) -> list[range]:
        return self._blocks or super().blocks()


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference_pixels(image: np.ndarray, size: int) -> torch.Tensor:
    """Centre crop by hand (upstream's box: offsets floor((H - size) / 2)), then resize and ImageNet-normalise."""
    top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    crop = torch.from_numpy(image[top : top + size, left : left + size]).permute(2, 0, 1)
    return normalize(resize_to_unit(crop))[0]


@pytest.mark.parametrize("zoom", [1, 3, 5])
def test_eval_sample_crops_zoom_times_tile_px(zoom: int) -> None:
    pair = record()
    sample = SampleTransform(train=False, zoom_levels=(1, 3, 5), eval_zoom=zoom)(pair, seeded(0))
    assert sample.image.shape == (3, 224, 224)
    assert sample.image.dtype == torch.float32
    assert torch.allclose(sample.image, reference_pixels(pair.image, zoom * TILE_PX_BY_SAT_TYPE["sentinel"]))
    assert (sample.zoom_level, sample.image_caption) == (zoom, f"zoom {zoom}")
    assert sample.mel.shape == (1, N_FRAMES, N_MELS)
    assert torch.all(sample.mel == 30)


def test_eval_defaults_to_the_smallest_zoom_and_first_segment_and_is_deterministic() -> None:
    transform = SampleTransform.for_source(ListSource([record()]), train=False)
    first, second = transform(record(), seeded(0)), transform(record(), seeded(99))
    assert (first.zoom_level, int(first.mel[0, 0, 0])) == (1, 30)
    assert torch.equal(first.image, second.image)
    picked = SampleTransform(train=False, zoom_levels=(1, 3, 5), eval_mel_segment=3)(record(), seeded(0))
    assert int(picked.mel[0, 0, 0]) == 33


def test_train_draws_are_random_but_fixed_by_the_seed() -> None:
    transform = SampleTransform(train=True, zoom_levels=(1, 3, 5))
    pair = record()
    again = transform(pair, seeded(7)), transform(pair, seeded(7))
    assert torch.equal(again[0].image, again[1].image)
    assert torch.equal(again[0].mel, again[1].mel)
    draws = [transform(pair, seeded(seed)) for seed in range(24)]
    assert {sample.zoom_level for sample in draws} == {1, 3, 5}
    assert {int(sample.mel[0, 0, 0]) - 30 for sample in draws} == set(range(5))
    for sample in draws:
        assert sample.image_caption == f"zoom {sample.zoom_level}"


def test_colour_jitter_only_in_training_and_global_rng_untouched() -> None:
    pair = record()
    evaluated = SampleTransform(train=False, zoom_levels=(1,))(pair, seeded(0)).image
    state = torch.get_rng_state()
    trained = [SampleTransform(train=True, zoom_levels=(1,))(pair, seeded(seed)).image for seed in range(3)]
    assert torch.equal(torch.get_rng_state(), state)
    for image in trained:
        assert not torch.allclose(image, evaluated, atol=1e-3)
        # Jitter works on [0, 1] pixels: after normalisation they stay within ImageNet's range of [0, 1].
        assert image.min() >= normalize(torch.zeros(1, 3, 1, 1)).min() - 1e-5
        assert image.max() <= normalize(torch.ones(1, 3, 1, 1)).max() + 1e-5
    assert not torch.equal(trained[0], trained[1])


def test_colour_jitter_strengths_are_a_setting_and_zero_is_none() -> None:
    pair = record()
    evaluated = SampleTransform(train=False, zoom_levels=(1,))(pair, seeded(0)).image
    still = SampleTransform(train=True, zoom_levels=(1,), color_jitter=(0.0, 0.0, 0.0, 0.0))
    assert all(torch.equal(still(pair, seeded(seed)).image, evaluated) for seed in range(3))
    mild = SampleTransform(train=True, zoom_levels=(1,), color_jitter=(0.1, 0.1, 0.1, 0.0))
    upstream = SampleTransform(train=True, zoom_levels=(1,))
    mild_change, upstream_change = (
        sum(float((transform(pair, seeded(seed)).image - evaluated).abs().mean()) for seed in range(8))
        for transform in (mild, upstream)
    )
    assert 0.0 < mild_change < upstream_change / 2


def test_dihedral_training_turns_or_mirrors_the_same_sample_and_evaluation_never() -> None:
    pair = record()
    plain, turned = (SampleTransform(train=True, zoom_levels=(1,), dihedral=on) for on in (False, True))
    seen = set()
    for seed in range(16):
        upright, sample = plain(pair, seeded(seed)), turned(pair, seeded(seed))
        turns = [torch.rot90(upright.image, k, dims=(-2, -1)) for k in range(4)]
        views = turns + [view.flip(-1) for view in turns]
        matches = [i for i, view in enumerate(views) if torch.equal(view, sample.image)]
        assert len(matches) == 1, f"seed {seed}: not one of the 8 turns and mirrors of the upright sample"
        assert (sample.turn, upright.turn) == (matches[0], 0), "the sample records the turn it was given"
        assert torch.equal(dihedral_turn(upright.image, sample.turn), sample.image)
        seen.add(matches[0])
    assert len(seen) >= 6
    evaluate = SampleTransform(train=False, zoom_levels=(1,), dihedral=True)(pair, seeded(0))
    assert torch.equal(evaluate.image, SampleTransform(train=False, zoom_levels=(1,))(pair, seeded(0)).image)
    assert evaluate.turn == 0


def test_a_record_offering_one_zoom_level_is_seen_at_it() -> None:
    pinned, full = record(zooms=(3,)), record()
    train = SampleTransform(train=True, zoom_levels=(1, 3, 5))
    assert {train(pinned, seeded(seed)).zoom_level for seed in range(12)} == {3}
    assert {train(full, seeded(seed)).zoom_level for seed in range(12)} == {1, 3, 5}
    evaluate = SampleTransform(train=False, zoom_levels=(1, 3, 5))
    assert (evaluate(pinned, seeded(0)).zoom_level, evaluate(full, seeded(0)).zoom_level) == (3, 1)
    with pytest.raises(DataError, match="no image caption at zoom 1; use zoom levels \\[3\\]"):
        SampleTransform(train=False, zoom_levels=(1, 3), eval_zoom=1)(pinned, seeded(0))


def test_zoom_without_caption_or_room_is_one_line_error() -> None:
    with pytest.raises(DataError, match="no image caption at zoom 3"):
        SampleTransform(train=False, zoom_levels=(3,))(record(zooms=(1,)), seeded(0))
    small = record(sat_type="googleEarth")
    with pytest.raises(DataError, match="1024x1024 px image is smaller than the 1280 px crop of zoom 5"):
        SampleTransform(train=False, zoom_levels=(5,))(small, seeded(0))
    with pytest.raises(DataError, match="zoom levels"):
        SampleTransform(train=True, zoom_levels=())


def test_dataset_sample_depends_on_seed_epoch_and_index_only() -> None:
    records = [record(seed) for seed in range(4)]
    dataset = PairDataset(ListSource(records), SampleTransform(train=True, zoom_levels=(1, 3, 5)), seed=5)
    first = [dataset[index] for index in range(4)]
    assert all(torch.equal(dataset[index].image, first[index].image) for index in (2, 0))
    dataset.set_epoch(1)
    later = [dataset[index] for index in range(4)]
    assert any(not torch.equal(a.image, b.image) for a, b in zip(first, later, strict=True))
    other_seed = PairDataset(ListSource(records), dataset.transform, seed=6)
    assert any(not torch.equal(a.image, other_seed[i].image) for i, a in enumerate(first))


def test_collate_builds_the_training_batch() -> None:
    records = [record(0), record(1, month=None, hour=23, audio_source="freesound", caption_source="meta")]
    dataset = PairDataset(ListSource(records), SampleTransform(train=True, zoom_levels=(1, 3, 5)))
    batch = next(iter(DataLoader(dataset, batch_size=2, collate_fn=collate)))
    assert len(batch) == 2
    assert batch.keys == ("pair-0", "pair-1")
    assert (batch.images.shape, batch.images.dtype) == ((2, 3, 224, 224), torch.float32)
    assert (batch.zoom_level.shape, batch.zoom_level.dtype) == ((2,), torch.int64)
    assert (batch.mel.shape, batch.mel.dtype) == ((2, 1, N_FRAMES, N_MELS), torch.float32)
    assert batch.audio_captions == ["sound 0", "sound 1"]
    assert batch.image_captions == [f"zoom {int(zoom)}" for zoom in batch.zoom_level]
    assert batch.month.tolist() == [4, -1]
    assert batch.hour.tolist() == [-1, 23]
    meta = batch.metadata()
    assert meta.latlong.shape == (2, 4)
    assert meta.month_valid.tolist() == [1, 0]
    assert meta.time_valid.tolist() == [0, 1]
    assert meta.audio_source.tolist() == [1, 3]
    assert meta.caption_source.tolist() == [2, 0]
    text = (torch.zeros(2, 5, 8), torch.ones(2, 5, dtype=torch.bool))
    model_batch = batch.to_model_batch(text, text, with_metadata=True)
    assert model_batch.metadata is not None
    assert model_batch.images is batch.images
    assert batch.to_model_batch(text, text, with_metadata=False).metadata is None


def test_geosound_shard_through_loader(tmp_path: Path) -> None:
    write_shard(tmp_path / "data/train-00000-of-00001.parquet", geosound_schema(), [geosound_row(0), geosound_row(1)])
    source = GeoSoundParquet(tmp_path, "train")
    dataset = PairDataset(source, SampleTransform.for_source(source, train=True))
    batch = next(iter(DataLoader(dataset, batch_size=2, collate_fn=collate, sampler=BlockShuffleSampler(source))))
    assert sorted(batch.keys) == ["yfcc-0", "yfcc-1"]
    assert batch.images.shape == (2, 3, 224, 224)


def test_block_sampler_reads_each_block_back_to_back() -> None:
    blocks = [range(0, 3), range(3, 5), range(5, 9)]
    source = ListSource([record(0)] * 9, blocks)
    sampler = BlockShuffleSampler(source, seed=1)
    order = list(sampler)
    assert sorted(order) == list(range(9))
    assert len(sampler) == 9
    block_of = {index: number for number, block in enumerate(blocks) for index in block}
    seen_blocks = [block_of[index] for index in order]
    assert seen_blocks == sorted(seen_blocks, key=seen_blocks.index)
    assert list(sampler) == order
    epochs = {tuple(sampler)}
    for epoch in range(1, 6):
        sampler.set_epoch(epoch)
        epochs.add(tuple(sampler))
    assert len(epochs) > 1

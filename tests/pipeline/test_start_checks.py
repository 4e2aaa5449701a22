"""The checks a build makes when it starts, one by one: each input that would fail later is refused first."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import soundfile
from rasterio.transform import Affine
from rasterio.warp import transform_bounds
from support.damage import overwritten_copy
from support.imagery_servers import served_raster
from support.paths import LANDSAT

from model import checkpoint
from model.checkpoint import save_safetensors, sha256_file
from model.config import Sat2SoundConfig
from model.errors import CheckpointError
from model.sat2sound import Sat2Sound
from pipeline import config as config_module
from pipeline.build import idle_gpus_line, plan_build
from pipeline.config import ModelSettings, Query, load_build_config, load_plan_inputs
from pipeline.errors import BuildConfigError, ImageryCoverageError, ImageryMismatchError, QueryError
from pipeline.imagery import open_reader
from pipeline.model_setup import check_device, check_model, prepare_model
from pipeline.queries import check_query_files

SCENE_REGION = "-54.664,-25.489,-54.354,-25.208"
MINIMAL = {"name": "test", "region": SCENE_REGION, "queries": [{"id": "birds", "text": "birds"}]}


def model_settings(**model: Any) -> ModelSettings:
    return load_build_config({**MINIMAL, "model": model}).model


def plan_inputs(region: str, source: Path | str, **imagery: Any) -> Any:
    return load_plan_inputs(
        {"region": region, "imagery": {"source": str(source), **imagery}, "model": {"zoom_level": 3}}
    )


@pytest.fixture(scope="module")
def antimeridian_raster(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 30 x 10 km UTM 60S scene over Fiji's 180th meridian: its EPSG:4326 box has west > east."""
    path = tmp_path_factory.mktemp("antimeridian") / "fiji.tif"
    profile = {"driver": "GTiff", "width": 300, "height": 100, "count": 3, "dtype": "uint8", "crs": "EPSG:32760"}
    with rasterio.open(path, "w", transform=Affine(100, 0, 800_000, 0, -100, 8_125_000), **profile) as dataset:
        dataset.write(np.full((3, 100, 300), 100, np.uint8))
    return path


def test_a_raster_answers_its_footprint_and_a_world_source_none(tmp_path: Path) -> None:
    with rasterio.open(LANDSAT) as scene:
        expected = transform_bounds(scene.crs, "EPSG:4326", *scene.bounds)
    with open_reader(str(LANDSAT), cache_dir=tmp_path) as reader:
        np.testing.assert_allclose(reader.footprint_lnglat(), expected, atol=1e-6)
    with open_reader("esri", cache_dir=tmp_path) as reader:
        assert reader.footprint_lnglat() is None


def test_a_region_outside_a_raster_is_refused_when_the_build_is_planned() -> None:
    with pytest.raises(ImageryCoverageError) as raised:
        plan_build(plan_inputs("-60,10,-59,11", LANDSAT))
    message = str(raised.value)
    assert "region -60,10,-59,11 lies outside the imagery" in message and str(LANDSAT) in message
    assert "54.6642°W to 54.3535°W, 25.4894°S to 25.2071°S" in message and "set imagery.source" in message
    # A region that reaches into the scene is planned (its tiles outside the scene are left empty).
    assert plan_build(plan_inputs("-54.9,-25.489,-54.6,-25.208", LANDSAT)).plan.tile_count > 0


def test_the_starts_messages_about_a_raster_url_hide_its_credentials(tmp_path: Path) -> None:
    with served_raster(LANDSAT, tmp_path / "served") as served:
        url, shown = f"{served}?sig=s3cret", f"{served}?sig=***"
        with pytest.raises(ImageryCoverageError) as outside:
            plan_build(plan_inputs("-60,10,-59,11", url))
        coarse = load_plan_inputs(
            {"region": SCENE_REGION, "imagery": {"source": url}, "model": {"sat_type": "bingmap", "zoom_level": 1}}
        )
        with pytest.raises(ImageryMismatchError) as too_coarse:
            plan_build(coarse)
        fit = plan_build(plan_inputs(SCENE_REGION, url)).plan.imagery
    for message in (str(outside.value), str(too_coarse.value)):
        assert shown in message and "s3cret" not in message
    assert fit.source == shown


@pytest.mark.parametrize(("region", "inside"), [("-179.95,-17.0,-179.92,-16.96", True), ("170,-17,171,-16", False)])
def test_the_footprint_of_a_raster_across_the_antimeridian_has_two_sides(
    antimeridian_raster: Path, region: str, inside: bool
) -> None:
    inputs = plan_inputs(region, antimeridian_raster, native_gsd_m=10)
    if inside:
        assert plan_build(inputs).plan.tile_count > 0
    else:
        with pytest.raises(ImageryCoverageError, match=r"179\.8166°E to 179\.9006°W"):
            plan_build(inputs)


@pytest.mark.parametrize(
    ("device", "words"),
    [("tpu", "config.model.device: unknown device 'tpu'"), ("cuda:99", "config.model.device: device 'cuda:99'")],
)
def test_a_device_this_machine_lacks_is_refused(device: str, words: str) -> None:
    with pytest.raises(BuildConfigError) as raised:
        check_device(device)
    assert words in str(raised.value) and "use " in str(raised.value)


def test_auto_and_cpu_pass_without_probing_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr("model.devices.pick_device")
    check_device("auto")
    check_device("cpu")


def test_a_text_backbone_that_cannot_load_is_refused_when_text_queries_need_it(tmp_path: Path) -> None:
    settings = model_settings(text_backbone=str(tmp_path / "absent"))
    with pytest.raises(BuildConfigError, match=r"config\.model\.text_backbone: no T5 model directory at"):
        check_model(settings, text_queries=True)
    check_model(settings, text_queries=False)
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text('{"model_type": "t5", "d_model": 32}')
    with pytest.raises(BuildConfigError, match="gives 32-d states but the model expects 384-d"):
        check_model(model_settings(text_backbone=str(t5)), text_queries=True)
    check_model(model_settings(text_backbone="minilm"), text_queries=True)


def test_an_audio_query_cut_short_or_without_frames_is_refused(tmp_path: Path) -> None:
    whole = tmp_path / "rain.wav"
    soundfile.write(whole, 0.1 * np.sin(np.arange(32_000, dtype=np.float32) / 5), 16_000, subtype="PCM_16")
    cut = tmp_path / "cut.wav"
    cut.write_bytes(whole.read_bytes()[:200])
    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros(0, np.float32), 16_000)
    check_query_files([Query("rain", audio=str(whole)), Query("birds", text="birds")])
    with pytest.raises(QueryError, match=re.escape(f"query 'rain': audio file {cut} is truncated")):
        check_query_files([Query("ok", audio=str(whole), text="rain"), Query("rain", audio=str(cut))])
    with pytest.raises(QueryError, match=r"query 'quiet': audio file .* holds no samples"):
        check_query_files([Query("quiet", audio=str(empty))])


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    weights, _ = save_safetensors(
        Sat2Sound(Sat2SoundConfig.small("none")), tmp_path_factory.mktemp("ckpt") / "small.safetensors"
    )
    return weights


def test_a_checkpoint_with_garbage_inside_is_refused_naming_the_tensor(small_checkpoint: Path, tmp_path: Path) -> None:
    corrupt = overwritten_copy(small_checkpoint, tmp_path / "corrupt.safetensors")
    check_model(model_settings(checkpoint=str(small_checkpoint)), text_queries=True)
    with pytest.raises(CheckpointError, match=r"corrupt\.safetensors is corrupt: tensor \S+"):
        check_model(model_settings(checkpoint=str(corrupt)), text_queries=False)


def test_weights_an_earlier_start_checked_are_not_loaded_again_unless_the_file_changed(
    small_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = tmp_path / "mine.safetensors"
    for suffix in (".safetensors", ".json"):
        weights.with_suffix(suffix).write_bytes(small_checkpoint.with_suffix(suffix).read_bytes())
    settings = model_settings(checkpoint=str(weights))
    recorded = prepare_model(settings, tmp_path, tmp_path / "model.json")
    with monkeypatch.context() as patched:
        patched.setattr(checkpoint, "load_model", _loading_refused)
        check_model(settings, text_queries=False, recorded=recorded)
        with pytest.raises(AssertionError, match="loaded the weights"):
            check_model(settings, text_queries=False, recorded=recorded._replace(sha256="0" * 64))
        hashed: list[Path] = []
        patched.setattr(checkpoint, "sha256_file", lambda path: hashed.append(path) or sha256_file(path))
        expected = model_settings(checkpoint=str(weights), checkpoint_sha256=recorded.sha256)
        check_model(expected, text_queries=False, recorded=recorded)
        assert hashed == [weights]  # the expected sha256 and the record are checked against one hash
    overwritten_copy(small_checkpoint, weights)  # corrupted in place, after the record was made
    with pytest.raises(CheckpointError, match=r"mine\.safetensors is corrupt: tensor \S+"):
        check_model(settings, text_queries=False, recorded=recorded)


def _loading_refused(*_: object) -> None:
    raise AssertionError("the check loaded the weights")


def test_the_expected_sha256_of_a_checkpoint_is_checked(small_checkpoint: Path) -> None:
    digest = sha256_file(small_checkpoint)
    check_model(model_settings(checkpoint=str(small_checkpoint), checkpoint_sha256=digest), text_queries=False)
    other = "ab" * 32
    with pytest.raises(BuildConfigError) as raised:
        check_model(model_settings(checkpoint=str(small_checkpoint), checkpoint_sha256=other), text_queries=False)
    assert str(raised.value).startswith("config.model.checkpoint_sha256: ")
    assert f"has sha256 {digest}, not the expected {other}" in str(raised.value)
    with pytest.raises(BuildConfigError, match=r"model\.checkpoint is untrained"):
        check_model(model_settings(checkpoint_sha256=digest), text_queries=False)
    with pytest.raises(BuildConfigError, match=r"config\.model\.checkpoint_sha256: 'abc' does not match"):
        model_settings(checkpoint=str(small_checkpoint), checkpoint_sha256="abc")


@pytest.mark.parametrize(
    ("device", "gpus", "jobs", "limit", "said"),
    [
        ("auto", ("0", "1", "2", "3"), 7, 1, "4 GPUs here and embed jobs take one each: add --resources gpu=4"),
        ("cuda", ("0", "1"), 2, 1, "2 GPUs here"),
        ("auto", ("0", "1"), 1, 1, None),  # one job: nothing to run side by side
        ("auto", ("0", "1"), 4, 2, None),  # already one on each
        ("auto", ("0", "1"), 4, None, None),  # no limit: the jobs run as the cores allow, each claiming a GPU
        ("auto", ("0",), 4, 1, None),
        ("cuda:1", ("0", "1"), 4, 1, None),  # every job on GPU 1
        ("cpu", ("0", "1"), 4, 1, None),
    ],
)
def test_the_start_says_how_to_run_an_embed_job_on_each_gpu_where_they_would_idle(
    device: str, gpus: tuple[str, ...], jobs: int, limit: int | None, said: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config_module, "visible_gpus", lambda: gpus)
    line = idle_gpus_line(load_build_config({**MINIMAL, "model": {"device": device}}), jobs, limit)
    assert (line is None) if said is None else (line is not None and line.startswith(said)), line

"""The build config: schema, defaults, one-line errors, and what makes each workflow step rerun."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import soundfile
import yaml
from rasterio.warp import transform_bounds
from support.paths import LANDSAT

from pipeline import config as config_module
from pipeline.build import check_output_dir
from pipeline.config import (
    DEFAULT_CONFIG_PATH,
    STEP_KEYS,
    TilingSettings,
    Time,
    load_build_config,
    load_plan_inputs,
    read_settings,
    recorded_config,
    settings_digest,
    write_settings,
)
from pipeline.errors import BuildConfigError, OutputDirError, QueryError
from pipeline.queries import check_query_files
from pipeline.regions import parse_region

MINIMAL = {"name": "test", "region": "1,1,1.1,1.1", "queries": [{"id": "birds", "text": "birds"}]}
STEPS = (*STEP_KEYS, "mosaic")


def config_with(**changes: Any) -> dict[str, Any]:
    return {**json.loads(json.dumps(MINIMAL)), **changes}


def digests(config: dict[str, Any]) -> dict[str, str]:
    loaded = load_build_config(config)
    return {step: settings_digest(loaded, step) for step in STEPS}


def test_missing_keys_take_the_schema_defaults() -> None:
    config = load_build_config(MINIMAL)
    assert config.model.checkpoint == "untrained" and config.model.untrained
    assert config.imagery.source == "esri" and config.imagery.min_coverage == 0.5
    assert config.tiling == TilingSettings(tile_zoom_offset=0, chunk_zoom=None, max_tiles=250_000)
    assert config.outputs.concepts_top_k == 3 and config.outputs.crs is None and config.outputs.top_k == 20
    assert config.outputs.zones is None and config.outputs.zone_field is None
    assert config.build_dir == Path("outputs/test")


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"model": {"zoom_level": 0}}, "config.model.zoom_level: 0 is less than the minimum of 1"),
        ({"model": {"precision": "fp8"}}, "config.model.precision: 'fp8' is not one of"),
        ({"model": {"compile": "auto"}}, "config.model.compile: 'auto' is not true or false; use true to compile"),
        (
            {"tiling": {"offset": 1}},
            "config.tiling: Additional properties are not allowed ('offset' was unexpected)",
        ),
        ({"queries": [{"id": "a b", "text": "x"}]}, "config.queries[0].id: 'a b' does not match"),
        (
            {"queries": [{"id": "concepts", "text": "x"}]},
            "config.queries[0].id: 'concepts' would name one of the build's own maps (cog/concepts.tif,"
            " cog/dominant.tif, cog/<id>_percentile.tif); give the query another id",
        ),
        ({"queries": [{"id": "dominant", "text": "x"}]}, "config.queries[0].id: 'dominant' would name one of"),
        ({"queries": [{"id": "birds_percentile", "text": "x"}]}, "'birds_percentile' would name one of the build's"),
        (
            {"queries": [{"id": "birds", "text": "x"}, {"id": "only_id"}]},
            """config.queries[1]: query 'only_id' has neither text nor audio; give it text: "..." or audio: PATH""",
        ),
        ({"queries": [{"text": "x"}]}, "config.queries[0]: 'id' is a required property"),
        (
            {"tiling": {"chunk_zoom": -1}},
            "config.tiling.chunk_zoom: -1 is below 0: a chunk zoom must be between 0 and the output zoom;",
        ),
        ({"queries": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]}, "id 'a' is used twice"),
        (
            {"queries": [{"id": "A", "text": "x"}, {"id": "a", "text": "y"}]},
            "config.queries: ids 'A' and 'a' differ only in case (GeoPackage and field names ignore case);"
            " give every query its own id",
        ),
        ({"queries": [{"id": "a", "text": "🦆🐸🦉"}]}, "config.queries[0].text: '🦆🐸🦉' holds no words; give"),
        ({"queries": [{"id": "a", "text": "..."}]}, "config.queries[0].text: '...' holds no words; give"),
        ({"queries": [{"id": "a", "text": "_"}]}, "config.queries[0].text: '_' holds no words; give"),
        ({"model": {"zoom_level": 3.0}}, "config.model.zoom_level: 3.0 is not of type 'integer'; see config/schema"),
        ({"model": {"hour": [6.0, 18]}}, "config.model.hour[0]: 6.0 is not of type 'integer'; see config/schema.json"),
        ({"outputs": {"top_k": True}}, "config.outputs.top_k: True is not of type 'integer'"),
        ({"output_dir": "/"}, "config.output_dir: '/' is the file system's root; set output_dir to a folder of its"),
        (
            {"output_dir": str(config_module.REPO / "pipeline" / "maps")},
            f"config.output_dir: '{config_module.REPO}/pipeline/maps' lies in the project's own folder"
            f" {config_module.REPO}/pipeline; set output_dir to a folder of its own, e.g. outputs",
        ),
        ({"output_dir": str(config_module.REPO / "examples")}, "lies in the project's own folder"),
        ({"queries": []}, "config.queries: [] should be non-empty"),
        ({"outputs": {"crs": "EPSG:999999"}}, "config.outputs.crs: 'EPSG:999999' is not a known CRS"),
        ({"outputs": {"crs": "EPSG:4978"}}, "config.outputs.crs: 'EPSG:4978' is not a map CRS"),
        ({"imagery": {"min_coverage": math.nan}}, "config.imagery.min_coverage: nan is not a finite number"),
        (
            {"imagery": {"source": "scene.tif", "options": {"stretch": [0, math.inf]}}},
            "config.imagery.options.stretch[1]: inf is not a finite number; give a number",
        ),
        ({"outputs": {"zarr_chunk_px": 10**12}}, "config.outputs.zarr_chunk_px: 1000000000000 is greater than"),
    ],
)
def test_config_errors_are_one_line_naming_the_key(changes: dict[str, Any], words: str) -> None:
    with pytest.raises(BuildConfigError) as raised:
        load_build_config(config_with(**changes))
    message = str(raised.value)
    assert words in message and "\n" not in message


def test_text_of_any_script_ids_of_one_case_and_the_repository_and_its_outputs_are_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    queries = [{"id": "niao", "text": "鸟鸣"}, {"id": "Birds", "text": "x"}, {"id": "birds_2", "text": "2"}]
    assert [query.text for query in load_build_config(config_with(queries=queries)).queries] == ["鸟鸣", "x", "2"]
    monkeypatch.chdir(config_module.REPO)
    for output_dir in (".", "outputs", str(config_module.REPO / "outputs" / "maps")):
        assert load_build_config(config_with(output_dir=output_dir)).output_dir == output_dir


def test_the_output_dir_is_read_from_where_the_build_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(config_module.REPO / "config")
    with pytest.raises(BuildConfigError, match=r"config\.output_dir: 'outputs' lies in the project's own folder"):
        load_plan_inputs({"region": "St. Louis"})


def test_a_builds_settings_read_from_another_folder_keep_their_relative_output_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # `python -m pipeline query BUILD` reads settings.json from wherever it runs: from the project's config/
    # folder, 'outputs' would resolve inside the project's own folders, which only a new build must avoid.
    path = tmp_path / "settings.json"
    write_settings(load_build_config(config_with(output_dir="outputs")), path)
    monkeypatch.chdir(config_module.REPO / "config")
    assert read_settings(path).output_dir == "outputs"
    with pytest.raises(BuildConfigError, match="lies in the project's own folder"):
        load_build_config(config_with(output_dir="outputs"))


def test_a_crs_gdal_does_not_know_is_refused_at_load_without_gdal_noise(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(BuildConfigError, match="EPSG:999999"):
        load_plan_inputs({"region": "St. Louis", "outputs": {"crs": "EPSG:999999"}})
    assert capfd.readouterr().err == ""
    assert load_build_config(config_with(outputs={"crs": "EPSG:32633"})).outputs.crs == "EPSG:32633"


def test_an_empty_config_says_which_file_to_pass() -> None:
    with pytest.raises(BuildConfigError, match=r"--configfile config\.yaml"):
        load_build_config({})


@pytest.mark.parametrize("name", ["config.yaml", "city.yaml"])
def test_shipped_configs_are_valid(name: str) -> None:
    load_build_config(yaml.safe_load((DEFAULT_CONFIG_PATH.parent / name).read_text()))


def test_adding_a_query_changes_only_the_settings_of_query_steps() -> None:
    before = digests(MINIMAL)
    after = digests(config_with(queries=[*MINIMAL["queries"], {"id": "b", "text": "x"}]))
    assert {step for step in before if before[step] != after[step]} == {"queries", "mosaic"}


def test_how_jobs_run_is_never_a_reason_to_rerun_them() -> None:
    tuned = config_with(
        model={"batch_size": 7, "loader_workers": 5, "device": "cpu"}, imagery={"cache_dir": "/c", "offline": True}
    )
    assert digests(tuned) == digests(MINIMAL)
    assert recorded_config(load_build_config(tuned)) == recorded_config(load_build_config(MINIMAL))


def test_outputs_record_no_credentials() -> None:
    url = "https://b.s3.amazonaws.com/m.tif?X-Amz-Credential=AKIA&X-Amz-Signature=f00"
    gdal_env = {"AWS_SECRET_ACCESS_KEY": "s3cret", "GDAL_HTTP_USERPWD": "me:pw", "GDAL_HTTP_MAX_RETRY": 3}
    config = load_build_config(config_with(imagery={"source": url, "options": {"gdal_env": gdal_env}}))
    recorded = recorded_config(config)
    assert recorded["imagery"]["source"] == "https://b.s3.amazonaws.com/m.tif?X-Amz-Credential=***&X-Amz-Signature=***"
    assert recorded["imagery"]["options"]["gdal_env"] == {
        "AWS_SECRET_ACCESS_KEY": "***",
        "GDAL_HTTP_USERPWD": "***",
        "GDAL_HTTP_MAX_RETRY": 3,
    }
    assert "s3cret" not in json.dumps(recorded) and "f00" not in json.dumps(recorded)
    assert config.imagery.options["gdal_env"] == gdal_env  # the build itself still reads with them


@pytest.mark.parametrize(
    ("changes", "steps"),
    [
        ({"imagery": {"min_coverage": 0.9}}, {"embed", "mosaic"}),
        ({"model": {"month": 3}}, {"embed", "mosaic"}),
        ({"model": {"hour": [6, 18]}}, {"embed", "mosaic"}),
        ({"model": {"text_backbone": "minilm"}}, {"queries", "gallery", "mosaic"}),
        ({"outputs": {"gallery": "recordings"}}, {"gallery", "score", "mosaic"}),
        ({"outputs": {"gallery_top_k": 3}}, {"score", "mosaic"}),
        ({"outputs": {"crs": "EPSG:4326"}}, {"cogs", "mosaic"}),
        ({"outputs": {"top_k": 5}}, {"places", "mosaic"}),
        ({"outputs": {"zones": "districts.gpkg"}}, {"zones", "project", "mosaic"}),
        ({"model": {"seed": 3}}, {"model", "mosaic"}),
    ],
)
def test_each_setting_reruns_the_steps_whose_output_it_changes(changes: dict[str, Any], steps: set[str]) -> None:
    before, after = digests(MINIMAL), digests(config_with(**changes))
    assert {step for step in before if before[step] != after[step]} == steps


def test_the_zone_field_reruns_the_zone_statistics_alone() -> None:
    zones = config_with(outputs={"zones": "districts.gpkg"})
    before, after = digests(zones), digests(config_with(outputs={"zones": "districts.gpkg", "zone_field": "code"}))
    assert {step for step in before if before[step] != after[step]} == {"zones", "mosaic"}


def test_the_settings_file_round_trips_and_is_rewritten_only_on_change(tmp_path: Path) -> None:
    config = load_build_config(MINIMAL)
    path = tmp_path / "settings.json"
    write_settings(config, path)
    assert read_settings(path) == config
    stamp = path.stat().st_mtime_ns
    write_settings(load_build_config(MINIMAL), path)
    assert path.stat().st_mtime_ns == stamp
    write_settings(load_build_config(config_with(model={"device": "cpu"})), path)
    assert read_settings(path).model.device == "cpu"


@pytest.mark.parametrize(
    ("device", "in_sight", "gpus", "shared"),
    [
        ("cpu", ("0", "1"), 0, ()),
        ("cuda", (), 1, ()),
        ("cuda", ("0", "1"), 1, ("0", "1")),
        ("cuda:1", ("0", "1"), 1, ()),
        ("mps", (), 1, ()),
        ("auto", ("0",), 1, ("0",)),
        ("auto", ("2", "3"), 1, ("2", "3")),
        ("auto", (), 0, ()),
    ],
)
def test_an_embed_job_takes_a_gpu_where_it_runs_on_one_and_shares_out_the_gpus_unless_the_config_names_one(
    device: str, in_sight: tuple[str, ...], gpus: int, shared: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config_module, "visible_gpus", lambda: in_sight)
    model = load_build_config(config_with(model={"device": device})).model
    assert (model.embed_gpus, model.shared_gpus) == (gpus, shared)


def test_plan_inputs_need_no_name_or_queries_and_share_the_defaults() -> None:
    inputs = load_plan_inputs({"region": "St. Louis"})
    build = load_build_config(config_with(region="St. Louis"))
    assert inputs == replace(build.plan_inputs, queries=None)
    assert build.plan_inputs.query_count == len(build.queries)
    queries = [{"id": "a", "text": "a"}, {"id": "b", "text": "b"}]
    assert load_plan_inputs({"region": "St. Louis", "queries": queries}).query_count == 2
    with pytest.raises(BuildConfigError, match=r"config\.tiling\.tile_zoom_offset: -3 is less than the minimum of 0"):
        load_plan_inputs({"region": "St. Louis", "tiling": {"tile_zoom_offset": -3}})


def test_an_output_folder_that_cannot_be_created_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputDirError, match="cannot write into the output folder"):
        check_output_dir(blocker / "build")


def test_query_audio_files_are_checked_before_any_job(tmp_path: Path) -> None:
    clip = tmp_path / "clip.flac"
    soundfile.write(clip, np.sin(np.arange(1600, dtype=np.float32) / 5), 16000)
    config = load_build_config(config_with(queries=[{"id": "ok", "audio": str(clip), "text": "rain"}]))
    check_query_files(config.queries)
    assert config.queries[0].kind == "composed" and config.queries[0].label == "clip.flac + rain"
    broken = tmp_path / "broken.ogg"
    broken.write_bytes(b"OggS" + bytes(100))
    with pytest.raises(QueryError, match="cannot read"):
        check_query_files(replace(config, queries=(replace(config.queries[0], audio=str(broken)),)).queries)


def test_landsat_scene_bounds_match_the_default_region() -> None:
    # The default config maps the bundled scene: its region must lie inside the scene's extent.
    region = parse_region(yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())["region"])
    with rasterio.open(LANDSAT) as scene:
        west, south, east, north = transform_bounds(scene.crs, "EPSG:4326", *scene.bounds)
    r_west, r_south, r_east, r_north = region.geometry.bounds
    assert west <= r_west < r_east <= east and south <= r_south < r_north <= north


def test_lists_or_all_of_months_and_hours_give_the_builds_times_month_major() -> None:
    model = load_build_config(config_with(model={"month": [6, 12], "hour": "all"})).model
    times = model.times.all
    assert len(times) == 48 and times[:2] == (Time(6, 0), Time(6, 1)) and times[24] == Time(12, 0)
    assert model.times.sweeps and model.swept == ("month", "hour")
    one = load_build_config(config_with(model={"month": 6})).model
    assert one.times.all == (Time(6, None),) and not one.times.sweeps and one.swept == ()
    assert load_build_config(config_with(model={"month": "all"})).model.times.months == tuple(range(1, 13))
    assert [time.label for time in (Time(6, 14), Time(None, 3), Time(None, None))] == [
        "month 6, hour 14",
        "hour 3",
        "time unknown",
    ]

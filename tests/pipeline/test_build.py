"""The map build's parts without Snakemake: config, imagery fit, plan and grid math, scores, Zarr store."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import mercantile
import numpy as np
import pytest
import rasterio
import soundfile
import torch
import xarray as xr
import yaml
from rasterio.warp import transform_bounds

from pipeline.build_plan import (
    chunk_footprints,
    chunk_tile,
    grid_index,
    make_build_plan,
    plan_cover,
    read_plan,
    tile_centres_lnglat,
    write_plan,
)
from pipeline.config import (
    DEFAULT_CONFIG_PATH,
    TilingSettings,
    load_build_config,
    runtime_settings,
    step_settings,
)
from pipeline.embed import model_batches, top_concepts
from pipeline.errors import BuildConfigError, ImageryMismatchError, OutputDirError, QueryError
from pipeline.fetch import fetches_ahead
from pipeline.gsd import ImageryFit, check_imagery_fit, fitting_zoom_level, native_gsd_m
from pipeline.imagery import LocalRasterReader, TileCache, XYZReader
from pipeline.preflight import check_output_dir
from pipeline.queries import QueryEmbeddings, check_query_files, write_queries
from pipeline.regions import parse_region
from pipeline.store.scores import percentile_within, score_chunk, softmax_over_queries
from pipeline.store.write import ChunkFiles, atomic_directory, soundscape_dataset, write_soundscape

REPO = Path(__file__).resolve().parents[2]
LANDSAT = REPO / "examples" / "landsat8_itaipu_30m.tif"
WORLD_M = 2 * math.pi * 6378137.0
MINIMAL = {"name": "test", "region": "1,1,1.1,1.1", "queries": [{"id": "birds", "text": "birds"}]}
FIT = ImageryFit("test", "test-source", "test attribution", 1.0, 4.0)


def mean_rank_percentile(values: np.ndarray, score: float) -> float:
    """By definition: the share of values below `score` plus half of those equal to it, in percent."""
    below = sum(float(value) < score for value in values)
    equal = sum(float(value) == score for value in values)
    return 100.0 * (below + 0.5 * equal) / len(values)


def softmax(logits: np.ndarray) -> np.ndarray:
    weights = np.exp(logits - logits.max())
    return weights / weights.sum()


def config_with(**changes: Any) -> dict[str, Any]:
    return {**json.loads(json.dumps(MINIMAL)), **changes}


# --- config --------------------------------------------------------------------------------------------


def test_missing_keys_take_the_schema_defaults() -> None:
    config = load_build_config(MINIMAL)
    assert config.model.checkpoint == "untrained" and config.model.untrained
    assert config.imagery.source == "esri" and config.imagery.min_coverage == 0.5
    assert config.tiling == TilingSettings(tile_zoom_offset=0, chunk_zoom=None, max_tiles=250_000)
    assert config.outputs.concepts_top_k == 3 and config.outputs.crs is None
    assert config.build_dir == Path("outputs/test")


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"model": {"zoom_level": 0}}, "config.model.zoom_level: 0 is less than the minimum of 1"),
        ({"model": {"precision": "fp8"}}, "config.model.precision: 'fp8' is not one of"),
        (
            {"tiling": {"offset": 1}},
            "config.tiling: Additional properties are not allowed ('offset' was unexpected)",
        ),
        ({"queries": [{"id": "a b", "text": "x"}]}, "config.queries[0].id: 'a b' does not match"),
        (
            {"queries": [{"id": "concepts", "text": "x"}]},
            "config.queries[0].id: 'concepts' should not be valid",
        ),
        ({"queries": [{"id": "only_id"}]}, "config.queries[0]"),
        ({"queries": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]}, "id 'a' is used twice"),
        ({"queries": []}, "config.queries: [] should be non-empty"),
    ],
)
def test_config_errors_are_one_line_naming_the_key(changes: dict[str, Any], words: str) -> None:
    with pytest.raises(BuildConfigError) as raised:
        load_build_config(config_with(**changes))
    message = str(raised.value)
    assert words in message and "\n" not in message


def test_an_empty_config_says_which_file_to_pass() -> None:
    with pytest.raises(BuildConfigError, match=r"--configfile config\.yaml"):
        load_build_config({})


@pytest.mark.parametrize("name", ["config.yaml", "city.yaml"])
def test_shipped_configs_are_valid(name: str) -> None:
    load_build_config(yaml.safe_load((DEFAULT_CONFIG_PATH.parent / name).read_text()))


def test_adding_a_query_changes_only_the_settings_of_query_steps() -> None:
    before = step_settings(load_build_config(MINIMAL))
    after = step_settings(
        load_build_config(config_with(queries=[*MINIMAL["queries"], {"id": "b", "text": "x"}]))
    )
    changed = {step for step in before if before[step] != after[step]}
    assert changed == {"queries", "mosaic"}


def test_how_jobs_run_is_never_a_reason_to_rerun_them() -> None:
    base = load_build_config(MINIMAL)
    tuned = load_build_config(
        config_with(
            model={"batch_size": 7, "loader_workers": 5, "device": "cpu"}, imagery={"cache_dir": "/c"}
        )
    )
    before, after = step_settings(base), step_settings(tuned)
    assert {step for step in before if before[step] != after[step]} == {"mosaic"}  # it records the config
    assert runtime_settings(tuned) == {
        "cache_dir": "/c",
        "offline": False,
        "device": "cpu",
        "batch_size": 7,
        "loader_workers": 5,
    }


@pytest.mark.parametrize(
    ("source", "remote"),
    [("esri", True), ("xyz:https://h/{z}/{x}/{y}.png", True), ("stac:https://h", True), ("scene.tif", False)],
)
def test_only_remote_sources_are_fetched_ahead(source: str, remote: bool) -> None:
    assert fetches_ahead(source) is remote


# --- imagery fit -----------------------------------------------------------------------------------------


def test_fitting_zoom_level_is_the_first_whose_view_is_as_coarse_as_the_imagery() -> None:
    # sentinel: 256 px x 10 m per zoom level over 224 px = 11.43 m/px per level.
    assert fitting_zoom_level(30.0, "sentinel") == 3
    assert fitting_zoom_level(11.0, "sentinel") == 1
    assert fitting_zoom_level(0.3, "bingmap") == 1


def test_imagery_up_to_one_and_a_half_times_coarser_fits(tmp_path: Path) -> None:
    with XYZReader("https://h/{z}/{x}/{y}.png", cache=TileCache(tmp_path)) as reader:
        model_m = 5 * 300 * 0.6 / 224
        assert check_imagery_fit(reader, "xyz", 1.5 * model_m, "bingmap", 5).model_gsd_m == pytest.approx(
            model_m
        )
        with pytest.raises(ImageryMismatchError) as raised:
            check_imagery_fit(reader, "xyz", 1.51 * model_m, "bingmap", 5)
    message = str(raised.value)
    assert f"expects {model_m:.3g} m/px" in message and "set model.zoom_level: 8" in message


def test_native_gsd_of_a_local_raster_and_of_a_tile_server(tmp_path: Path) -> None:
    with LocalRasterReader(LANDSAT) as landsat:
        assert native_gsd_m(landsat, -25.3) == pytest.approx(30.0, rel=0.01)
    with XYZReader("https://h/{z}/{x}/{y}.png", cache=TileCache(tmp_path), max_zoom=17) as server:
        expected = WORLD_M / 2**17 / 256 * math.cos(math.radians(40.0))
        assert native_gsd_m(server, 40.0) == pytest.approx(expected, rel=1e-9)


# --- plan and grid ---------------------------------------------------------------------------------------


def test_tile_zoom_offset_refines_the_automatic_zoom() -> None:
    region = parse_region("-54.664,-25.489,-54.354,-25.208")
    auto = make_build_plan(region, "sentinel", 3, TilingSettings(0, None, 10_000), FIT)
    finer = make_build_plan(region, "sentinel", 3, TilingSettings(2, None, 10_000), FIT)
    assert finer.tile_zoom == auto.tile_zoom + 2 == auto.auto_tile_zoom + 2
    pixel = (finer.grid.bounds.right - finer.grid.bounds.left) / finer.grid.width
    assert pixel == pytest.approx(WORLD_M / 2**finer.tile_zoom)
    assert finer.tile_count > 10 * auto.tile_count


@pytest.mark.filterwarnings("ignore::pipeline.errors.RegionWarning")  # the second bbox crosses ±180°
@pytest.mark.parametrize("region_spec", ["-72.2245,18.5035,-72.2015,18.5245", "179.99,-0.01,-179.99,0.01"])
def test_grid_index_puts_each_tile_on_its_own_pixel(region_spec: str, tmp_path: Path) -> None:
    region = parse_region(region_spec)
    plan = make_build_plan(region, "bingmap", 5, TilingSettings(2, None, 10_000), FIT)
    tile_cover = plan_cover(plan)
    rows, cols = grid_index(plan, tile_cover.x, tile_cover.y)
    size = WORLD_M / 2**plan.tile_zoom
    for x, y, row, col in zip(tile_cover.x, tile_cover.y, rows, cols, strict=True):
        left, _, _, top = mercantile.xy_bounds(mercantile.Tile(int(x), int(y), plan.tile_zoom))
        # Past the antimeridian the grid continues east of +180°: the pixel is one world east of the tile.
        worlds = (plan.grid.bounds.left + col * size - left) / WORLD_M
        assert worlds == pytest.approx(round(worlds), abs=1e-9)
        assert plan.grid.bounds.top - row * size == pytest.approx(top, abs=1e-3)
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) == len(tile_cover)
    assert (
        rows.min() >= 0 and cols.min() >= 0 and rows.max() < plan.grid.height and cols.max() < plan.grid.width
    )
    write_plan(tmp_path / "plan.json", plan)
    assert read_plan(tmp_path / "plan.json") == plan


def test_tile_centres_are_the_web_mercator_centres() -> None:
    tiles = [mercantile.Tile(39245, 58670, 17), mercantile.Tile(0, 0, 3)]
    lon, lat = tile_centres_lnglat(tiles)
    for tile, tile_lon, tile_lat in zip(tiles, lon, lat, strict=True):
        left, bottom, right, top = mercantile.xy_bounds(tile)
        expected = mercantile.lnglat((left + right) / 2, (bottom + top) / 2)
        assert (tile_lon, tile_lat) == pytest.approx(expected, abs=1e-9)


def test_chunk_footprints_hold_exactly_the_chunk_tiles() -> None:
    region = parse_region("-72.2245,18.5035,-72.2015,18.5245")
    plan = make_build_plan(region, "bingmap", 5, TilingSettings(2, 15, 10_000), FIT)
    tile_cover = plan_cover(plan)
    tiles = [view.tile for chunk in plan.chunks for view in chunk_footprints(plan, tile_cover, chunk)]
    assert sorted(tiles) == sorted(tile_cover.tiles())
    for chunk in plan.chunks:
        parent = chunk_tile(chunk)
        assert all(
            mercantile.parent(view.tile, zoom=parent.z) == parent
            for view in chunk_footprints(plan, tile_cover, chunk)
        )


# --- scores and concepts ---------------------------------------------------------------------------------


def test_percentile_is_the_mean_rank_among_the_regions_valid_scores() -> None:
    rng = np.random.default_rng(0)
    region = np.round(rng.normal(size=200), 1)  # rounding makes ties
    probe = np.array([region[3], -5.0, 5.0, np.nan, 0.05])
    got = percentile_within(probe, np.sort(region))
    expected = [mean_rank_percentile(region, float(value)) for value in probe[:3]]
    np.testing.assert_allclose(got[:3], expected, rtol=1e-5)
    assert np.isnan(got[3]) and 0 < got[4] < 100
    assert np.isnan(percentile_within(probe, np.empty(0))).all()


def test_softmax_runs_across_queries_with_each_kinds_logit_scale() -> None:
    scores = np.array([[0.2, np.nan], [0.5, np.nan], [-0.1, np.nan]], np.float32)
    scale = np.log(np.array([100.0, 50.0, 20.0], np.float32))
    got = softmax_over_queries(scores, scale)
    np.testing.assert_allclose(got[:, 0], softmax(np.exp(scale) * scores[:, 0]), rtol=1e-5)
    assert np.isnan(got[:, 1]).all()


def test_top_concepts_mark_empty_ranks_with_minus_one() -> None:
    weights = torch.tensor([[0.0, 0.7, 0.3, 0.0], [0.25, 0.25, 0.25, 0.25]])
    indices, values = top_concepts(weights, 3)
    assert indices[0].tolist() == [1, 2, -1] and values[0].tolist() == pytest.approx([0.7, 0.3, 0.0])
    assert len(set(indices[1].tolist())) == 3 and values[1].tolist() == pytest.approx([0.25] * 3)


def test_loader_batches_are_regrouped_into_model_batches_in_order() -> None:
    loader = [(torch.arange(start, start + 3), torch.full((3,), float(start))) for start in range(0, 30, 3)]
    batches = list(model_batches(loader, 7))
    assert [len(pixels) for pixels, _ in batches] == [7, 7, 7, 7, 2]
    assert torch.equal(torch.cat([pixels for pixels, _ in batches]), torch.arange(30))
    assert torch.equal(
        torch.cat([coverage for _, coverage in batches]),
        torch.arange(30).div(3, rounding_mode="floor").mul(3).float(),
    )


# --- the Zarr store --------------------------------------------------------------------------------------


def _synthetic_build(tmp_path: Path) -> tuple[Any, dict[tuple[int, int], dict[str, Any]], QueryEmbeddings]:
    """A plan over two chunks and hand-made chunk, query and score files; returns what each tile holds."""
    region = parse_region("-72.2245,18.5035,-72.2015,18.5245")
    plan = make_build_plan(region, "bingmap", 5, TilingSettings(2, 13, 10_000), FIT)
    rng = np.random.default_rng(1)
    dim, top_k = 6, 2
    query_embedding = rng.normal(size=(3, dim)).astype(np.float32)
    query_embedding /= np.linalg.norm(query_embedding, axis=1, keepdims=True)
    queries = QueryEmbeddings(
        ["a", "b", "c"],
        ["text"] * 3,
        ["a", "b", "c"],
        ["a", "b", "c"],
        [""] * 3,
        query_embedding,
        np.log(np.array([10.0, 20.0, 30.0], np.float32)),
    )
    write_queries(tmp_path / "queries.npz", queries)
    tile_cover = plan_cover(plan)
    (tmp_path / "chunks").mkdir()
    expected: dict[tuple[int, int], dict[str, Any]] = {}
    for chunk in plan.chunks:
        tiles = [view.tile for view in chunk_footprints(plan, tile_cover, chunk)]
        x = np.array([tile.x for tile in tiles])
        y = np.array([tile.y for tile in tiles])
        row, col = grid_index(plan, x, y)
        count = len(tiles)
        valid = rng.random(count) > 0.3
        embedding = rng.normal(size=(count, dim)).astype(np.float32)
        embedding /= np.linalg.norm(embedding, axis=1, keepdims=True)
        embedding[~valid] = 0
        concept_index = np.where(valid[:, None], rng.integers(0, 50, (count, top_k)), -1).astype(np.int32)
        concept_weight = np.where(valid[:, None], rng.random((count, top_k)), 0).astype(np.float32)
        arrays = {
            "x": x,
            "y": y,
            "row": row,
            "col": col,
            "coverage": valid.astype(np.float32),
            "valid": valid,
            "embedding": embedding.astype(np.float16),
            "concept_index": concept_index,
            "concept_weight": concept_weight,
        }
        np.savez(tmp_path / "chunks" / f"{chunk}.npz", **arrays)
        score_chunk(
            tmp_path / "chunks" / f"{chunk}.npz",
            tmp_path / "queries.npz",
            tmp_path / "scores" / f"{chunk}.npz",
        )
        for index in range(count):
            expected[int(row[index]), int(col[index])] = {
                name: value[index] for name, value in arrays.items()
            }
    return plan, expected, queries


def test_store_blocks_hold_every_tile_where_the_grid_puts_it(tmp_path: Path) -> None:
    plan, expected, queries = _synthetic_build(tmp_path)
    assert len(plan.chunks) >= 2
    files = ChunkFiles(plan, tmp_path / "chunks", tmp_path / "scores", block_px=3)
    dataset = soundscape_dataset(plan, files, queries, top_k=2, dim=6)
    write_soundscape(dataset, {"untrained": True}, tmp_path / "store.zarr")
    store = xr.open_zarr(tmp_path / "store.zarr", decode_coords="all").load()
    valid_scores = store.score.values[0][store.valid.values]
    for row in range(plan.grid.height):
        for col in range(plan.grid.width):
            tile = expected.get((row, col))
            cell = store.isel(y=row, x=col)
            if tile is None or not tile["valid"]:
                assert not bool(cell.valid) and np.isnan(cell.score.values).all()
                assert np.isnan(cell.embedding.values).all()
                assert (cell.concept_index.values == -1).all()
                continue
            assert bool(cell.valid)
            np.testing.assert_array_equal(cell.embedding.values, tile["embedding"])
            np.testing.assert_array_equal(cell.concept_index.values, tile["concept_index"])
            cosines = queries.embedding @ tile["embedding"].astype(np.float32)
            np.testing.assert_allclose(cell.score.values, cosines, atol=1e-6)
            np.testing.assert_allclose(
                cell.score_softmax.values, softmax(np.exp(queries.logit_scale) * cosines), rtol=1e-5
            )
            assert float(cell.score_percentile.values[0]) == pytest.approx(
                mean_rank_percentile(valid_scores, float(cell.score.values[0])), abs=1e-3
            )
    assert store.rio.crs.to_epsg() == 3857
    assert store.score.rio.transform().c == pytest.approx(plan.grid.bounds.left)
    assert store.attrs["untrained"] is True


def test_a_failed_store_write_keeps_the_previous_store(tmp_path: Path) -> None:
    target = tmp_path / "store.zarr"
    target.mkdir()
    (target / "old").write_text("previous build")
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("half written")
        raise RuntimeError("killed")
    assert [path.name for path in tmp_path.iterdir()] == ["store.zarr"]
    assert (target / "old").read_text() == "previous build"


# --- start-up checks -------------------------------------------------------------------------------------


def test_an_output_folder_that_cannot_be_created_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputDirError, match="cannot write into the output folder"):
        check_output_dir(blocker / "build")


def test_query_audio_files_are_checked_before_any_job(tmp_path: Path) -> None:
    clip = tmp_path / "clip.flac"
    soundfile.write(clip, np.zeros(1600, np.float32), 16000)
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

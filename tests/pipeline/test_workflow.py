"""The map workflow end to end, run as a user runs it: a tiny region against the loopback tile server.

Expected values are derived independently of the pipeline: tile geometry with mercantile and shapely, model
outputs from a model built here from the same seed and fed with imagery read straight from the server.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import geopandas as gpd
import mercantile
import numpy as np
import pytest
import rasterio
import rioxarray  # noqa: F401 - registers the .rio accessor
import soundfile
import torch
import xarray as xr
import yaml
from rasterio.warp import transform_bounds
from rio_cogeo.cogeo import cog_validate
from shapely.geometry import Polygon, box
from support.imagery_servers import SCENE_PATH, Fault, SceneTiles, TileServer
from support.paths import REPO
from support.slurm_cluster import needs_slurm, requested_gres, slurm_cluster

from model.config import Sat2SoundConfig
from model.inference import Sat2SoundEncoder
from model.metadata import Metadata
from model.sat2sound import Sat2Sound
from pipeline.gallery import composed_vectors, open_gallery
from pipeline.gallery_sources import folder_items
from pipeline.geometry import Bounds
from pipeline.imagery import open_reader
from pipeline.plan import embed_jobs, read_chunks, read_plan

SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]
LOCAL_PROFILE = str(REPO / "profiles" / "local")
SLURM_PROFILE = str(REPO / "profiles" / "slurm")
IMAGERY_ZOOM = 16
# bingmap views at zoom_level 5: 900 m squares seen at 4.0 m/px; the 5 m scene is fine for them.
SAT_TYPE, ZOOM_LEVEL, FOOTPRINT_M = "bingmap", 5, 5 * 300 * 0.6
TILE_ZOOM = 17  # 900 m views match zoom-15 tiles at 18.5°N; tile_zoom_offset 2 makes them zoom 17
MONTH, HOUR = 6, 14
SEED = 0
# A triangle over the 1.6 x 1.4 km scene: its corners reach well past the scene (tiles without imagery)
# and its bounding box holds tiles outside it.
TRIANGLE = Polygon([(-72.2245, 18.5035), (-72.2015, 18.5035), (-72.2130, 18.5245)])
# Zones: the triangle's western and eastern halves, split at its apex.
HALVES = {"west": box(-72.23, 18.50, -72.2130, 18.53), "east": box(-72.2130, 18.50, -72.19, 18.53)}
# A 700 m square in the scene's centre: 12 tiles in 4 chunks of zoom 16.
RESUME_REGION = "-72.2160,18.5110,-72.2095,18.5175"
QUERIES = [{"id": "birds", "text": "birds singing in the trees"}, {"id": "traffic", "text": "cars and horns"}]
SCORE_ATOL = 3e-3  # embeddings are stored as float16
RUN_TIMEOUT_S = 240
TOP_K_DEFAULT = 20  # outputs.top_k when the config leaves it out
GALLERY_TOP_K_DEFAULT = 5  # outputs.gallery_top_k when the config leaves it out
SOUNDS = REPO / "examples" / "sounds"

pytestmark = pytest.mark.slow  # every test here runs Snakemake


def snakemake(work: Path, config: Path, *extra: str, profile: str = LOCAL_PROFILE) -> subprocess.CompletedProcess[str]:
    command = [*SNAKEMAKE, "--profile", profile, "--configfile", str(config), *extra]
    return subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def write_config(folder: Path, config: dict[str, Any]) -> Path:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def job_counts(dry_run_output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run as {rule: count}."""
    lines = dry_run_output.split("Job stats:")[1].splitlines()[3:]
    counts = {}
    for line in lines:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


def check_ran(result: subprocess.CompletedProcess[str], work: Path) -> None:
    if result.returncode != 0:
        logs = "\n".join(f"--- {log}\n{log.read_text()}" for log in sorted(work.rglob("logs/**/*.log")))
        pytest.fail(f"snakemake failed ({result.returncode}):\n{result.stderr[-4000:]}\n{logs[-6000:]}")


@pytest.fixture(scope="module")
def server() -> Iterator[TileServer]:
    with TileServer(SceneTiles.from_raster(SCENE_PATH, zooms=(IMAGERY_ZOOM,))) as running:
        yield running


@pytest.fixture(scope="module")
def base_config(server: TileServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    shared = tmp_path_factory.mktemp("shared")
    region = shared / "triangle.geojson"
    feature = {"type": "Feature", "properties": {}, "geometry": TRIANGLE.__geo_interface__}
    region.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    halves = gpd.GeoDataFrame({"name": list(HALVES)}, geometry=list(HALVES.values()), crs=4326)
    halves.to_file(shared / "halves.gpkg")
    return {
        "name": "tiny",
        "output_dir": "out",
        "region": str(region),
        "imagery": {
            "source": f"xyz:{server.url}/png/{{z}}/{{x}}/{{y}}.png",
            "options": {"max_zoom": IMAGERY_ZOOM, "attribution": "loopback test scene"},
            "cache_dir": str(shared / "tiles"),
        },
        "model": {
            "checkpoint": "untrained",
            "sat_type": SAT_TYPE,
            "metadata_type": "latlong_month_time",
            "seed": SEED,
            "zoom_level": ZOOM_LEVEL,
            "month": MONTH,
            "hour": HOUR,
            "batch_size": 8,
            "loader_workers": 1,
        },
        "tiling": {"tile_zoom_offset": 2, "chunk_zoom": 13},
        "queries": QUERIES,
        "outputs": {"concepts_top_k": 2, "zones": str(shared / "halves.gpkg"), "gallery": str(SOUNDS)},
    }


@pytest.fixture(scope="module")
def built(base_config: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working folder after one complete build; tests that change it work on a copy."""
    work = tmp_path_factory.mktemp("work")
    check_ran(snakemake(work, write_config(work, base_config), "--cores", "2"), work)
    return work


@pytest.fixture
def reference_encoder() -> Sat2SoundEncoder:
    """The untrained model, built here the way the config describes it."""
    torch.manual_seed(SEED)
    cfg = replace(Sat2SoundConfig.small("latlong_month_time"), sat_type=SAT_TYPE)
    return Sat2SoundEncoder(Sat2Sound(cfg), device="cpu")


def grid_tiles() -> tuple[list[mercantile.Tile], int, int]:
    """Every zoom-17 tile of the triangle's bounding box, with the box's first column and row."""
    tiles = list(mercantile.tiles(*TRIANGLE.bounds, zooms=TILE_ZOOM))
    return tiles, min(tile.x for tile in tiles), min(tile.y for tile in tiles)


def in_region(tile: mercantile.Tile) -> bool:
    west, south, east, north = mercantile.bounds(tile)
    cell = box(west, south, east, north)
    return TRIANGLE.intersects(cell) and not TRIANGLE.touches(cell)


def view_bounds(tile: mercantile.Tile) -> Bounds:
    """The model's 900 m ground square centred on the tile, in EPSG:3857, moved east or west by half of one of
    its 224 pixels at most so that it starts a whole number of them from the world's west edge."""
    left, bottom, right, top = mercantile.xy_bounds(tile)
    centre_x, centre_y = (left + right) / 2, (bottom + top) / 2
    lat = math.degrees(math.atan(math.sinh(centre_y / 6378137.0)))
    half = FOOTPRINT_M / 2 / math.cos(math.radians(lat))
    step, world_half = 2 * half / 224, math.pi * 6378137.0
    west = round((centre_x - half + world_half) / step) * step - world_half
    return Bounds(west, centre_y - half, west + 2 * half, centre_y + half)


def scene_box_3857() -> Polygon:
    with rasterio.open(SCENE_PATH) as scene:
        west, south, east, north = transform_bounds(scene.crs, "EPSG:4326", *scene.bounds)
    return box(*mercantile.xy(west, south), *mercantile.xy(east, north))


def test_build_writes_a_georeferenced_store_and_cogs_on_the_tile_grid(built: Path) -> None:
    tiles, first_x, first_y = grid_tiles()
    region_tiles = [tile for tile in tiles if in_region(tile)]
    columns = max(tile.x for tile in region_tiles) - min(tile.x for tile in region_tiles) + 1
    rows = max(tile.y for tile in region_tiles) - min(tile.y for tile in region_tiles) + 1
    left, _, _, top = mercantile.xy_bounds(mercantile.Tile(first_x, first_y, TILE_ZOOM))
    size = 2 * math.pi * 6378137.0 / 2**TILE_ZOOM
    expected = rasterio.Affine(size, 0.0, left, 0.0, -size, top)

    store = xr.open_zarr(built / "out/tiny/soundscape.zarr")
    assert store.rio.crs.to_epsg() == 3857
    assert store.score.rio.transform().almost_equals(expected, precision=1e-6)
    assert (store.sizes["y"], store.sizes["x"]) == (rows, columns)
    assert list(store["query"].values) == [query["id"] for query in QUERIES]
    assert store.attrs["untrained"] is True and store.attrs["checkpoint"] == "untrained"
    assert len(store.attrs["checkpoint_sha256"]) == 64
    assert store.embedding.dtype == np.float16 and store.concept_index.dtype == np.int32

    for query in QUERIES:
        cog = built / f"out/tiny/cog/{query['id']}.tif"
        assert cog_validate(cog)[0]
        with rasterio.open(cog) as dataset:
            assert dataset.crs.to_epsg() == 3857
            assert dataset.transform.almost_equals(expected, precision=1e-6)
            assert (dataset.height, dataset.width) == (rows, columns)
            values = dataset.read(1)
        assert np.array_equal(np.isnan(values), np.isnan(store.score.sel(query=query["id"]).values))
    with rasterio.open(f'ZARR:"{built / "out/tiny/soundscape.zarr"}":/score') as gdal_view:
        assert gdal_view.crs.to_epsg() == 3857 and gdal_view.transform.almost_equals(expected, precision=1e-6)


def test_a_build_of_several_months_has_a_band_per_time_and_each_equals_its_one_time_build(
    built: Path, base_config: dict[str, Any], tmp_path: Path
) -> None:
    config = {**base_config, "name": "months", "model": {**base_config["model"], "month": [12, MONTH]}}
    check_ran(snakemake(tmp_path, write_config(tmp_path, config), "--cores", "2"), tmp_path)
    build = tmp_path / "out/months"
    swept, single = xr.open_zarr(build / "soundscape.zarr"), xr.open_zarr(built / "out/tiny/soundscape.zarr")
    assert swept.score.dims == ("month", "hour", "query", "y", "x")
    assert swept["month"].values.tolist() == [12, MONTH] and swept["hour"].values.tolist() == [HOUR]
    same_time = swept.embedding.sel(month=MONTH, hour=HOUR).values.astype(np.float32)
    np.testing.assert_allclose(same_time, single.embedding.values.astype(np.float32), atol=2e-3)
    other_time = swept.embedding.sel(month=12, hour=HOUR).values.astype(np.float32)
    assert np.nanmax(np.abs(other_time - same_time)) > 1e-2
    labels = [f"month 12, hour {HOUR}", f"month {MONTH}, hour {HOUR}"]
    for name in ("birds.tif", "birds_percentile.tif"):
        with rasterio.open(build / "cog" / name) as dataset:
            assert list(dataset.descriptions) == labels
    with rasterio.open(build / "cog/birds.tif") as dataset:
        np.testing.assert_allclose(dataset.read(2), single.score.sel(query="birds").values, atol=SCORE_ATOL)
    logs = "".join(log.read_text() for log in build.rglob("logs/embed/*.log"))
    assert "first time step" in logs and "each extra time step" in logs
    assert 'id="s2s-time"' in (build / "preview.html").read_text(encoding="utf-8")


def test_build_writes_the_answers_a_planner_acts_on(built: Path) -> None:
    build = built / "out/tiny"
    store = xr.open_zarr(build / "soundscape.zarr")
    valid = store.valid.values
    for query in QUERIES:
        with rasterio.open(build / f"cog/{query['id']}_percentile.tif") as percentile:
            values = percentile.read(1)
        np.testing.assert_array_equal(values, store.score_percentile.sel(query=query["id"]).values)
        assert (build / f"cog/{query['id']}_percentile.qml").is_file()
    with rasterio.open(build / "cog/dominant.tif") as dominant:
        index, margin = dominant.read()
    probabilities = np.sort(store.score_softmax.values[:, valid], axis=0)
    np.testing.assert_array_equal(index[valid], store.score_softmax.values[:, valid].argmax(axis=0))
    np.testing.assert_allclose(margin[valid], 100 * (probabilities[-1] - probabilities[-2]), atol=0.5 + 1e-3)
    assert (index[~valid] == 255).all()
    assert (build / "cog/dominant.qml").is_file()
    places_per_query = min(TOP_K_DEFAULT, int(valid.sum()))
    for query in QUERIES:
        places = gpd.read_file(build / "top_places.gpkg", layer=f"{query['id']}_places")
        assert places.crs.to_epsg() == 4326 and places["rank"].tolist() == list(range(1, places_per_query + 1))
        scores = store.score.sel(query=query["id"]).values[valid]
        np.testing.assert_allclose(places["score"], np.sort(scores)[::-1][:places_per_query], rtol=1e-6)
        areas = gpd.read_file(build / "top_places.gpkg", layer=f"{query['id']}_areas")
        assert areas["tiles"].sum() == places_per_query
    with (build / "top_places.csv").open(encoding="utf-8-sig", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == places_per_query * len(QUERIES)
    zones = gpd.read_file(build / "zones.gpkg", layer="zones")
    assert zones.crs.to_epsg() == 4326 and zones["zone"].tolist() == list(HALVES)
    assert (zones["tiles"] > 0).all() and zones["tiles"].sum() >= valid.sum(), "tiles on the split count twice"
    for query in QUERIES:
        scores = store.score.sel(query=query["id"]).values[valid]
        assert zones[f"{query['id']}_max"].max() == pytest.approx(scores.max())
    with (build / "zones.csv").open(encoding="utf-8-sig", newline="") as handle:
        assert [row["zone"] for row in csv.DictReader(handle)] == list(HALVES)
    for log in ("cogs", "top_places", "zones", "underlay", "project"):
        assert (build / f"logs/{log}.log").is_file()
    with rasterio.open(build / "imagery.tif") as underlay:
        assert underlay.crs.to_epsg() == 3857 and underlay.count == 3
    with zipfile.ZipFile(build / "project.qgz") as project:
        assert project.namelist() == ["project.qgs"]
        document = project.read("project.qgs").decode()
    assert "type=xyz&amp;url=http://127.0.0.1:" in document and "./zones.gpkg|layername=zones" in document


def test_the_build_embeds_its_gallery_and_stores_each_tiles_best_recordings(built: Path) -> None:
    build = built / "out/tiny"
    gallery = open_gallery(build / "gallery")
    assert [item.id for item in gallery.items] == [item.id for item in folder_items(SOUNDS, None)]
    assert gallery.record.sha256 == json.loads((build / "model.json").read_text())["sha256"]
    store = xr.open_zarr(build / "soundscape.zarr")
    assert store.attrs["gallery"] == "gallery" and store.attrs["gallery_count"] == len(gallery.items)
    valid = store.valid.values
    tiles = store.embedding.transpose("y", "x", "dim").values[valid].astype(np.float32)
    items = store.gallery_item.transpose("y", "x", "gallery_rank").values
    assert items.shape[-1] == GALLERY_TOP_K_DEFAULT and (items[~valid] == -1).all()
    composed = composed_vectors(gallery.embeddings, gallery.record.logit_scale)
    expected = np.argsort(-(tiles @ composed.T), axis=1, kind="stable")[:, :GALLERY_TOP_K_DEFAULT]
    np.testing.assert_array_equal(items[valid], expected)
    logits = store.gallery_logit.transpose("y", "x", "gallery_rank").values[valid]
    np.testing.assert_allclose(logits, np.take_along_axis(tiles @ composed.T, expected, axis=1), rtol=1e-5)
    assert "10 of 10 recordings" in (build / "logs/gallery.log").read_text()


def test_a_new_gallery_top_k_reruns_scoring_and_exports_not_the_gallery_or_embedding(
    built: Path, base_config: dict[str, Any], tmp_path: Path
) -> None:
    work = tmp_path / "work"
    shutil.copytree(built, work)
    config = write_config(work, {**base_config, "outputs": {**base_config["outputs"], "gallery_top_k": 2}})
    dry_run = snakemake(work, config, "-n")
    check_ran(dry_run, work)
    assert {"score", "mosaic", "preview"} <= set(job_counts(dry_run.stdout))
    assert not {"gallery", "embed", "fetch", "queries"} & set(job_counts(dry_run.stdout))
    check_ran(snakemake(work, config, "--cores", "2"), work)
    assert xr.open_zarr(work / "out/tiny/soundscape.zarr").sizes["gallery_rank"] == 2


def test_tiles_outside_the_region_or_without_imagery_are_nodata(built: Path) -> None:
    tiles, first_x, first_y = grid_tiles()
    store = xr.open_zarr(built / "out/tiny/soundscape.zarr")
    valid = store.valid.values
    scores = store.score.values
    scene = scene_box_3857()
    outside = without_imagery = 0
    for tile in tiles:
        row, col = tile.y - first_y, tile.x - first_x
        if row >= valid.shape[0] or col >= valid.shape[1]:
            continue
        if not in_region(tile):
            outside += 1
            assert not valid[row, col] and np.isnan(scores[:, row, col]).all()
        elif not box(*view_bounds(tile)).intersects(scene):
            without_imagery += 1
            assert not valid[row, col] and np.isnan(scores[:, row, col]).all()
    assert outside > 0 and without_imagery > 0
    assert valid.sum() >= 4 and np.isfinite(scores[:, valid]).all()


def test_scores_equal_direct_model_calls(
    built: Path, server: TileServer, reference_encoder: Sat2SoundEncoder, tmp_path: Path
) -> None:
    tiles, first_x, first_y = grid_tiles()
    store = xr.open_zarr(built / "out/tiny/soundscape.zarr")
    valid = store.valid.values
    sampled = [tile for tile in tiles if in_region(tile) and valid[tile.y - first_y, tile.x - first_x]][::3]
    template = f"xyz:{server.url}/png/{{z}}/{{x}}/{{y}}.png"
    with open_reader(template, cache_dir=tmp_path, max_zoom=IMAGERY_ZOOM) as reader:
        images = np.stack([np.ma.filled(reader.part(view_bounds(tile), 224, 224).array, 0) for tile in sampled])
    centres = [mercantile.lnglat(*np.mean(np.reshape(mercantile.xy_bounds(tile), (2, 2)), axis=0)) for tile in sampled]
    lon, lat = np.array(centres).T
    meta = Metadata.from_values(lat, lon, month=MONTH, hour=HOUR)
    tile_embeddings = reference_encoder.embed_images(images, zoom_level=ZOOM_LEVEL, metadata=meta).embedding
    query_embeddings = reference_encoder.embed_texts([query["text"] for query in QUERIES]).embedding
    expected = (query_embeddings @ tile_embeddings.T).numpy()
    rows = [tile.y - first_y for tile in sampled]
    cols = [tile.x - first_x for tile in sampled]
    stored = store.score.values[:, rows, cols]
    assert len(sampled) >= 2
    np.testing.assert_allclose(stored, expected, atol=SCORE_ATOL)
    softmax = store.score_softmax.values[:, rows, cols]
    np.testing.assert_allclose(softmax.sum(axis=0), 1.0, rtol=1e-5)


def test_adding_a_query_reruns_only_query_scoring_and_exports(
    built: Path, base_config: dict[str, Any], reference_encoder: Sat2SoundEncoder, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    shutil.copytree(built, work)
    clip = tmp_path / "rain.wav"
    soundfile.write(clip, 0.2 * np.sin(np.linspace(0, 2000, 32000)).astype(np.float32), 16000)
    composed = {"id": "rain", "audio": str(clip), "text": "rain on a roof"}
    config = write_config(work, {**base_config, "queries": [*QUERIES, composed]})
    kept = {
        path: path.stat().st_mtime_ns
        for pattern in ("chunks/*", "imagery/*", "model.json", "plan.npz")
        for path in (work / "out/tiny").glob(pattern)
    }

    dry_run = snakemake(work, config, "-n")
    check_ran(dry_run, work)
    counts = job_counts(dry_run.stdout)
    assert set(counts) == {
        "queries",
        "score",
        "mosaic",
        "cogs",
        "top_places",
        "zones",
        "preview",
        "project",
        "all",
    }

    check_ran(snakemake(work, config, "--cores", "2"), work)
    assert {path: path.stat().st_mtime_ns for path in kept} == kept
    store = xr.open_zarr(work / "out/tiny/soundscape.zarr")
    assert list(store["query"].values) == ["birds", "traffic", "rain"]
    assert (work / "out/tiny/cog/rain.tif").is_file()
    # The new query's scores are those of the composed embedding with the stored tile embeddings.
    query = reference_encoder.embed_composed([clip], [composed["text"]]).embedding.numpy()[0]
    valid = store.valid.values
    tiles = store.embedding.transpose("y", "x", "dim").values[valid].astype(np.float32)
    np.testing.assert_allclose(store.score.sel(query="rain").values[valid], tiles @ query, atol=SCORE_ATOL)


def test_how_jobs_run_never_reruns_a_step(built: Path, base_config: dict[str, Any], tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(built, work)
    runtime = {**base_config["model"], "batch_size": 3, "loader_workers": 0, "device": "cpu"}
    config = write_config(work, {**base_config, "model": runtime})
    dry_run = snakemake(work, config, "-n")
    check_ran(dry_run, work)
    assert "Nothing to be done" in dry_run.stdout + dry_run.stderr, dry_run.stdout


def test_paths_with_spaces_quotes_and_accents_build_inside_their_folder(
    base_config: dict[str, Any], tmp_path: Path
) -> None:
    output_dir = tmp_path / "My Maps" / "Zürich 'quoted' run"
    config = {
        **base_config,
        "name": "spaced",
        "output_dir": str(output_dir),
        "region": RESUME_REGION,
        "imagery": {"source": str(SCENE_PATH)},
        "tiling": {"tile_zoom_offset": 2, "chunk_zoom": 16},
    }
    work = tmp_path / "work"
    work.mkdir()
    check_ran(snakemake(work, write_config(work, config), "--cores", "2"), work)
    build = output_dir / "spaced"
    assert (build / "preview.html").is_file() and (build / "cog" / "birds.tif").is_file()
    assert int(xr.open_zarr(build / "soundscape.zarr").valid.sum()) > 0
    outside = {path.relative_to(tmp_path) for path in tmp_path.rglob("*") if build not in (path, *path.parents)}
    assert {path for path in outside if ".snakemake" not in path.parts} == {
        Path("My Maps"),
        Path("My Maps") / "Zürich 'quoted' run",
        Path("work"),
        Path("work") / "config.yaml",
    }


def one_chunk_jobs(base_config: dict[str, Any], name: str) -> dict[str, Any]:
    """A build `name` of RESUME_REGION from the local scene: four chunks, each its own embed job."""
    return {
        **base_config,
        "name": name,
        "region": RESUME_REGION,
        "imagery": {"source": str(SCENE_PATH)},
        "tiling": {"tile_zoom_offset": 2, "chunk_zoom": 16},
        "model": {**base_config["model"], "loader_workers": 0, "tiles_per_job": 1},
    }


def test_a_killed_run_resumes_without_redoing_finished_chunks(base_config: dict[str, Any], tmp_path: Path) -> None:
    # One chunk a job, so the kill lands while the next job starts (seconds of imports and model load), not in the
    # few milliseconds between two chunks of one job, which a loaded machine can let slip by. A job that stopped
    # part-way through its chunks reuses the finished ones: tests/pipeline/test_embed.py.
    config_path = write_config(tmp_path, one_chunk_jobs(base_config, "resume"))
    chunks = tmp_path / "out/resume/chunks"
    target = "out/resume/soundscape.zarr/.zmetadata"  # the store alone: exports are not what this test is about
    command = [
        *SNAKEMAKE,
        "--profile",
        LOCAL_PROFILE,
        "--configfile",
        str(config_path),
        "--cores",
        "1",
        target,
    ]
    run = subprocess.Popen(
        command, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while len(list(chunks.glob("*.npz"))) < 2 and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    written = sorted(chunks.glob("*.npz"), key=lambda path: path.stat().st_mtime_ns)
    # One job runs at a time, so every chunk before the newest was finished and recorded by Snakemake.
    finished = {path: path.stat().st_mtime_ns for path in written[:-1]}
    planned = read_plan(tmp_path / "out/resume/plan.npz").chunk_ids
    assert len(finished) >= 1 and len(written) < len(planned)

    check_ran(snakemake(tmp_path, config_path, "--unlock"), tmp_path)
    check_ran(snakemake(tmp_path, config_path, "--cores", "2", target), tmp_path)
    assert {path: path.stat().st_mtime_ns for path in finished} == finished
    assert sorted(path.stem for path in chunks.glob("*.npz")) == sorted(planned)
    assert int(xr.open_zarr(tmp_path / "out/resume/soundscape.zarr").valid.sum()) > 0


def least_shared_imagery_tile(plan_path: Path) -> mercantile.Tile:
    """The scene's imagery tile under the views of the fewest chunks of a plan (one at least)."""
    plan = read_plan(plan_path)
    under: dict[mercantile.Tile, int] = {}
    for chunk in read_chunks(plan_path, plan, plan.chunk_ids):
        tiles = set()
        for left, bottom, right, top in chunk.views.tolist():
            west, south = mercantile.lnglat(left, bottom)
            east, north = mercantile.lnglat(right, top)
            tiles |= set(mercantile.tiles(west, south, east, north, zooms=IMAGERY_ZOOM))
        for tile in tiles:
            under[tile] = under.get(tile, 0) + 1
    scene = scene_box_3857()
    inside = [tile for tile in under if scene.contains(box(*mercantile.xy_bounds(tile)).centroid)]
    return min(inside, key=lambda tile: (under[tile], tile))


def test_imagery_a_run_could_not_have_is_fetched_by_the_next_run_alone(
    server: TileServer, base_config: dict[str, Any], tmp_path: Path
) -> None:
    cache = tmp_path / "tiles"
    imagery = {**base_config["imagery"], "cache_dir": str(cache), "on_missing": "leave_empty"}
    imagery["options"] = {**imagery["options"], "retry": {"attempts": 2, "backoff_s": 0.01}}
    config = {
        **one_chunk_jobs(base_config, "retry"),
        "imagery": imagery,
        "model": {**base_config["model"], "loader_workers": 0, "tiles_per_job": 6},
    }
    config_path = write_config(tmp_path, config)
    check_ran(snakemake(tmp_path, config_path, "-n"), tmp_path)
    failing = least_shared_imagery_tile(tmp_path / "out/retry/plan.npz")
    path = f"/png/{failing.z}/{failing.x}/{failing.y}.png"
    target = "out/retry/soundscape.zarr/.zmetadata"
    server.clear()
    server.add_fault(Fault("status", path=path, status=503))
    try:
        first = snakemake(tmp_path, config_path, "--cores", "2", target)
    finally:
        server.clear()
    check_ran(first, tmp_path)
    store = tmp_path / "out/retry/soundscape.zarr"
    with xr.open_zarr(store) as built:
        assert built.attrs["empty_tiles_unavailable_imagery"] > 0
        valid = int(built.valid.sum())
    records = {record: record.stat().st_mtime_ns for record in (tmp_path / "out/retry/imagery/chunks").glob("*.json")}
    whole = {record: stamp for record, stamp in records.items() if not json.loads(record.read_text())["unavailable"]}
    assert len(whole) < len(records) and whole

    again = snakemake(tmp_path, config_path, "--cores", "2", target)
    check_ran(again, tmp_path)
    assert "retrying the imagery an earlier run could not have" in again.stderr
    # Only the tile that failed was asked for again: the chunks fetched whole were kept, their tiles cached.
    assert {record.path for record in server.requests} == {path}
    assert {record: record.stat().st_mtime_ns for record in whole} == whole
    assert not any(json.loads(record.read_text())["unavailable"] for record in records)
    with xr.open_zarr(store) as rebuilt:
        assert rebuilt.attrs["empty_tiles_unavailable_imagery"] == 0
        assert int(rebuilt.valid.sum()) > valid


def most_at_once(log: str, rule: str) -> tuple[int, int]:
    """(jobs of `rule` a Snakemake run started, the most of them running at once), from its log."""
    started = running = most = 0
    for line in (line.strip() for line in log.splitlines()):
        if re.fullmatch(rf"(local)?rule {rule}:", line):
            started, running = started + 1, running + 1
            most = max(most, running)
        elif re.fullmatch(rf"Finished jobid: \d+ \(Rule: {rule}\)", line):
            running -= 1
    return started, most


def test_on_a_gpu_the_local_profile_runs_one_embed_job_at_a_time(base_config: dict[str, Any], tmp_path: Path) -> None:
    """Cores for two embed jobs, but each takes the one GPU (here the resource stands in for it: this machine runs
    them on the CPU, where they ask for none)."""
    config_path = write_config(tmp_path, one_chunk_jobs(base_config, "gpu"))
    store = "out/gpu/soundscape.zarr/.zmetadata"
    dry_run = snakemake(tmp_path, config_path, "-n", store)
    check_ran(dry_run, tmp_path)
    assert "gpu=0" in dry_run.stdout.split("\nrule embed:")[1].split("\n\n")[0]
    result = snakemake(tmp_path, config_path, "--set-resources", "embed:gpu=1", "--cores", "4", store)
    check_ran(result, tmp_path)
    started, most = most_at_once(result.stderr, "embed")
    assert started >= 2 and most == 1, (started, most)


# Two GPUs as NVIDIA's driver would show them, in every Python process of a run (Snakemake's and its jobs'): this
# machine has none, and its jobs, claiming them all the same, run on the CPU.
TWO_GPUS = "import common.cores\ncommon.cores.visible_gpus = lambda root=None: ('0', '1')\n"


def test_on_two_gpus_embed_jobs_run_one_on_each_given_the_resources_and_the_start_says_how(
    base_config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "two_gpus"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(TWO_GPUS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(fake), os.environ.get("PYTHONPATH")])))
    config_path = write_config(tmp_path, one_chunk_jobs(base_config, "gpus"))
    store = "out/gpus/soundscape.zarr/.zmetadata"
    hint = "2 GPUs here and embed jobs take one each: add --resources gpu=2 to run one on each"
    dry_run = snakemake(tmp_path, config_path, "-n", store)
    check_ran(dry_run, tmp_path)
    assert hint in dry_run.stderr
    # Cores for two embed jobs beside the queries and the gallery, so that the GPUs alone set how many run at once.
    result = snakemake(tmp_path, config_path, "--resources", "gpu=2", "--cores", "6", store)
    check_ran(result, tmp_path)
    assert hint not in result.stderr
    started, most = most_at_once(result.stderr, "embed")
    assert started >= 2 and most == 2, (started, most)
    logs = sorted((tmp_path / "out/gpus/logs/embed").glob("*.log"))
    claimed = [re.search(r"^embed: GPU (\d) of 0, 1,", log.read_text(), re.MULTILINE) for log in logs]
    assert len(logs) == started and all(claimed), [log.read_text() for log in logs]
    assert {match.group(1) for match in claimed if match} == {"0", "1"}


BAD_INPUT_CASES = [
    "missing audio",
    "undecodable audio",
    "not an audio type",
    "imagery too coarse",
    "empty region",
    "output folder not writable",
    "bad config value",
    "unknown config key",
]


def _bad_inputs(tmp: Path) -> dict[str, tuple[dict[str, Any], str]]:
    """Config changes that must stop the build before any job, with the words the error must say."""
    garbage = tmp / "noise.wav"
    garbage.write_bytes(b"this is not audio" * 20)
    notes = tmp / "notes.txt"
    notes.write_text("birds")
    empty_region = tmp / "empty.geojson"
    empty_region.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    a_file = tmp / "not_a_folder"
    a_file.write_text("")
    one_level_m = 300 * 0.6 / 224
    with rasterio.open(SCENE_PATH) as scene:
        # The finest trained zoom level (1, 3, 5) whose view the scene is at most 1.5x coarser than.
        fitting_level = next(level for level in (1, 3, 5) if scene.res[0] <= 1.5 * level * one_level_m)
    return {
        "missing audio": ({"queries": [{"id": "rain", "audio": str(tmp / "missing.wav")}]}, "does not exist"),
        "undecodable audio": ({"queries": [{"id": "rain", "audio": str(garbage)}]}, "cannot read"),
        "not an audio type": (
            {"queries": [{"id": "rain", "audio": str(notes)}]},
            "is not a wav, flac, ogg or mp3",
        ),
        "imagery too coarse": (
            {"imagery": {"source": str(SCENE_PATH)}, "model": {"checkpoint": "untrained", "zoom_level": 1}},
            f"expects {one_level_m:.3g} m/px (at most 1.5x coarser); set model.zoom_level: {fitting_level}",
        ),
        "empty region": ({"region": str(empty_region)}, "holds no geometries"),
        "output folder not writable": (
            {"output_dir": str(a_file / "out")},
            "cannot write into the output folder",
        ),
        "bad config value": (
            {"tiling": {"tile_zoom_offset": -1}},
            "config.tiling.tile_zoom_offset: -1 is less",
        ),
        "unknown config key": ({"zoom": 3}, "Additional properties are not allowed ('zoom' was unexpected)"),
    }


@pytest.mark.parametrize("case", BAD_INPUT_CASES)
def test_bad_inputs_stop_with_one_line(case: str, base_config: dict[str, Any], tmp_path: Path) -> None:
    change, words = _bad_inputs(tmp_path)[case]
    config = {**base_config, **change}
    if "model" in change:
        config["model"] = {**base_config["model"], "sat_type": SAT_TYPE, **change["model"]}
    result = snakemake(tmp_path, write_config(tmp_path, config), "-n")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr
    assert len(errors) == 1 and words in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_without_outputs_zones_there_is_no_zones_job(base_config: dict[str, Any], tmp_path: Path) -> None:
    config = {**base_config, "outputs": {"concepts_top_k": 2}}
    result = snakemake(tmp_path, write_config(tmp_path, config), "-n")
    check_ran(result, tmp_path)
    planned = job_counts(result.stdout)
    assert "zones" not in planned and planned["project"] == 1


def test_loading_the_workflow_imports_no_model_library_or_exporter(base_config: dict[str, Any], tmp_path: Path) -> None:
    # Every run starts by loading the Snakefile in one process: torch there would add seconds to each of them, the
    # store reader (zarr: checking the zone file needs none of the zonal statistics) a third of one.
    heavy = ("torch", "transformers", "numba", "zarr")
    report = f"import atexit, sys; atexit.register(lambda: print('LOADED', [n for n in {heavy!r} if n in sys.modules]))"
    run = f"{report}; from snakemake.cli import main; sys.argv[0] = 'snakemake'; main()"
    config = write_config(tmp_path, base_config)
    command = [sys.executable, "-c", run, *SNAKEMAKE[3:], "--profile", LOCAL_PROFILE, "--configfile", str(config), "-n"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    check_ran(result, tmp_path)
    assert "LOADED []" in result.stdout, result.stdout[-500:]


def test_slurm_profile_dry_run_asks_one_gpu_per_embed_job(base_config: dict[str, Any], tmp_path: Path) -> None:
    # Small jobs, so that this small region makes several of them.
    config = {**base_config, "model": {**base_config["model"], "tiles_per_job": 20}}
    result = snakemake(tmp_path, write_config(tmp_path, config), "-n", profile=SLURM_PROFILE)
    check_ran(result, tmp_path)
    jobs = result.stdout.split("\nrule ")
    embeds = [job for job in jobs if job.startswith("embed:")]
    planned = job_counts(result.stdout)
    assert len(embeds) == planned["embed"] >= 2
    assert all("gpu=1" in job for job in embeds)
    assert not any("gpu=1" in job for job in jobs if not job.startswith("embed:"))


def test_a_region_of_many_chunks_makes_a_fetch_and_an_embed_job_per_group_of_chunks(
    base_config: dict[str, Any], tmp_path: Path
) -> None:
    # Snakemake's DAG grows with its jobs and files, faster than linearly where one rule lists many of them: a
    # continent's 48,000 chunks must not each become a job or a tracked output.
    check_ran(snakemake(tmp_path, write_config(tmp_path, base_config), "-n"), tmp_path)
    zoom = read_plan(tmp_path / "out/tiny/plan.npz").zoom
    tiling = {**base_config["tiling"], "chunk_zoom": zoom}  # a chunk a tile
    config = {**base_config, "tiling": tiling, "model": {**base_config["model"], "tiles_per_job": 4}}
    result = snakemake(tmp_path, write_config(tmp_path, config), "-n")
    check_ran(result, tmp_path)
    plan = read_plan(tmp_path / "out/tiny/plan.npz")
    planned, jobs = job_counts(result.stdout), embed_jobs(plan, 4)
    assert 2 <= planned["fetch"] == planned["embed"] == len(jobs) < len(plan.chunk_ids) == plan.tile_count
    assert planned["score"] == planned["mosaic"] == 1


@pytest.fixture
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as folder:
        yield folder


@needs_slurm
def test_a_build_on_slurm_gives_each_embed_job_a_gpu_and_the_local_builds_map(
    base_config: dict[str, Any], built: Path, slurm: Path, tmp_path: Path
) -> None:
    """profiles/slurm as shipped, on a one-node cluster with one GPU (see support.slurm_cluster); only the job
    status comes from squeue (no accounting database here) and is asked for every second."""
    config = {**base_config, "model": {**base_config["model"], "tiles_per_job": 20}}
    polling = [
        *("--slurm-status-command", "squeue"),
        *("--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "1"),
    ]
    result = snakemake(tmp_path, write_config(tmp_path, config), *polling, profile=SLURM_PROFILE)
    check_ran(result, tmp_path)
    submitted = re.findall(r"submitted with SLURM jobid (\d+) \(log: \S*/rule_([a-z_]+)/", result.stderr)
    rules = {rule for _, rule in submitted}
    assert {"embed", "gallery", "score", "mosaic", "cogs", "top_places", "zones", "preview", "project"} == rules
    embed_jobs = [job for job, rule in submitted if rule == "embed"]
    assert len(embed_jobs) == len(list((tmp_path / "out/tiny/embedded").glob("*.json"))) >= 2
    for job, rule in submitted:
        assert ("gpu:1" in requested_gres(job)) == (rule == "embed"), (rule, requested_gres(job))
    on_slurm = xr.open_zarr(tmp_path / "out/tiny/soundscape.zarr")
    local = xr.open_zarr(built / "out/tiny/soundscape.zarr")
    np.testing.assert_array_equal(on_slurm.valid.values, local.valid.values)
    np.testing.assert_allclose(on_slurm.score.values, local.score.values, atol=SCORE_ATOL)

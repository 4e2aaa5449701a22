"""New questions on a built map (`python -m pipeline query`): the tile index, the answers, the maps, bad inputs.

The index and the bad inputs use synthetic stores (tests/support/synthetic_store.py) in a folder laid out as a
build; the answers run on one real build of the bundled Landsat scene per module (Snakemake, the untrained small
model), checked against numpy scoring of the store's embeddings with a model built here from the same weights.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import faiss
import geopandas as gpd
import numpy as np
import pytest
import rasterio
import soundfile
import xarray as xr
import yaml
from pyproj import Transformer
from rio_cogeo.cogeo import cog_validate
from support.paths import LANDSAT, REPO
from support.synthetic_store import DEFAULT_QUERIES, write_synthetic_store

from model.config import Sat2SoundConfig
from model.inference import Sat2SoundEncoder
from pipeline import new_query, search, vectors
from pipeline.__main__ import main
from pipeline.build import ERROR_STATUS
from pipeline.config import ONE_UNKNOWN_TIME, Times
from pipeline.errors import SearchWarning
from pipeline.model_setup import ModelRecord
from pipeline.store.read import SoundscapeStore

SMALL_WIDTH = Sat2SoundConfig.small().codebook_dim
SYNTHETIC_SHA256 = "0" * 64  # what the synthetic store records as its checkpoint's sha256
SNAKEMAKE_TIMEOUT_S = 240
# The default build's scene and model on a smaller region: 63 output tiles (7 x 9).
BUILD_CONFIG: dict[str, Any] = {
    "name": "demo",
    "output_dir": "out",
    "region": "-54.60,-25.45,-54.45,-25.30",
    "imagery": {"source": str(LANDSAT), "options": {"bands": [3, 2, 1]}, "cache_dir": "tiles"},
    "model": {"checkpoint": "untrained", "sat_type": "sentinel", "zoom_level": 3, "loader_workers": 0},
    "tiling": {"tile_zoom_offset": 2},
    "queries": [
        {"id": "birds", "text": "birds singing in a forest"},
        {"id": "traffic", "text": "city traffic with cars and horns"},
    ],
}
BUILD_TOP_K = 20  # outputs.top_k's default: the places the build wrote per query
# Scores closer than this may come out in either order from two float32 matrix products.
NEAR_TIE = 1e-5


def unit_vectors(count: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def ranked(scores: np.ndarray, k: int) -> list[tuple[int, int]]:
    """(row, col) of the k best finite scores of a grid: highest first, then northern, then western."""
    rows, cols = np.nonzero(np.isfinite(scores))
    order = np.lexsort((cols, rows, -scores[rows, cols]))[:k]
    return list(zip(rows[order].tolist(), cols[order].tolist(), strict=True))


def percentiles_of(values: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Share of the region's scores below each value, equal ones counting half, in percent."""
    region = region[np.isfinite(region)]
    below = (region[None, :] < values[:, None]).sum(axis=1)
    equal = (region[None, :] == values[:, None]).sum(axis=1)
    return 100.0 * (below + equal / 2) / len(region)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], list[str]]:
    status = main(["query", *argv])
    out, err = capsys.readouterr()
    return status, out.splitlines(), err.splitlines()


# --- the tile index, on synthetic stores ------------------------------------------------------------------------


def synthetic_build(folder: Path, seed: int = 0, dim: int = 16, times: Times = ONE_UNKNOWN_TIME) -> Path:
    """A folder laid out as a finished build around a synthetic store (its queries: DEFAULT_QUERIES)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_synthetic_store(folder / "soundscape.zarr", dim=dim, seed=seed, times=times)
    record = ModelRecord("untrained", str(folder / "weights.safetensors"), SYNTHETIC_SHA256, True, "sentinel", "none")
    (folder / "model.json").write_text(json.dumps(record._asdict()))
    queries = [{key: value for key, value in vars(query).items() if value is not None} for query in DEFAULT_QUERIES]
    settings = {"name": "synthetic", "region": "2.1,48.9,2.6,49.0", "queries": queries}
    (folder / "settings.json").write_text(json.dumps(settings))
    return folder


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_build(tmp_path_factory.mktemp("synthetic") / "build")


def store_embeddings(build: Path) -> np.ndarray:
    """(dim, height, width) float32 embeddings as the store holds them, NaN where not valid."""
    return xr.open_zarr(build / "soundscape.zarr")["embedding"].values.astype(np.float32)


def test_the_index_finds_what_numpy_scoring_finds(tmp_path: Path) -> None:
    build = synthetic_build(tmp_path / "build")
    store = SoundscapeStore(build / "soundscape.zarr")
    opened = search.open_tile_index(store, build / "index")
    embeddings = store_embeddings(build)
    query = unit_vectors(1, embeddings.shape[0], seed=5)[0]
    expected = np.einsum("d,dyx->yx", query, embeddings)

    positions, scores = opened.tiles.search(query, 25)
    rows, cols = np.divmod(positions, store.grid.width)
    assert list(zip(rows.tolist(), cols.tolist(), strict=True)) == ranked(expected, 25)
    np.testing.assert_allclose(scores, expected[rows, cols], rtol=1e-5, atol=1e-6)
    grid = opened.tiles.score_grid(query)
    np.testing.assert_array_equal(np.isnan(grid), ~xr.open_zarr(build / "soundscape.zarr")["valid"].values)
    np.testing.assert_allclose(grid, expected, rtol=1e-5, atol=1e-6)
    assert opened.tiles.record.kind == vectors.FLAT and opened.tiles.record.count == int(np.isfinite(expected).sum())


def test_a_store_of_several_times_is_indexed_at_its_first_time(tmp_path: Path) -> None:
    build = synthetic_build(tmp_path / "build", times=Times((6, 12), (None,)))
    store = SoundscapeStore(build / "soundscape.zarr")
    embeddings = xr.open_zarr(build / "soundscape.zarr")["embedding"].values.astype(np.float32)
    query = unit_vectors(1, embeddings.shape[2], seed=5)[0]
    grid = search.open_tile_index(store, build / "index").tiles.score_grid(query)
    np.testing.assert_allclose(grid, np.einsum("d,dyx->yx", query, embeddings[0, 0]), rtol=1e-5, atol=1e-6)
    assert not np.allclose(grid, np.einsum("d,dyx->yx", query, embeddings[1, 0]), equal_nan=True)


def test_the_index_is_kept_and_read_back_by_the_next_query(tmp_path: Path) -> None:
    build = synthetic_build(tmp_path / "build")
    store = SoundscapeStore(build / "soundscape.zarr")
    first = search.open_tile_index(store, build / "index")
    kept = {name: (build / "index" / name).stat().st_mtime_ns for name in ("tiles.faiss", "tiles_positions.npy")}
    record = json.loads((build / "index" / "tiles.json").read_text())
    second = search.open_tile_index(SoundscapeStore(build / "soundscape.zarr"), build / "index")

    assert first.built and not second.built
    assert {name: (build / "index" / name).stat().st_mtime_ns for name in kept} == kept
    assert record == {**asdict(first.tiles.record), "faiss_version": faiss.__version__}
    assert record["dim"] == 16 and record["kind"] == "flat"
    query = unit_vectors(1, 16, seed=2)[0]
    np.testing.assert_array_equal(first.tiles.search(query, 10)[0], second.tiles.search(query, 10)[0])


def test_a_rebuilt_store_gets_a_new_index(tmp_path: Path) -> None:
    build = synthetic_build(tmp_path / "build", seed=0)
    search.open_tile_index(SoundscapeStore(build / "soundscape.zarr"), build / "index")
    synthetic_build(build, seed=1)
    reopened = search.open_tile_index(SoundscapeStore(build / "soundscape.zarr"), build / "index")
    query = unit_vectors(1, 16, seed=3)[0]
    expected = np.einsum("d,dyx->yx", query, store_embeddings(build))

    assert reopened.built
    np.testing.assert_allclose(reopened.tiles.score_grid(query), expected, rtol=1e-5, atol=1e-6)
    positions, _ = reopened.tiles.search(query, 5)
    rows, cols = np.divmod(positions, expected.shape[1])
    assert list(zip(rows.tolist(), cols.tolist(), strict=True)) == ranked(expected, 5)


def test_a_damaged_kept_index_is_made_again(tmp_path: Path) -> None:
    build = synthetic_build(tmp_path / "build")
    search.open_tile_index(SoundscapeStore(build / "soundscape.zarr"), build / "index")
    (build / "index" / "tiles.faiss").write_bytes(b"not a faiss index")
    assert search.open_tile_index(SoundscapeStore(build / "soundscape.zarr"), build / "index").built


def test_a_large_store_gets_an_hnsw_index_read_back_as_hnsw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build = synthetic_build(tmp_path / "build")
    monkeypatch.setattr(vectors, "EXACT_MAX_VALUES", 100)
    made = search.open_tile_index(SoundscapeStore(build / "soundscape.zarr"), build / "index")
    read = search.open_tile_index(SoundscapeStore(build / "soundscape.zarr"), build / "index")
    query = unit_vectors(1, 16, seed=4)[0]
    expected = np.einsum("d,dyx->yx", query, store_embeddings(build))

    assert made.tiles.record.kind == read.tiles.record.kind == vectors.HNSW and not read.built
    assert isinstance(read.tiles.index, faiss.IndexHNSWFlat)
    np.testing.assert_allclose(read.tiles.score_grid(query), expected, rtol=1e-5, atol=1e-6)
    positions, _ = read.tiles.search(query, 10)
    rows, cols = np.divmod(positions, expected.shape[1])
    assert list(zip(rows.tolist(), cols.tolist(), strict=True)) == ranked(expected, 10)


def test_the_index_kind_follows_the_size_of_a_query_scan() -> None:
    assert faiss.get_num_gpus() == 0  # faiss-cpu: the CPU rule applies
    assert vectors.index_kind(vectors.EXACT_MAX_VALUES // 1024, 1024) == vectors.FLAT
    assert vectors.index_kind(vectors.EXACT_MAX_VALUES // 1024 + 1, 1024) == vectors.HNSW
    assert vectors.index_kind(1_000_000, SMALL_WIDTH) == vectors.FLAT


def test_a_build_folder_that_cannot_be_written_still_answers(tmp_path: Path) -> None:
    build = synthetic_build(tmp_path / "build")
    (build / "index").write_text("a file where the index folder goes")
    with pytest.warns(SearchWarning, match="cannot keep the tile index"):
        opened = search.open_tile_index(SoundscapeStore(build / "soundscape.zarr"), build / "index")
    assert opened.built and len(opened.tiles.search(unit_vectors(1, 16, seed=6)[0], 3)[0]) == 3


def test_hnsw_recall_against_exact_search_on_random_unit_vectors() -> None:
    """20,000 random unit vectors of the small model's width: no structure for HNSW to use (its worst case)."""
    points, queries, k = unit_vectors(20_000, SMALL_WIDTH, seed=0), unit_vectors(50, SMALL_WIDTH, seed=1), 50
    positions = np.arange(len(points), dtype=np.int64)
    found = {}
    for kind in (vectors.FLAT, vectors.HNSW):
        index = vectors.new_index(kind, SMALL_WIDTH)
        index.add(points)
        record = search.IndexRecord(kind, len(points), SMALL_WIDTH, "", faiss.__version__)
        tile_index = search.TileIndex(index, positions, (1, len(points)), record)
        found[kind] = [tile_index.search(query, k)[0] for query in queries]
    exact = [np.argsort(-(points @ query), kind="stable")[:k] for query in queries]
    assert all(set(a) == set(b) for a, b in zip(found[vectors.FLAT], exact, strict=True))
    recall = np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(found[vectors.HNSW], exact, strict=True)])
    assert recall >= 0.95, recall


def test_default_query_ids_are_file_names() -> None:
    assert new_query.default_query_id("Birds singing in the trees!", None) == "birds_singing_in_the_trees"
    assert new_query.default_query_id("Café près du marché", None) == "cafe_pres_du_marche"
    assert new_query.default_query_id("鳥のさえずり", None) == "query"
    assert new_query.default_query_id("cars on a wet street", "sounds/Rain 01.flac") == "rain_01_cars_on_a_wet_street"
    long_id = new_query.default_query_id("a very long description of a soundscape " * 3, None)
    assert len(long_id) <= new_query.DEFAULT_ID_CHARS and not long_id.endswith("_")


# --- bad inputs: one line, exit status 2, before the model is loaded ----------------------------------------------


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(new_query, "load_encoder", refuse)
    monkeypatch.setattr(new_query, "open_tile_index", refuse)


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("audio")
    (folder / "noise.wav").write_bytes(b"RIFF and then nothing a decoder can read")
    (folder / "notes.txt").write_text("not audio")
    return folder


BAD_INPUTS = {
    "no such build": (lambda build, audio: ["/nonexistent/build", "birds"], "no build folder"),
    "not a build": (lambda build, audio: [str(audio), "birds"], "is no finished map build (no soundscape.zarr"),
    "empty text": (lambda build, audio: [str(build), "   "], "the query text '   ' holds no words; write what to"),
    "text without words": (lambda build, audio: [str(build), "..."], "the query text '...' holds no words"),
    "text of emoji": (lambda build, audio: [str(build), "--audio", "x.wav", "--text", "🦆🐸"], "holds no words"),
    "no query": (lambda build, audio: [str(build)], "give a query"),
    "text twice": (lambda build, audio: [str(build), "a", "--text", "b"], "given twice"),
    "missing audio": (
        lambda build, audio: [str(build), "--audio", str(audio / "absent.wav")],
        "absent.wav does not exist",
    ),
    "unreadable audio": (lambda build, audio: [str(build), "--audio", str(audio / "noise.wav")], "cannot read"),
    "not audio": (lambda build, audio: [str(build), "--audio", str(audio / "notes.txt")], "is not a wav"),
    "no places": (
        lambda build, audio: [str(build), "birds", "--top-k", "0"],
        "--top-k 0 is outside 1 to 1000 (the range of outputs.top_k); ask for 1 or more places",
    ),
    "fewer than no places": (
        lambda build, audio: [str(build), "birds", "--top-k=-3"],
        "--top-k -3 is outside 1 to 1000 (the range of outputs.top_k); ask for 1 or more places",
    ),
    "too many places": (
        lambda build, audio: [str(build), "birds", "--top-k", "1001"],
        "--top-k 1001 is outside 1 to 1000 (the range of outputs.top_k); ask for 1000 or fewer places",
    ),
    "configured id": (lambda build, audio: [str(build), "birds", "--id", "birds", "--map"], "is a query of the build"),
    "derived configured id": (lambda build, audio: [str(build), "Rain!", "--map"], "'rain' is a query of the build"),
    "configured id in another case": (
        lambda build, audio: [str(build), "birds", "--id", "Birds", "--map"],
        "query id 'Birds' differs only in case from 'birds', a query of the build",
    ),
    "places in a folder": (lambda build, audio: [str(build), "birds", "--csv", str(audio)], "is a folder"),
    "places not a gpkg": (lambda build, audio: [str(build), "birds", "--gpkg", "x.txt"], "is not a .gpkg file"),
    "places under a file": (
        lambda build, audio: [str(build), "birds", "--gpkg", str(audio / "notes.txt" / "x.gpkg")],
        "notes.txt is no writable folder",
    ),
    "places over the build's own": (
        lambda build, audio: [str(build), "birds", "--gpkg", str(build / "top_places.gpkg")],
        "lies in the build folder",
    ),
    "places in the build folder": (
        lambda build, audio: [str(build), "birds", "--csv", str(build / "cog" / ".." / "mine.csv")],
        "which holds the build's own outputs; write the places outside it, e.g. --csv mine.csv",
    ),
    "reserved id": (lambda build, audio: [str(build), "birds", "--id", "dominant"], "cannot name a file"),
    "percentile id": (lambda build, audio: [str(build), "birds", "--id", "x_percentile"], "cannot name a file"),
    "id with spaces": (lambda build, audio: [str(build), "birds", "--id", "my query"], "cannot name a file"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
@pytest.mark.usefixtures("no_model")
def test_bad_inputs_are_one_line_and_status_2(
    case: str, synthetic: Path, audio_files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, message = BAD_INPUTS[case]
    status, out, err = run_cli(capsys, *argv(synthetic, audio_files))
    assert status == ERROR_STATUS
    assert out == [] and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_text_of_any_script_is_asked_and_an_id_in_another_case_only_without_maps(synthetic: Path) -> None:
    built = new_query.open_built_map(synthetic)
    assert new_query.new_query(built, "鸟鸣", None, None, 5, maps=True).text == "鸟鸣"
    assert new_query.new_query(built, "birds", None, "Birds", 5, maps=False).id == "Birds"


@pytest.mark.usefixtures("no_model")
def test_a_store_without_embeddings_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build = synthetic_build(tmp_path / "build")
    shutil.rmtree(build / "soundscape.zarr" / "embedding")
    status, out, err = run_cli(capsys, str(build), "birds singing")
    assert status == ERROR_STATUS and out == [] and len(err) == 1
    assert err[0] == f"error: {build}/soundscape.zarr keeps no tile embeddings, so new queries cannot be scored;" + (
        " rebuild the map"
    )


@pytest.mark.usefixtures("no_model")
def test_a_store_of_other_weights_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build = synthetic_build(tmp_path / "build")
    record = json.loads((build / "model.json").read_text())
    (build / "model.json").write_text(json.dumps({**record, "sha256": "1" * 64}))
    status, _, err = run_cli(capsys, str(build), "birds singing")
    assert status == ERROR_STATUS and len(err) == 1 and "was made with weights of sha256 000000000000" in err[0]


# --- answers on a real build -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("work")
    (work / "config.yaml").write_text(yaml.safe_dump(BUILD_CONFIG))
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--cores", "2"]
    command += ["--profile", str(REPO / "profiles" / "local"), "--configfile", str(work / "config.yaml")]
    environment = {**os.environ, "PYTHONPATH": str(REPO)}  # the jobs import this checkout's pipeline
    result = subprocess.run(
        command, cwd=work, capture_output=True, text=True, env=environment, timeout=SNAKEMAKE_TIMEOUT_S
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return work / "out" / "demo"


@pytest.fixture(scope="module")
def encoder(built: Path) -> Sat2SoundEncoder:
    """The build's untrained weights, loaded here as any user of the model package would."""
    record = json.loads((built / "model.json").read_text())
    return Sat2SoundEncoder.from_checkpoint(record["path"], device="cpu")


@pytest.fixture(scope="module")
def store(built: Path) -> xr.Dataset:
    return xr.open_zarr(built / "soundscape.zarr").load()


def centres_lnglat(store: xr.Dataset, tiles: list[tuple[int, int]]) -> np.ndarray:
    rows, cols = np.array(tiles).T
    to_lnglat = Transformer.from_crs("EPSG:3857", "EPSG:4326", always_xy=True)
    return np.column_stack(to_lnglat.transform(store.x.values[cols], store.y.values[rows]))


def ask(built: Path, text: str | None, audio: str | None, query_id: str | None, top_k: int) -> new_query.Answer:
    found = new_query.open_built_map(built)
    return new_query.answer(found, new_query.new_query(found, text, audio, query_id, top_k, maps=False), top_k)


@pytest.mark.slow
def test_a_configured_query_asked_again_gives_its_scores_and_places(built: Path, store: xr.Dataset) -> None:
    # Under its own id: only `--map` writes files that it would share with the build's own query.
    result = ask(built, BUILD_CONFIG["queries"][0]["text"], None, "birds", BUILD_TOP_K)
    stored = store.score.sel(query="birds").values
    np.testing.assert_array_equal(np.isnan(result.scores), np.isnan(stored))
    np.testing.assert_allclose(result.scores, stored, atol=1e-3)
    places = gpd.read_file(built / "top_places.gpkg", layer="birds_places")
    assert len(places) == len(result.places) == BUILD_TOP_K
    assert result.places["rank"].tolist() == places["rank"].tolist()
    np.testing.assert_allclose(result.places[["score", "percentile"]], places[["score", "percentile"]], atol=1e-3)
    # Tiles whose stored scores differ by float rounding (1e-7) may swap; every other place is the same tile.
    same = np.abs(places["score"].to_numpy()[:, None] - stored[np.isfinite(stored)][None, :]) < NEAR_TIE
    clear = same.sum(axis=1) == 1
    assert clear.sum() >= BUILD_TOP_K // 2
    np.testing.assert_allclose(result.places[["lon", "lat"]][clear], places[["lon", "lat"]][clear], atol=1e-9)
    assert result.places.geometry[clear].geom_equals_exact(places.geometry[clear], tolerance=1e-9).all()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["text", "audio", "composed"])
def test_new_queries_find_the_places_numpy_scoring_finds(
    kind: str, built: Path, store: xr.Dataset, encoder: Sat2SoundEncoder, tmp_path: Path
) -> None:
    text = "rain falling on a tin roof" if kind != "audio" else None
    audio = None
    if kind != "text":
        audio = str(tmp_path / "rain.wav")
        noise = np.random.default_rng(0).uniform(-0.2, 0.2, 48_000).astype(np.float32)
        soundfile.write(audio, noise, 16_000)
    if kind == "text":
        embedding = encoder.embed_texts([str(text)]).embedding[0].numpy()
    elif kind == "audio":
        embedding = encoder.embed_audio([str(audio)]).embedding[0].numpy()
    else:
        embedding = encoder.embed_composed([str(audio)], [str(text)]).embedding[0].numpy()
    expected = np.einsum("d,dyx->yx", embedding, store.embedding.values.astype(np.float32))
    top_k = 30

    result = ask(built, text, audio, None, top_k)
    best = ranked(expected, top_k)
    np.testing.assert_allclose(result.places[["lon", "lat"]].to_numpy(), centres_lnglat(store, best), atol=1e-9)
    np.testing.assert_allclose(result.places["score"], [expected[tile] for tile in best], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.scores, expected, rtol=1e-5, atol=1e-6)
    scores = result.places["score"].to_numpy()
    np.testing.assert_allclose(result.places["percentile"], percentiles_of(scores, result.scores), atol=1e-4)
    assert result.query.kind == kind


@pytest.mark.slow
def test_map_writes_cogs_on_the_builds_grid(
    built: Path, store: xr.Dataset, encoder: Sat2SoundEncoder, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    text = "waves and flowing water"
    argv = [str(built), text, "--top-k", "5", "--map", "--id", "water_new", "--csv", str(tmp_path / "water.csv")]
    status, out, err = run_cli(capsys, *argv, "--gpkg", str(tmp_path / "water.gpkg"))
    assert status == 0, err
    assert out[0].startswith(f"query {text!r} (text, id water_new): the 5 best of")
    assert out[1].split() == ["rank", "score", "percentile", "lon", "lat"]
    assert [line.split()[0] for line in out[2:7]] == ["1", "2", "3", "4", "5"]
    assert out[7].startswith("time: index ") and " ms" in out[7]
    assert out[-1] == f"map: {built}/cog/water_new.tif, {built}/cog/water_new_percentile.tif (+ .qml)"

    embedding = encoder.embed_texts([text]).embedding[0].numpy()
    expected = np.einsum("d,dyx->yx", embedding, store.embedding.values.astype(np.float32))
    bands = {}
    for name in ("water_new", "water_new_percentile"):
        path = built / "cog" / f"{name}.tif"
        assert cog_validate(path)[0] and path.with_suffix(".qml").is_file()
        with rasterio.open(path) as made, rasterio.open(built / "cog" / "birds.tif") as builds:
            assert (made.crs, made.transform, made.shape, made.dtypes) == (
                builds.crs,
                builds.transform,
                builds.shape,
                builds.dtypes,
            )
            assert math.isnan(made.nodata) and math.isnan(builds.nodata)
            assert made.tags()["QUERY_ID"] == "water_new" and made.tags()["QUERY"] == text
            bands[name] = made.read(1)
            np.testing.assert_array_equal(np.isnan(bands[name]), np.isnan(builds.read(1)))
    valid = np.isfinite(expected)
    raw = bands["water_new"][valid]
    np.testing.assert_allclose(raw, expected[valid], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bands["water_new_percentile"][valid], percentiles_of(raw, raw), atol=1e-4)
    with (tmp_path / "water.csv").open(encoding="utf-8-sig", newline="") as handle:
        assert [row["query"] for row in csv.DictReader(handle)] == ["water_new"] * 5
    places = gpd.read_file(tmp_path / "water.gpkg", layer="water_new_places")
    assert places["rank"].tolist() == [1, 2, 3, 4, 5] and places.crs.to_epsg() == 4326


@pytest.mark.slow
def test_the_command_line_makes_the_index_once(built: Path) -> None:
    shutil.rmtree(built / "index", ignore_errors=True)
    command = [sys.executable, "-m", "pipeline", "query", str(built), "people talking at a market", "--top-k", "3"]
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = [subprocess.run(command, capture_output=True, text=True, env=environment, timeout=120) for _ in "ab"]
    for run in runs:
        assert run.returncode == 0, run.stderr
    first, second = (run.stdout.splitlines() for run in runs)
    assert "(made: flat, 63 tiles)" in first[5] and "(read: flat, 63 tiles)" in second[5]
    assert first[:5] == second[:5] and len(first[2:5]) == 3

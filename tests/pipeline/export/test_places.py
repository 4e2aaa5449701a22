"""`top_places.gpkg` and `top_places.csv`, read back with geopandas and the csv module, from a synthetic store whose
best tiles, their ranks and the areas they make are laid out by hand."""

from __future__ import annotations

import csv
from pathlib import Path

import geopandas as gpd
import mercantile
import numpy as np
import pyogrio
import pytest
import xarray as xr
from pyproj import Geod
from shapely.geometry import box
from support.synthetic_store import DEFAULT_QUERIES, SyntheticStore, write_synthetic_store

from pipeline.errors import ExportError
from pipeline.export import cog
from pipeline.export.places import write_top_places

TOP_K = 10
# Query 0's ten best tiles (row, col): score. Areas: a 2 x 2 block (A), an L of three (B), a lone tile (C) and two
# tiles touching at a corner only (D1, D2: two areas).
BEST = {
    (18, 10): 0.95,  # A, rank 1
    (14, 30): 0.94,  # B, rank 2
    (20, 20): 0.93,  # C, rank 3
    (22, 36): 0.92,  # D1, rank 4
    (18, 11): 0.80,  # A
    (19, 10): 0.79,  # A
    (19, 11): 0.78,  # A
    (15, 30): 0.77,  # B
    (15, 31): 0.76,  # B
    (23, 37): 0.75,  # D2, rank 10
}
AREAS = [[(18, 10), (18, 11), (19, 10), (19, 11)], [(14, 30), (15, 30), (15, 31)], [(20, 20)], [(22, 36)], [(23, 37)]]
# Query 1: three equal best scores; the northern, then the western tile ranks first.
TIED = [(14, 28), (14, 30), (20, 20)]
PLACE_COLUMNS = ["query", "query_text", "rank", "score", "percentile", "lon", "lat", "area", "geometry"]
AREA_COLUMNS = ["query", "query_text", "area", "tiles", "area_km2", "best_rank", "best_score", "best_percentile"]
GEOD = Geod(ellps="WGS84")


def tile_of(store: SyntheticStore, row: int, col: int) -> mercantile.Tile:
    return mercantile.Tile(store.top_left.x + col, store.top_left.y + row, store.zoom)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStore:
    rng = np.random.default_rng(1)
    scores = rng.uniform(-0.5, 0.5, (len(DEFAULT_QUERIES), 32, 48))
    for (row, col), score in BEST.items():
        scores[0, row, col] = score
    for row, col in TIED:
        scores[1, row, col] = 0.9
    written = write_synthetic_store(tmp_path_factory.mktemp("store") / "soundscape.zarr", score=scores)
    assert all(written.valid[tile] for tile in [*BEST, *TIED])
    return written


@pytest.fixture(scope="module")
def outputs(store: SyntheticStore, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("build")
    gpkg, table = folder / "top_places.gpkg", folder / "top_places.csv"
    assert write_top_places(store.path, TOP_K, gpkg, table) == TOP_K * len(DEFAULT_QUERIES)
    assert sorted(path.name for path in folder.iterdir()) == ["top_places.csv", "top_places.gpkg"]
    return gpkg, table


def test_two_layers_per_query(outputs: tuple[Path, Path]) -> None:
    layers = pyogrio.list_layers(outputs[0])
    names = [f"{query.id}_{kind}" for query in DEFAULT_QUERIES for kind in ("places", "areas")]
    assert layers[:, 0].tolist() == names
    assert set(layers[:, 1]) == {"Polygon"}


def test_places_are_the_k_best_tiles_in_rank_order(store: SyntheticStore, outputs: tuple[Path, Path]) -> None:
    places = gpd.read_file(outputs[0], layer="birds_places")
    assert places.crs.to_epsg() == 4326
    assert list(places.columns) == PLACE_COLUMNS
    assert len(places) == TOP_K and places["rank"].tolist() == list(range(1, TOP_K + 1))
    assert (places["query"] == "birds").all() and (places["query_text"] == "birds chirping in a park").all()
    ranked = sorted(BEST, key=lambda tile: -BEST[tile])
    np.testing.assert_allclose(places["score"], [BEST[tile] for tile in ranked], rtol=1e-6)
    stored = xr.open_zarr(store.path)["score_percentile"].sel(query="birds").to_numpy()
    np.testing.assert_allclose(places["percentile"], [stored[tile] for tile in ranked], rtol=1e-6)
    for (row, col), geometry, lon, lat in zip(ranked, places.geometry, places["lon"], places["lat"], strict=True):
        tile = tile_of(store, row, col)
        np.testing.assert_allclose(geometry.bounds, box(*mercantile.bounds(tile)).bounds, rtol=0, atol=1e-9)
        left, bottom, right, top = mercantile.xy_bounds(tile)
        assert (lon, lat) == pytest.approx(mercantile.lnglat((left + right) / 2, (bottom + top) / 2), abs=1e-9)


def test_neighbouring_places_merge_into_areas(store: SyntheticStore, outputs: tuple[Path, Path]) -> None:
    places = gpd.read_file(outputs[0], layer="birds_places")
    areas = gpd.read_file(outputs[0], layer="birds_areas")
    assert areas.crs.to_epsg() == 4326
    assert list(areas.columns) == [*AREA_COLUMNS, "lon", "lat", "geometry"]
    assert areas["area"].tolist() == [1, 2, 3, 4, 5]
    assert areas["tiles"].tolist() == [len(tiles) for tiles in AREAS]
    assert areas["best_rank"].tolist() == [1, 2, 3, 4, 10]
    np.testing.assert_allclose(areas["best_score"], [0.95, 0.94, 0.93, 0.92, 0.75], rtol=1e-6)
    ranked = sorted(BEST, key=lambda tile: -BEST[tile])
    area_of_place = {tile: number for tile, number in zip(ranked, places["area"], strict=True)}
    for number, (tiles, outline) in enumerate(zip(AREAS, areas.geometry, strict=True), start=1):
        assert {area_of_place[tile] for tile in tiles} == {number}
        expected = gpd.GeoSeries([box(*mercantile.bounds(tile_of(store, *tile))) for tile in tiles]).union_all()
        assert outline.geom_type == "Polygon"
        assert outline.symmetric_difference(expected).area < 1e-12
    block = areas.iloc[0]
    tile_m2 = [abs(GEOD.geometry_area_perimeter(tile)[0]) for tile in places.geometry[[0, 4, 5, 6]]]
    assert block["area_km2"] == pytest.approx(sum(tile_m2) / 1e6)
    best_tile = places.iloc[0]
    assert (block["lon"], block["lat"], block["best_percentile"]) == (
        best_tile["lon"],
        best_tile["lat"],
        best_tile["percentile"],
    )


def test_equal_scores_rank_north_then_west_first(outputs: tuple[Path, Path]) -> None:
    places = gpd.read_file(outputs[0], layer="rain_places")
    lon, lat = places["lon"].to_numpy(), places["lat"].to_numpy()
    assert places["score"][:3].tolist() == pytest.approx([0.9] * 3)
    assert lat[0] == pytest.approx(lat[1]) and lon[0] < lon[1], "same row: west first"
    assert lat[1] > lat[2], "north first"


def test_csv_holds_every_querys_places_for_spreadsheets(outputs: tuple[Path, Path]) -> None:
    gpkg, table = outputs
    assert table.read_bytes().startswith(b"\xef\xbb\xbf"), "a byte order mark tells Excel it is UTF-8"
    with table.open(encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == PLACE_COLUMNS[:-1]
    assert len(rows) == TOP_K * len(DEFAULT_QUERIES)
    for query in DEFAULT_QUERIES:
        places = gpd.read_file(gpkg, layer=f"{query.id}_places")
        mine = [row for row in rows if row["query"] == query.id]
        assert [int(row["rank"]) for row in mine] == places["rank"].tolist()
        assert [int(row["area"]) for row in mine] == places["area"].tolist()
        assert {row["query_text"] for row in mine} == {query.label}
        for column in ("score", "percentile", "lon", "lat"):
            # Rounded to 6 decimals (2 for percentiles).
            np.testing.assert_allclose([float(row[column]) for row in mine], places[column], rtol=0, atol=5e-3)


def test_places_do_not_depend_on_how_the_store_is_read(
    store: SyntheticStore, outputs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cog, "WINDOW_PX", 7)
    write_top_places(store.path, TOP_K, tmp_path / "small.gpkg", tmp_path / "small.csv")
    assert (tmp_path / "small.csv").read_bytes() == outputs[1].read_bytes()


def test_k_beyond_the_valid_tiles_gives_every_valid_tile(tmp_path: Path) -> None:
    store = write_synthetic_store(tmp_path / "soundscape.zarr", 6, 4)
    write_top_places(store.path, 1000, tmp_path / "top_places.gpkg", tmp_path / "top_places.csv")
    places = gpd.read_file(tmp_path / "top_places.gpkg", layer="birds_places")
    assert len(places) == int(store.valid.sum())
    np.testing.assert_allclose(places["score"], np.sort(store.score[0][store.valid])[::-1], rtol=1e-6)


def test_a_missing_store_is_an_export_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no Zarr store"):
        write_top_places(tmp_path / "absent.zarr", 5, tmp_path / "top.gpkg", tmp_path / "top.csv")
    assert not list(tmp_path.iterdir())

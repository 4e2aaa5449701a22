"""`zones.gpkg` and `zones.csv`, read back with geopandas, the csv module and GDAL's `ogrinfo`, from a synthetic
store whose scores depend on the column only, so that every zone's statistics can be worked out by hand: a block
of tiles wholly inside the region, a zone partly over tiles without imagery and cutting tiles in half, one on
tiles outside the region, one a hundredth of a tile, and one off the grid."""

from __future__ import annotations

import csv
import json
import subprocess
import warnings
from pathlib import Path

import geopandas as gpd
import mercantile
import numpy as np
import pyogrio
import pytest
import shapely
import xarray as xr
from pyproj import Geod
from shapely.geometry import GeometryCollection, LineString, Point, Polygon, box
from support.synthetic_store import (
    DEFAULT_QUERIES,
    SyntheticStore,
    grid_rectangle,
    write_synthetic_store,
)

from pipeline.config import OutputSettings
from pipeline.errors import BuildConfigError
from pipeline.export.qgis_style import percentile_class
from pipeline.export.zones import TOP_DECILE_ABOVE, ZONES_LAYER, write_zones, zone_statistics
from pipeline.regions import Region
from pipeline.steps import build_parser
from pipeline.zone_file import check_zones, read_zones

HEIGHT, WIDTH = 32, 48
# Zones as (top row, left column, bottom row, right column) of the grid, fractions cutting tiles.
ZONES = {
    "inside": (14, 36, 18, 40),  # 16 whole tiles, all with imagery
    "partly": (9, 21.5, 10, 25.5),  # row 9: half of column 21, columns 22 and 23, then the block without imagery
    "outside": (0, 0, 2, 4),  # a corner of the grid outside the region: no valid tile
    "tiny": (20.4, 10.4, 20.5, 10.5),  # a hundredth of tile (20, 10)
}
OFF_GRID = box(10.0, 40.0, 10.5, 40.5)  # far from the grid (Paris): not written
STATISTICS = ("mean", "max", "mean_percentile", "top_decile_pct")
GEOD = Geod(ellps="WGS84")
OGRINFO = Path("/usr/bin/ogrinfo")


def column_scores() -> np.ndarray:
    """(Q, H, W) raw cosines that depend on the column only: rising, falling, and a saw-tooth."""
    cols = np.arange(WIDTH, dtype=np.float64)
    fields = [(cols - 24) / 30, (24 - cols) / 30, (cols % 5 - 2) / 10]
    return np.stack([np.broadcast_to(field, (HEIGHT, WIDTH)) for field in fields]).astype(np.float32)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStore:
    written = write_synthetic_store(tmp_path_factory.mktemp("store") / "soundscape.zarr", score=column_scores())
    assert written.valid[14:18, 36:40].all() and written.valid[9, 21:24].all() and not written.valid[9, 24:26].any()
    assert not written.valid[0:2, 0:4].any() and written.valid[20, 10]
    return written


def zone_file(store: SyntheticStore, path: Path, crs: str = "EPSG:4326", **columns: list[str]) -> Path:
    """The zones (and one off the grid) as a GeoPackage in `crs`, with their names in `columns` (default `name`)."""
    shapes = [grid_rectangle(store, *rows_cols) for rows_cols in ZONES.values()] + [OFF_GRID]
    names = columns or {"name": [*ZONES, "far away"]}
    gpd.GeoDataFrame(names, geometry=shapes, crs="EPSG:4326").to_crs(crs).to_file(path)
    return path


def settings(zones: Path | None, field: str | None = None) -> OutputSettings:
    return OutputSettings(3, None, 20, 128, None if zones is None else str(zones), field)


@pytest.fixture(scope="module")
def outputs(store: SyntheticStore, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("build")
    zones = zone_file(store, folder / "districts.gpkg")
    gpkg, table = folder / "zones.gpkg", folder / "zones.csv"
    assert write_zones(store.path, settings(zones), gpkg, table) == len(ZONES)
    return gpkg, table


def percentiles(store: SyntheticStore) -> np.ndarray:
    """(Q, H, W) the store's percentiles within the region."""
    return xr.open_zarr(store.path)["score_percentile"].to_numpy()


def tile_ground_m2(store: SyntheticStore, row: int) -> float:
    west, south, east, north = mercantile.bounds(store.top_left.x, store.top_left.y + row, store.zoom)
    return abs(GEOD.geometry_area_perimeter(box(west, south, east, north))[0])


def test_the_zones_layer_is_in_lon_lat_with_a_row_per_zone_on_the_grid(outputs: tuple[Path, Path]) -> None:
    assert pyogrio.list_layers(outputs[0]).tolist() == [[ZONES_LAYER, "Polygon"]]
    zones = gpd.read_file(outputs[0], layer=ZONES_LAYER)
    assert zones.crs.to_epsg() == 4326
    statistics = [f"{query.id}_{name}" for query in DEFAULT_QUERIES for name in STATISTICS]
    assert zones.columns.tolist() == ["zone", "tiles", "area_km2", "zone_km2", *statistics, "geometry"]
    assert zones["zone"].tolist() == list(ZONES), "in the file's order, without the zone off the grid"


def test_a_block_of_whole_tiles_gets_their_mean_max_and_top_decile(
    store: SyntheticStore, outputs: tuple[Path, Path]
) -> None:
    inside = gpd.read_file(outputs[0]).set_index("zone").loc["inside"]
    assert inside["tiles"] == 16
    # Every row holds the same four columns, so the rows' areas cancel out of the means.
    expected_km2 = sum(4 * tile_ground_m2(store, row) for row in range(14, 18)) / 1e6
    assert inside["area_km2"] == pytest.approx(expected_km2, rel=1e-9)
    assert inside["zone_km2"] == pytest.approx(expected_km2, rel=1e-4)
    scores, ranks = store.score[:, 14, 36:40], percentiles(store)[:, 14, 36:40]
    for index, query in enumerate(DEFAULT_QUERIES):
        assert inside[f"{query.id}_mean"] == pytest.approx(scores[index].mean(), abs=1e-6)
        assert inside[f"{query.id}_max"] == pytest.approx(scores[index].max(), abs=1e-6)
        assert inside[f"{query.id}_mean_percentile"] == pytest.approx(ranks[index].mean(), abs=1e-4)
        top = 100 * np.mean(ranks[index] > TOP_DECILE_ABOVE)
        assert inside[f"{query.id}_top_decile_pct"] == pytest.approx(top, abs=1e-6)
    assert 0 < inside["birds_top_decile_pct"] < 100 and inside["rain_top_decile_pct"] == 0


def test_tiles_count_by_the_share_inside_and_never_without_imagery(
    store: SyntheticStore, outputs: tuple[Path, Path]
) -> None:
    partly = gpd.read_file(outputs[0]).set_index("zone").loc["partly"]
    weights = np.array([0.5, 1.0, 1.0])  # columns 21, 22, 23 of row 9; 24 and 25 have no imagery
    assert partly["tiles"] == 3
    assert partly["area_km2"] == pytest.approx(weights.sum() * tile_ground_m2(store, 9) / 1e6, rel=1e-9)
    assert partly["zone_km2"] > partly["area_km2"] * 1.5, "half the zone lies on tiles without imagery"
    scores, ranks = store.score[:, 9, 21:24], percentiles(store)[:, 9, 21:24]
    for index, query in enumerate(DEFAULT_QUERIES):
        assert partly[f"{query.id}_mean"] == pytest.approx(weights @ scores[index] / weights.sum(), abs=1e-6)
        assert partly[f"{query.id}_max"] == pytest.approx(scores[index].max(), abs=1e-6)
        assert partly[f"{query.id}_mean_percentile"] == pytest.approx(weights @ ranks[index] / weights.sum(), abs=1e-4)


def test_a_zone_smaller_than_a_tile_takes_its_tiles_values(store: SyntheticStore, outputs: tuple[Path, Path]) -> None:
    tiny = gpd.read_file(outputs[0]).set_index("zone").loc["tiny"]
    assert tiny["tiles"] == 1
    assert tiny["area_km2"] == pytest.approx(0.01 * tile_ground_m2(store, 20) / 1e6, rel=1e-6)
    for index, query in enumerate(DEFAULT_QUERIES):
        assert tiny[[f"{query.id}_mean", f"{query.id}_max"]].tolist() == pytest.approx([store.score[index, 20, 10]] * 2)


def test_a_zone_without_valid_tiles_has_null_statistics_not_zeros(outputs: tuple[Path, Path]) -> None:
    outside = gpd.read_file(outputs[0]).set_index("zone").loc["outside"]
    assert (outside["tiles"], outside["area_km2"]) == (0, 0.0) and outside["zone_km2"] > 0
    statistics = [f"{query.id}_{name}" for query in DEFAULT_QUERIES for name in STATISTICS]
    assert outside[statistics].isna().all()


def test_the_csv_has_the_same_rows_without_geometry(outputs: tuple[Path, Path]) -> None:
    zones = gpd.read_file(outputs[0])
    with outputs[1].open(encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == zones.columns.tolist()[:-1]
    assert [row["zone"] for row in rows] == zones["zone"].tolist()
    assert [int(row["tiles"]) for row in rows] == zones["tiles"].tolist()
    np.testing.assert_allclose([float(row["birds_mean"] or "nan") for row in rows], zones["birds_mean"], atol=1e-6)
    outside = rows[list(ZONES).index("outside")]
    assert outside["birds_mean"] == outside["harbour_top_decile_pct"] == ""


@pytest.mark.skipif(not OGRINFO.exists(), reason="Debian's gdal-bin is not installed (bash run.sh test installs it)")
def test_gdal_reads_the_layer_its_crs_and_nulls(outputs: tuple[Path, Path]) -> None:
    result = subprocess.run(
        [str(OGRINFO), "-ro", "-al", "-where", "zone = 'outside'", str(outputs[0])],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Layer name: zones" in result.stdout and "Feature Count: 1" in result.stdout
    assert 'ID["EPSG",4326]' in result.stdout
    assert "birds_mean (Real) = (null)" in result.stdout and "tiles (Integer64) = 0" in result.stdout


def test_the_top_decile_is_the_percentile_maps_top_ten_percent() -> None:
    percentile = np.array([89.9, 90.0, 90.01, 95.0, 99.75])
    top_ten = percentile_class(percentile) >= percentile_class(np.array([90.01]))[0]
    np.testing.assert_array_equal(top_ten, percentile > TOP_DECILE_ABOVE)


def test_zones_in_a_projected_crs_give_the_same_statistics(store: SyntheticStore, tmp_path: Path) -> None:
    utm = zone_file(store, tmp_path / "utm.gpkg", crs="EPSG:32631")
    lnglat = zone_file(store, tmp_path / "lnglat.gpkg")
    projected, geographic = (zone_statistics(store.path, settings(path)) for path in (utm, lnglat))
    assert projected["zone"].tolist() == geographic["zone"].tolist()
    assert projected["tiles"].tolist() == geographic["tiles"].tolist()
    columns = ["area_km2", "birds_mean", "harbour_mean_percentile"]
    np.testing.assert_allclose(projected[columns], geographic[columns], rtol=2e-3)


def test_zones_are_named_by_a_field_the_name_column_or_their_number(store: SyntheticStore, tmp_path: Path) -> None:
    codes = [f"Z{index}" for index in range(len(ZONES) + 1)]
    named = zone_file(store, tmp_path / "named.gpkg", code=codes, NAME=[*ZONES, "far"])
    assert zone_statistics(store.path, settings(named, "code"))["zone"].tolist() == codes[: len(ZONES)]
    assert zone_statistics(store.path, settings(named))["zone"].tolist() == list(ZONES)
    numbered = zone_file(store, tmp_path / "numbered.gpkg", code=codes)
    assert zone_statistics(store.path, settings(numbered))["zone"].tolist() == ["1", "2", "3", "4"]


def test_zone_files_that_cannot_serve_are_refused_in_one_line(store: SyntheticStore, tmp_path: Path) -> None:
    region = Region("synthetic ellipse", store.plan.region.geometry)
    good = zone_file(store, tmp_path / "good.gpkg")
    check_zones(settings(good), region)
    points = tmp_path / "points.geojson"
    gpd.GeoDataFrame({"name": ["a"]}, geometry=gpd.points_from_xy([2.2], [49.0]), crs=4326).to_file(points)
    far = tmp_path / "far.geojson"
    gpd.GeoDataFrame({"name": ["far"]}, geometry=[OFF_GRID], crs=4326).to_file(far)
    broken = tmp_path / "broken.gpkg"
    broken.write_text("not a GeoPackage")
    cases = {
        settings(tmp_path / "absent.gpkg"): "absent.gpkg does not exist; check the path",
        settings(broken): "broken.gpkg cannot be read as vector data",
        settings(points): "points.geojson holds no polygons; give areas",
        settings(good, "district"): "config.outputs.zone_field: 'district' is not a column of",
        settings(far): "config.outputs.zones: no zone of",
    }
    for outputs, words in cases.items():
        with pytest.raises(BuildConfigError) as refused:
            check_zones(outputs, region)
        message = str(refused.value)
        assert words in message and "; " in message and "\n" not in message, message


def test_zone_files_with_bad_coordinates_several_layers_or_a_hollow_polygon_are_refused_alone(tmp_path: Path) -> None:
    ring = box(0, 0, 1, 1).exterior.coords
    nan = tmp_path / "nan.geojson"
    broken = {"type": "Polygon", "coordinates": [[[0, 0], [float("nan"), 0], [1, 1], [0, 0]]]}
    nan.write_text(
        json.dumps(
            {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, "geometry": broken}]}
        )
    )
    hollow = tmp_path / "hollow.gpkg"
    gpd.GeoDataFrame(geometry=[box(2, 2, 3, 3), Polygon(ring, [ring])], crs=4326).to_file(hollow)
    layers = tmp_path / "layers.gpkg"
    for layer in ("districts", "parks"):
        gpd.GeoDataFrame(geometry=[box(0, 0, 1, 1)], crs=4326).to_file(layers, layer=layer)
    cases = {
        nan: "nan.geojson has NaN or infinite coordinates (feature 1); fix or remove them",
        hollow: "hollow.gpkg has a polygon that encloses no area once repaired (feature 2: Self-intersection",
        layers: "layers.gpkg holds 2 layers (districts, parks) where one is read; save the layer you want alone"
        " (ogr2ogr OUT.gpkg layers.gpkg LAYER)",
    }
    for path, words in cases.items():
        with warnings.catch_warnings(), pytest.raises(BuildConfigError) as refused:
            warnings.simplefilter("error")  # a library's warning would be raised instead
            read_zones(settings(path))
        assert str(refused.value).startswith(f"config.outputs.zones: {tmp_path / words}")


def test_zones_keep_their_polygons_repaired_and_drop_what_has_no_area(tmp_path: Path) -> None:
    bowtie = Polygon([(0, 0), (2, 2), (2, 0), (0, 2), (0, 0)])  # self-intersecting: two triangles once repaired
    mixed = GeometryCollection([box(5, 5, 6, 6), LineString([(6, 6), (8, 8)]), Point(9, 9)])
    path = tmp_path / "mixed.gpkg"
    shapes = [bowtie, mixed, LineString([(0, 0), (1, 1)])]
    gpd.GeoDataFrame({"name": ["bowtie", "mixed", "line"]}, geometry=shapes, crs=4326).to_file(path)
    zones = read_zones(settings(path))
    assert zones["zone"].tolist() == ["bowtie", "mixed"]
    assert zones.geometry.is_valid.all()
    assert shapely.area(zones.geometry.to_numpy()).tolist() == pytest.approx([2.0, 1.0])
    assert zones.geometry.geom_type.tolist() == ["MultiPolygon", "Polygon"]


def test_the_project_step_takes_the_zones_only_where_the_build_has_them() -> None:
    common = ["--settings", "s.json", "--store", "z", "--cog-dir", "cog", "--places", "p.gpkg", "--underlay", "i.tif"]
    without = build_parser().parse_args(["project", *common, "--out", "project.qgz"])
    with_zones = build_parser().parse_args(["project", *common, "--zones", "zones.gpkg", "--out", "project.qgz"])
    assert (without.zones, with_zones.zones) == (None, Path("zones.gpkg"))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["zones", "--settings", "s.json", "--store", "z", "--gpkg", "zones.gpkg"])

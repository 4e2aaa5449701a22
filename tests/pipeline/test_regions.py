"""Region specifications: bboxes, circles, catalog names and vector files, with their real-world geometry cases."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import geopandas as gpd
import mercantile
import pytest
import shapely
from pyproj import Geod, Transformer
from shapely.geometry import MultiPolygon, Point, Polygon, box

from pipeline.__main__ import main
from pipeline.errors import RegionError, RegionWarning
from pipeline.regions import WEB_MERCATOR_MAX_LAT, Region, catalog_names, parse_region

GEOD = Geod(ellps="WGS84")


def _parse_quietly(spec: str) -> Region:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return parse_region(spec)


def _assert_clean(region: Region) -> None:
    assert isinstance(region.geometry, Polygon | MultiPolygon)
    assert region.geometry.is_valid
    assert not region.geometry.is_empty
    west, south, east, north = region.geometry.bounds
    assert -180.0 <= west <= east <= 180.0
    assert -WEB_MERCATOR_MAX_LAT <= south < north <= WEB_MERCATOR_MAX_LAT


def _write(frame: gpd.GeoDataFrame, path: Path, **options: object) -> Path:
    if path.suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_file(path, **options)
    return path


def test_mercator_limit_is_the_latitude_of_the_square_world() -> None:
    assert mercantile.bounds(0, 0, 0).north == pytest.approx(WEB_MERCATOR_MAX_LAT, abs=1e-12)


def test_bbox_becomes_its_rectangle() -> None:
    region = _parse_quietly(" -90.25, 38.55 ,-90.1,38.7 ")
    assert region.geometry.equals(box(-90.25, 38.55, -90.1, 38.7))
    _assert_clean(region)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("-90.1,38.7,-90.2,38.6", "inverted bbox"),
        ("10,20,30,20", "inverted bbox"),
        ("10,20,10,30", "zero width"),
        ("180,20,-180,30", "zero width"),
        ("38.6,-90.2,38.7,-91.2", "latitude -90.2 is out of range"),
        ("-200,10,-190,20", "longitude -200 is out of range"),
        ("0,86,10,89", "empty after clipping"),
        ("95,10,3km", "latitude 95 is out of range"),
        ("10,190,3km", "longitude 190 is out of range"),
        ("10,10,0km", "radius 0 km is out of range"),
        ("10,10,2500km", "radius 2500 km is out of range"),
        ("89.5,0,100km", "contains a pole"),
        ("1,2,3", "cannot read '1,2,3'"),
        ("", "empty region"),
        ("Frnace", "did you mean 'France'"),
        ("Atlantis", "unknown region 'Atlantis'"),
    ],
)
def test_bad_specs_raise_one_line_errors(spec: str, message: str) -> None:
    with pytest.raises(RegionError, match=message) as caught:
        parse_region(spec)
    assert "\n" not in str(caught.value)


def test_bbox_across_the_antimeridian_is_split_in_two() -> None:
    with pytest.warns(RegionWarning, match="antimeridian"):
        region = parse_region("170,-20,-170,-10")
    _assert_clean(region)
    assert isinstance(region.geometry, MultiPolygon)
    parts = sorted(region.geometry.geoms, key=lambda part: part.bounds[0])
    assert parts[0].equals(box(-180, -20, -170, -10))
    assert parts[1].equals(box(170, -20, 180, -10))


@pytest.mark.parametrize(
    ("spec", "bounds"), [("-100,0,100,10", (-100, 0, 100, 10)), ("-180,-60,180,60", (-180, -60, 180, 60))]
)
def test_bbox_wider_than_180_degrees_runs_east_from_its_west_edge(spec: str, bounds: tuple[float, ...]) -> None:
    region = _parse_quietly(spec)
    _assert_clean(region)
    west, south, east, north = bounds
    assert region.geometry.bounds == pytest.approx(bounds)
    assert region.geometry.area == pytest.approx((east - west) * (north - south))


def slice_area_m2(south: float, north: float) -> float:
    """Ground area of a 1° wide slice of the band between two latitudes, its edges following the parallels."""
    return abs(GEOD.geometry_area_perimeter(shapely.segmentize(box(0, south, 1, north), 0.1))[0])


def test_a_region_around_the_whole_band_has_the_bands_area() -> None:
    band = _parse_quietly("-180,-60,180,60")
    assert band.area_m2 == pytest.approx(360 * slice_area_m2(-60, 60), rel=1e-5)
    halves = _parse_quietly("-180,0,0,60").area_m2 + _parse_quietly("0,-60,180,0").area_m2
    assert halves == pytest.approx(band.area_m2 / 2, rel=1e-6)


@pytest.mark.parametrize("as_file", [False, True])
def test_the_world_is_the_web_mercator_band_not_nothing(as_file: bool, tmp_path: Path) -> None:
    """A world box's edges run from -180° to 180° along the whole band; read as crossings of the antimeridian,
    the box would shrink to nothing."""
    spec = "-180,-90,180,90"
    if as_file:
        spec = str(tmp_path / "world.geojson")
        gpd.GeoDataFrame(geometry=[box(-180, -90, 180, 90)], crs=4326).to_file(spec)
    with pytest.warns(RegionWarning, match="clipped"):
        world = parse_region(spec)
    assert world.geometry.bounds == pytest.approx((-180, -WEB_MERCATOR_MAX_LAT, 180, WEB_MERCATOR_MAX_LAT))
    assert world.area_m2 == pytest.approx(360 * slice_area_m2(-WEB_MERCATOR_MAX_LAT, WEB_MERCATOR_MAX_LAT), rel=1e-5)


def test_bbox_across_the_antimeridian_wider_than_180_degrees_keeps_its_width() -> None:
    with pytest.warns(RegionWarning, match="antimeridian"):
        region = parse_region("10,0,-10,10")
    _assert_clean(region)
    assert region.geometry.area == pytest.approx(340 * 10)
    assert not region.geometry.intersects(Point(0, 5)) and region.geometry.contains(Point(180 - 1e-9, 5))


def test_bbox_beyond_the_mercator_limit_is_clipped() -> None:
    with pytest.warns(RegionWarning, match="clipped"):
        region = parse_region("0,80,10,89")
    assert region.geometry.bounds == pytest.approx((0, 80, 10, WEB_MERCATOR_MAX_LAT))


def test_point_with_radius_is_a_ground_circle() -> None:
    region = _parse_quietly("38.627,-90.199,3km")
    _assert_clean(region)
    centre = region.geometry.centroid
    assert (centre.y, centre.x) == pytest.approx((38.627, -90.199), abs=1e-3)
    assert region.area_m2 == pytest.approx(math.pi * 3000.0**2, rel=5e-3)
    _, _, distance_m = GEOD.inv(-90.199, 38.627, *region.geometry.exterior.coords[0])
    assert distance_m == pytest.approx(3000.0, rel=1e-3)


def test_radius_in_metres() -> None:
    region = _parse_quietly("-1.28,36.82,500m")
    assert region.area_m2 == pytest.approx(math.pi * 500.0**2, rel=5e-3)


def test_circle_across_the_antimeridian_is_split_without_losing_area() -> None:
    region = _parse_quietly("-17,179.9,50km")
    _assert_clean(region)
    assert isinstance(region.geometry, MultiPolygon)
    assert region.geometry.bounds[0] == -180.0 and region.geometry.bounds[2] == 180.0
    assert region.area_m2 == pytest.approx(math.pi * 50_000.0**2, rel=5e-3)


@pytest.mark.parametrize(
    ("spec", "name"),
    [
        ("france", "France"),
        ("FRA", "France"),
        ("sao paulo", "São Paulo"),
        ("St Louis", "St. Louis"),
        ("cote d'ivoire", "Côte d'Ivoire"),
    ],
)
def test_catalog_names_ignore_case_accents_and_punctuation(spec: str, name: str) -> None:
    assert _parse_quietly(spec).name == name


def test_france_is_metropolitan_and_french_guiana_an_entry_of_its_own() -> None:
    # Natural Earth's France also held French Guiana: a map of France spanned the Atlantic, 98 % outside it.
    france, guiana = _parse_quietly("France"), _parse_quietly("GUF")
    assert france.geometry.bounds == pytest.approx((-4.6, 41.4, 9.6, 51.1), abs=0.1)
    assert guiana.name == "French Guiana" and guiana.geometry.bounds[0] < -54 and guiana.geometry.bounds[3] < 6
    assert not france.geometry.intersects(guiana.geometry)


def test_catalog_names_are_unique_and_every_entry_is_usable() -> None:
    names = catalog_names()
    assert len(names) == 178 + 5
    folded = {name.casefold() for name in names}
    assert len(folded) == len(names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RegionWarning)
        for name in names:
            _assert_clean(parse_region(name))


def test_example_cities_are_small() -> None:
    for name in ("St. Louis", "Paris", "Nairobi", "Tokyo", "São Paulo"):
        area_km2 = _parse_quietly(name).area_m2 / 1e6
        assert 2.0 < area_km2 < 15.0, name


def test_countries_across_the_antimeridian_keep_their_parts_on_both_sides() -> None:
    for name in ("Fiji", "Russia"):
        region = _parse_quietly(name)
        _assert_clean(region)
        assert all(part.bounds[2] - part.bounds[0] < 180.0 for part in region.geometry.geoms)
        assert region.geometry.bounds[0] == -180.0 and region.geometry.bounds[2] == 180.0


def test_antarctica_is_clipped_with_a_warning() -> None:
    with pytest.warns(RegionWarning, match="clipped"):
        region = parse_region("Antarctica")
    assert region.geometry.bounds[1] == pytest.approx(-WEB_MERCATOR_MAX_LAT)


def test_geojson_file_union_of_features(tmp_path: Path) -> None:
    frame = gpd.GeoDataFrame(geometry=[box(2.30, 48.80, 2.34, 48.84), box(2.40, 48.80, 2.44, 48.84)], crs=4326)
    region = _parse_quietly(str(_write(frame, tmp_path / "two_parks.geojson")))
    assert region.name == "two_parks"
    assert region.geometry.equals(MultiPolygon(list(frame.geometry)))


def test_projected_geopackage_with_hole_is_reprojected(tmp_path: Path) -> None:
    ring = Polygon(box(-90.4, 38.45, -90.0, 38.8).exterior.coords, [box(-90.3, 38.55, -90.1, 38.7).exterior.coords])
    frame = gpd.GeoDataFrame(geometry=[ring], crs=4326).to_crs(32615)
    region = _parse_quietly(str(_write(frame, tmp_path / "ring.gpkg")))
    assert isinstance(region.geometry, Polygon)
    assert len(region.geometry.interiors) == 1
    assert region.geometry.bounds == pytest.approx(ring.bounds, abs=1e-6)


def test_geoparquet_file(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    frame = gpd.GeoDataFrame(geometry=[box(36.80, -1.30, 36.84, -1.27)], crs=4326)
    region = _parse_quietly(str(_write(frame, tmp_path / "nairobi.parquet")))
    assert region.geometry.equals(frame.geometry[0])


def test_invalid_ring_is_repaired_with_a_warning(tmp_path: Path) -> None:
    bowtie = Polygon([(10, 10), (11, 11), (11, 10), (10, 11), (10, 10)])
    assert not bowtie.is_valid
    path = _write(gpd.GeoDataFrame(geometry=[bowtie], crs=4326), tmp_path / "bowtie.geojson")
    with pytest.warns(RegionWarning, match="repaired 1 invalid"):
        region = parse_region(str(path))
    _assert_clean(region)
    assert region.geometry.area == pytest.approx(0.5)


def test_three_dimensional_polygons_are_flattened(tmp_path: Path) -> None:
    polygon = Polygon([(10, 10, 5), (11, 10, 5), (11, 11, 6), (10, 10, 5)])
    region = _parse_quietly(str(_write(gpd.GeoDataFrame(geometry=[polygon], crs=4326), tmp_path / "z.gpkg")))
    assert not shapely.has_z(region.geometry)


def _shapefile_without_crs(tmp_path: Path, geometry: Polygon) -> Path:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "'crs' was not provided")
        path = _write(gpd.GeoDataFrame(geometry=[geometry]), tmp_path / "no_crs.shp")
    path.with_suffix(".prj").unlink(missing_ok=True)
    return path


def test_missing_crs_with_lonlat_coordinates_is_assumed_wgs84(tmp_path: Path) -> None:
    path = _shapefile_without_crs(tmp_path, box(30.0, 50.0, 30.1, 50.1))
    with pytest.warns(RegionWarning, match="no CRS; assuming EPSG:4326"):
        region = parse_region(str(path))
    assert region.geometry.bounds == pytest.approx((30.0, 50.0, 30.1, 50.1))


def test_missing_crs_with_projected_coordinates_is_refused(tmp_path: Path) -> None:
    path = _shapefile_without_crs(tmp_path, box(500_000, 4_200_000, 510_000, 4_210_000))
    with pytest.raises(RegionError, match=r"no CRS and its coordinates \(x 500000\.\.510000, y 4200000\.\.4210000\)"):
        parse_region(str(path))


def test_projected_polygon_across_the_antimeridian_is_split(tmp_path: Path) -> None:
    to_utm = Transformer.from_crs(4326, 32760, always_xy=True)
    lonlat_ring = [(178.0, -17.0), (182.0, -17.0), (182.0, -16.0), (178.0, -16.0)]
    utm = Polygon([to_utm.transform(lon, lat) for lon, lat in lonlat_ring])
    path = _write(gpd.GeoDataFrame(geometry=[utm], crs=32760), tmp_path / "fiji_utm.gpkg")
    region = _parse_quietly(str(path))
    _assert_clean(region)
    assert isinstance(region.geometry, MultiPolygon)
    east, west = sorted(region.geometry.geoms, key=lambda part: -part.bounds[0])
    assert east.bounds == pytest.approx((178.0, -17.0, 180.0, -16.0), abs=1e-6)
    assert west.bounds == pytest.approx((-180.0, -17.0, -178.0, -16.0), abs=1e-6)


def test_longitudes_past_180_are_wrapped(tmp_path: Path) -> None:
    path = tmp_path / "pacific.geojson"
    feature = {"type": "Polygon", "coordinates": [[[175, 10], [185, 10], [185, 12], [175, 12], [175, 10]]]}
    path.write_text(
        json.dumps(
            {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, "geometry": feature}]}
        )
    )
    region = _parse_quietly(str(path))
    assert region.geometry.equals(MultiPolygon([box(-180, 10, -175, 12), box(175, 10, 180, 12)]))


@pytest.mark.parametrize(
    ("filename", "content", "message"),
    [
        ("garbage.geojson", "this is not json", "is not valid JSON"),
        ("garbage.gpkg", "this is no GeoPackage", "cannot read"),
        ("places.csv", "name,lat,lon\nhere,1,2\n", "cannot read .* as vector data \\(it holds no geometry column\\)"),
        ("empty.geojson", '{"type": "FeatureCollection", "features": []}', "holds no geometries"),
    ],
)
def test_unusable_files_raise_region_errors(tmp_path: Path, filename: str, content: str, message: str) -> None:
    path = tmp_path / filename
    path.write_text(content)
    with pytest.raises(RegionError, match=message):
        parse_region(str(path))


def test_a_file_of_empty_polygons_is_refused_with_our_line_alone(tmp_path: Path) -> None:
    path = tmp_path / "empty_polygon.geojson"
    empty = {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": []}}
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [empty]}))
    with pytest.raises(RegionError, match="holds no geometries"):
        _parse_quietly(str(path))  # a library's warning would be raised instead


def test_points_only_file_is_refused(tmp_path: Path) -> None:
    path = _write(gpd.GeoDataFrame(geometry=[Point(1, 1), Point(2, 2)], crs=4326), tmp_path / "points.geojson")
    with pytest.raises(RegionError, match="holds no polygons"):
        parse_region(str(path))


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(RegionError, match="does not exist"):
        parse_region(str(tmp_path / "nowhere.gpkg"))


# --- bad region files, as `python -m pipeline plan` reports them ------------------------------------------

UNCLOSED_RING = {"type": "Polygon", "coordinates": [[[10, 10], [11, 10], [11, 11], [10, 11]]]}
RING_FIX = "close every ring: at least 4 points, the last one repeating the first"


def _feature_collection(*geometries: object) -> str:
    features = [{"type": "Feature", "properties": {}, "geometry": geometry} for geometry in geometries]
    return json.dumps({"type": "FeatureCollection", "features": features})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            _feature_collection(UNCLOSED_RING),
            "holds a malformed polygon (IllegalArgumentException: Points of LinearRing do not form a closed"
            f" linestring); {RING_FIX}",
        ),
        (json.dumps(UNCLOSED_RING), "holds a malformed polygon"),
        (
            _feature_collection({"type": "Polygon", "coordinates": [[[10, 10], [11, 10], [10, 10]]]}),
            f"holds a polygon ring of fewer than 4 points; {RING_FIX}",
        ),
        (
            '{"type": "FeatureCollection", "features": [}',
            "is not valid JSON (Expecting value at line 1 column 44); fix it or export the region again as GeoJSON",
        ),
        ("", "is not valid JSON (Expecting value at line 1 column 1)"),
        (_feature_collection(), "holds no geometries; draw a polygon into it"),
        (_feature_collection(None), "holds no geometries; draw a polygon into it"),
    ],
    ids=["unclosed ring", "bare unclosed polygon", "3-point ring", "bad JSON", "empty file", "no features", "null"],
)
def test_malformed_region_files_are_one_line_naming_the_file_and_the_fix(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "region.geojson"
    path.write_text(content)
    status = main(["plan", "--region", str(path), "--cache-dir", str(tmp_path)])
    captured = capsys.readouterr()
    assert (status, captured.out) == (2, "")
    assert captured.err.startswith(f"error: region file {path} {message}")
    assert captured.err.count("\n") == 1


def test_an_unclosed_ring_stops_the_plan_command_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "unclosed.geojson"
    path.write_text(_feature_collection(UNCLOSED_RING))
    completed = subprocess.run(
        [sys.executable, "-m", "pipeline", "plan", "--region", str(path), "--cache-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (completed.returncode, completed.stdout) == (2, "")
    assert completed.stderr.startswith(f"error: region file {path} holds a malformed polygon")
    assert completed.stderr.count("\n") == 1 and "Traceback" not in completed.stderr


CRS_FIX = "or reproject it to EPSG:4326"


def _plan_error(capsys: pytest.CaptureFixture[str], path: Path) -> str:
    status = main(["plan", "--region", str(path), "--cache-dir", str(path.parent)])
    captured = capsys.readouterr()
    assert (status, captured.out, captured.err.count("\n")) == (2, "", 1)
    return captured.err


def test_projected_coordinates_in_a_geojson_without_a_crs_are_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "utm.geojson"
    path.write_text(_feature_collection(box(500_000, 4_200_000, 510_000, 4_210_000).__geo_interface__))
    assert _plan_error(capsys, path).startswith(
        f"error: region file {path} has coordinates that look projected (x 500000..510000, y 4200000..4210000)"
        f" but no projected CRS (it reads as WGS 84); set its CRS (e.g. ogr2ogr -a_srs EPSG:32633 fixed.gpkg"
        f" utm.geojson) {CRS_FIX}"
    )


def test_a_shapefile_without_prj_beyond_180_degrees_is_not_taken_as_lonlat(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = _shapefile_without_crs(tmp_path, box(250, 10, 300, 20))
    err = _plan_error(capsys, path)
    assert err.startswith(
        f"error: region file {path} has no CRS and its coordinates (x 250..300, y 10..20) are outside the"
        " longitude/latitude range; set its CRS"
    )
    assert CRS_FIX in err


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_nan_or_infinite_coordinate_is_refused_before_any_repair(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, bad: float
) -> None:
    path = tmp_path / "region.geojson"
    path.write_text(
        _feature_collection(
            box(10, 10, 11, 11).__geo_interface__,
            {"type": "Polygon", "coordinates": [[[10, 10], [bad, 10], [11, 11], [10, 10]]]},
        )
    )
    assert _plan_error(capsys, path) == (
        f"error: region file {path} has NaN or infinite coordinates (feature 2); fix or remove them\n"
    )


def test_a_polygon_whose_hole_is_its_shell_is_refused_not_filled(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    ring = box(10, 10, 11, 11).exterior.coords
    path = _write(gpd.GeoDataFrame(geometry=[Polygon(ring, [ring])], crs=4326), tmp_path / "hollow.geojson")
    err = _plan_error(capsys, path)
    assert err.startswith(
        f"error: region file {path} has a polygon that encloses no area once repaired (feature 1: Self-intersection"
    )
    assert "); fix the polygon in a GIS: its holes must lie inside its shell" in err


def test_overlapping_holes_are_cut_out_together_when_repaired(tmp_path: Path) -> None:
    holes = [box(11, 11, 12, 12).exterior.coords, box(11.5, 11.5, 13, 13).exterior.coords]
    polygon = Polygon(box(10, 10, 14, 14).exterior.coords, holes)
    path = _write(gpd.GeoDataFrame(geometry=[polygon], crs=4326), tmp_path / "holes.geojson")
    with pytest.warns(RegionWarning, match="repaired 1 invalid"):
        region = parse_region(str(path))
    assert region.geometry.area == pytest.approx(16 - 1 - 2.25 + 0.25)


@pytest.mark.parametrize(
    ("corner", "words"),
    [
        ((10, -95), "latitude -95, outside the longitude/latitude range (latitudes -90..90 in WGS 84)"),
        ((-361.5, 10), "longitude -361.5, outside the longitude/latitude range (longitudes -360..360 in WGS 84)"),
    ],
)
def test_degrees_a_little_out_of_range_are_named_not_taken_for_a_projection(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, corner: tuple[float, float], words: str
) -> None:
    path = tmp_path / "typo.geojson"
    path.write_text(_feature_collection(Polygon([corner, (11, 10), (11, 11), corner]).__geo_interface__))
    assert _plan_error(capsys, path) == (
        f"error: region file {path} has {words}; fix that coordinate, or give the file its real CRS\n"
    )


def test_a_geopackage_of_several_layers_is_refused_naming_them(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "layers.gpkg"
    for layer, west in (("far", 10), ("here", 20)):
        gpd.GeoDataFrame(geometry=[box(west, 10, west + 1, 11)], crs=4326).to_file(path, layer=layer)
    assert _plan_error(capsys, path) == (
        f"error: region file {path} holds 2 layers (far, here) where one is read; save the layer you want alone"
        " (ogr2ogr OUT.gpkg layers.gpkg LAYER)\n"
    )

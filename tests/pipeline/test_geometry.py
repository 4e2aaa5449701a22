"""Tile math, zoom rules, model views, covers, chunks and the raster grid, against mercantile and brute force."""

from __future__ import annotations

import math

import mercantile
import numpy as np
import pytest
import shapely
from shapely.geometry import MultiPolygon, Polygon, box
from shapely.geometry.base import BaseGeometry

from model import MODEL_INPUT_PX
from pipeline.errors import TilingError, TooManyTilesError
from pipeline.geometry import (
    WORLD_HALF_M,
    Bounds,
    CoverBlocks,
    RasterGrid,
    TileBlock,
    TileCover,
    chunk_depth,
    cover_blocks,
    default_chunk_zoom,
    ground_resolution_m,
    imagery_zoom,
    lattice_blocks,
    lnglat_of_mercator,
    mercator_scale,
    output_zoom,
    tile_bounds,
    tile_centres,
    tile_centres_lnglat,
    tile_ground_size_m,
    view_bounds,
    view_rows,
    view_strips,
    views_centred_at,
)
from pipeline.plan import ModelView
from pipeline.regions import parse_region

# Metres per pixel of 256-px Web Mercator tiles at zoom 0 on the equator (the published constant).
EQUATOR_GSD_Z0 = 156543.03392804097
WORLD_HALF_WIDTH_M = 20037508.342789244


def _true_tile_size_m(zoom: int, lat: float) -> float:
    """Ground edge of a tile at `lat`, from mercantile's own bounds and the Mercator factor cos(lat)."""
    left, _, right, _ = mercantile.xy_bounds(0, 0, zoom)
    return (right - left) * math.cos(math.radians(lat))


def _brute_force_cover(geometry, zoom: int) -> set[mercantile.Tile]:
    """Every tile in the bbox whose lon/lat box shares interior with the geometry."""
    west, south, east, north = geometry.bounds
    found = set()
    for tile in mercantile.tiles(west, south, east, north, zooms=zoom):
        tile_box = box(*mercantile.bounds(tile))
        if geometry.intersects(tile_box) and not geometry.touches(tile_box):
            found.add(tile)
    return found


@pytest.mark.parametrize("tile", [(0, 0, 0), (1, 0, 1), (38000, 49000, 17), (2**20 - 1, 2**20 - 1, 20), (5, 9, 4)])
def test_tile_bounds_match_mercantile(tile: tuple[int, int, int]) -> None:
    assert tile_bounds(mercantile.Tile(*tile)) == pytest.approx(tuple(mercantile.xy_bounds(*tile)), abs=1e-6)


def mercator_pixel_m(view_size_m: float, lat: float) -> float:
    """EPSG:3857 metres per model-input pixel of a view of `view_size_m` ground metres at `lat`."""
    return view_size_m * mercator_scale(lat) / MODEL_INPUT_PX


def footprint_size_m(sat_type: str, zoom_level: int) -> float:
    return ModelView.of(sat_type, zoom_level).size_m


def test_model_view_size_follows_sat_type_and_zoom_level() -> None:
    assert footprint_size_m("bingmap", 1) == pytest.approx(300 * 0.6)
    assert footprint_size_m("bingmap", 5) == pytest.approx(5 * 300 * 0.6)
    assert footprint_size_m("sentinel", 1) == pytest.approx(256 * 10.0)
    assert footprint_size_m("googleEarth", 3) == pytest.approx(3 * 256 * 0.2)
    assert ModelView.of("bingmap", 1).gsd_m == pytest.approx(180.0 / MODEL_INPUT_PX)
    with pytest.raises(TilingError, match="unknown sat type"):
        footprint_size_m("landsat", 1)
    with pytest.raises(TilingError, match="zoom level 0"):
        footprint_size_m("bingmap", 0)


@pytest.mark.parametrize("lat", [0.0, 38.627, 60.0, -71.5])
def test_footprint_is_square_of_true_ground_size_centred_on_the_tile(lat: float) -> None:
    tile = mercantile.tile(-90.2, lat, 17)
    view_left, view_bottom, view_right, view_top = view_bounds([tile.x], [tile.y], 17, 180.0, 224)[0]
    left, bottom, right, top = mercantile.xy_bounds(tile)
    centre = mercantile.lnglat((left + right) / 2, (bottom + top) / 2)
    assert (view_left + view_right) / 2 == pytest.approx((left + right) / 2)
    assert (view_bottom + view_top) / 2 == pytest.approx((bottom + top) / 2)
    expected_width = 180.0 / math.cos(math.radians(centre.lat))
    assert view_right - view_left == pytest.approx(expected_width, rel=1e-9)
    assert view_top - view_bottom == pytest.approx(expected_width, rel=1e-9)
    lon, lat_centre = tile_centres_lnglat([tile.x], [tile.y], 17)
    assert (lon[0], lat_centre[0]) == pytest.approx((centre.lng, centre.lat), abs=1e-9)


def test_views_move_less_than_half_a_pixel_onto_their_pixel_lattice() -> None:
    x, y = np.meshgrid(np.arange(8000, 8040), np.arange(5000, 5003))
    centred = views_centred_at(*tile_centres(x.ravel(), y.ravel(), 14), 4000.0)
    views = view_bounds(x.ravel(), y.ravel(), 14, 4000.0, 224)
    step = (centred[:, 2] - centred[:, 0]) / 224
    assert np.all(np.abs(views[:, 0] - centred[:, 0]) <= step / 2)
    np.testing.assert_array_equal(views[:, [1, 3]], centred[:, [1, 3]])
    np.testing.assert_allclose(views[:, 2] - views[:, 0], centred[:, 2] - centred[:, 0], rtol=1e-12)
    lattice = (views[:, 0] + WORLD_HALF_M) / step
    np.testing.assert_allclose(lattice, np.rint(lattice), atol=1e-6)
    assert np.abs(views[:, 0] - centred[:, 0]).max() > step[0] / 10, "views do move"


def test_footprint_is_twice_as_wide_in_mercator_at_sixty_degrees() -> None:
    tile = mercantile.tile(10.0, 60.0, 22)
    left, _, right, _ = view_bounds([tile.x], [tile.y], 22, 1000.0, 224)[0]
    assert right - left == pytest.approx(2000.0, rel=1e-4)


def test_mercator_to_lnglat_inverts_mercantile() -> None:
    points = [(-179.9, -80.0), (0.0, 0.0), (-90.2, 38.627), (179.99, 84.9)]
    x, y = zip(*(mercantile.xy(lon, lat) for lon, lat in points), strict=True)
    lon, lat = lnglat_of_mercator(x, y)
    assert np.column_stack((lon, lat)) == pytest.approx(np.array(points), abs=1e-9)


@pytest.mark.parametrize("zoom", [0, 12, 18])
def test_ground_resolution_shrinks_with_cos_latitude(zoom: int) -> None:
    equator = ground_resolution_m(zoom, 0.0)
    assert equator == pytest.approx(EQUATOR_GSD_Z0 / 2**zoom)
    assert ground_resolution_m(zoom, 60.0) == pytest.approx(equator / 2)
    assert ground_resolution_m(zoom, -60.0) == pytest.approx(equator / 2)
    assert ground_resolution_m(zoom, 45.0, tile_px=512) == pytest.approx(equator / 2 * math.cos(math.pi / 4))


@pytest.mark.parametrize(
    ("sat_type", "lat", "expected"),
    [
        # 180 m: equator tiles are 152.9 m at z18 and 305.7 m at z17; at 38.6° z17 tiles are 238.9 m.
        ("bingmap", 0.0, 18),
        ("bingmap", 38.627, 17),
        ("bingmap", 60.0, 17),
        # 2,560 m: 2,446 m tiles at z14 on the equator.
        ("sentinel", 0.0, 14),
        ("sentinel", 60.0, 13),
        # 51.2 m: 38.2 m tiles at z20 beat 76.4 m at z19 on the equator.
        ("googleEarth", 0.0, 20),
    ],
)
def test_output_zoom_per_sat_type(sat_type: str, lat: float, expected: int) -> None:
    assert output_zoom(footprint_size_m(sat_type, 1), lat) == expected


@pytest.mark.parametrize("size_m", [51.2, 180.0, 540.0, 900.0, 2560.0, 12800.0])
@pytest.mark.parametrize("lat", [0.0, 25.0, 38.627, -52.0, 70.0])
def test_output_zoom_is_the_closest_tile_size_in_ratio(size_m: float, lat: float) -> None:
    def mismatch(zoom: int) -> float:
        return abs(math.log(_true_tile_size_m(zoom, lat) / size_m))

    assert output_zoom(size_m, lat) == min(range(26), key=mismatch)


@pytest.mark.parametrize(
    ("sat_type", "lat", "expected"),
    [
        # Model input GSD 180/224 = 0.80 m: z17 is 1.19 m, z18 0.60 m on the equator; z17 is 0.60 m at 60°.
        ("bingmap", 0.0, 18),
        ("bingmap", 60.0, 17),
        # 2560/224 = 11.4 m: z13 is 19.1 m, z14 9.6 m.
        ("sentinel", 0.0, 14),
        # 51.2/224 = 0.23 m: z19 is 0.30 m, z20 0.15 m.
        ("googleEarth", 0.0, 20),
    ],
)
def test_imagery_zoom_per_sat_type(sat_type: str, lat: float, expected: int) -> None:
    assert imagery_zoom(mercator_pixel_m(footprint_size_m(sat_type, 1), lat)) == expected


@pytest.mark.parametrize("size_m", [51.2, 180.0, 540.0, 2560.0])
@pytest.mark.parametrize("lat", [0.0, 38.627, -45.0, 80.0])
def test_imagery_zoom_is_coarsest_zoom_fine_enough(size_m: float, lat: float) -> None:
    target = size_m / MODEL_INPUT_PX

    def true_gsd(zoom: int) -> float:
        return _true_tile_size_m(zoom, lat) / 256

    chosen = imagery_zoom(mercator_pixel_m(size_m, lat))
    assert true_gsd(chosen) <= target * (1 + 1e-12)
    assert true_gsd(chosen - 1) > target


def test_imagery_zoom_keeps_an_exact_match() -> None:
    exact_size_m = MODEL_INPUT_PX * EQUATOR_GSD_Z0 / 2**18
    assert imagery_zoom(mercator_pixel_m(exact_size_m, 0.0)) == 18
    assert imagery_zoom(mercator_pixel_m(exact_size_m, 0.0), tile_px=512) == 17


def test_zoom_choices_reject_bad_input() -> None:
    with pytest.raises(TilingError, match="not positive"):
        imagery_zoom(0.0)
    with pytest.raises(TilingError, match="latitude 90"):
        output_zoom(180.0, 90.0)


def test_cover_excludes_tiles_inside_a_hole() -> None:
    outer = box(-90.40, 38.45, -90.00, 38.80)
    hole = box(-90.30, 38.55, -90.10, 38.70)
    ring = Polygon(outer.exterior.coords, [hole.exterior.coords])
    result = cover(ring, 14)
    tiles = set(result.tiles())
    assert tiles == _brute_force_cover(ring, 14)
    hole_centre = mercantile.tile(-90.20, 38.625, 14)
    assert hole_centre not in tiles
    assert hole_centre in set(cover(outer, 14).tiles())
    assert len(result) == len(tiles)


def test_cover_skips_tiles_that_only_touch_the_region() -> None:
    inside = [mercantile.Tile(x, y, 9) for x in range(100, 104) for y in range(200, 203)]
    aligned = shapely.union_all([box(*mercantile.bounds(tile)) for tile in inside])
    assert set(cover(aligned, 9).tiles()) == set(inside)


def test_cover_of_a_multipolygon_leaves_the_gap_out() -> None:
    parts = MultiPolygon([box(2.30, 48.80, 2.34, 48.84), box(2.40, 48.80, 2.44, 48.84)])
    tiles = set(cover(parts, 15).tiles())
    assert tiles == _brute_force_cover(parts, 15)
    assert mercantile.tile(2.37, 48.82, 15) not in tiles


def test_cover_is_sorted_row_by_row() -> None:
    result = cover(box(-1.0, -1.0, 1.0, 1.0), 8)
    keys = list(zip(result.y.tolist(), result.x.tolist(), strict=True))
    assert keys == sorted(keys)
    assert len(set(keys)) == len(keys)


def test_cover_across_the_antimeridian_has_both_edges_of_the_world() -> None:
    with pytest.warns(UserWarning, match="antimeridian"):
        region = parse_region("170,-20,-170,-10")
    result = cover(region.geometry, 6)
    tiles = set(result.tiles())
    assert tiles == _brute_force_cover(region.geometry, 6)
    assert mercantile.tile(179.9, -15.0, 6) in tiles
    assert mercantile.tile(-179.9, -15.0, 6) in tiles
    longitudes = [mercantile.bounds(tile).west for tile in tiles]
    assert not any(-169.0 < lon < 168.0 for lon in longitudes)


def cover(geometry: BaseGeometry, zoom: int, max_tiles: int | None = None) -> TileCover:
    return cover_blocks(geometry, zoom, max_tiles).tiles()


def grid_of(tiles: TileCover) -> RasterGrid:
    """The raster grid of listed tiles: a cover of one-tile blocks."""
    return CoverBlocks(tiles.zoom, ((0, tiles.x, tiles.y),)).grid()


@pytest.mark.parametrize(
    ("region", "zoom", "chunk_zoom"),
    [("Belgium", 12, 7), ("Paris", 16, 10), ("Fiji", 8, 4), ("-180,-60,180,60", 6, 2), ("Paris", 9, 9)],
)
def test_a_cover_counted_by_its_blocks_holds_what_its_listed_tiles_hold(
    region: str, zoom: int, chunk_zoom: int
) -> None:
    """What the plan of a large region takes from the blocks alone: the tile count, the raster grid (across the
    antimeridian too), every chunk's size, and each chunk's tiles from its own blocks."""
    blocks = cover_blocks(parse_region(region).geometry, zoom)
    tiles = blocks.tiles()
    assert len(blocks) == len(tiles) == len(set(tiles.tiles()))
    assert blocks.grid() == grid_of(tiles)
    depth = chunk_depth(zoom, chunk_zoom)
    listed_keys = (tiles.y >> depth) * 2**chunk_zoom + (tiles.x >> depth)
    expected_keys, expected_sizes = np.unique(listed_keys, return_counts=True)
    chunked = blocks.chunked(chunk_zoom)
    assert np.array_equal(chunked.keys, expected_keys) and np.array_equal(chunked.sizes(), expected_sizes)
    assert len(chunked) <= blocks.chunk_bound(chunk_zoom)
    for index in range(0, len(chunked), max(1, len(chunked) // 7)):
        chunk = chunked.chunk(index)
        assert (chunk.z, chunk.y * 2**chunk_zoom + chunk.x) == (chunk_zoom, chunked.keys[index])
        listed = chunked.tiles(index)
        mine = listed_keys == chunked.keys[index]
        assert np.array_equal(listed.x, tiles.x[mine]) and np.array_equal(listed.y, tiles.y[mine])


def test_cover_refuses_more_tiles_than_allowed() -> None:
    geometry = box(5.0, 45.0, 6.0, 46.0)
    full = cover(geometry, 12)
    assert len(cover(geometry, 12, max_tiles=len(full))) == len(full)
    with pytest.raises(TooManyTilesError, match="more than"):
        cover(geometry, 12, max_tiles=len(full) - 1)
    with pytest.raises(TooManyTilesError, match="more than 1,000"):
        cover(geometry, 22, max_tiles=1000)


def test_cover_of_a_country_stays_fast_and_complete() -> None:
    region = parse_region("Belgium")
    result = cover(region.geometry, 12)
    assert set(result.tiles()) == _brute_force_cover(region.geometry, 12)


def _city_cover() -> TileCover:
    return cover(parse_region("Paris").geometry, 16)


def test_chunks_sit_a_fixed_depth_above_the_output_zoom() -> None:
    assert default_chunk_zoom(17) == 11
    assert default_chunk_zoom(3) == 0
    assert chunk_depth(16, 12) == 4
    with pytest.raises(TilingError, match="chunk zoom 17"):
        chunk_depth(16, 17)


def test_tile_block_holds_the_source_tiles_under_a_read() -> None:
    tile = mercantile.Tile(38000, 49000, 17)
    left, bottom, right, top = tile_bounds(tile)
    exact = TileBlock.covering(tile_bounds(tile), 17)
    assert exact.tiles() == [tile]
    inner = (right - left) / 4
    straddling = TileBlock.covering(Bounds(left + inner, bottom - inner, right + inner, top), 17)
    assert set(straddling.tiles()) == {
        tile,
        mercantile.Tile(38001, 49000, 17),
        mercantile.Tile(38000, 49001, 17),
        mercantile.Tile(38001, 49001, 17),
    }
    assert straddling.transform(256).c == pytest.approx(left)
    assert straddling.transform(256).f == pytest.approx(top)


def test_raster_grid_spans_the_cover() -> None:
    result = _city_cover()
    grid = grid_of(result)
    assert grid.width == result.x.max() - result.x.min() + 1
    assert grid.height == result.y.max() - result.y.min() + 1
    top_left = mercantile.xy_bounds(int(result.x.min()), int(result.y.min()), 16)
    bottom_right = mercantile.xy_bounds(int(result.x.max()), int(result.y.max()), 16)
    assert tuple(grid.bounds) == pytest.approx(
        (top_left.left, bottom_right.bottom, bottom_right.right, top_left.top), abs=1e-6
    )
    rows, cols = grid.cells(result.x, result.y)
    assert rows.min() == cols.min() == 0
    assert (rows.max(), cols.max()) == (grid.height - 1, grid.width - 1)
    assert grid.transform @ (0, 0) == pytest.approx((grid.bounds.left, grid.bounds.top))


def test_a_raster_grid_round_the_world_runs_from_180_west_to_180_east() -> None:
    zoom = 3
    columns = np.arange(2**zoom)
    grid = grid_of(TileCover(zoom, columns, np.full_like(columns, 2)))
    assert (grid.first_column, grid.width) == (0, 2**zoom)
    assert grid.lnglat_bounds[0::2] == (-180.0, 180.0)


def test_raster_grid_continues_across_the_antimeridian() -> None:
    zoom = 5
    last = 2**zoom - 1
    crossing = TileCover(zoom, np.array([last, 0, 1]), np.array([10, 10, 11]))
    grid = grid_of(crossing)
    assert (grid.width, grid.height) == (3, 2)
    assert grid.bounds.left == pytest.approx(mercantile.xy_bounds(last, 10, zoom).left)
    assert grid.bounds.right == pytest.approx(WORLD_HALF_WIDTH_M + 2 * 2 * WORLD_HALF_WIDTH_M / 2**zoom)
    _, cols = grid.cells(crossing.x, crossing.y)
    assert cols.tolist() == [0, 1, 2]
    west, south, east, north = grid.lnglat_bounds
    assert (west, east) == pytest.approx((mercantile.bounds(last, 10, zoom).west, mercantile.bounds(1, 11, zoom).east))
    assert (south, north) == pytest.approx((mercantile.bounds(0, 11, zoom).south, mercantile.bounds(0, 10, zoom).north))
    with pytest.raises(TilingError, match="empty"):
        grid_of(TileCover(zoom, np.array([], dtype=np.int64), np.array([], dtype=np.int64)))


def test_view_strips_group_whole_rows_within_their_budgets() -> None:
    zoom = 14
    x, y = np.meshgrid(np.arange(5000, 5064), np.arange(7000, 7064))
    size = tile_ground_size_m(zoom, 20.0)
    for view_m, budget, most in ((4 * size, 2048**2, 256), (size, 2048**2, 256), (size, 10**12, 100)):
        views = view_bounds(x.ravel(), y.ravel(), zoom, view_m, 224)
        strips = view_strips(views, 224, budget, most)
        assert [strip.start for strip in strips] == [0, *(strip.stop for strip in strips[:-1])]
        assert strips[-1].stop == len(views)
        for strip in strips:
            assert strip.stop - strip.start <= most
            # A strip holds whole rows of 64 views, or pieces of one row when a row is over the view budget.
            assert (strip.start % 64 == 0 and strip.stop % 64 == 0) or strip.start // 64 == (strip.stop - 1) // 64
            assert strip.pixels <= budget or (strip.stop - strip.start) <= 64
    # Overlapping views (4x the tile) share strips of several rows; views without overlap, strips of one row.
    wide = view_strips(view_bounds(x.ravel(), y.ravel(), zoom, 4 * size, 224), 224, 2048**2, 256)
    assert len(wide) == 16 and all(strip.stop - strip.start == 256 for strip in wide)


def test_view_strips_never_mix_views_of_different_sizes() -> None:
    views = np.array([[0.0, 0.0, 100.0, 100.0], [0.0, 100.0, 100.0, 200.0], [0.0, 200.0, 150.0, 350.0]])
    assert [(strip.start, strip.stop) for strip in view_strips(views, 224, 10**9, 10)] == [(0, 2), (2, 3)]
    assert view_strips(np.zeros((0, 4)), 224, 10, 10) == []
    assert view_rows(np.zeros((0, 4))) == [] and len(lattice_blocks(np.zeros((0, 4)), 224).block) == 0

"""COG and QGIS style export from a synthetic soundscape store laid out like the map build's."""

from __future__ import annotations

import math
import tracemalloc
import xml.etree.ElementTree as ET
from pathlib import Path

import mercantile
import numpy as np
import pytest
import rasterio
import xarray as xr
import zarr
from rasterio.warp import transform_bounds
from rio_cogeo.cogeo import cog_validate
from support.synthetic_store import CODEBOOK_SIZE, DEFAULT_QUERIES, SyntheticStore, write_synthetic_store

from pipeline.config import Query
from pipeline.errors import ExportError
from pipeline.export import cog
from pipeline.export.cog import write_concept_cog, write_dominant_cog, write_query_cogs
from pipeline.export.places import write_top_places
from pipeline.export.qgis_style import category_colours, srgb_to_lab

LABELS = ["birds chirping in a park", "rain_on_roof.flac", "harbour.wav + with seagulls"]
# First and last colours of matplotlib's published viridis table.
VIRIDIS_ENDS = ("#440154", "#fde725")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStore:
    return write_synthetic_store(tmp_path_factory.mktemp("store") / "soundscape.zarr")


@pytest.fixture(scope="module")
def query_cogs(store: SyntheticStore, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_query_cogs(store.path, tmp_path_factory.mktemp("cog"))


@pytest.fixture(scope="module")
def concept_cog(store: SyntheticStore, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_concept_cog(store.path, tmp_path_factory.mktemp("concepts"))


def _stored(store: SyntheticStore, name: str) -> np.ndarray:
    with xr.open_zarr(store.path, consolidated=False) as dataset:
        return dataset[name].to_numpy()


def _valid_cog(path: Path) -> None:
    is_valid, errors, warnings = cog_validate(path, quiet=True)
    assert (is_valid, errors, warnings) == (True, [], [])


def test_one_valid_cog_per_query_with_internal_overviews(store: SyntheticStore, query_cogs: list[Path]) -> None:
    assert [path.name for path in query_cogs] == [f"{query.id}.tif" for query in DEFAULT_QUERIES]
    for path in query_cogs:
        _valid_cog(path)
        with rasterio.open(path) as cog_file:
            assert (cog_file.count, cog_file.dtypes[0]) == (1, "float32")
            assert cog_file.overviews(1)
    assert sorted(path.name for path in query_cogs[0].parent.iterdir()) == sorted(
        name for path in query_cogs for name in (path.name, path.with_suffix(".qml").name)
    ), "no staging or temporary files are left behind"


def test_georeferencing_is_the_stores_tile_grid(store: SyntheticStore, query_cogs: list[Path]) -> None:
    tile_left, _, tile_right, tile_top = mercantile.xy_bounds(store.top_left)
    with rasterio.open(query_cogs[0]) as cog_file:
        transform = cog_file.transform
        assert cog_file.crs.to_epsg() == 3857
        assert (cog_file.width, cog_file.height) == (store.width, store.height)
    assert transform.c == pytest.approx(tile_left, abs=1e-6)
    assert transform.f == pytest.approx(tile_top, abs=1e-6)
    assert transform.a == pytest.approx(tile_right - tile_left, abs=1e-9)
    assert transform.e == pytest.approx(-(tile_right - tile_left), abs=1e-9)
    assert (transform.b, transform.d) == (0.0, 0.0)
    centres_x, _ = rasterio.transform.xy(transform, np.zeros(store.width), np.arange(store.width))
    _, centres_y = rasterio.transform.xy(transform, np.arange(store.height), np.zeros(store.height))
    np.testing.assert_allclose(centres_x, _stored(store, "x"), rtol=0, atol=1e-6)
    np.testing.assert_allclose(centres_y, _stored(store, "y"), rtol=0, atol=1e-6)


def test_scores_are_the_stores_and_nodata_where_invalid(store: SyntheticStore, query_cogs: list[Path]) -> None:
    for index, path in enumerate(query_cogs):
        with rasterio.open(path) as cog_file:
            assert math.isnan(cog_file.nodata)
            np.testing.assert_array_equal(cog_file.read(1), store.score[index])
            np.testing.assert_array_equal(cog_file.read_masks(1) > 0, store.valid)


def test_export_writes_the_stores_values_as_they_are(tmp_path: Path) -> None:
    """The store is the one place invalid tiles become nodata: the export copies what the store holds."""
    store = write_synthetic_store(tmp_path / "soundscape.zarr")
    assert not store.valid[0].all()
    zarr.open_array(store.path / "score", mode="r+")[0, 0, :] = 0.25
    (path, *_) = write_query_cogs(store.path, tmp_path / "cog")
    with rasterio.open(path) as cog_file:
        scores = cog_file.read(1)
    assert (scores[0] == 0.25).all(), "a stored value is exported even on a tile that is not valid"
    np.testing.assert_array_equal(scores[1:], store.score[0][1:])


def test_band_description_is_the_query_and_tags_carry_provenance(query_cogs: list[Path]) -> None:
    for path, query, label in zip(query_cogs, DEFAULT_QUERIES, LABELS, strict=True):
        with rasterio.open(path) as cog_file:
            assert cog_file.descriptions == (label,)
            tags = cog_file.tags()
        assert tags["QUERY_ID"] == query.id
        assert tags["QUERY_KIND"] == query.kind
        assert tags["QUERY"] == label
        assert tags["VARIABLE"] == "score"
        assert tags["UNTRAINED"] == "true"
        assert tags["CHECKPOINT"] == "synthetic-test-checkpoint.safetensors"
        assert tags["CHECKPOINT_SHA256"] == "0" * 64
        assert tags["IMAGERY_ATTRIBUTION"] == "Synthetic test imagery"
        assert tags["SOFTWARE_VERSION"] == "sat2sound-maps 0.1.0"


def test_overviews_average_the_valid_tiles_they_cover(store: SyntheticStore, query_cogs: list[Path]) -> None:
    with rasterio.open(query_cogs[0], overview_level=0) as overview:
        halved = overview.read(1)
    blocks = store.score[0].reshape(store.height // 2, 2, store.width // 2, 2)
    finite = np.isfinite(blocks).sum(axis=(1, 3))
    block_mean = np.where(finite > 0, np.nansum(blocks, axis=(1, 3)) / np.maximum(finite, 1), np.nan)
    np.testing.assert_allclose(halved, block_mean, rtol=1e-6, atol=1e-7)


def test_qml_beside_each_cog_has_a_viridis_ramp_over_the_2nd_to_98th_percentile(
    store: SyntheticStore, query_cogs: list[Path]
) -> None:
    for index, path in enumerate(query_cogs):
        qml_path = path.with_suffix(".qml")
        assert qml_path.read_text(encoding="utf-8").startswith("<!DOCTYPE qgis")
        root = ET.parse(qml_path).getroot()
        assert root.tag == "qgis"
        renderer = root.find("pipe/rasterrenderer")
        assert renderer is not None
        assert renderer.attrib["type"] == "singlebandpseudocolor"
        assert (renderer.attrib["band"], renderer.attrib["nodataColor"]) == ("1", "")
        low, high = np.percentile(store.score[index][store.valid], [2, 98])
        assert float(renderer.attrib["classificationMin"]) == pytest.approx(low, rel=1e-6)
        assert float(renderer.attrib["classificationMax"]) == pytest.approx(high, rel=1e-6)
        shader = renderer.find("rastershader/colorrampshader")
        assert shader is not None
        assert shader.attrib["colorRampType"] == "INTERPOLATED"
        items = shader.findall("item")
        values = [float(item.attrib["value"]) for item in items]
        assert len(items) >= 10
        assert values == sorted(values)
        assert (values[0], values[-1]) == (pytest.approx(low, rel=1e-6), pytest.approx(high, rel=1e-6))
        assert (items[0].attrib["color"], items[-1].attrib["color"]) == VIRIDIS_ENDS
        assert "2nd percentile" in items[0].attrib["label"]
        assert "98th percentile" in items[-1].attrib["label"]
        options = {
            option.attrib["name"]: option.attrib["value"] for option in shader.findall("colorramp/Option/Option")
        }
        assert options["color1"] == "68,1,84,255"
        assert len(options["stops"].split(":")) == len(items) - 2
        legend = shader.find("rampLegendSettings")
        assert legend is not None
        assert legend.attrib["useContinuousLegend"] == "1"
        assert "98th percentile" in legend.attrib["maximumLabel"]


def test_other_score_variables_get_their_own_files(store: SyntheticStore, tmp_path: Path) -> None:
    paths = write_query_cogs(store.path, tmp_path, variable="score_percentile")
    assert [path.name for path in paths] == [f"{query.id}_percentile.tif" for query in DEFAULT_QUERIES]
    stored = _stored(store, "score_percentile")
    with rasterio.open(paths[0]) as cog_file:
        np.testing.assert_array_equal(cog_file.read(1), stored[0])
        assert cog_file.tags()["VARIABLE"] == "score_percentile"
    assert paths[0].with_suffix(".qml").exists()


def test_concept_cog_holds_the_dominant_concept_with_its_colour_table(store: SyntheticStore, concept_cog: Path) -> None:
    _valid_cog(concept_cog)
    dominant = np.where(store.valid, store.concept_index[..., 0], 255)
    present, counts = np.unique(dominant[store.valid], return_counts=True)
    with rasterio.open(concept_cog) as cog_file:
        assert (cog_file.dtypes[0], cog_file.nodata) == ("uint8", 255)
        assert cog_file.descriptions == ("dominant codebook concept",)
        assert cog_file.units == ("codebook concept",)
        np.testing.assert_array_equal(cog_file.read(1), dominant)
        colormap = cog_file.colormap(1)
        band_tags = cog_file.tags(1)
    with rasterio.open(concept_cog, overview_level=0) as overview:
        assert set(np.unique(overview.read(1))) <= set(np.unique(dominant)), "overviews pick existing concepts"
    root = ET.parse(concept_cog.with_suffix(".qml")).getroot()
    renderer = root.find("pipe/rasterrenderer")
    assert renderer is not None
    assert renderer.attrib["type"] == "paletted"
    entries = renderer.findall("colorPalette/paletteEntry")
    assert [int(entry.attrib["value"]) for entry in entries] == present.tolist()
    shares = [float(entry.attrib["label"].split("(")[1].split("%")[0]) for entry in entries]
    np.testing.assert_allclose(shares, 100 * counts / counts.sum(), atol=0.05)
    assert len({entry.attrib["color"] for entry in entries}) == len(entries)
    for entry in entries:
        value = int(entry.attrib["value"])
        assert "#{:02x}{:02x}{:02x}".format(*colormap[value][:3]) == entry.attrib["color"], "file and .qml agree"
        assert colormap[value][3] == 255
        assert band_tags[f"CATEGORY_{value}"] == entry.attrib["label"], "category names travel inside the file"
    assert colormap[255][3] == 0, "nodata is transparent"
    most_common = int(present[np.argmax(counts)])
    assert entries[present.tolist().index(most_common)].attrib["color"] == category_colours(1)[0].hex


def test_concept_colours_differ_clearly_between_any_two_categories() -> None:
    colours = category_colours(20)
    lab = srgb_to_lab(np.array(colours, dtype=float))
    distance = np.linalg.norm(lab[:, None] - lab[None], axis=-1)
    np.fill_diagonal(distance, np.inf)
    # CIELAB distance 2.3 is just noticeable; neighbouring map categories need far more. Golden-ratio hues: 12.
    assert distance.min() > 35
    assert all(30 <= value <= 90 for value in lab[:, 0]), "neither lost on dark nor on light basemaps"


def test_score_bands_carry_their_unit_and_meaning(query_cogs: list[Path], tmp_path: Path) -> None:
    with rasterio.open(query_cogs[0]) as cog_file:
        assert cog_file.units == ("cosine",)
        band_tags = cog_file.tags(1)
    assert band_tags["VARIABLE"] == "score"
    assert band_tags["VARIABLE_MEANING"].startswith("cosine similarity")


def test_wide_codebooks_get_a_uint16_colour_table(tmp_path: Path) -> None:
    store = write_synthetic_store(tmp_path / "soundscape.zarr", 12, 8)
    concepts = zarr.open_array(store.path / "concept_index", mode="r+")
    first = concepts[0]
    concepts[0] = np.where(first >= 0, first + 300, first)
    path = write_concept_cog(store.path, tmp_path / "cog")
    with rasterio.open(path) as cog_file:
        assert (cog_file.dtypes[0], cog_file.nodata) == ("uint16", 65535)
        values = cog_file.read(1)
        assert set(np.unique(values[store.valid])) <= set(range(300, 300 + CODEBOOK_SIZE))
        assert cog_file.colormap(1)[int(values[store.valid][0])][3] == 255


@pytest.mark.parametrize("dst_crs", ["EPSG:4326", "EPSG:32631"])
def test_reprojected_cog_is_valid_in_the_asked_crs_and_covers_the_same_area(
    store: SyntheticStore, tmp_path: Path, dst_crs: str
) -> None:
    (path, *_) = write_query_cogs(store.path, tmp_path, dst_crs=dst_crs)
    _valid_cog(path)
    assert path.with_suffix(".qml").exists()
    with rasterio.open(path) as cog_file:
        assert cog_file.crs == rasterio.crs.CRS.from_user_input(dst_crs)
        bounds = cog_file.bounds
        pixel = max(abs(cog_file.transform.a), abs(cog_file.transform.e))
        scores = cog_file.read(1)
    left, _, right, top = mercantile.xy_bounds(store.top_left)
    size = right - left
    expected = transform_bounds("EPSG:3857", dst_crs, left, top - store.height * size, left + store.width * size, top)
    np.testing.assert_allclose(bounds, expected, rtol=0, atol=2 * pixel)
    finite = scores[np.isfinite(scores)]
    assert np.isin(finite, store.score[0][store.valid]).all(), "nearest neighbour only copies stored scores"
    assert finite.size / scores.size == pytest.approx(store.valid.mean(), rel=0.1), "same share of the area is valid"


def test_reprojection_to_the_stores_own_crs_keeps_the_grid(store: SyntheticStore, tmp_path: Path) -> None:
    (path, *_) = write_query_cogs(store.path, tmp_path, dst_crs="EPSG:3857")
    with rasterio.open(path) as cog_file:
        np.testing.assert_array_equal(cog_file.read(1), store.score[0])


@pytest.mark.slow
def test_export_reads_the_store_window_by_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    query = DEFAULT_QUERIES[:1]
    warm_up = write_synthetic_store(tmp_path / "small.zarr", queries=query, dim=1, ranks=1)
    store = write_synthetic_store(tmp_path / "big.zarr", 1024, 1024, queries=query, dim=1, ranks=1, chunk=128)
    monkeypatch.setattr(cog, "WINDOW_PX", 256)
    monkeypatch.setattr(cog, "MAX_SAMPLE_PX", 128 * 128)
    # First use loads GDAL drivers and codecs; only the second export's allocations are the export's own.
    write_query_cogs(warm_up.path, tmp_path / "warm-up")
    write_concept_cog(warm_up.path, tmp_path / "warm-up")
    write_dominant_cog(warm_up.path, tmp_path / "warm-up")
    write_top_places(warm_up.path, 20, tmp_path / "warm-up.gpkg", tmp_path / "warm-up.csv")
    layer_bytes = store.score[0].nbytes
    tracemalloc.start()
    try:
        write_query_cogs(store.path, tmp_path / "cog")
        write_concept_cog(store.path, tmp_path / "cog")
        write_dominant_cog(store.path, tmp_path / "cog")
        write_top_places(store.path, 20, tmp_path / "top.gpkg", tmp_path / "top.csv")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < layer_bytes / 2, f"peak {peak:,} B of Python allocations; one score layer is {layer_bytes:,} B"


def test_missing_store_unknown_variable_and_unknown_crs_are_export_errors(
    store: SyntheticStore, tmp_path: Path
) -> None:
    with pytest.raises(ExportError, match="no Zarr store"):
        write_query_cogs(tmp_path / "absent.zarr", tmp_path)
    with pytest.raises(ExportError, match="unknown score variable 'loudness'"):
        write_query_cogs(store.path, tmp_path, variable="loudness")
    with pytest.raises(ExportError, match="unknown CRS 'EPSG:999999'"):
        write_query_cogs(store.path, tmp_path / "cog", dst_crs="EPSG:999999")
    assert not (tmp_path / "cog").exists()


def test_query_ids_that_cannot_name_a_file_are_refused(tmp_path: Path) -> None:
    queries = (Query("../birds", "birds"),)
    store = write_synthetic_store(tmp_path / "soundscape.zarr", queries=queries)
    with pytest.raises(ExportError, match="cannot name a file"):
        write_query_cogs(store.path, tmp_path / "cog")


def test_a_one_tile_wide_grid_takes_its_pixel_width_from_the_geotransform(tmp_path: Path) -> None:
    store = write_synthetic_store(tmp_path / "soundscape.zarr", 1, 6)
    (path, *_) = write_query_cogs(store.path, tmp_path / "cog")
    tile_left, _, tile_right, _ = mercantile.xy_bounds(store.top_left)
    with rasterio.open(path) as cog_file:
        assert cog_file.transform.a == pytest.approx(tile_right - tile_left, abs=1e-9)
        assert cog_file.transform.c == pytest.approx(tile_left, abs=1e-6)

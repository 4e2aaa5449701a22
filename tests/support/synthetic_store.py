"""A small `soundscape.zarr` written by the real store writer from chunk and score files whose values tests know.

The plan is a real `pipeline.plan.Plan` of the synthetic grid and chunks. The grid is split into square chunks;
inside an elliptic region are in a chunk (as in a real build), and a block inside the region has no imagery
(in its chunk, not valid). The chunk and score files hold finite values even for tiles that are not valid:
the store writer alone turns them into nodata.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import mercantile
import numpy as np
import pytest
import rasterio
import shapely
from pyproj import Transformer
from rasterio.transform import from_origin

from pipeline.config import ONE_UNKNOWN_TIME, Query, Times
from pipeline.gallery import open_gallery
from pipeline.geometry import RasterGrid, lnglat_of_mercator
from pipeline.model_setup import ModelRecord
from pipeline.plan import ImageryFit, ModelView, Plan
from pipeline.queries import QueryEmbeddings
from pipeline.regions import Region
from pipeline.store.write import GalleryMatches, write_store

DEFAULT_QUERIES: tuple[Query, ...] = (
    Query("birds", "birds chirping in a park"),
    Query("rain", audio="queries/rain_on_roof.flac"),
    Query("harbour", "with seagulls", "queries/harbour.wav"),
)
# Paris: the grid's top-left tile at zoom 14 (about 1.6 km tiles), so UTM zone 31N suits reprojection tests.
DEFAULT_ZOOM = 14
DEFAULT_TOP_LEFT = mercantile.tile(2.10, 49.00, DEFAULT_ZOOM)
LOGIT_SCALE = math.log(1 / 0.07)
CODEBOOK_SIZE = 12
CHECKPOINT = "synthetic-test-checkpoint.safetensors"
ATTRIBUTION = "Synthetic test imagery"


class SyntheticStore(NamedTuple):
    """The store and, as (rows, cols[, ...]) grids, what it must hold: the files' values, nodata where not valid."""

    path: Path
    zoom: int
    top_left: mercantile.Tile
    region: dict[str, Any]
    queries: tuple[Query, ...]
    valid: np.ndarray
    score: np.ndarray  # (Q, H, W) raw cosines
    concept_index: np.ndarray  # (H, W, k)
    concept_weight: np.ndarray  # (H, W, k)
    embedding: np.ndarray  # (H, W, D) float16
    in_chunk: np.ndarray  # (H, W) whether a chunk holds the tile
    plan: Plan
    logit_scale: np.ndarray
    times: Times
    score_by_time: np.ndarray  # (T, Q, H, W) raw cosines per time (score is the first)
    embedding_by_time: np.ndarray  # (T, H, W, D) float16 per time (embedding is the first)

    @property
    def height(self) -> int:
        return int(self.valid.shape[0])

    @property
    def width(self) -> int:
        return int(self.valid.shape[1])


def write_synthetic_store(
    path: Path,
    width: int = 48,
    height: int = 32,
    *,
    zoom: int = DEFAULT_ZOOM,
    top_left: mercantile.Tile = DEFAULT_TOP_LEFT,
    queries: tuple[Query, ...] = DEFAULT_QUERIES,
    dim: int = 4,
    ranks: int = 3,
    chunk: int = 16,
    chunk_tiles: int = 20,
    untrained: bool = True,
    seed: int = 0,
    unavailable: bool = False,
    score: np.ndarray | None = None,
    logit_scale: np.ndarray | None = None,
    times: Times = ONE_UNKNOWN_TIME,
    model: ModelRecord | None = None,
    gallery: Path | None = None,
    gallery_top_k: int = 5,
) -> SyntheticStore:
    """Write chunk, score and query files beside `path`, then the store at `path` with the real writer.

    `chunk` is the store's block size (pixels), `chunk_tiles` the side of a build chunk (tiles). With
    `unavailable`, the in-chunk tiles that are not valid were left empty because imagery could not be had (two
    source tiles named by every chunk: counted once). `score` ((Q, H, W) raw cosines) and `logit_scale` ((Q,))
    replace the generated fields and the common LOGIT_SCALE. With several `times`, each time after the first has
    its own scores (the first's, queries rotated by the time's index, scaled and shifted) and embeddings; concepts
    are the same at every time. `model` the synthetic checkpoint's record. With a `gallery`, the score files and the
    store hold each tile's `gallery_top_k` best items of it, as the score step finds them.
    """
    rng = np.random.default_rng(seed)
    grid = RasterGrid(zoom, top_left.x, top_left.y, width, height)
    left, _, _, top = grid.bounds
    x = left + (np.arange(width) + 0.5) * grid.pixel_m
    y = top - (np.arange(height) + 0.5) * grid.pixel_m
    region = _elliptic_region(left, top, width * grid.pixel_m, height * grid.pixel_m)
    in_chunk = _inside(region, x, y)
    if not in_chunk.any():
        in_chunk[:] = True
    valid = in_chunk.copy()
    valid[height // 4 : height // 4 + max(1, height // 8), width // 2 : width // 2 + max(1, width // 8)] = False

    score = _score_fields(len(queries), x, y, rng) if score is None else np.array(score, np.float32)
    concept_index, concept_weight = _concepts(height, width, ranks, rng)
    count = len(times.all)
    score_by_time = np.stack(
        [np.clip(np.roll(score, t, axis=0) * (1 - 0.1 * t) + 0.05 * t, -1, 1) for t in range(count)]
    )
    score_by_time = score_by_time.astype(np.float32)
    embedding_by_time = rng.standard_normal((count, height, width, dim)).astype(np.float16)
    embedding = embedding_by_time[0]

    work = path.parent / f"{path.name}.inputs"
    chunk_ids = _write_chunks(
        work, in_chunk, valid, score_by_time, concept_index, concept_weight, embedding_by_time, chunk_tiles, unavailable
    )
    plan = Plan(
        region=Region("synthetic ellipse", shapely.geometry.shape(region)),
        view=ModelView("sentinel", 1),
        latitude=float(np.mean(lnglat_of_mercator(x, y)[1])),
        auto_zoom=zoom,
        grid=grid,
        chunk_zoom=zoom,
        chunk_ids=chunk_ids,
        chunk_sizes=tuple(chunk_tiles * chunk_tiles for _ in chunk_ids),
        tile_count=int(in_chunk.sum()),
        imagery=ImageryFit('{"kind": "synthetic"}', "synthetic", ATTRIBUTION, 10.0, False),
    )
    matches = None if gallery is None else _add_gallery_matches(work, chunk_ids, gallery, gallery_top_k)
    logit_scale = np.full(len(queries), LOGIT_SCALE, np.float32) if logit_scale is None else np.array(logit_scale)
    embeddings = QueryEmbeddings(
        queries=queries,
        embedding=np.zeros((len(queries), dim), np.float32),
        logit_scale=logit_scale,
    )
    config = {"region": "synthetic ellipse", "sat_type": "sentinel"}
    write_store(
        plan,
        work / "chunks",
        work / "scores",
        embeddings,
        model or ModelRecord(CHECKPOINT, CHECKPOINT, "0" * 64, untrained, "sentinel", "none"),
        config,
        path,
        top_k=ranks,
        block_px=chunk,
        times=times,
        gallery=matches,
    )
    off = ~valid
    score_by_time[:, :, off] = np.nan
    concept_index[off] = -1
    concept_weight[off] = np.nan
    embedding_by_time[:, off] = np.nan
    score, embedding = score_by_time[0], embedding_by_time[0]
    return SyntheticStore(
        path,
        zoom,
        top_left,
        region,
        queries,
        valid,
        score,
        concept_index,
        concept_weight,
        embedding,
        in_chunk,
        plan,
        logit_scale,
        times,
        score_by_time,
        embedding_by_time,
    )


def _add_gallery_matches(work: Path, chunk_ids: tuple[str, ...], folder: Path, top_k: int) -> GalleryMatches:
    gallery = open_gallery(folder)
    for chunk_id in chunk_ids:
        with np.load(work / "chunks" / f"{chunk_id}.npz") as chunk, np.load(work / "scores" / f"{chunk_id}.npz") as old:
            matches = gallery.tile_matches(chunk["embedding"], chunk["valid"].astype(bool), top_k)
            arrays = {**old, **matches.arrays()}
        np.savez(work / "scores" / f"{chunk_id}.npz", **arrays)
    return GalleryMatches(folder, gallery.record.count, top_k)


def _write_chunks(
    work: Path,
    in_chunk: np.ndarray,
    valid: np.ndarray,
    score: np.ndarray,
    concept_index: np.ndarray,
    concept_weight: np.ndarray,
    embedding: np.ndarray,
    side: int,
    unavailable: bool = False,
) -> tuple[str, ...]:
    """Chunk files (chunks/<id>.npz) and score files (scores/<id>.npz) of square blocks of `side` tiles, from
    per-time `score` (T, Q, H, W) and `embedding` (T, H, W, D); concepts are the same at every time."""
    (work / "chunks").mkdir(parents=True, exist_ok=True)
    (work / "scores").mkdir(parents=True, exist_ok=True)
    height, width = valid.shape
    ids = []
    for row0 in range(0, height, side):
        for col0 in range(0, width, side):
            rows, cols = np.nonzero(in_chunk[row0 : row0 + side, col0 : col0 + side])
            if rows.size == 0:
                continue
            rows, cols = rows + row0, cols + col0
            chunk_id = f"synthetic_{row0 // side}_{col0 // side}"
            lacking = (
                {
                    "unavailable": in_chunk[rows, cols] & ~valid[rows, cols],
                    "unavailable_source_tiles": np.array([[15, 1, 2], [15, 1, 3]], np.int64),
                }
                if unavailable
                else {}
            )
            np.savez(
                work / "chunks" / f"{chunk_id}.npz",
                x=cols,
                y=rows,
                row=rows.astype(np.int32),
                col=cols.astype(np.int32),
                coverage=valid[rows, cols].astype(np.float32),
                valid=valid[rows, cols],
                embedding=embedding[:, rows, cols],
                concept_index=np.stack([concept_index[rows, cols]] * len(embedding)),
                concept_weight=np.stack([concept_weight[rows, cols]] * len(embedding)),
                **lacking,
            )
            np.savez(work / "scores" / f"{chunk_id}.npz", ids=np.arange(score.shape[1]), score=score[:, :, rows, cols])
            ids.append(chunk_id)
    return tuple(ids)


def grid_rectangle(store: SyntheticStore, top: float, left: float, bottom: float, right: float) -> shapely.Polygon:
    """The rectangle between (fractional) grid rows `top`..`bottom` and columns `left`..`right`, in EPSG:4326: its
    edges are a meridian and a parallel, so its corners give it exactly."""
    grid_left, _, _, grid_top = store.plan.grid.bounds
    pixel = store.plan.grid.pixel_m
    x = grid_left + np.array([left, right, right, left]) * pixel
    y = grid_top - np.array([top, top, bottom, bottom]) * pixel
    return shapely.Polygon(np.column_stack(lnglat_of_mercator(x, y)))


def _elliptic_region(left: float, top: float, width_m: float, height_m: float) -> dict[str, Any]:
    """An ellipse filling 90% of the grid, as a GeoJSON polygon in EPSG:4326."""
    angles = np.linspace(0.0, 2 * math.pi, 73)
    centre_x, centre_y = left + width_m / 2, top - height_m / 2
    ring_x = centre_x + 0.45 * width_m * np.cos(angles)
    ring_y = centre_y + 0.45 * height_m * np.sin(angles)
    lon, lat = Transformer.from_crs("EPSG:3857", "EPSG:4326", always_xy=True).transform(ring_x, ring_y)
    return {"type": "Polygon", "coordinates": [np.column_stack([lon, lat]).tolist()]}


def _inside(region: dict[str, Any], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    grid_x, grid_y = np.meshgrid(x, y)
    lon, lat = Transformer.from_crs("EPSG:3857", "EPSG:4326", always_xy=True).transform(grid_x, grid_y)
    return shapely.contains_xy(shapely.geometry.shape(region), lon, lat)


def _score_fields(count: int, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    u = (x - x[0]) / max(x[-1] - x[0], 1.0)
    v = (y[0] - y) / max(y[0] - y[-1], 1.0)
    grid_u, grid_v = np.meshgrid(u, v)
    fields = [
        0.45 * np.sin(math.pi * (index + 1) * grid_u) * np.cos(math.pi * grid_v) + 0.05 * index
        for index in range(count)
    ]
    noise = rng.normal(0.0, 0.02, (count, *grid_u.shape))
    return np.clip(np.stack(fields) + noise, -1.0, 1.0).astype(np.float32)


def _concepts(height: int, width: int, ranks: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Top-k codebook indices and their weights, sorted by falling weight, for every tile."""
    index = np.argsort(rng.random((height, width, CODEBOOK_SIZE)), axis=-1)[..., :ranks].astype(np.int32)
    weight = -np.sort(-rng.dirichlet(np.ones(CODEBOOK_SIZE), (height, width))[..., :ranks], axis=-1)
    return index, weight.astype(np.float32)


# --- Imagery over a store's grid ---------------------------------------------------------------------------------

# A checkerboard of two colours in blocks of CHECKER_TILES x CHECKER_TILES tiles, IMAGERY_TILE_PX pixels per tile.
CHECKER_COLOURS = ((230, 120, 30), (30, 160, 170))
CHECKER_TILES = 8
IMAGERY_TILE_PX = 4


def checker_colour(row: float, col: float) -> tuple[int, int, int]:
    """The colour of the synthetic imagery at (fractional) grid row and column."""
    return CHECKER_COLOURS[(int(row // CHECKER_TILES) + int(col // CHECKER_TILES)) % 2]


def write_synthetic_imagery(
    store: SyntheticStore,
    path: Path,
    *,
    dtype: str = "uint8",
    scale: int = 1,
    offset: int = 0,
    cover: float = 1.0,
    bgr: bool = True,
) -> Path:
    """A north-up EPSG:3857 GeoTIFF over the western `cover` share of the store's grid, IMAGERY_TILE_PX pixels a
    tile: the checkerboard, as colour * `scale` + `offset` in `dtype`, nodata 0. With `bgr` its bands are in blue,
    green, red order (read it with bands [3, 2, 1]), else in red, green, blue order."""
    grid = store.plan.grid
    left, _, _, top = grid.bounds
    width, height = round(grid.width * cover) * IMAGERY_TILE_PX, grid.height * IMAGERY_TILE_PX
    rows, cols = np.mgrid[0:height, 0:width] / IMAGERY_TILE_PX
    blocks = ((rows // CHECKER_TILES).astype(int) + (cols // CHECKER_TILES).astype(int)) % 2
    rgb = np.array(CHECKER_COLOURS)[blocks]
    bands = np.moveaxis(rgb[..., ::-1] if bgr else rgb, -1, 0) * scale + offset
    pixel = grid.pixel_m / IMAGERY_TILE_PX
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=width,
        height=height,
        count=3,
        dtype=dtype,
        crs="EPSG:3857",
        transform=from_origin(left, top, pixel, pixel),
        nodata=0,
    ) as dataset:
        dataset.write(bands.astype(dtype))
    return path


# --- Debian's GDAL 3.6 and QGIS 3.22, run as a GIS user would (bash run.sh test installs them as root) ----------

DEBIAN_GDALINFO = Path("/usr/bin/gdalinfo")
DEBIAN_GDALLOCATIONINFO = Path("/usr/bin/gdallocationinfo")
DEBIAN_PYTHON = Path("/usr/bin/python3")
DEBIAN_QGIS = Path("/usr/lib/python3/dist-packages/qgis/core/__init__.py")
needs_debian_gdal = pytest.mark.skipif(
    not (DEBIAN_GDALINFO.exists() and DEBIAN_GDALLOCATIONINFO.exists()),
    reason="Debian's gdal-bin is not installed (bash run.sh test installs it as root)",
)
needs_debian_qgis = pytest.mark.skipif(
    not (DEBIAN_PYTHON.exists() and DEBIAN_QGIS.exists()),
    reason="Debian's python3-qgis is not installed (bash run.sh test installs it as root)",
)
_QGIS_SCRIPT = """
import json, sys
from qgis.core import QgsApplication, QgsRasterLayer

def facts(uri):
    layer = QgsRasterLayer(uri, "layer", "gdal")
    extent = layer.extent()
    return {
        "valid": layer.isValid(),
        "crs": layer.crs().authid(),
        "extent": [extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum()],
        "size": [layer.width(), layer.height()],
        "bands": layer.bandCount(),
    }

app = QgsApplication([], False)
app.initQgis()
print(json.dumps([facts(uri) for uri in sys.argv[1:]]))
app.exitQgis()
"""

_QGIS_STYLE_SCRIPT = """
import json, sys
from qgis.core import QgsApplication, QgsRaster, QgsRasterLayer

def styled(uri, values):
    layer = QgsRasterLayer(uri, "layer", "gdal")
    _, loaded = layer.loadDefaultStyle()
    renderer = layer.renderer()
    provider = layer.dataProvider()
    shader = renderer.shader().rasterShaderFunction() if renderer.type() == "singlebandpseudocolor" else None
    return {
        "valid": layer.isValid(),
        "style_loaded": loaded,
        "renderer": renderer.type(),
        "alpha_band": renderer.alphaBand(),
        "alpha_bands": [band for band in range(1, layer.bandCount() + 1)
                        if provider.colorInterpretation(band) == QgsRaster.AlphaBand],
        "legend": [[label, colour.name()] for label, colour in renderer.legendSymbologyItems()],
        "shades": ["#%02x%02x%02x" % tuple(shader.shade(value)[1:4]) for value in values] if shader else [],
    }

app = QgsApplication([], False)
app.initQgis()
values = json.loads(sys.argv[1])
print(json.dumps([styled(uri, values) for uri in sys.argv[2:]]))
app.exitQgis()
"""


def qgis_styles(*uris: str, shade: tuple[float, ...] = ()) -> list[dict[str, Any]]:
    """Each raster as QGIS shows it with its `.qml`: renderer, legend (label, colour), its alpha bands, and the
    colour its shader gives each of `shade` (pseudocolor renderers)."""
    return list(run_debian_qgis(_QGIS_STYLE_SCRIPT, json.dumps(list(shade)), *uris))


def run_debian_qgis(script: str, *args: str, timeout: float = 120) -> Any:
    """Run a PyQGIS `script` with Debian's Python, headless; the JSON its last line of output prints."""
    result = subprocess.run(
        [str(DEBIAN_PYTHON), "-c", script, *args],
        capture_output=True,
        text=True,
        env=_debian_env(),
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _debian_env() -> dict[str, str]:
    # Debian's tools must not pick up the virtualenv's GDAL or PROJ data.
    env = {key: value for key, value in os.environ.items() if not key.startswith(("GDAL_", "PROJ_", "PYTHON"))}
    return env | {"QT_QPA_PLATFORM": "offscreen", "XDG_RUNTIME_DIR": _runtime_dir()}


@cache
def _runtime_dir() -> str:
    """A private (0700) runtime folder for Qt, as it asks."""
    return tempfile.mkdtemp(prefix="sat2sound-qt-runtime-")


def gdalinfo(name: str) -> dict[str, Any]:
    """`gdalinfo -json` of a GDAL dataset name, by Debian's GDAL."""
    result = subprocess.run(
        [str(DEBIAN_GDALINFO), "-json", name], capture_output=True, text=True, env=_debian_env(), check=False
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def run_gdalinfo(name: str) -> subprocess.CompletedProcess[str]:
    """Plain `gdalinfo` of a GDAL dataset name, by Debian's GDAL, as a GIS user runs it."""
    return subprocess.run([str(DEBIAN_GDALINFO), name], capture_output=True, text=True, env=_debian_env(), check=False)


def gdalinfo_text(name: str) -> str:
    result = run_gdalinfo(name)
    assert result.returncode == 0, result.stderr
    return result.stdout


def location_value(name: str, x: float, y: float) -> float:
    """The value at georeferenced point (x, y) in the dataset's CRS, by Debian's `gdallocationinfo -geoloc`."""
    result = subprocess.run(
        [str(DEBIAN_GDALLOCATIONINFO), "-valonly", "-geoloc", name, repr(x), repr(y)],
        capture_output=True,
        text=True,
        env=_debian_env(),
        check=False,
    )
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
    return float(result.stdout.split()[0])


def qgis_layers(*uris: str) -> list[dict[str, Any]]:
    """Validity, CRS authid, extent, size and band count of each URI loaded as a QgsRasterLayer by Debian's QGIS."""
    return list(run_debian_qgis(_QGIS_SCRIPT, *uris))

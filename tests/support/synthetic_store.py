"""A small `soundscape.zarr` laid out exactly as the map build's store contract says, from arrays the tests know.

The layout (the workflow's real store must look the same), Zarr format 2 with consolidated metadata:

- coords: `query` (Q,) str ids, with `query_label` and `query_kind` along it; `y` (H,) float64 EPSG:3857
  pixel-centre northings, descending; `x` (W,) float64 eastings, ascending; `dim` (D,); `rank` (k,). One pixel
  is one Web Mercator tile at the output zoom.
- `score(query, y, x)` float32 raw cosine, NaN where invalid; `score_percentile(query, y, x)` float32 in
  [0, 100]; `score_softmax(query, y, x)` float32; `embedding(y, x, dim)` float16; `concept_index(y, x, rank)`
  int32 (-1 invalid), rank 0 the highest weight; `concept_weight(y, x, rank)` float32; `valid(y, x)` bool.
- `spatial_ref`: CF grid mapping (crs_wkt, spatial_ref, GeoTransform); every data variable has
  `grid_mapping="spatial_ref"`.
- attrs: checkpoint, checkpoint_sha256, untrained (bool), queries (JSON list of {"id", "kind", "text",
  "audio"}, in the order of the `query` coordinate), config (JSON), imagery_source, imagery_attribution,
  software_version, created (ISO 8601 UTC).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import mercantile
import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import shapely
import xarray as xr
from affine import Affine
from pyproj import Transformer

DEFAULT_QUERIES: tuple[dict[str, str | None], ...] = (
    {"id": "birds", "kind": "text", "text": "birds chirping in a park", "audio": None},
    {"id": "rain", "kind": "audio", "text": None, "audio": "queries/rain_on_roof.flac"},
    {"id": "harbour", "kind": "composed", "text": "with seagulls", "audio": "queries/harbour.wav"},
)
# Paris: the grid's top-left tile at zoom 14 (about 1.6 km tiles), so UTM zone 31N suits reprojection tests.
DEFAULT_ZOOM = 14
DEFAULT_TOP_LEFT = mercantile.tile(2.10, 49.00, DEFAULT_ZOOM)
LOGIT_SCALE = math.log(1 / 0.07)
CODEBOOK_SIZE = 12


class SyntheticStore(NamedTuple):
    path: Path
    zoom: int
    top_left: mercantile.Tile
    region: dict[str, Any]
    queries: tuple[dict[str, str | None], ...]
    valid: np.ndarray
    score: np.ndarray
    concept_index: np.ndarray

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
    queries: tuple[dict[str, str | None], ...] = DEFAULT_QUERIES,
    dim: int = 4,
    ranks: int = 3,
    chunk: int = 16,
    untrained: bool = True,
    seed: int = 0,
) -> SyntheticStore:
    """Write the store; valid tiles lie inside an elliptic region, less a block with no imagery."""
    rng = np.random.default_rng(seed)
    tile_size = 2 * math.pi * 6378137.0 / 2**zoom
    left, _, _, top = mercantile.xy_bounds(top_left)
    x = left + (np.arange(width) + 0.5) * tile_size
    y = top - (np.arange(height) + 0.5) * tile_size
    region = _elliptic_region(left, top, width * tile_size, height * tile_size)
    valid = _inside(region, x, y)
    valid[height // 4 : height // 4 + max(1, height // 8), width // 2 : width // 2 + max(1, width // 8)] = False

    score = _score_fields(len(queries), x, y, rng)
    score[:, ~valid] = np.nan
    concept_index, concept_weight = _concepts(valid, ranks, rng)
    embedding = rng.standard_normal((height, width, dim)).astype(np.float16)
    embedding[~valid] = np.nan

    dataset = xr.Dataset(
        data_vars={
            "score": (("query", "y", "x"), score),
            "score_percentile": (("query", "y", "x"), _percentiles(score)),
            "score_softmax": (("query", "y", "x"), _softmax(score)),
            "embedding": (("y", "x", "dim"), embedding),
            "concept_index": (("y", "x", "rank"), concept_index),
            "concept_weight": (("y", "x", "rank"), concept_weight),
            "valid": (("y", "x"), valid),
        },
        coords={
            "query": np.array([query["id"] for query in queries], dtype=object),
            "query_label": ("query", np.array([_label(query) for query in queries])),
            "query_kind": ("query", np.array([query["kind"] for query in queries])),
            "y": y,
            "x": x,
            "dim": np.arange(dim),
            "rank": np.arange(ranks),
        },
        attrs=_provenance(queries, untrained),
    )
    transform = Affine(tile_size, 0.0, left, 0.0, -tile_size, top)
    dataset = dataset.rio.write_crs("EPSG:3857").rio.write_transform(transform).rio.write_coordinate_system()
    for variable in dataset.data_vars.values():
        variable.attrs["grid_mapping"] = "spatial_ref"
        variable.encoding.pop("grid_mapping", None)
    dataset.chunk({"y": chunk, "x": chunk}).to_zarr(path, mode="w-", zarr_format=2, consolidated=True)
    return SyntheticStore(path, zoom, top_left, region, queries, valid, score, concept_index)


def _label(query: dict[str, str | None]) -> str:
    if query["audio"] is None:
        return str(query["text"])
    name = Path(query["audio"]).name
    return name if query["text"] is None else f"{name} + {query['text']}"


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


def _percentiles(score: np.ndarray) -> np.ndarray:
    """Percent of the query's valid tiles whose score is at most the tile's."""
    out = np.full(score.shape, np.nan, dtype=np.float32)
    for index, layer in enumerate(score):
        values = layer[np.isfinite(layer)]
        ordered = np.sort(values)
        ranks = np.searchsorted(ordered, values, side="right")
        out[index][np.isfinite(layer)] = 100.0 * ranks / len(values)
    return out


def _softmax(score: np.ndarray) -> np.ndarray:
    logits = math.exp(LOGIT_SCALE) * score.astype(np.float64)
    logits -= np.max(np.nan_to_num(logits, nan=-np.inf), axis=0, keepdims=True)
    weights = np.exp(logits)
    return (weights / weights.sum(axis=0, keepdims=True)).astype(np.float32)


def _concepts(valid: np.ndarray, ranks: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Top-k codebook indices and their weights, sorted by falling weight; -1 and NaN where invalid."""
    height, width = valid.shape
    index = np.argsort(rng.random((height, width, CODEBOOK_SIZE)), axis=-1)[..., :ranks].astype(np.int32)
    weight = -np.sort(-rng.dirichlet(np.ones(CODEBOOK_SIZE), (height, width))[..., :ranks], axis=-1)
    index[~valid] = -1
    weight[~valid] = np.nan
    return index, weight.astype(np.float32)


def _provenance(queries: tuple[dict[str, str | None], ...], untrained: bool) -> dict[str, Any]:
    return {
        "checkpoint": "synthetic-test-checkpoint.safetensors",
        "checkpoint_sha256": "0" * 64,
        "untrained": untrained,
        "queries": json.dumps(list(queries)),
        "config": json.dumps({"region": "synthetic ellipse", "sat_type": "sentinel"}),
        "imagery_source": json.dumps({"kind": "synthetic"}),
        "imagery_attribution": "Synthetic test imagery",
        "software_version": "sat2sound-maps 0.1.0",
        "created": "2026-01-01T00:00:00Z",
    }

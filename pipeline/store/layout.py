"""The layout of `soundscape.zarr`, shared by its writer and its readers.

Zarr format 2, consolidated metadata. One pixel is one Web Mercator tile at the output zoom; x/y are EPSG:3857
pixel centres (x ascending, y descending). Every gridded variable ends in (y, x), extra dimensions first, so GDAL's
classic 2-D view (which takes the last two dimensions as y, x) reads each of them the right way round:

    score, score_percentile, score_softmax   (query, y, x) float32, NaN where invalid
    embedding                                (dim, y, x)   float16, NaN where invalid
    concept_index                            (rank, y, x)  int32, -1 where invalid or no concept
    concept_weight                           (rank, y, x)  float32, NaN where invalid
    valid                                    (y, x)        bool

With a sound gallery (`outputs.gallery`), each tile's best gallery recordings, best first, ranked by the summed
image->audio and image->caption logits the model was trained with (`pipeline.gallery`):

    gallery_item                             (gallery_rank, y, x) int32, the item's position in the gallery's
                                             items.json; -1 where invalid or the gallery has fewer items
    gallery_logit                            (gallery_rank, y, x) float32, that sum; NaN where no item
    gallery_audio_cosine                     (gallery_rank, y, x) float32, cosine of tile and recording
    gallery_caption_cosine                   (gallery_rank, y, x) float32, cosine of tile and caption

and the attributes `gallery` (the gallery's folder) and `gallery_count` (its items).

Coordinates: `query` (str ids) with `query_kind`, `query_text`, `query_audio` along it ("" where a query has no
text or audio), `y`, `x`, `dim`, `rank`, `gallery_rank` (with a gallery) and `spatial_ref`.

Times: a build of several times (`model.month` and/or `model.hour` a list or `all`) adds the dimensions `month`
and `hour` (int coordinates, UNKNOWN_TIME = -1 where the config left one unknown) in front of every per-time
variable: score, score_percentile and score_softmax (month, hour, query, y, x), embedding (month, hour, dim, y,
x), concept_index and concept_weight (month, hour, rank, y, x), the gallery's (month, hour, gallery_rank, y, x).
`valid` does not change with the time. The percentile is within the region for each time and query; the softmax
over the queries of each time. A build of one time has no time dimensions (the layout above). GDAL names one 2-D
layer by an index per dimension before (y, x): `ZARR:"soundscape.zarr":/score:<month>:<hour>:<query>`
(`gdal_path`). Readers go through `pipeline.store.read.SoundscapeStore`, whose methods take a time index into
`times` (month-major, one entry for a store of one time), so both kinds of store are read by one code path.

Georeferencing, written so that every reader finds it without options:
- CF: `spatial_ref` grid mapping (crs_wkt, spatial_ref, GeoTransform), named by each gridded variable's
  `grid_mapping`; the global `coordinates` attribute lists `spatial_ref`, so plain `xr.open_zarr` makes it a
  coordinate and rioxarray finds the CRS (GDAL >= 3.9 reads the grid mapping too).
- GDAL's Zarr driver (3.4 on): a `_CRS` attribute ({"wkt", "url"}) on each gridded variable gives the CRS; the
  regularly spaced x/y arrays give the geotransform.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pyproj import CRS

from pipeline.store.scores import SCORE_KINDS

ZARR_FORMAT = 2
# The attribute that names each array's dimensions in a Zarr format 2 store (xarray's convention).
STORE_DIMS_ATTR = "_ARRAY_DIMENSIONS"
GRID_MAPPING = "spatial_ref"
SPATIAL_DIMS = ("y", "x")
QUERY_FACTS = ("query_kind", "query_text", "query_audio")
EMBEDDING_DIM_CHUNK = 64
CONCEPT_NONE = -1
# A month or hour the config left unknown (null), in chunk files and the store's time coordinates.
UNKNOWN_TIME = -1
TIME_DIMS = ("month", "hour")

VARIABLE_ATTRS: dict[str, dict[str, str]] = {
    **{name: {"long_name": kind.long_name, "units": kind.units} for name, kind in SCORE_KINDS.items()},
    "embedding": {"long_name": "L2-normalised Sat2Sound tile embedding"},
    "concept_index": {"long_name": "codebook concepts with the largest weights, -1 for none"},
    "concept_weight": {"long_name": "sparse codebook weights of concept_index", "units": "1"},
    "valid": {"long_name": "tile inside the region with enough imagery to be scored"},
}
GRIDDED_VARIABLES = tuple(VARIABLE_ATTRS)
GALLERY_NONE = -1
GALLERY_RANK = "gallery_rank"
GALLERY_ITEM = "gallery_item"
# In the order of pipeline.gallery.TileMatches' fields.
GALLERY_ATTRS: dict[str, dict[str, str]] = {
    GALLERY_ITEM: {"long_name": "gallery items that fit the tile best (positions in items.json), -1 for none"},
    "gallery_logit": {"long_name": "image-audio plus image-caption logit of tile and gallery item", "units": "1"},
    "gallery_audio_cosine": {"long_name": "cosine similarity of tile and gallery recording", "units": "1"},
    "gallery_caption_cosine": {"long_name": "cosine similarity of tile and gallery caption", "units": "1"},
}


def time_coordinate(values: Sequence[int | None]) -> np.ndarray:
    """(T,) int64 months or hours as chunk files and the store hold them: UNKNOWN_TIME where unknown (None)."""
    return np.array([UNKNOWN_TIME if value is None else value for value in values], np.int64)


def gdal_crs_attribute(crs: CRS) -> dict[str, str]:
    """The `_CRS` attribute GDAL's Zarr driver reads (https://gdal.org/drivers/raster/zarr.html)."""
    attribute = {"wkt": crs.to_wkt()}
    epsg = crs.to_epsg()
    if epsg is not None:
        attribute["url"] = f"http://www.opengis.net/def/crs/EPSG/0/{epsg}"
    return attribute


def gdal_path(store: Any, variable: str, *indices: int) -> str:
    """The GDAL name of one 2-D layer of the store, as GDAL 3.4 to 3.8 need it: `ZARR:"<store>":/<variable>[:i...]`,
    one index per dimension before (y, x) (a swept store's score: month, hour, query)."""
    suffix = "".join(f":{index}" for index in indices)
    return f'ZARR:"{store}":/{variable}{suffix}'


def has_array(store: Path, name: str) -> bool:
    """Whether the store holds the array `name` (Zarr format 2 keeps each array in a folder of its own)."""
    return (store / name / ".zarray").is_file()


def arrays_stamp(store: Path, names: tuple[str, ...]) -> str:
    """A digest of the arrays `names` as files: every chunk's name, size and modification time. The store is
    written into a new folder and renamed into place, so a rebuilt store gets a new stamp, and reading the
    stamp costs one `stat` per chunk, not a read of the data."""
    digest = hashlib.sha256()
    for name in names:
        for path in sorted((store / name).rglob("*")):
            if path.is_file():
                stat = path.stat()
                digest.update(f"{path.relative_to(store)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]

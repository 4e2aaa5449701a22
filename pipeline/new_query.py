"""New questions on a built map: `python -m pipeline query BUILD "text" | --audio FILE [--text TEXT]`.

A new query is checked as a build checks its queries (its text: `pipeline.config.holds_words`; its audio files:
`pipeline.queries.check_query_files`; its id: `pipeline.export.cog.check_file_name`), embedded exactly as the
build embedded its own (the weights model.json names, checked against their sha256, with settings.json's text
backbone, device and precision, through `pipeline.queries.embed_queries`) and answered from the build's tile
index (`pipeline.search`): the index finds its best tiles, which become places as a build's top places do
(`pipeline.export.places`), each with its percentile among the region's valid tiles
(`pipeline.store.scores.percentile_within`, over every tile's score: one matrix product). `write_map` writes its
COG and percentile COG into the build's cog/ with the build's writer and output CRS. Every bad input is refused
in one line before the model is loaded.

A build of several times (`model.month`/`model.hour` lists or `all`) is asked at its first time: the tile index
holds that time's embeddings (`pipeline.search`), as the build's top places and dominant map show that time; the
printed answer and the COGs' band say which time it is.
"""

from __future__ import annotations

import re
import time
import unicodedata
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import geopandas as gpd
import numpy as np

from common.atomic import unwritable_reason
from pipeline.build import COG_DIR, MODEL_NAME, SETTINGS_NAME, STORE_NAME, check_build_folder
from pipeline.config import BuildConfig, Query, holds_words, id_key, read_settings, schema_bounds
from pipeline.errors import BuildFolderError, PipelineError, QueryError
from pipeline.export.cog import check_file_name, write_score_cog
from pipeline.export.places import CSV_FORMATS, GPKG_SUFFIX, Candidates, place_layers
from pipeline.model_setup import ModelRecord, load_encoder, read_model_record, untrained_notice
from pipeline.queries import check_query_files, embed_queries
from pipeline.search import INDEX_DIR, OpenedIndex, open_tile_index
from pipeline.store.layout import has_array
from pipeline.store.read import SoundscapeStore
from pipeline.store.scores import percentile_within

if TYPE_CHECKING:
    from model import Sat2SoundEncoder

# A query id made from the text or audio file name keeps at most this many characters.
DEFAULT_ID_CHARS = 40
FALLBACK_ID = "query"


class BuiltMap(NamedTuple):
    """A finished build: its folder, store, settings and model record."""

    folder: Path
    store: SoundscapeStore
    settings: BuildConfig
    model: ModelRecord


class Answer(NamedTuple):
    query: Query
    places: gpd.GeoDataFrame
    areas: gpd.GeoDataFrame
    scores: np.ndarray  # (height, width) every tile's cosine with the query, NaN where not valid
    sorted_valid: np.ndarray  # the valid tiles' scores, ascending (the percentiles' reference)
    opened: OpenedIndex
    seconds: dict[str, float]  # model load, embedding, search, scoring every tile


def open_built_map(folder: Path) -> BuiltMap:
    """The build in `folder`, refused in one line if it is not a finished build whose store keeps embeddings."""
    check_build_folder(folder, (STORE_NAME, MODEL_NAME, SETTINGS_NAME))
    if not has_array(folder / STORE_NAME, "embedding"):
        raise BuildFolderError(
            f"{folder / STORE_NAME} keeps no tile embeddings, so new queries cannot be scored; rebuild the map"
        )
    store = SoundscapeStore(folder / STORE_NAME)
    try:
        record = read_model_record(folder / MODEL_NAME)
    except (OSError, ValueError, TypeError) as exc:
        raise BuildFolderError(f"cannot read {folder / MODEL_NAME} ({exc}); rebuild the map") from None
    if store.provenance["checkpoint_sha256"] != record.sha256:
        raise BuildFolderError(
            f"{folder / STORE_NAME} was made with weights of sha256 {store.provenance['checkpoint_sha256'][:12]}"
            f" but {MODEL_NAME} names {record.sha256[:12]}; rebuild the map"
        )
    try:
        settings = read_settings(folder / SETTINGS_NAME)
    except (OSError, ValueError) as exc:
        raise BuildFolderError(f"cannot read {folder / SETTINGS_NAME} ({exc}); rebuild the map") from None
    return BuiltMap(folder, store, settings, record)


def new_query(
    built: BuiltMap, text: str | None, audio: str | None, query_id: str | None, top_k: int, *, maps: bool
) -> Query:
    """The query asked, checked: text with words (as a build's), audio files as a build checks them, an id that
    could name files (with `maps`, which writes them into the build, not a configured query's, case aside), and a
    number of places a build could ask for."""
    low, high = schema_bounds("outputs", "top_k")
    check_top_k(top_k, low, high, "places", QueryError, " (the range of outputs.top_k)")
    if text is None and audio is None:
        raise QueryError("give a query: its text, or --audio FILE (with --text TEXT for audio and text together)")
    if text is not None and not holds_words(text):
        raise QueryError(
            f'the query text {text!r} holds no words; write what to listen for, e.g. "birds singing in the trees"'
        )
    query = Query(default_query_id(text, audio) if query_id is None else query_id, text, audio)
    check_file_name(query)
    taken = next((known.id for known in built.store.queries if id_key(known.id) == id_key(query.id)), None)
    if maps and taken is not None:
        which = "is" if taken == query.id else f"differs only in case from {taken!r},"
        raise QueryError(
            f"query id {query.id!r} {which} a query of the build {built.folder} (its maps are cog/{taken}.tif);"
            " pass --id with another name"
        )
    check_query_files([query])
    return query


def check_top_k(
    top_k: int, low: int, high: int, things: str, error: type[PipelineError], bounds_note: str = ""
) -> None:
    """Refuse a --top-k outside `low` to `high` (of `things`), saying to ask for more or fewer as it lies."""
    if not low <= top_k <= high:
        ask = f"{low} or more" if top_k < low else f"{high} or fewer"
        raise error(f"--top-k {top_k} is outside {low} to {high}{bounds_note}; ask for {ask} {things}")


def check_places_files(gpkg: Path | None, csv_path: Path | None, build: Path) -> None:
    """Refuse, before the model loads, places files that cannot be written where asked, or that would land in the
    build's folder (among, or over, the build's own outputs: its places, zones, preview and project)."""
    if gpkg is not None and gpkg.suffix.lower() != GPKG_SUFFIX:
        raise QueryError(f"--gpkg {gpkg} is not a .gpkg file; name one, e.g. --gpkg places.gpkg")
    for flag, path in (("--gpkg", gpkg), ("--csv", csv_path)):
        if path is None:
            continue
        if path.resolve().is_relative_to(build.resolve()):
            raise QueryError(
                f"{flag} {path} lies in the build folder {build}, which holds the build's own outputs;"
                f" write the places outside it, e.g. {flag} {path.name}"
            )
        if reason := unwritable_reason(path):
            raise QueryError(f"cannot write {flag} {path} ({reason}); pass {flag} a writable file path")


def default_query_id(text: str | None, audio: str | None) -> str:
    """An id from the audio file's name and the text: ASCII letters and digits joined by '_', e.g.
    'birds_singing_in_the_trees'; 'query' when none remain."""
    words = " ".join(part for part in (audio and Path(audio).stem, text) if part)
    ascii_words = unicodedata.normalize("NFKD", words).encode("ascii", "ignore").decode().lower()
    slug = re.sub(r"[^a-z0-9]+", "_", ascii_words).strip("_")[:DEFAULT_ID_CHARS].rstrip("_")
    return slug or FALLBACK_ID


def answer(built: BuiltMap, query: Query, top_k: int) -> Answer:
    """The query's best `top_k` places and every tile's score, with how long each part took."""
    opened = open_tile_index(built.store, built.folder / INDEX_DIR)
    index = opened.tiles
    start = time.perf_counter()
    encoder = _load_encoder(built)
    loaded = time.perf_counter()
    embedding = embed_queries(encoder, [query]).embedding[0]
    embedded = time.perf_counter()
    if len(embedding) != index.record.dim:
        raise BuildFolderError(
            f"the model gives {len(embedding)}-d embeddings but the store holds {index.record.dim}-d ones;"
            " rebuild the map"
        )
    positions, _ = index.search(embedding, top_k)
    searched = time.perf_counter()
    scores = index.score_grid(embedding)
    sorted_valid = np.sort(scores[np.isfinite(scores)])
    scored = time.perf_counter()
    rows, cols = np.divmod(positions, built.store.grid.width)
    found = scores[rows, cols]
    best = Candidates(found, rows, cols, percentile_within(found, sorted_valid)).best(top_k)
    places, areas = place_layers(built.store.grid, query, best)
    seconds = {
        "model": loaded - start,
        "embed": embedded - loaded,
        "search": searched - embedded,
        "score every tile": scored - searched,
    }
    return Answer(query, places, areas, scores, sorted_valid, opened, seconds)


def _load_encoder(built: BuiltMap) -> Sat2SoundEncoder:
    """The build's own weights (refused if they changed since), as its queries step loaded them."""
    from model import sha256_file

    path = Path(built.model.path)
    if not path.is_file():
        raise BuildFolderError(f"the build's weights {path} ({MODEL_NAME}) are gone; restore them or rebuild the map")
    if sha256_file(path) != built.model.sha256:
        raise BuildFolderError(
            f"the build's weights {path} changed since the build (sha256 is not {built.model.sha256[:12]}, as"
            f" {MODEL_NAME} says); restore them or rebuild the map"
        )
    model = built.settings.model
    return load_encoder(built.model, model.device, model.precision, model.text_backbone)


def write_map(built: BuiltMap, result: Answer) -> list[Path]:
    """cog/<id>.tif (raw cosine) and cog/<id>_percentile.tif of the query, each with its .qml, exactly as a build
    writes them for its queries (same writer, the build's outputs.crs)."""
    percentile = percentile_within(result.scores, result.sorted_valid)
    layers = {"score": result.scores, "score_percentile": percentile}
    times = built.store.times
    return [
        write_score_cog(
            built.store,
            result.query,
            variable,
            partial(_window, values),
            built.folder / COG_DIR,
            built.settings.outputs.crs,
            times.all[:1] if times.sweeps else (),
        )
        for variable, values in layers.items()
    ]


def _window(values: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
    return values[rows, cols]


def answer_lines(built: BuiltMap, result: Answer) -> list[str]:
    """What `python -m pipeline query` prints: the query, its places as a table, and the timings."""
    query, record = result.query, result.opened.tiles.record
    times = built.store.times
    at_time = f" at {times.all[0].label} (the build's first time)" if times.sweeps else ""
    lines = [
        f"query {query.label!r} ({query.kind}, id {query.id}): the {len(result.places)} best of"
        f" {record.count:,} tiles of {built.folder}{at_time}",
        f"{'rank':>4}  {'score':>9}  {'percentile':>10}  {'lon':>11}  {'lat':>10}",
    ]
    for place in result.places.itertuples():
        text = {column: CSV_FORMATS[column].format(getattr(place, column)) for column in CSV_FORMATS}
        lines.append(
            f"{place.rank:>4}  {text['score']:>9}  {text['percentile']:>10}  {text['lon']:>11}  {text['lat']:>10}"
        )
    how = "made" if result.opened.built else "read"
    timings = [f"index {_ms(result.opened.seconds)} ({how}: {record.kind}, {record.count:,} tiles)"]
    timings += [f"{part} {_ms(seconds)}" for part, seconds in result.seconds.items()]
    lines.append("time: " + ", ".join(timings))
    if built.model.untrained:
        lines.append(untrained_notice(built.model.sat_type, built.settings.model.seed))
    return lines


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms"

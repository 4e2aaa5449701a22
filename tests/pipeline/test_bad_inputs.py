"""A catalogue of bad inputs: each stops the build when it starts, before any job, with one line.

Every case goes through `pipeline.build.open_workflow`, what the Snakefile runs first, and must exit with
status 2 after exactly one `error: ...` line on stderr that names the key or file and says what to do,
having written nothing at all (no build folder, no tile cache, nothing beside the inputs). A few cases also
go through a real `snakemake --dry-run`, to show the workflow adds nothing to that line, and through
`python -m pipeline plan --config`, to show the plan refuses them as the build's start does.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import rasterio
import soundfile
import torch
import yaml
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine
from shapely.geometry import box
from support.damage import overwritten_copy
from support.paths import LANDSAT, REPO

from model.checkpoint import save_safetensors, sha256_file
from model.sat2sound import Sat2Sound
from model.text_specs import minilm_directory
from pipeline.__main__ import main
from pipeline.build import ERROR_STATUS, open_workflow
from pipeline.model_setup import untrained_config

COUNTRIES = REPO / "regions" / "countries.geojson"
# The default build's scene, region and model, with few output tiles.
BASE: dict[str, Any] = {
    "name": "demo",
    "output_dir": "out",
    "region": "-54.60,-25.45,-54.45,-25.30",
    "imagery": {"source": str(LANDSAT), "options": {"bands": [3, 2, 1]}, "cache_dir": "tiles"},
    "model": {"checkpoint": "untrained", "sat_type": "sentinel", "zoom_level": 3},
    "queries": [{"id": "birds", "text": "birds singing in a forest"}],
}


class Inputs(NamedTuple):
    """Files the cases point at, made once: good ones and broken ones."""

    folder: Path
    tone_wav: Path
    wav_cut: Path
    wav_no_frames: Path
    flac_cut: Path
    not_audio_wav: Path
    notes_txt: Path
    checkpoint: Path
    checkpoint_corrupt: Path
    checkpoint_text: Path
    checkpoint_foreign: Path
    checkpoint_without_config: Path
    t5_narrow: Path
    raster_text: Path
    raster_without_crs: Path
    raster_not_georeferenced: Path
    raster_blank: Path
    a_file: Path
    zones_points: Path
    zones_far: Path
    zones_broken: Path
    zones_table: Path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    folder = tmp_path_factory.mktemp("inputs")
    tone = (0.3 * np.sin(np.linspace(0, 4000, 32_000))).astype(np.float32)
    soundfile.write(folder / "tone.wav", tone, 16_000, subtype="PCM_16")
    (folder / "cut.wav").write_bytes((folder / "tone.wav").read_bytes()[:200])
    soundfile.write(folder / "silent.wav", np.zeros(0, np.float32), 16_000)
    soundfile.write(folder / "hush.flac", np.zeros(48_000, np.float32), 16_000)
    # 16-bit silence for the 10 s the model hears, then the tone.
    soundfile.write(folder / "late.wav", np.r_[np.zeros(16_000 * 10 + 800, np.float32), tone], 16_000, "PCM_16")
    soundfile.write(folder / "tone.flac", tone, 16_000)
    flac = (folder / "tone.flac").read_bytes()
    (folder / "cut.flac").write_bytes(flac[: len(flac) // 2])
    (folder / "noise.wav").write_bytes(b"this is not audio" * 20)
    (folder / "notes.txt").write_text("birds")

    checkpoint, _ = save_safetensors(Sat2Sound(untrained_config("sentinel", "none")), folder / "small.safetensors")
    corrupt = overwritten_copy(checkpoint, folder / "corrupt.safetensors")
    (folder / "notes.ckpt").write_text("not a checkpoint")
    torch.save({"conv1.weight": torch.zeros(2, 2)}, folder / "resnet.pth")
    lone = folder / "lone" / "small.safetensors"
    lone.parent.mkdir()
    lone.write_bytes(checkpoint.read_bytes())

    t5 = folder / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 32}))
    (folder / "fake.tif").write_text("not a raster")
    profile = {"driver": "GTiff", "width": 8, "height": 8, "count": 3, "dtype": "uint8"}
    with rasterio.open(folder / "nocrs.tif", "w", transform=Affine(10, 0, 100, 0, -10, 200), **profile) as dataset:
        dataset.write(np.zeros((3, 8, 8), np.uint8))
    with (
        warnings.catch_warnings(category=NotGeoreferencedWarning, action="ignore"),
        rasterio.open(folder / "plain.tif", "w", **profile) as dataset,
    ):
        dataset.write(np.zeros((3, 8, 8), np.uint8))
    with rasterio.open(LANDSAT) as scene:
        blank = {**scene.profile, "nodata": 0, "compress": "deflate"}
    with rasterio.open(folder / "blank.tif", "w", **blank) as dataset:
        dataset.write(np.zeros((blank["count"], blank["height"], blank["width"]), blank["dtype"]))
    (folder / "a_file").write_text("")
    write_features(folder / "points.geojson", {"type": "Point", "coordinates": [-54.5, -25.4]})
    write_features(folder / "far.geojson", box(2.0, 48.0, 3.0, 49.0).__geo_interface__)
    (folder / "broken.gpkg").write_text("not a GeoPackage")
    (folder / "zones.csv").write_text("name,area\nnorth,1\n")
    listed = folder / "listed"
    listed.mkdir()
    (listed / "tone.wav").write_bytes((folder / "tone.wav").read_bytes())
    (listed / "recordings.csv").write_text("file,caption\ntone.wav,a tone\nowl.flac,an owl\n")
    return Inputs(
        folder,
        folder / "tone.wav",
        folder / "cut.wav",
        folder / "silent.wav",
        folder / "cut.flac",
        folder / "noise.wav",
        folder / "notes.txt",
        checkpoint,
        corrupt,
        folder / "notes.ckpt",
        folder / "resnet.pth",
        lone,
        t5,
        folder / "fake.tif",
        folder / "nocrs.tif",
        folder / "plain.tif",
        folder / "blank.tif",
        folder / "a_file",
        folder / "points.geojson",
        folder / "far.geojson",
        folder / "broken.gpkg",
        folder / "zones.csv",
    )


def write_features(path: Path, geometry: dict[str, Any]) -> None:
    """A GeoJSON file of one named feature."""
    feature = {"type": "Feature", "properties": {"name": "zone"}, "geometry": geometry}
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))


Change = Callable[[dict[str, Any], Inputs], None]


@dataclass(frozen=True)
class Case:
    """A change to the good config and the words the error line must hold (the key or file, and the fix)."""

    id: str
    change: Change
    words: tuple[str, ...]
    when: bool = True  # False where this machine cannot show the problem (e.g. it has the device)
    defect: str = ""  # why the case does not pass yet, where a fix belongs to other work


def set_key(path: str, value: Any | Callable[[Inputs], Any]) -> Change:
    """Set `path` ("model.device", "queries") to `value`, or to `value(inputs)` when it is a function."""

    def change(config: dict[str, Any], files: Inputs) -> None:
        *sections, key = path.split(".")
        target = config
        for section in sections:
            target = target.setdefault(section, {})
        target[key] = value(files) if callable(value) else value

    return change


def drop_key(key: str) -> Change:
    return lambda config, files: config.pop(key)


def audio_query(pick: Callable[[Inputs], Path], text: str | None = None) -> Change:
    def query(files: Inputs) -> list[dict[str, str]]:
        entry = {"id": "rain", "audio": str(pick(files))} | ({"text": text} if text else {})
        return [*BASE["queries"], entry]

    return set_key("queries", query)


def checkpoint(pick: Callable[[Inputs], Path]) -> Change:
    return set_key("model.checkpoint", lambda files: str(pick(files)))


SCHEMA = "see config/schema.json"
CASES = [
    # The config itself: keys, types and ranges (config/schema.json).
    Case("unknown key", set_key("zoom", 3), ("config: Additional properties", "'zoom' was unexpected", SCHEMA)),
    Case("unknown model key", set_key("model.zoom", 3), ("config.model: Additional properties", "'zoom'", SCHEMA)),
    Case("name not text", set_key("name", 5), ("config.name: 5 is not of type 'string'", SCHEMA)),
    Case("name with a slash", set_key("name", "../up"), ("config.name: '../up' does not match", SCHEMA)),
    Case("no region", drop_key("region"), ("config: 'region' is a required property", SCHEMA)),
    Case("empty region", set_key("region", ""), ("config.region: '' should be non-empty", SCHEMA)),
    Case(
        "batch size as text", set_key("model.batch_size", "64"), ("config.model.batch_size: '64' is not a batch size",)
    ),
    Case("batch size 0", set_key("model.batch_size", 0), ("config.model.batch_size: 0 is less than the minimum of 1",)),
    Case(
        "seed past 64 bits", set_key("model.seed", 2**64), ("config.model.seed: 18446744073709551616 is greater than",)
    ),
    Case("zoom level 0", set_key("model.zoom_level", 0), ("config.model.zoom_level: 0 is less than the minimum",)),
    Case("unknown precision", set_key("model.precision", "fp8"), ("config.model.precision: 'fp8' is not one of",)),
    Case("unknown sat type", set_key("model.sat_type", "landsat"), ("config.model.sat_type: 'landsat' is not one",)),
    Case("month 13", set_key("model.month", 13), ("config.model.month: 13 is greater than the maximum of 12",)),
    Case("hour -1", set_key("model.hour", -1), ("config.model.hour: -1 is less than the minimum of 0",)),
    # Times: lists or all of months and hours, for models that fuse them.
    Case("months with 13", set_key("model.month", [6, 13]), ("config.model.month[1]: 13 is greater than the maximum",)),
    Case("hours with 24", set_key("model.hour", [0, 24]), ("config.model.hour[1]: 24 is greater than the maximum",)),
    Case("month twice", set_key("model.month", [6, 7, 6]), ("config.model.month: [6, 7, 6] names a month twice",)),
    Case("hour twice", set_key("model.hour", [8, 8]), ("config.model.hour: [8, 8] names an hour twice",)),
    Case("no months", set_key("model.month", []), ("config.model.month: [] should be non-empty",)),
    Case(
        "month as a word", set_key("model.month", "june"), ("config.model.month: 'june' is not a month", "all or null")
    ),
    Case(
        "months for a model without metadata",
        set_key("model.month", [6, 12]),
        ("config.model.month: a list of months (or all) needs a model that fuses the month", "no metadata"),
    ),
    Case(
        "all hours for a model without the hour",
        lambda config, files: config["model"].update(hour="all", metadata_type="latlong_month"),
        ("config.model.hour: a list of hours (or all) needs a model that fuses the hour", "latlong_month"),
    ),
    Case(
        "months for a checkpoint without metadata",
        lambda config, files: config["model"].update(checkpoint=str(files.checkpoint), month="all"),
        ("config.model.month: a list of months", "use a withmeta checkpoint"),
    ),
    Case("offline as text", set_key("imagery.offline", "yes"), ("config.imagery.offline: 'yes' is not of type",)),
    Case("no coverage", set_key("imagery.min_coverage", 0), ("config.imagery.min_coverage: 0 is less than or",)),
    Case("offset 7", set_key("tiling.tile_zoom_offset", 7), ("config.tiling.tile_zoom_offset: 7 is greater",)),
    Case("top k 33", set_key("outputs.concepts_top_k", 33), ("config.outputs.concepts_top_k: 33 is greater",)),
    Case("chunk px 8", set_key("outputs.zarr_chunk_px", 8), ("config.outputs.zarr_chunk_px: 8 is less",)),
    Case(
        "gallery missing",
        set_key("outputs.gallery", lambda files: str(files.folder / "no_gallery")),
        ("config.outputs.gallery:", "no_gallery is neither a gallery nor a folder of recordings"),
    ),
    Case(
        "gallery folder without recordings",
        set_key("outputs.gallery", lambda files: str(files.folder / "lone")),
        ("config.outputs.gallery:", "lone holds no wav, flac, ogg or mp3 recordings", "recordings.csv"),
    ),
    Case(
        "gallery csv names a missing recording",
        set_key("outputs.gallery", lambda files: str(files.folder / "listed")),
        ("config.outputs.gallery:", "recordings.csv names owl.flac, which is not in", "add it or drop its row"),
    ),
    Case("gallery top k 0", set_key("outputs.gallery_top_k", 0), ("config.outputs.gallery_top_k: 0 is less",)),
    Case("no queries", set_key("queries", []), ("config.queries: [] should be non-empty", SCHEMA)),
    Case(
        "query without text or audio",
        set_key("queries", [{"id": "a"}]),
        ("config.queries[0]", "neither text nor audio"),
    ),
    Case("query id concepts", set_key("queries", [{"id": "concepts", "text": "x"}]), ("config.queries[0].id",)),
    Case("query id with a space", set_key("queries", [{"id": "a b", "text": "x"}]), ("config.queries[0].id: 'a b'",)),
    Case(
        "query id too long",
        set_key("queries", [{"id": "a" * 65, "text": "x"}]),
        ("config.queries[0].id: an id longer than 64 characters", "give the query a shorter one"),
    ),
    Case(
        "query text blank",
        set_key("queries", [{"id": "a", "text": "  "}]),
        ("config.queries[0].text: '  ' holds no words",),
    ),
    Case(
        "query id twice",
        set_key("queries", [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]),
        ("config.queries: id 'a' is used twice; give every query its own id",),
    ),
    Case("sha256 not hex", set_key("model.checkpoint_sha256", "abc"), ("config.model.checkpoint_sha256: 'abc'",)),
    Case("crs unknown", set_key("outputs.crs", "EPSG:999999"), ("config.outputs.crs: 'EPSG:999999' is not a known",)),
    Case("crs not a map", set_key("outputs.crs", "EPSG:4978"), ("config.outputs.crs: 'EPSG:4978' is not a map CRS",)),
    # The device the jobs would run on.
    Case("device tpu", set_key("model.device", "tpu"), ("config.model.device: unknown device 'tpu'; use auto",)),
    Case(
        "device cuda without a gpu",
        set_key("model.device", "cuda"),
        ("config.model.device: device 'cuda': CUDA is not available", "use auto or cpu"),
        when=not torch.cuda.is_available(),
    ),
    Case("device cuda:99", set_key("model.device", "cuda:99"), ("config.model.device: device 'cuda:99'", "use ")),
    Case(
        "device mps unavailable",
        set_key("model.device", "mps"),
        ("config.model.device: device 'mps'", "use auto or cpu"),
        when=not torch.backends.mps.is_available(),
    ),
    # Audio queries, decoded whole when the build starts.
    Case("audio missing", audio_query(lambda files: files.folder / "absent.wav"), ("absent.wav does not exist",)),
    Case("audio not a sound type", audio_query(lambda files: files.notes_txt), ("notes.txt is not a wav, flac",)),
    Case("audio undecodable", audio_query(lambda files: files.not_audio_wav), ("cannot read", "noise.wav", "convert")),
    Case("audio wav cut short", audio_query(lambda files: files.wav_cut), ("cut.wav is truncated", "export it again")),
    Case(
        "audio flac cut short",
        audio_query(lambda files: files.flac_cut),
        ("cut.flac is truncated", "the last cannot be read"),
    ),
    Case("audio without frames", audio_query(lambda files: files.wav_no_frames), ("silent.wav holds no samples",)),
    Case(
        "audio of silence",
        audio_query(lambda files: files.folder / "hush.flac"),
        ("query 'rain': ", "hush.flac is silent in its first 10 s", "pick a recording of the sound to map"),
    ),
    Case(
        "audio silent where the model listens",
        audio_query(lambda files: files.folder / "late.wav", text="rain on a roof"),
        ("late.wav is silent in its first 10 s", "no sample reaches -80 dBFS", "trim the silence from its start"),
    ),
    Case(
        "composed query cut short",
        audio_query(lambda files: files.wav_cut, text="rain on a roof"),
        ("query 'rain': audio file", "cut.wav is truncated"),
    ),
    # The checkpoint: there, a checkpoint, whole, and the expected one.
    Case("checkpoint missing", checkpoint(lambda files: files.folder / "absent.ckpt"), ("absent.ckpt is not a file",)),
    Case("checkpoint not one", checkpoint(lambda files: files.checkpoint_text), ("notes.ckpt is not a torch",)),
    Case("checkpoint foreign", checkpoint(lambda files: files.checkpoint_foreign), ("resnet.pth is not a Sat2Sound",)),
    Case(
        "checkpoint without its config",
        checkpoint(lambda files: files.checkpoint_without_config),
        ("small.safetensors has no config beside it (small.json); convert the .ckpt again",),
    ),
    Case(
        "checkpoint corrupt",
        checkpoint(lambda files: files.checkpoint_corrupt),
        ("corrupt.safetensors is corrupt: tensor", "NaN or infinite values; download or convert it again"),
    ),
    Case(
        "checkpoint sha256 mismatch",
        lambda config, files: config["model"].update(checkpoint=str(files.checkpoint), checkpoint_sha256="ab" * 32),
        ("config.model.checkpoint_sha256: ", "small.safetensors has sha256", "download it again"),
    ),
    Case(
        "sha256 of the untrained model",
        lambda config, files: config["model"].update(checkpoint_sha256=sha256_file(files.checkpoint)),
        ("config.model.checkpoint_sha256 is set but model.checkpoint is untrained", "remove it"),
    ),
    # The text backbone of the text queries.
    Case(
        "text backbone missing",
        set_key("model.text_backbone", lambda files: str(files.folder / "flan")),
        ("config.model.text_backbone: no T5 model directory at", "flan"),
    ),
    Case(
        "text backbone not t5",
        set_key("model.text_backbone", str(minilm_directory())),
        ("config.model.text_backbone: ", "holds a 'bert' model, not T5"),
    ),
    Case(
        "text backbone of another width",
        set_key("model.text_backbone", lambda files: str(files.t5_narrow)),
        ("config.model.text_backbone: ", "gives 32-d states but the model expects 384-d", "(auto)"),
    ),
    Case(
        "text backbone not an id",
        set_key("model.text_backbone", "google/flan/t5"),
        ("config.model.text_backbone: text backbone 'google/flan/t5' is neither a model directory nor a Hub",),
    ),
    # The imagery and where it lies.
    Case("imagery unknown", set_key("imagery.source", "ftp://x"), ("unknown imagery source 'ftp://x'; use esri",)),
    Case("raster missing", set_key("imagery.source", "/no/such.tif"), ("raster /no/such.tif does not exist",)),
    Case(
        "raster not a raster",
        set_key("imagery.source", lambda files: str(files.raster_text)),
        ("cannot open raster", "fake.tif", "check the path"),
    ),
    Case(
        "raster without crs",
        set_key("imagery.source", lambda files: str(files.raster_without_crs)),
        ("nocrs.tif has no CRS; georeference it",),
    ),
    Case(
        "raster not georeferenced",
        set_key("imagery.source", lambda files: str(files.raster_not_georeferenced)),
        ("plain.tif has no CRS; georeference it",),
    ),
    Case(
        "raster of nodata alone",
        set_key("imagery.source", lambda files: str(files.raster_blank)),
        ("imagery", "blank.tif has no valid pixel over region", "check the file and imagery.options.nodata"),
    ),
    Case("imagery option unknown", set_key("imagery.options", {"band": [1]}), ("option 'band' does not apply",)),
    Case("bands past the last", set_key("imagery.options", {"bands": [4, 3, 2]}), ("bands (4, 3, 2) do not fit",)),
    Case(
        "bands by name",
        set_key("imagery.options", {"bands": ["red", "green", "blue"]}),
        ("imagery option bands.", "is not of type 'integer'", "give three 1-based band indexes"),
    ),
    Case(
        "percentiles inverted",
        set_key("imagery.options", {"bands": [3, 2, 1], "percentiles": [98, 2]}),
        ("percentiles (98, 2) are empty or inverted", "give [low, high]"),
    ),
    Case(
        "retry attempts as text",
        lambda config, files: config.update(imagery={"source": "esri", "options": {"retry": {"attempts": "many"}}}),
        ("imagery option retry.attempts: 'many' is not of type 'integer'", "attempts a whole number from 1"),
    ),
    Case(
        "tile size 0",
        lambda config, files: config.update(
            imagery={"source": "xyz:http://127.0.0.1:9/{z}/{x}/{y}.png", "options": {"tile_size": 0}}
        ),
        ("imagery option tile_size: 0 is less than the minimum of 1", "give the server's tile width in px"),
    ),
    Case(
        "stac datetime not a date",
        lambda config, files: config.update(
            imagery={"source": "stac:http://127.0.0.1:9/v1", "options": {"datetime": "yesterday"}}
        ),
        ("datetime 'yesterday' is not a STAC date range", "give e.g. 2023-06-01/2023-08-31"),
    ),
    Case(
        "offline without a cached tile",
        lambda config, files: config.update(
            imagery={
                "source": "xyz:http://127.0.0.1:9/{z}/{x}/{y}.png",
                "offline": True,
                "cache_dir": str(files.folder / "empty_cache"),
            }
        ),
        ("imagery.offline is set but the tile cache", "empty_cache holds none of the", "unset imagery.offline"),
    ),
    Case(
        "tile cache a file",
        lambda config, files: config.update(
            imagery={"source": "xyz:http://127.0.0.1:9/{z}/{x}/{y}.png", "cache_dir": str(files.a_file)}
        ),
        ("imagery.cache_dir", "a_file is no folder; set imagery.cache_dir to a folder"),
    ),
    Case(
        "tile cache under a file",
        lambda config, files: config.update(
            imagery={"source": "xyz:http://127.0.0.1:9/{z}/{x}/{y}.png", "cache_dir": str(files.a_file / "tiles")}
        ),
        ("a_file/tiles is no folder (it lies under", "a_file, a file); set imagery.cache_dir to a folder"),
    ),
    Case(
        "offline as an option",
        set_key("imagery.options", {"bands": [3, 2, 1], "offline": True}),
        ("imagery.options.offline is an imagery key of its own; set imagery.offline",),
    ),
    Case(
        "region outside the raster",
        set_key("region", "-60,10,-59,11"),
        ("region -60,10,-59,11 lies outside the imagery", "landsat8_itaipu_30m.tif", "set imagery.source"),
    ),
    Case(
        "region at the raster's corner",
        set_key("region", "-54.664,-25.215,-54.660,-25.2075"),
        (
            "imagery.min_coverage (0.5) of its pixels",
            "landsat8_itaipu_30m.tif covers at most",
            "lower imagery.min_coverage",
        ),
    ),
    Case(
        "region past the web mercator latitudes",
        set_key("region", "89.9,10,3km"),
        ("region '89.9,10,3km' is empty after clipping", "map a region between 85.0511°S and 85.0511°N"),
    ),
    Case(
        "imagery too coarse", set_key("model.zoom_level", 1), ("m/px but a sentinel model", "set model.zoom_level: 3")
    ),
    Case("too many tiles", set_key("tiling.max_tiles", 1), ("tiling.max_tiles",)),
    # The zones of the zone statistics.
    Case(
        "zones missing",
        set_key("outputs.zones", lambda files: str(files.folder / "absent.gpkg")),
        ("config.outputs.zones:", "absent.gpkg does not exist", "set outputs.zones: null"),
    ),
    Case(
        "zones unreadable",
        set_key("outputs.zones", lambda files: str(files.zones_broken)),
        ("config.outputs.zones:", "broken.gpkg cannot be read as vector data", "give a GeoPackage"),
    ),
    Case(
        "zones a table",
        set_key("outputs.zones", lambda files: str(files.zones_table)),
        ("config.outputs.zones:", "zones.csv cannot be read as vector data (it holds no geometry column)"),
    ),
    Case(
        "zones without polygons",
        set_key("outputs.zones", lambda files: str(files.zones_points)),
        (
            "config.outputs.zones:",
            "points.geojson holds no polygons; give areas",
        ),
    ),
    Case(
        "zone field missing",
        lambda config, files: config.setdefault("outputs", {}).update(zones=str(COUNTRIES), zone_field="district"),
        ("config.outputs.zone_field: 'district' is not a column of", "name, iso_a3, continent", "zone_field: null"),
    ),
    Case(
        "zone field without zones",
        set_key("outputs.zone_field", "district"),
        ("config.outputs.zone_field names the zones' column but outputs.zones names no zone file", "drop zone_field"),
    ),
    Case(
        "zones off the region",
        set_key("outputs.zones", lambda files: str(files.zones_far)),
        ("config.outputs.zones: no zone of", "far.geojson overlaps region", "set outputs.zones: null"),
    ),
    # Where the build would write.
    Case(
        "output folder is a file",
        set_key("output_dir", lambda files: str(files.a_file)),
        ("cannot write into the output folder", "a_file", "set output_dir to a writable folder"),
    ),
    Case(
        "output folder under a file",
        set_key("output_dir", lambda files: str(files.a_file / "maps")),
        ("cannot write into the output folder", "a_file/maps/demo"),
    ),
]
CASE_IDS = [case.id for case in CASES]
# The checks `python -m pipeline plan --config` runs too, with the same line.
PLAN_CASES = [
    "query id twice",
    "zone field without zones",
    "audio missing",
    "zones missing",
    "zones off the region",
    "gallery missing",
    "gallery csv names a missing recording",
    "tile cache a file",
    "region past the web mercator latitudes",
]
# One case per place a check lives, run through Snakemake itself.
WORKFLOW_CASES = [
    "unknown key",
    "device tpu",
    "audio wav cut short",
    "checkpoint corrupt",
    "region outside the raster",
    "region at the raster's corner",
    "zones off the region",
]


def bad_config(case: Case, files: Inputs) -> dict[str, Any]:
    config = copy.deepcopy(BASE)
    case.change(config, files)
    return config


def snapshot(*folders: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for folder in folders for path in folder.rglob("*")}


def check_error_line(stderr: str, case: Case) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {stderr!r}"
    line = lines[0]
    assert line.startswith("error: ") and "; " in line and "Traceback" not in line, line
    for words in case.words:
        assert words in line, f"{words!r} not in {line!r}"


def known_defect(case: Case) -> list[pytest.MarkDecorator]:
    return [pytest.mark.xfail(strict=True, reason=case.defect)] if case.defect else []


@pytest.fixture(params=[pytest.param(case, id=case.id, marks=known_defect(case)) for case in CASES])
def case(request: pytest.FixtureRequest) -> Case:
    chosen: Case = request.param
    if not chosen.when:
        pytest.skip("this machine has what the case takes away")
    return chosen


def test_a_bad_input_stops_the_start_with_one_line_and_writes_nothing(
    case: Case, inputs: Inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    config = bad_config(case, inputs)
    before = snapshot(tmp_path, inputs.folder)
    # The workflow prints every warning to stderr (two lines each); pytest would only collect them.
    with warnings.catch_warnings(record=True) as shown, pytest.raises(SystemExit) as stopped:
        warnings.simplefilter("always")
        open_workflow(config, main_process=True)
    assert stopped.value.code == ERROR_STATUS
    assert [str(warning.message) for warning in shown] == []
    captured = capfd.readouterr()
    assert captured.out == ""
    check_error_line(captured.err, case)
    assert snapshot(tmp_path, inputs.folder) == before


def dry_run(config_path: Path, folder: Path) -> subprocess.CompletedProcess[str]:
    """A bare `snakemake --dry-run` of the workflow with `config_path`, in `folder`."""
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--configfile", str(config_path)]
    return subprocess.run(
        [*command, "--dry-run", "--cores", "1"],
        cwd=folder,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("case_id", WORKFLOW_CASES)
def test_the_workflow_stops_with_the_same_one_line(case_id: str, inputs: Inputs, tmp_path: Path) -> None:
    case = CASES[CASE_IDS.index(case_id)]
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(bad_config(case, inputs)))
    before = snapshot(tmp_path, inputs.folder)
    result = dry_run(config_path, tmp_path)
    assert result.returncode == ERROR_STATUS, result.stderr
    assert result.stdout == ""
    check_error_line(result.stderr, case)
    assert snapshot(tmp_path, inputs.folder) == before


@pytest.mark.parametrize("case_id", PLAN_CASES)
def test_the_plan_of_the_config_stops_with_the_same_one_line(
    case_id: str, inputs: Inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    case = CASES[CASE_IDS.index(case_id)]
    monkeypatch.chdir(tmp_path)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(bad_config(case, inputs)))
    before = snapshot(tmp_path, inputs.folder)
    assert main(["plan", "--config", str(config_path)]) == ERROR_STATUS
    captured = capfd.readouterr()
    assert captured.out == ""
    check_error_line(captured.err, case)
    assert snapshot(tmp_path, inputs.folder) == before


def test_a_config_file_giving_a_key_twice_stops_the_workflow_in_one_line(tmp_path: Path) -> None:
    """Snakemake's own reading keeps the last of two `queries:` blocks: the build would silently map fewer."""
    config_path = tmp_path / "config.yaml"
    second = yaml.safe_dump({"queries": [{"id": "water", "text": "ducks quacking"}]})
    first = yaml.safe_dump(BASE)
    config_path.write_text(first + second)
    result = dry_run(config_path, tmp_path)
    assert (result.returncode, result.stdout) == (ERROR_STATUS, "")
    assert result.stderr == (
        f"error: --configfile {config_path} gives 'queries' (line {first.count(chr(10)) + 1}) twice, and only the last"
        " would count; keep one\n"
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.yaml"]

"""A build's imagery: open its reader, and fetch a chunk's imagery ahead of the model.

Fetching fills the shared tile cache, so that embed jobs (on GPU nodes of a cluster) read from disk:
XYZ sources download the server tiles under the chunk's model views, STAC sources cache each view's
mosaic, and local rasters need nothing. imagery/<chunk>.json records what was done.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import NamedTuple

from common.atomic import atomic_path
from pipeline.build_plan import BuildPlan, chunk_footprints, plan_cover
from pipeline.config import ImagerySettings
from pipeline.geometry import MODEL_INPUT_PX
from pipeline.imagery import ImageryReader, StacReader, XYZReader, open_reader


class FetchReport(NamedTuple):
    source_id: str
    method: str
    views: int
    source_tiles: int
    with_imagery: int
    seconds: float


def open_imagery(settings: ImagerySettings) -> ImageryReader:
    return open_reader(
        settings.source,
        cache_dir=Path(settings.cache_dir),
        offline=settings.offline,
        **dict(settings.options),
    )


def fetch_chunk(plan: BuildPlan, chunk: str, settings: ImagerySettings, out: Path) -> FetchReport:
    start = time.perf_counter()
    views = chunk_footprints(plan, plan_cover(plan), chunk)
    with open_imagery(settings) as reader:
        if isinstance(reader, XYZReader):
            method = "server tiles into the tile cache"
            tiles = {
                tile
                for view in views
                for tile in reader.source_tiles(view.bounds, reader.zoom_for(view.bounds, MODEL_INPUT_PX))
            }
            source_tiles, with_imagery = len(tiles), reader.prefetch(sorted(tiles))
        elif isinstance(reader, StacReader):
            method = "model views into the tile cache"
            images = [reader.part(view.bounds, MODEL_INPUT_PX, MODEL_INPUT_PX) for view in views]
            source_tiles, with_imagery = len(images), sum(image.coverage > 0 for image in images)
        else:
            method = "read on demand"
            source_tiles = with_imagery = 0
        report = FetchReport(reader.source_id, method, len(views), source_tiles, with_imagery, 0.0)
    report = report._replace(seconds=round(time.perf_counter() - start, 3))
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(report._asdict(), indent=1))
    return report


def fetches_ahead(source: str) -> bool:
    """Whether `source` (an `open_reader` spec) is remote, so that its imagery is fetched before embedding."""
    source = source.strip()
    return source in ("", "esri") or source.startswith(("xyz:", "stac:"))

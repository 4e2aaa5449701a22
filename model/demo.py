"""`python -m model demo`: run the model on a real satellite scene and score its tiles against text queries.

Without a checkpoint it builds a small model from a fixed seed: untrained weights, which the output says
plainly. With `--checkpoint` (a path or hf:// URI) it uses trained weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
import torch
from pyproj import Transformer

from model.config import Sat2SoundConfig
from model.inference import Sat2SoundEncoder
from model.metadata import Metadata
from model.sat2sound import Sat2Sound

DEMO_SCENE = Path(__file__).resolve().parents[1] / "tests" / "data" / "imagery" / "rgb_5m_utm18n.tif"
DEFAULT_QUERIES = (
    "birds chirping in the trees",
    "cars driving on a busy road",
    "waves crashing on the shore",
    "people talking at a busy market",
)
UNTRAINED_SEED = 0


def read_grid(scene: Path, grid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The scene's RGB cut into grid x grid square tiles (N, 3, S, S) uint8, with tile-centre lat/lon."""
    with rasterio.open(scene) as src:
        rgb = src.read(indexes=[1, 2, 3])
        to_lonlat = Transformer.from_crs(src.crs, "EPSG:4326", always_xy=True)
        side = min(src.height, src.width) // grid
        tiles, rows, cols = [], [], []
        for row in range(grid):
            for col in range(grid):
                tiles.append(rgb[:, row * side : (row + 1) * side, col * side : (col + 1) * side])
                rows.append((row + 0.5) * side)
                cols.append((col + 0.5) * side)
        xs, ys = rasterio.transform.xy(src.transform, rows, cols)
        lon, lat = to_lonlat.transform(np.asarray(xs), np.asarray(ys))
    return np.stack(tiles).astype(np.uint8), np.asarray(lat), np.asarray(lon)


def run_demo(checkpoint: str | None, scene: Path, queries: tuple[str, ...], grid: int) -> None:
    if checkpoint:
        encoder = Sat2SoundEncoder.from_checkpoint(checkpoint)
        print(f"model: {checkpoint}")
    else:
        torch.manual_seed(UNTRAINED_SEED)
        encoder = Sat2SoundEncoder(Sat2Sound(Sat2SoundConfig.small("none")), text_backbone="minilm")
        print(f"model: UNTRAINED small Sat2Sound (seed {UNTRAINED_SEED}) - scores are not soundscape predictions;")
        print("       pass --checkpoint hf://MVRL/sat2sound/sat2sound/bingmap_nometa.ckpt for trained weights")
    tiles, lat, lon = read_grid(scene, grid)
    meta = Metadata.from_values(lat, lon) if encoder.cfg.metadata else None
    images = encoder.embed_images(tiles, zoom_level=1, metadata=meta)
    texts = encoder.embed_texts(list(queries))
    scores = (images.embedding @ texts.embedding.T).numpy()
    print(f"scene: {scene.name}, {len(tiles)} tiles of {tiles.shape[-1]} px")
    print("cosine similarity of each tile with each query:")
    print(f"{'tile':>4} {'lat':>8} {'lon':>9} " + "".join(f"{f'q{i}':>8}" for i in range(len(queries))) + "  best")
    for i, row in enumerate(scores):
        cells = "".join(f"{value:+8.3f}" for value in row)
        print(f"{i:>4} {lat[i]:8.4f} {lon[i]:9.4f} {cells}  q{int(row.argmax())}")
    for i, query in enumerate(queries):
        print(f"  q{i}: {query}")

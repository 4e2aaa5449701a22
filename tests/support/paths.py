"""Where the repository and its bundled data are, for tests at any depth."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LANDSAT = REPO / "examples" / "landsat8_itaipu_30m.tif"

"""Where the repository and its bundled data are, for tests at any depth."""

from pathlib import Path
from typing import Any

import yaml

from pipeline.config import DEFAULT_CONFIG_PATH

REPO = Path(__file__).resolve().parents[2]
LANDSAT = REPO / "examples" / "landsat8_itaipu_30m.tif"


def default_config_from_anywhere() -> dict[str, Any]:
    """The default config with its repository-relative paths (relative to where `bash run.sh build` runs) made
    absolute, for builds run from another folder."""
    config: dict[str, Any] = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    config["model"]["checkpoint"] = str(REPO / config["model"]["checkpoint"])
    for query in config["queries"]:
        if "audio" in query:
            query["audio"] = str(REPO / query["audio"])
    for key in ("zones", "gallery"):
        config["outputs"][key] = str(REPO / config["outputs"][key])
    return config

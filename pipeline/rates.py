"""Measured build rates (benchmarks/rates.json): what `python -m pipeline plan` times a build by.

The file is `{"format": RATES_FORMAT, "rates": [...]}`, one entry per device kind and model size with the keys of
`Rate` (`start_s` optional); `benchmarks/bench_build.py --write-rates` updates it. Other keys (notes,
model-only figures) are kept as they are.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from pipeline.errors import BuildConfigError

RATES_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "rates.json"
RATES_FORMAT = "sat2sound-maps/rates-v1"
RATE_KEYS = ("device", "model", "tiles_per_s", "measure", "cores", "hardware", "source", "date")


class Rate(NamedTuple):
    """One measured build rate: tiles/s on a device kind ("cpu" or "gpu") with a model size
    (`Sat2SoundConfig.size`: "small", the demo and untrained models, or "full", the reference's); `measure`
    is "end-to-end" (a whole build) or "model-only"."""

    device: str
    model: str
    tiles_per_s: float
    measure: str
    cores: int | None
    hardware: str
    source: str
    date: str
    # Seconds a build spends whatever its size (process starts, model load, store, exports); None: not measured.
    start_s: float | None = None

    def seconds(self, tiles: int, speed_up: float = 1.0) -> float:
        return (self.start_s or 0.0) + tiles / (self.tiles_per_s * speed_up)


def read_rates(path: Path = RATES_PATH) -> list[Rate]:
    """The rates of benchmarks/rates.json (schema: `{"format": RATES_FORMAT, "rates": [{RATE_KEYS...}]}`)."""
    try:
        data = json.loads(path.read_text())
        if data.get("format") != RATES_FORMAT:
            raise ValueError(f"not a {RATES_FORMAT} file")
        return [Rate(**{key: entry[key] for key in RATE_KEYS}, start_s=entry.get("start_s")) for entry in data["rates"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BuildConfigError(f"cannot read the rates file {path} ({exc}); rerun benchmarks/bench_build.py") from None


def update_rates(path: Path, rate: Rate, **extra: Any) -> None:
    """Write `rate` into the rates file, replacing the entry of the same device and model (others kept)."""
    rates = read_rates(path) if path.is_file() else []
    entries = [r._asdict() for r in rates if (r.device, r.model) != (rate.device, rate.model)]
    if path.is_file():  # keep what the loader does not read (notes, model-only figures) on the other entries
        kept = {(e["device"], e["model"]): e for e in json.loads(path.read_text())["rates"]}
        entries = [kept[(e["device"], e["model"])] for e in entries]
    entries.append({**rate._asdict(), **extra})
    entries.sort(key=lambda e: (e["device"], e["model"]))
    path.write_text(json.dumps({"format": RATES_FORMAT, "rates": entries}, indent=1) + "\n")


def pick_rate(rates: Sequence[Rate], device: str, model: str) -> Rate | None:
    """The rate of `device` and `model`, else (GPU only) the device's full-model rate, else None."""
    for wanted in (model, "full") if device == "gpu" else (model,):
        for rate in rates:
            if (rate.device, rate.model) == (device, wanted):
                return rate
    return None

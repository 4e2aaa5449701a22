"""How well a built map's land-cover queries find their land cover on the scene held out from training.

    python -m pipeline.demo_quality BUILD water=water birds=tree town=developed farm=crop

For each tile of a build over the held-out scene (the default build), the shares of the four land-cover classes
in the tile's model view are computed with the very rules the demo data set is labelled by (`pipeline.landcover`,
cut exactly like the view's imagery). For each class, the tiles richest in it are its positives (a share in the
region's top quartile, and at least `MIN_POSITIVE_SHARE`) and the tiles poorest in it its negatives (a share at
most the region's median); tiles in between are left out, so that a class spread thinly everywhere is judged by
where it is plentiful against where it is scarce. Each query's raw score is then read as a classifier of each
class: the ROC AUC (the chance that a random positive tile outscores a random negative one, ties counting half).
A query separates its class when its AUC is at least `GOOD_AUC` and higher than that of every query meant
for another class.

On a scene around a reservoir, the tiles poorest in a land class are mostly the ones that hold water, so a land
class's AUC also measures land against water. Beside it the report gives, over the tiles with less than
`LAND_AT_MOST_WATER` water, each query's Spearman rank correlation with each land class's share: whether it tells
town from farmland from forest where there is no water to tell.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy.stats import ConstantInputWarning, rankdata, spearmanr

from common.cli import OneLineParser
from pipeline.build import STORE_NAME
from pipeline.demo_data import default_settings, land_cover, open_scene
from pipeline.errors import PipelineError
from pipeline.geometry import views_centred_at
from pipeline.landcover import CLASSES, WATER
from pipeline.plan import ModelView
from pipeline.store.read import SoundscapeStore, open_store

MIN_POSITIVE_SHARE = 0.1
POSITIVE_QUANTILE = 0.75
NEGATIVE_QUANTILE = 0.5
GOOD_AUC = 0.85
LAND_AT_MOST_WATER = 0.1
# Every row or every column of the store.
WHOLE = slice(None)


class QualityReport(NamedTuple):
    """AUC of every (query, class), the tiles' positive counts per class, and the query each class is checked on."""

    queries: tuple[str, ...]
    auc: np.ndarray  # (queries, CLASSES)
    positives: np.ndarray  # (CLASSES,)
    negatives: np.ndarray  # (CLASSES,)
    tiles: int
    expected: Mapping[str, str]  # query id -> class
    land_rho: np.ndarray  # (queries, CLASSES) Spearman over the land tiles; NaN for water
    land_tiles: int

    def auc_of(self, query: str) -> float:
        """The query's AUC for the class it is meant for."""
        return float(self.auc[self.queries.index(query), CLASSES.index(self.expected[query])])

    def outscores_other_classes(self, query: str) -> bool:
        """Its class's AUC above that of every query not meant for that class."""
        meant = self.expected[query]
        column = CLASSES.index(meant)
        others = [
            self.auc[index, column] for index, other in enumerate(self.queries) if self.expected.get(other) != meant
        ]
        return all(self.auc_of(query) > auc for auc in others)

    def separates(self, query: str) -> bool:
        """AUC at least GOOD_AUC for its class, above every query not meant for that class."""
        return self.auc_of(query) >= GOOD_AUC and self.outscores_other_classes(query)

    def table(self) -> str:
        header = f"{'query':>12} " + " ".join(f"{name:>10}" for name in CLASSES)
        lines = [header]
        for row, query in enumerate(self.queries):
            cells = []
            for column, name in enumerate(CLASSES):
                mark = "*" if self.expected.get(query) == name else " "
                cells.append(f"{self.auc[row, column]:>9.3f}{mark}")
            lines.append(f"{query:>12} " + " ".join(cells))
        for name, counts in (("positives", self.positives), ("negatives", self.negatives)):
            lines.append(f"{name:>12} " + " ".join(f"{int(count):>10}" for count in counts))
        lines.append(f"{self.tiles} tiles; * marks the query meant for the class")
        under = f"{self.land_tiles} tiles under {LAND_AT_MOST_WATER:.0%} water"
        lines.append(f"Spearman with each class's share over the {under}:")
        for row, query in enumerate(self.queries):
            cells = [f"{'':>10}" if np.isnan(rho) else f"{rho:>+10.2f}" for rho in self.land_rho[row]]
            lines.append(f"{query:>12} " + " ".join(cells))
        return "\n".join(lines)


def class_sides(shares: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, CLASSES) boolean positives and negatives of each class, from the tiles' (N, CLASSES) shares."""
    rich = np.maximum(np.quantile(shares, POSITIVE_QUANTILE, axis=0), MIN_POSITIVE_SHARE)
    return shares >= rich, shares <= np.quantile(shares, NEGATIVE_QUANTILE, axis=0)


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney AUC of `scores` separating `positive` from the rest, ties counting half; NaN when a side is
    empty."""
    positive = np.asarray(positive, bool)
    count_pos, count_neg = int(positive.sum()), int((~positive).sum())
    if count_pos == 0 or count_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - count_pos * (count_pos + 1) / 2) / (count_pos * count_neg))


def land_correlations(scores: np.ndarray, shares: np.ndarray) -> tuple[np.ndarray, int]:
    """(queries, CLASSES) Spearman correlations of (queries, N) scores with the (N, CLASSES) shares over the tiles
    under LAND_AT_MOST_WATER water (NaN for water, where fewer than three such tiles, and where either side is
    constant), and their count."""
    land = shares[:, WATER] < LAND_AT_MOST_WATER
    rho = np.full((len(scores), len(CLASSES)), np.nan)
    if land.sum() >= 3:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConstantInputWarning)
            for column in range(len(CLASSES)):
                if column != WATER:
                    rho[:, column] = [spearmanr(row[land], shares[land, column]).statistic for row in scores]
    return rho, int(land.sum())


def tile_class_shares(store: SoundscapeStore) -> tuple[np.ndarray, np.ndarray]:
    """(valid tiles' flat indexes, their (N, CLASSES) land-cover shares) for a store over the held-out scene."""
    valid = store.valid(WHOLE, WHOLE).reshape(-1)
    x, y = np.meshgrid(*store.tile_centres())
    attrs = store.attrs
    view = ModelView.of(str(attrs["sat_type"]), int(attrs["zoom_level"]))
    indexes = np.flatnonzero(valid)
    views = views_centred_at(x.reshape(-1)[indexes], y.reshape(-1)[indexes], view.size_m)
    settings = default_settings()
    with ExitStack() as stack:
        scene = open_scene(settings.test_scene, settings, stack)
        _, shares = land_cover(scene, views)
    return indexes, shares


def map_quality(build: Path, expected: Mapping[str, str]) -> QualityReport:
    unknown = sorted(set(expected.values()) - set(CLASSES))
    if unknown:
        raise PipelineError(f"unknown land cover {unknown[0]!r}; use one of {', '.join(CLASSES)}")
    store = open_store(build / STORE_NAME)
    ids = tuple(query.id for query in store.queries)
    missing = sorted(set(expected) - set(ids))
    if missing:
        raise PipelineError(f"the build has no query {missing[0]!r}; its queries are {', '.join(ids)}")
    indexes, shares = tile_class_shares(store)
    positive, negative = class_sides(shares)
    scores = np.stack([store.scores("score", query, WHOLE, WHOLE).reshape(-1)[indexes] for query in range(len(ids))])
    judged = positive | negative
    auc = np.array(
        [[roc_auc(row[judged[:, c]], positive[judged[:, c], c]) for c in range(len(CLASSES))] for row in scores]
    )
    rho, land_tiles = land_correlations(scores, shares)
    return QualityReport(
        ids, auc, positive.sum(axis=0), negative.sum(axis=0), len(indexes), dict(expected), rho, land_tiles
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m pipeline.demo_quality", description=__doc__.splitlines()[0])
    parser.add_argument("build", type=Path, help="a build folder over the held-out scene (the default build)")
    parser.add_argument("pairs", nargs="+", help="QUERY=CLASS, the land cover each query is meant to find")
    args = parser.parse_args(argv)
    malformed = [pair for pair in args.pairs if pair.count("=") != 1]
    if malformed:
        print(f"error: {malformed[0]!r} is not QUERY=CLASS; write e.g. water=water birds=tree", file=sys.stderr)
        return 2
    expected = dict(pair.split("=") for pair in args.pairs)
    try:
        report = map_quality(args.build, expected)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.table())
    failing = [query for query in expected if not report.separates(query)]
    print("every query separates its land cover" if not failing else f"not separated: {', '.join(failing)}")
    return 0 if not failing else 1


if __name__ == "__main__":
    sys.exit(main())

"""The demo model's quality measure: ROC AUC with ties, the classes' positive and negative tiles, the verdict."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.demo_quality import (
    GOOD_AUC,
    LAND_AT_MOST_WATER,
    QualityReport,
    class_sides,
    land_correlations,
    main,
    roc_auc,
)
from pipeline.landcover import CLASSES, CROP, DEVELOPED, TREE, WATER


def test_auc_counts_pairs_ties_half() -> None:
    assert roc_auc(np.array([1.0, 2.0, 3.0, 4.0]), np.array([False, False, True, True])) == 1.0
    assert roc_auc(np.array([4.0, 3.0, 2.0, 1.0]), np.array([False, False, True, True])) == 0.0
    assert roc_auc(np.array([1.0, 1.0]), np.array([True, False])) == 0.5
    # positives 2, 3 against negatives 1, 3: pairs (2>1) (2<3) (3>1) (3=3) -> 2.5 of 4
    assert roc_auc(np.array([2.0, 3.0, 1.0, 3.0]), np.array([True, True, False, False])) == 2.5 / 4
    assert np.isnan(roc_auc(np.array([1.0, 2.0]), np.array([True, True])))


def test_positives_are_the_richest_quarter_negatives_the_poorer_half() -> None:
    shares = np.zeros((8, len(CLASSES)))
    shares[:, 0] = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    shares[:, 1] = 0.01 * np.arange(8)  # never 10 %: no positives
    positive, negative = class_sides(shares)
    assert positive[:, 0].tolist() == [False] * 6 + [True, True]
    assert negative[:, 0].tolist() == [True] * 4 + [False] * 4
    assert not positive[:, 1].any()


def report(auc_water: list[float]) -> QualityReport:
    auc = np.full((len(auc_water), len(CLASSES)), 0.5)
    auc[:, 0] = auc_water
    ids = tuple(f"q{index}" for index in range(len(auc_water)))
    counts = np.ones(len(CLASSES))
    return QualityReport(ids, auc, counts, counts, 10, {"q0": "water"}, np.zeros_like(auc), 5)


@pytest.mark.parametrize(
    ("auc_water", "outscores", "separates"),
    [
        ([0.9, 0.6], True, True),
        ([GOOD_AUC - 0.01, 0.5], True, False),
        ([0.9, 0.95], False, False),
        ([0.9, 0.9], False, False),
    ],
)
def test_a_query_separates_its_class_well_and_best(auc_water: list[float], outscores: bool, separates: bool) -> None:
    quality = report(auc_water)
    assert quality.auc_of("q0") == auc_water[0]
    assert quality.outscores_other_classes("q0") is outscores and quality.separates("q0") is separates


def test_queries_meant_for_the_same_class_do_not_compete() -> None:
    both = report([0.9, 0.95])
    both = both._replace(expected={"q0": "water", "q1": "water"})
    assert both.separates("q0") and both.separates("q1")


def test_land_correlations_rank_land_tiles_only() -> None:
    shares = np.zeros((8, len(CLASSES)))
    shares[:5, DEVELOPED] = [0.0, 0.1, 0.2, 0.3, 0.4]
    shares[:5, CROP] = 1.0 - shares[:5, DEVELOPED]
    shares[5:, WATER] = LAND_AT_MOST_WATER  # not land: left out, though they would break both orders
    shares[5:, CROP] = 1.0 - LAND_AT_MOST_WATER
    town = np.array([1.0, 2.0, 3.0, 4.0, 5.0, -9.0, 9.0, 0.0])
    rho, land = land_correlations(np.stack([town, -town]), shares)
    assert land == 5
    np.testing.assert_allclose(rho[:, [DEVELOPED, CROP]], [[1.0, -1.0], [-1.0, 1.0]])
    assert np.isnan(rho[:, WATER]).all() and np.isnan(rho[:, TREE]).all()  # no water column; tree is constant
    assert np.isnan(land_correlations(np.stack([town[5:]]), shares[5:])[0]).all()


def test_bad_arguments_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path), "water=sky"]) == 2
    assert "unknown land cover 'sky'" in capsys.readouterr().err
    assert main([str(tmp_path), "water"]) == 2
    assert "'water' is not QUERY=CLASS" in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere"), "water=water"]) == 2
    assert "no Zarr store" in capsys.readouterr().err

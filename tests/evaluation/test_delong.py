"""DeLong's test against R's pROC on the aSAH data, and its extension to folds.

Reference values: the expectations of R's pROC package in its own test suite (Robin et al. 2011,
BMC Bioinformatics 12:77; github.com/xrobin/pROC, ``tests/testthat/test-roc.test.R`` and
``tests/testthat/test-var.R``) for ``r.<marker> <- roc(aSAH$outcome, aSAH$<marker>)`` with
``<marker>`` in wfns, s100b, ndka, and ``roc.test(r.first, r.second)`` (DeLong, paired, two-sided).
The aSAH markers enter as rank-equivalent scores (see ``tests/fixtures/asah_rank_scores.json``);
the AUROCs below are pROC's own too (``theta`` of its placement test data).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fedfreeze.errors import DataError
from fedfreeze.evaluation.delong import (
    DELONG_FOLDS_NAME,
    DELONG_NAME,
    FoldScores,
    delong_test,
    delong_test_over_folds,
    delong_variance,
    placements,
)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "asah_rank_scores.json"

# pROC (xrobin/pROC tests): roc.test(first, second) -> Z, p, 95% CI of AUC(first) - AUC(second)
PROC_TESTS = [
    ("wfns", "s100b", 2.20898359144091, 0.0271757822291882, 0.0104061769564846, 0.174214419249478),
    ("wfns", "ndka", 2.79777591868904, 0.00514557970691098, 0.0634011709339876, 0.3600405634833566),
    ("ndka", "s100b", -1.39077002573558, 0.164295175223054, -0.2876917446341914, 0.0488706064228094),
]
# pROC: auc(r.<marker>) (theta of its placements) and var(r.<marker>) with method = "delong"
PROC_AUC = {"wfns": 0.823678861788618, "s100b": 0.731368563685637, "ndka": 0.611957994579946}
PROC_VAR = {"wfns": 0.00146991470882363, "s100b": 0.00266868245717244, "ndka": 0.0031908105493913}


@pytest.fixture(scope="module")
def asah() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    data = json.loads(FIXTURE.read_text())
    n_cases, n_controls = len(data["wfns"]["cases"]), len(data["wfns"]["controls"])
    assert (n_cases, n_controls) == (41, 72)  # aSAH: 41 poor outcomes, 72 good
    labels = np.array([1] * n_cases + [0] * n_controls)
    markers = {m: np.array(data[m]["cases"] + data[m]["controls"], dtype=float) for m in ("wfns", "s100b", "ndka")}
    return labels, markers


@pytest.mark.parametrize("marker", ["wfns", "s100b", "ndka"])
def test_auc_and_variance_match_proc(asah, marker):
    labels, markers = asah
    auc, var = delong_variance(labels, markers[marker])
    assert auc == pytest.approx(PROC_AUC[marker], abs=1e-12)
    assert var == pytest.approx(PROC_VAR[marker], rel=1e-9)


@pytest.mark.parametrize("first,second,z,p,low,high", PROC_TESTS)
def test_roc_test_matches_proc(asah, first, second, z, p, low, high):
    labels, markers = asah
    result = delong_test(labels, markers[first], markers[second])
    assert result.z == pytest.approx(z, rel=1e-9)
    assert result.p_value == pytest.approx(p, rel=1e-9)
    assert (result.ci_low, result.ci_high) == (pytest.approx(low, rel=1e-9), pytest.approx(high, rel=1e-9))
    assert result.difference == pytest.approx(PROC_AUC[first] - PROC_AUC[second], abs=1e-12)
    assert result.test == DELONG_NAME
    # swapping the arms flips the sign and keeps p (pROC's "reversed" test)
    swapped = delong_test(labels, markers[second], markers[first])
    assert swapped.z == pytest.approx(-z, rel=1e-9) and swapped.p_value == pytest.approx(p, rel=1e-9)


def test_placements_match_the_pairwise_definition(rng):
    labels = rng.integers(0, 2, 60)
    labels[:2] = [0, 1]
    scores = np.round(rng.normal(size=60), 1)  # plenty of ties
    p = placements(labels, scores)
    pos, neg = scores[labels == 1], scores[labels == 0]
    kernel = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    np.testing.assert_allclose(p.v10, kernel.mean(1))
    np.testing.assert_allclose(p.v01, kernel.mean(0))
    assert p.auc == pytest.approx(roc_auc_score(labels, scores))


def test_identical_scores_give_no_evidence(asah):
    labels, markers = asah
    result = delong_test(labels, markers["wfns"], markers["wfns"])
    assert (result.z, result.p_value, result.difference) == (0.0, 1.0, 0.0)


def test_one_fold_is_the_classic_test(asah):
    labels, markers = asah
    ids = [f"p{i}" for i in range(len(labels))]
    folded = delong_test_over_folds([FoldScores(labels, markers["wfns"], markers["s100b"], ids)])
    assert folded.z == pytest.approx(PROC_TESTS[0][2], rel=1e-9)
    assert folded.test == DELONG_NAME


def test_disjoint_folds_add_their_delong_variances(rng):
    folds, variances, diffs = [], [], []
    for k in range(3):
        y = np.r_[np.ones(20, int), np.zeros(25, int)]
        a = y * 1.0 + rng.normal(size=45)
        b = y * 0.6 + rng.normal(size=45)
        folds.append(FoldScores(y, a, b, [f"f{k}-{i}" for i in range(45)]))
        single = delong_test(y, a, b)
        variances.append(single.se**2)
        diffs.append(single.difference)
    combined = delong_test_over_folds(folds)
    assert combined.difference == pytest.approx(np.mean(diffs))
    assert combined.se**2 == pytest.approx(sum(variances) / 9)  # Var(mean of 3 independent) = sum / 3^2
    assert combined.test == DELONG_FOLDS_NAME


def test_a_patient_tested_in_two_repeats_counts_once(rng):
    """The same cases tested twice with the same scores: the mean over folds equals one fold, and so
    must the variance (the terms are summed per patient, not treated as new patients)."""
    y = np.r_[np.ones(30, int), np.zeros(30, int)]
    a, b = y + rng.normal(size=60), 0.5 * y + rng.normal(size=60)
    ids = [f"p{i}" for i in range(60)]
    once = delong_test_over_folds([FoldScores(y, a, b, ids)])
    twice = delong_test_over_folds([FoldScores(y, a, b, ids), FoldScores(y, a, b, ids)])
    assert twice.se == pytest.approx(once.se)
    as_if_new = delong_test_over_folds([FoldScores(y, a, b, ids), FoldScores(y, a, b, [f"q{i}" for i in range(60)])])
    assert as_if_new.se == pytest.approx(once.se / np.sqrt(2))  # what ignoring the pairing would wrongly claim


def test_bad_input_is_named():
    with pytest.raises(DataError, match="at least 2 positives and 2 negatives"):
        delong_test([1, 0, 0], [0.2, 0.1, 0.3], [0.1, 0.2, 0.3])
    with pytest.raises(DataError, match="labels should be 0 or 1"):
        placements([0, 1, 2, 1, 0], [0.1, 0.2, 0.3, 0.4, 0.5])
    with pytest.raises(DataError, match="same length"):
        placements([0, 1, 0, 1], [0.1, 0.2])

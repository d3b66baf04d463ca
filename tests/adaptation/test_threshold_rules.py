"""Threshold rules for a site's operating point: the binormal rule is unbiased at small n on binormal
scores, steadier than Youden's pick, and each rule refuses what it cannot do."""

from __future__ import annotations

import numpy as np
import pytest

from fedfreeze.adaptation.threshold_rules import (
    binormal_balanced_accuracy,
    binormal_sensitivity_bound_threshold,
    binormal_threshold,
    choose_threshold,
    empirical_threshold,
    sigmoid,
)
from fedfreeze.errors import DataError

MU0, SD0, MU1, SD1 = -1.0, 1.0, 2.0, 1.5  # logit scores of negatives and positives


def true_threshold() -> float:
    grid = np.linspace(MU0, MU1, 200_001)
    return float(grid[np.argmax(binormal_balanced_accuracy(grid, MU0, SD0, MU1, SD1))])


def draws(n: int, count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(n, bool), np.ones(n, bool)]
    for _ in range(count):
        yield np.r_[rng.normal(MU0, SD0, n), rng.normal(MU1, SD1, n)], y


@pytest.mark.parametrize("n", [10, 20, 40])
def test_binormal_threshold_is_unbiased_on_binormal_scores(n: int) -> None:
    target = true_threshold()
    picks = np.array([binormal_threshold(z, y, np.ones_like(z)) for z, y in draws(n, 2000)])
    se = picks.std() / np.sqrt(len(picks))
    assert abs(picks.mean() - target) < 4 * se + 0.01  # unbiased to within sampling error
    youden = np.array([empirical_threshold(z, y, np.ones_like(z), "youden", 0.9) for z, y in draws(n, 2000)])
    assert picks.std() < youden.std()  # and steadier than the empirical Youden pick
    # what a site cares about: balanced accuracy at the pick, on the true distributions
    assert binormal_balanced_accuracy(picks, MU0, SD0, MU1, SD1).mean() > (
        binormal_balanced_accuracy(youden, MU0, SD0, MU1, SD1).mean()
    )


def test_equal_spreads_give_the_midpoint_and_weights_count() -> None:
    z = np.array([-2.0, 0.0, 2.0, 4.0])
    y = np.array([False, False, True, True])
    assert binormal_threshold(z, y, np.ones(4)) == pytest.approx(1.0)
    # weight 0 drops a case: the negatives' mean moves to 0.0 only if their spread stays defined
    z2 = np.array([-2.0, 0.0, 1.0, 2.0, 4.0])
    y2 = np.array([False, False, False, True, True])
    with_all = binormal_threshold(z2, y2, np.ones(5))
    without_one = binormal_threshold(z2, y2, np.array([1.0, 1.0, 0.0, 1.0, 1.0]))
    assert without_one == pytest.approx(binormal_threshold(z, y, np.ones(4)))
    assert with_all != pytest.approx(without_one)


def test_choose_threshold_works_on_the_probability_scale() -> None:
    z = np.array([-2.0, 0.0, 2.0, 4.0])
    y = np.array([0, 0, 1, 1])
    assert choose_threshold(sigmoid(z), y, "binormal") == pytest.approx(float(sigmoid(1.0)))


def test_a_lower_confidence_bound_costs_threshold_at_small_n() -> None:
    rng = np.random.default_rng(1)
    z = np.r_[rng.normal(MU0, SD0, 200), rng.normal(MU1, SD1, 200)]
    y = np.r_[np.zeros(200, bool), np.ones(200, bool)]
    few = np.r_[np.ones(200), np.zeros(190), np.ones(10)]  # only 10 positives count
    many = np.ones(400)
    point = MU1 - 1.2815515655446004 * SD1  # where the true sensitivity is 0.9
    bound_many = binormal_sensitivity_bound_threshold(z, y, many, 0.9)
    bound_few = binormal_sensitivity_bound_threshold(z, y, few, 0.9)
    assert bound_few < bound_many < point + 0.3  # fewer positives: a lower, safer threshold
    # on the true distribution the bound's threshold keeps at least the target sensitivity (in most draws)
    kept = []
    for seed in range(200):
        r = np.random.default_rng(seed)
        zz = np.r_[r.normal(MU0, SD0, 20), r.normal(MU1, SD1, 20)]
        yy = np.r_[np.zeros(20, bool), np.ones(20, bool)]
        t = binormal_sensitivity_bound_threshold(zz, yy, np.ones(40), 0.9)
        kept.append(1 - 0.5 * (1 + np.vectorize(__import__("math").erf)((t - MU1) / (SD1 * np.sqrt(2)))) >= 0.9)
    assert np.mean(kept) >= 0.9


def test_rules_refuse_what_they_cannot_do() -> None:
    y = np.array([0, 0, 1, 1])
    with pytest.raises(DataError, match="rank the classes the wrong way round"):
        choose_threshold(np.array([0.9, 0.8, 0.2, 0.1]), y, "binormal")
    with pytest.raises(DataError, match="positive cases' scores to vary"):
        choose_threshold(np.array([0.1, 0.2, 0.7, 0.7]), y, "binormal")
    with pytest.raises(DataError, match="both classes"):
        choose_threshold(np.array([0.1, 0.2]), np.array([0, 0]), "youden")
    with pytest.raises(DataError, match=r"target sensitivity should be in \(0, 1\)"):
        choose_threshold(np.array([0.1, 0.2, 0.6, 0.7]), y, "target-sensitivity-lcb", target_sensitivity=1.0)

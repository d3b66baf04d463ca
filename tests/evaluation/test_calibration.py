"""Calibration maths against scikit-learn and a direct per-bin loop."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss

from fedfreeze.errors import DataError
from fedfreeze.evaluation.calibration import (
    brier_score,
    expected_calibration_error,
    reliability_table,
    weighted_brier,
    weighted_ece,
)

# scores sitting exactly on bin edges, and the two ends of [0, 1]
EDGE_SCORES = np.array([0.0, 0.1, 0.3, 0.7, 0.9, 1.0, 0.2999999, 0.6])


def _cases(rng: np.random.Generator, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, 2, n)
    scores = np.clip(0.35 * labels + 0.65 * rng.random(n), 0.0, 1.0)  # informative but miscalibrated
    scores = np.concatenate([scores, EDGE_SCORES])
    labels = np.concatenate([labels, [0, 1, 0, 1, 1, 1, 0, 0]])
    return labels, scores


def _loop_table(labels: np.ndarray, scores: np.ndarray, bins: int) -> list[tuple[int, float | None, float | None]]:
    """Bin k holds k/bins <= s < (k+1)/bins; 1.0 goes to the last bin."""
    rows = []
    for k in range(bins):
        lo, hi = k / bins, (k + 1) / bins
        members = [i for i, s in enumerate(scores) if lo <= s < hi or (k == bins - 1 and s == 1.0)]
        if members:
            rows.append(
                (
                    len(members),
                    sum(scores[i] for i in members) / len(members),
                    sum(labels[i] for i in members) / len(members),
                )
            )
        else:
            rows.append((0, None, None))
    return rows


def test_brier_equals_sklearn(rng):
    labels, scores = _cases(rng)
    assert brier_score(labels, scores) == pytest.approx(brier_score_loss(labels, scores), abs=1e-12)


@pytest.mark.parametrize("bins", [10, 7])
def test_reliability_table_and_ece_equal_a_direct_loop(rng, bins):
    labels, scores = _cases(rng)
    expected = _loop_table(labels, scores, bins)
    table = reliability_table(labels, scores, bins)
    assert len(table) == bins
    assert sum(row["count"] for row in table) == len(scores)
    for row, (count, mean_score, frequency) in zip(table, expected, strict=False):
        assert row["count"] == count
        if count:
            assert row["mean_score"] == pytest.approx(mean_score, abs=1e-12)
            assert row["observed_frequency"] == pytest.approx(frequency, abs=1e-12)
        else:
            assert row["mean_score"] is None and row["observed_frequency"] is None
    ece = sum(count / len(scores) * abs(mean_score - frequency) for count, mean_score, frequency in expected if count)
    assert expected_calibration_error(labels, scores, bins) == pytest.approx(ece, abs=1e-12)


def test_edges_fall_in_the_upper_bin():
    table = reliability_table(np.array([0, 1, 1, 0]), np.array([0.3, 0.7, 1.0, 0.0]))
    counts = [row["count"] for row in table]
    assert counts == [1, 0, 0, 1, 0, 0, 0, 1, 0, 1]


def test_a_perfectly_calibrated_bin_has_no_error():
    # every case scored 0.25 and one in four positive: calibrated; scored 0.75: off by 0.5
    labels = np.array([1, 1, 0, 0, 0, 0, 0, 0])
    assert expected_calibration_error(labels, np.full(8, 0.25)) == pytest.approx(0.0, abs=1e-15)
    assert expected_calibration_error(labels, np.full(8, 0.75)) == pytest.approx(0.5)


def test_weights_equal_repeating_cases(rng):
    labels, scores = _cases(rng, 60)
    counts = rng.integers(0, 4, (3, len(scores)))
    counts[:, 0] = 1  # no replicate is empty
    for row, weights in enumerate(counts):
        repeated_l, repeated_s = np.repeat(labels, weights), np.repeat(scores, weights)
        assert weighted_brier(labels, scores, counts)[row] == pytest.approx(brier_score_loss(repeated_l, repeated_s))
        assert weighted_ece(labels, scores, counts)[row] == pytest.approx(
            expected_calibration_error(repeated_l, repeated_s)
        )


@pytest.mark.parametrize(
    ("labels", "scores", "match"),
    [
        ([0, 1], [0.2, 1.5], r"scores in \[0, 1\], got 1.5"),
        ([0, 1], [0.2, float("nan")], r"scores in \[0, 1\]"),
        ([0, 2], [0.2, 0.4], r"binary labels 0/1, got \[0, 2\]"),
        ([0, 1, 1], [0.2, 0.4], "one label per score"),
        ([], [], "labelled cases, got none"),
    ],
)
def test_bad_input_is_rejected(labels, scores, match):
    with pytest.raises(DataError, match=match):
        brier_score(np.array(labels), np.array(scores, dtype=float))


def test_bins_must_be_positive():
    with pytest.raises(DataError, match="bins should be at least 1, got 0"):
        reliability_table(np.array([0, 1]), np.array([0.1, 0.9]), bins=0)

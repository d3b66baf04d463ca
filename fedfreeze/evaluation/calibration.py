"""Calibration of binary scores: do the model's probabilities mean what they say at a new hospital?

A threshold is only portable if the scores are: a model that ranks well (AUROC) can still say "0.9"
for cases that are positive half the time. Three views, all plain NumPy:

- Brier score: mean squared difference between score and label (0 is perfect; always predicting
  the prevalence p scores p(1-p)).
- Reliability table: the scores cut into ``bins`` equal-width bins on [0, 1] (bin k holds
  ``k/bins <= s < (k+1)/bins``, the last bin also holds 1.0); per bin, the count, the mean score
  and the observed share of positives.
- Expected calibration error (ECE): ``sum_k (n_k / n) * |mean score_k - observed frequency_k|`` over
  those bins (Naeini et al. 2015; Guo et al. 2017), empty bins contributing nothing.

The ``weighted_*`` forms take a ``[B, N]`` matrix of case weights (bootstrap replicates: how many
times each case was drawn) and return one value per row, so the bootstrap and the point estimate
(one row of ones) share the same code.
"""

from __future__ import annotations

import numpy as np

from fedfreeze.errors import DataError

ECE_BINS = 10
ECE_DEFINITION = (
    "expected calibration error: 10 equal-width score bins on [0, 1]; "
    "sum over bins of (bin share of cases) x |mean score - observed positive frequency|"
)


def bin_edges(bins: int = ECE_BINS) -> np.ndarray:
    """``bins + 1`` edges ``k / bins`` (exact decimal edges such as 0.3, not ``linspace``'s 0.30000000000000004)."""
    if bins < 1:
        raise DataError(f"calibration bins should be at least 1, got {bins}")
    return np.arange(bins + 1) / bins


def bin_index(scores: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """The bin of each score: ``k`` where ``k/bins <= s < (k+1)/bins``; 1.0 falls in the last bin."""
    scores = _check_scores(scores)
    inner = bin_edges(bins)[1:-1]
    return np.searchsorted(inner, scores, side="right")


def brier_score(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean of ``(score - label)^2`` over cases."""
    labels, scores = _check(labels, scores)
    return float(weighted_brier(labels, scores, np.ones((1, len(labels))))[0])


def expected_calibration_error(labels: np.ndarray, scores: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE over ``bins`` equal-width bins, each weighted by its share of cases (see the module docstring)."""
    labels, scores = _check(labels, scores)
    return float(weighted_ece(labels, scores, np.ones((1, len(labels))), bins)[0])


def reliability_table(
    labels: np.ndarray, scores: np.ndarray, bins: int = ECE_BINS
) -> list[dict[str, float | int | None]]:
    """One row per bin (empty bins included, their means ``None``): the data of a reliability diagram."""
    labels, scores = _check(labels, scores)
    edges = bin_edges(bins)
    index = bin_index(scores, bins)
    rows: list[dict[str, float | int | None]] = []
    for k in range(bins):
        inside = index == k
        count = int(inside.sum())
        rows.append(
            {
                "bin": k,
                "lower": float(edges[k]),
                "upper": float(edges[k + 1]),
                "count": count,
                "mean_score": float(scores[inside].mean()) if count else None,
                "observed_frequency": float(labels[inside].mean()) if count else None,
            }
        )
    return rows


def weighted_brier(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Brier score under each row of ``weights`` (``[B, N]``); NaN for a row of zeros."""
    squared = (np.asarray(scores, dtype=float) - np.asarray(labels, dtype=float)) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights @ squared) / weights.sum(axis=1)


def weighted_ece(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """ECE under each row of ``weights`` (``[B, N]``): per bin, weighted counts, score sums and positives."""
    scores = np.asarray(scores, dtype=float)
    one_hot = np.zeros((len(scores), bins))
    one_hot[np.arange(len(scores)), bin_index(scores, bins)] = 1.0
    count = weights @ one_hot  # [B, bins]
    score_sum = weights @ (one_hot * scores[:, None])
    positive_sum = weights @ (one_hot * np.asarray(labels, dtype=float)[:, None])
    total = count.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        gap = np.where(count > 0, np.abs(score_sum - positive_sum) / np.where(count > 0, count, 1.0), 0.0)
        return (count * gap).sum(axis=1) / total


def _check_scores(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=float)
    if scores.ndim != 1:
        raise DataError(f"calibration needs 1-D positive-class scores, got shape {scores.shape}")
    if not np.all(np.isfinite(scores)) or np.any(scores < 0) or np.any(scores > 1):
        bad = float(scores[~(np.isfinite(scores) & (scores >= 0) & (scores <= 1))][0])
        raise DataError(f"calibration needs scores in [0, 1], got {bad!r}")
    return scores


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = _check_scores(scores)
    labels = np.asarray(labels)
    if labels.shape != scores.shape:
        raise DataError(f"calibration needs one label per score, got {labels.shape} labels for {scores.shape} scores")
    if len(labels) == 0:
        raise DataError("calibration needs labelled cases, got none")
    if not np.all(np.isin(labels, (0, 1))):
        raise DataError(f"calibration needs binary labels 0/1, got {sorted(set(labels.tolist()))}")
    return labels.astype(int), scores

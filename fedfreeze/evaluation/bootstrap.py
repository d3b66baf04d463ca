"""Patient-level (cluster) bootstrap of metrics averaged over cross-validation folds.

A replicate draws *patients* with replacement, separately within each stratum (site x class, so
every replicate keeps each site's case mix), and gives each patient a weight: how many times it was
drawn. The weight applies to every prediction of that patient, in every fold and repeat that
tested it, so the dependence between repeats (the same patient scored by several models) and
between images of one patient is kept. A metric of a fold under a replicate is the metric of the
weighted test cases; the replicate's value is the mean over folds, like the point estimate.

Percentile intervals (Efron & Tibshirani 1993, ch. 13). Paired comparisons reuse the same weights
for both arms, so the bootstrap distribution of the difference respects the pairing; its two-sided
p-value is the share of centred replicates at least as far from zero as the observed difference
(Efron & Tibshirani 1993, ch. 16), with the usual +1 so that it is never 0.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedfreeze.errors import DataError

METRICS = ("auroc", "balanced_accuracy", "f1", "sensitivity", "specificity")
BOOTSTRAP_NAME = "paired patient-level bootstrap (stratified by site and class), two-sided"


def bootstrap_weights(strata: Sequence[str] | np.ndarray, replicates: int, seed: int) -> np.ndarray:
    """``[replicates, units]`` counts: each stratum's units drawn with replacement, as many as it holds."""
    strata = np.asarray(strata)
    if replicates < 1:
        raise DataError(f"bootstrap replicates should be at least 1, got {replicates}")
    rng = np.random.default_rng(seed)
    weights = np.zeros((replicates, len(strata)), dtype=np.float64)
    for value in sorted(set(strata.tolist())):
        members = np.flatnonzero(strata == value)
        draws = rng.multinomial(len(members), np.full(len(members), 1.0 / len(members)), size=replicates)
        weights[:, members] = draws
    return weights


@dataclass(frozen=True)
class FoldCases:
    """One fold's test cases for one scope (a site, or all sites): which unit, label and score."""

    units: np.ndarray  # index of each case's patient into the weight matrix's columns
    labels: np.ndarray
    scores: np.ndarray


def weighted_metrics(case: FoldCases, weights: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """Every metric of one fold under each row of ``weights`` (``[B, units]``); NaN where undefined."""
    w = weights[:, case.units]  # [B, cases]
    y = np.asarray(case.labels).astype(bool)
    s = np.asarray(case.scores, dtype=float)
    w_pos, w_neg = w[:, y], w[:, ~y]
    sp, sn = s[y], s[~y]
    # Mann-Whitney kernel: 1 if the positive outranks the negative, 1/2 on ties
    kernel = (sp[:, None] > sn[None, :]).astype(float) + 0.5 * (sp[:, None] == sn[None, :])
    total_pos, total_neg = w_pos.sum(1), w_neg.sum(1)
    predicted = s >= threshold
    tp = w_pos[:, predicted[y]].sum(1)
    tn = w_neg[:, ~predicted[~y]].sum(1)
    fp = total_neg - tn
    fn = total_pos - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        auroc = ((w_pos @ kernel) * w_neg).sum(1) / (total_pos * total_neg)
        sensitivity = tp / total_pos
        specificity = tn / total_neg
        f1 = np.where(tp > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
    f1 = np.where((total_pos > 0) & (total_neg > 0), f1, np.nan)
    return {
        "auroc": auroc,
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "f1": f1,
        "sensitivity": sensitivity,
        "specificity": specificity,
    }


def fold_mean_replicates(folds: Sequence[FoldCases], weights: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """Each metric's mean over folds, per replicate (``[B]``); folds undefined in a replicate are skipped."""
    per_fold = [weighted_metrics(fold, weights, threshold) for fold in folds]
    if not per_fold:
        return {key: np.full(len(weights), np.nan) for key in METRICS}
    out = {}
    for key in METRICS:
        stacked = np.vstack([m[key] for m in per_fold])  # [folds, B]
        with warnings.catch_warnings():  # a replicate where every fold is undefined stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            out[key] = np.nanmean(stacked, axis=0)
    return out


def percentile_interval(replicates: np.ndarray, confidence: float) -> tuple[float, float]:
    """The percentile bootstrap interval (NaN replicates dropped)."""
    values = replicates[np.isfinite(replicates)]
    if len(values) == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return float(low), float(high)


def paired_p_value(observed: float, replicates: np.ndarray) -> float:
    """Two-sided bootstrap p-value of a difference: centred replicates as far from 0 as ``observed``."""
    values = replicates[np.isfinite(replicates)]
    if len(values) == 0 or not np.isfinite(observed):
        return float("nan")
    if observed == 0.0:
        return 1.0
    extreme = np.sum(np.abs(values - observed) >= abs(observed))
    return float((1 + extreme) / (1 + len(values)))

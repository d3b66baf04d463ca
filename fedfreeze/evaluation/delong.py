"""DeLong's test for two correlated AUROCs, and its extension to the mean AUROC over CV folds.

DeLong, DeLong & Clarke-Pearson (1988), *Biometrics* 44:837-845: the AUROC is a Mann-Whitney
U-statistic; its variance (and the covariance of two AUROCs computed on the same cases) follows
from the *placement values* (structural components) of every case:

* ``V10[i]``: the share of negatives that positive ``i`` outranks (ties count one half);
* ``V01[j]``: the share of positives that outrank negative ``j``.

``Var(AUC) = S10 / m + S01 / n`` with ``S10``, ``S01`` the sample (co)variances of the placements
of the ``m`` positives and ``n`` negatives. The placements are computed with mid-ranks (Sun & Xu
2014, *IEEE Signal Processing Letters* 21:1389), in O(N log N).

**Over folds.** Cross-validation scores every patient with several models (one per repeat), and a
paper reports the mean AUROC over folds. That mean is a linear combination of per-fold U-statistics,
so its first-order (influence) decomposition sums, per patient, that patient's placement deviations
over every fold in which it was tested (as in Obuchowski 1997, *Biometrics* 53:567-578, for
clustered ROC data). With one fold this is exactly DeLong's estimator (tested against pROC); with
disjoint folds (one repeat) it is the sum of the folds' DeLong variances. Like every DeLong test it
conditions on the trained models: it measures test-case sampling variability, not how much the
models would change with other training sets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from fedfreeze.errors import DataError
from fedfreeze.metrics import midranks

DELONG_NAME = "DeLong's test for two correlated AUROCs (DeLong et al. 1988), two-sided"
DELONG_FOLDS_NAME = (
    "DeLong's test on the mean AUROC over folds (placements summed per patient "
    "over the folds that tested it), two-sided"
)


@dataclass(frozen=True)
class Placements:
    """One score vector's AUROC and the structural components of its positives and negatives."""

    auc: float
    v10: np.ndarray  # [m] per positive
    v01: np.ndarray  # [n] per negative


@dataclass(frozen=True)
class DeLongResult:
    """A paired comparison ``a - b`` of two AUROCs on the same cases."""

    auc_a: float
    auc_b: float
    difference: float
    se: float
    z: float
    p_value: float
    ci_low: float
    ci_high: float
    confidence: float
    n_positive: int
    n_negative: int
    test: str = DELONG_NAME

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def _split(
    labels: np.ndarray | Sequence[int], scores: np.ndarray | Sequence[float], what: str
) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=float)
    if y.ndim != 1 or s.shape != y.shape:
        raise DataError(f"{what}: labels and scores should be 1-D of the same length, got {y.shape} and {s.shape}")
    if not np.isin(y, (0, 1)).all():
        raise DataError(f"{what}: labels should be 0 or 1, got values {sorted(set(y.tolist()) - {0, 1})[:5]}")
    if not np.isfinite(s).all():
        raise DataError(f"{what}: scores should be finite")
    pos, neg = s[y == 1], s[y == 0]
    if len(pos) < 2 or len(neg) < 2:
        raise DataError(f"{what}: needs at least 2 positives and 2 negatives, got {len(pos)} and {len(neg)}")
    return pos, neg


def placements(labels: np.ndarray | Sequence[int], scores: np.ndarray | Sequence[float]) -> Placements:
    """AUROC and DeLong placement values, positives and negatives in their order in ``labels``."""
    pos, neg = _split(labels, scores, "placements")
    m, n = len(pos), len(neg)
    ranks_all = midranks(np.concatenate([pos, neg]))
    v10 = (ranks_all[:m] - midranks(pos)) / n  # negatives below each positive (+ half the ties)
    v01 = 1.0 - (ranks_all[m:] - midranks(neg)) / m  # positives above each negative (+ half the ties)
    return Placements(float(v10.mean()), v10, v01)


def delong_variance(labels: np.ndarray | Sequence[int], scores: np.ndarray | Sequence[float]) -> tuple[float, float]:
    """AUROC and DeLong's estimate of its variance."""
    p = placements(labels, scores)
    return p.auc, float(np.var(p.v10, ddof=1) / len(p.v10) + np.var(p.v01, ddof=1) / len(p.v01))


def _result(auc_a: float, auc_b: float, variance: float, confidence: float, m: int, n: int, test: str) -> DeLongResult:
    from scipy.stats import norm

    diff = auc_a - auc_b
    se = math.sqrt(max(variance, 0.0))
    if se == 0.0:
        # identical rankings give no evidence of a difference (pROC reports Z = 0, p = 1)
        z, p = (0.0, 1.0) if diff == 0.0 else (math.copysign(math.inf, diff), 0.0)
    else:
        z = diff / se
        p = float(2.0 * norm.sf(abs(z)))
    half = float(norm.ppf(0.5 + confidence / 2.0)) * se
    return DeLongResult(
        auc_a=auc_a,
        auc_b=auc_b,
        difference=diff,
        se=se,
        z=float(z),
        p_value=p,
        ci_low=diff - half,
        ci_high=diff + half,
        confidence=confidence,
        n_positive=m,
        n_negative=n,
        test=test,
    )


def delong_test(
    labels: np.ndarray | Sequence[int],
    scores_a: np.ndarray | Sequence[float],
    scores_b: np.ndarray | Sequence[float],
    *,
    confidence: float = 0.95,
) -> DeLongResult:
    """DeLong's paired test of ``AUROC(a) - AUROC(b)`` on the same cases (what pROC's ``roc.test`` does)."""
    a = placements(labels, scores_a)
    b = placements(labels, scores_b)
    m, n = len(a.v10), len(a.v01)
    s10 = np.cov(np.vstack([a.v10, b.v10]), ddof=1)
    s01 = np.cov(np.vstack([a.v01, b.v01]), ddof=1)
    cov = s10 / m + s01 / n
    variance = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    return _result(a.auc, b.auc, variance, confidence, m, n, DELONG_NAME)


@dataclass(frozen=True)
class FoldScores:
    """One fold's test cases scored by two models: labels, both scores and who each case is."""

    labels: np.ndarray
    scores_a: np.ndarray
    scores_b: np.ndarray
    case_ids: Sequence[str]  # the patient of each case: a patient's terms are summed over folds


def delong_test_over_folds(folds: Sequence[FoldScores], *, confidence: float = 0.95) -> DeLongResult:
    """DeLong's test of the difference of the mean AUROCs over ``folds`` (equal weights).

    Each fold contributes ``(V - AUC_f) / size`` per case and arm (positives over the fold's
    positives, negatives over its negatives), scaled by ``sqrt(size / (size - 1))`` so that one fold
    reproduces DeLong's unbiased (co)variances exactly; contributions are summed per patient across
    folds, and the variance of the difference is the sum of squares of the patients' totals.
    """
    if not folds:
        raise DataError("delong_test_over_folds: no folds given")
    weight = 1.0 / len(folds)
    influence: dict[str, float] = {}
    auc_a = auc_b = 0.0
    m_total = n_total = 0
    for number, fold in enumerate(folds):
        ids = list(fold.case_ids)
        y = np.asarray(fold.labels)
        if len(ids) != len(y):
            raise DataError(f"fold {number}: {len(y)} labels but {len(ids)} case ids")
        a = placements(y, fold.scores_a)
        b = placements(y, fold.scores_b)
        m, n = len(a.v10), len(a.v01)
        auc_a += weight * a.auc
        auc_b += weight * b.auc
        m_total += m
        n_total += n
        pos_ids = [c for c, label in zip(ids, y.tolist(), strict=True) if label == 1]
        neg_ids = [c for c, label in zip(ids, y.tolist(), strict=True) if label == 0]
        d_pos = ((a.v10 - a.auc) - (b.v10 - b.auc)) / m * math.sqrt(m / (m - 1))
        d_neg = ((a.v01 - a.auc) - (b.v01 - b.auc)) / n * math.sqrt(n / (n - 1))
        for case, value in zip(pos_ids + neg_ids, np.concatenate([d_pos, d_neg]).tolist(), strict=True):
            influence[case] = influence.get(case, 0.0) + weight * value
    variance = float(np.sum(np.square(list(influence.values()))))
    test = DELONG_NAME if len(folds) == 1 else DELONG_FOLDS_NAME
    return _result(auc_a, auc_b, variance, confidence, m_total, n_total, test)

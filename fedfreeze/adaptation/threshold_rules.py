"""Threshold rules for a site's operating point, chosen on that site's labelled cases.

A site calibrates with few labels (tens of patients), where the empirical Youden pick is noisy: it
lands on one of the cases' scores, and the gap between two cases at the edge of the class overlap
decides it. On 85 images of a real new site it overshot (specificity 0.96, sensitivity 0.79). The
``binormal`` rule instead fits a normal distribution to each class's scores on the logit scale and
returns the threshold that maximises balanced accuracy under the fit (where the two fitted densities
cross between the class means): every case informs it, not only the few at the edge, and on binormal
scores it is unbiased at small n (``tests/adaptation/test_threshold_rules.py``).

``target-sensitivity`` keeps the sensitivity at or above a target; ``target-sensitivity-lcb`` asks
it of a one-sided 95 % confidence bound (a normal tolerance bound on the positives' logit scores): a
guarantee that holds at small n for binormal scores, paid for in specificity. Cases with weight 0 (left out of a bootstrap replicate)
play no part in any rule.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from scipy.special import ndtr, ndtri

from fedfreeze.errors import DataError

Rule = Literal["binormal", "youden", "target-sensitivity", "target-sensitivity-lcb"]
RULES: tuple[str, ...] = ("binormal", "youden", "target-sensitivity", "target-sensitivity-lcb")
THRESHOLD_CLIP = 1e-6
LOGIT_CLIP = 1e-6  # scores are clipped to [1e-6, 1 - 1e-6] before the logit (|logit| <= 13.8)
CONFIDENCE = 0.95  # of the target-sensitivity-lcb rule's bound


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), LOGIT_CLIP, 1 - LOGIT_CLIP)
    return np.log(p / (1 - p))


def sigmoid(z: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def choose_threshold(
    scores: np.ndarray,
    labels: np.ndarray,
    rule: Rule,
    target_sensitivity: float = 0.9,
    weights: np.ndarray | None = None,
) -> float:
    """The decision threshold (a case is positive when its score >= threshold) chosen by ``rule``."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    w = np.ones_like(s) if weights is None else np.asarray(weights, dtype=np.float64)
    keep = w > 0
    s, y, w = s[keep], y[keep], w[keep]
    if w[y].sum() == 0 or w[~y].sum() == 0:
        raise DataError("choosing a threshold needs labelled cases of both classes")
    if rule == "binormal":
        t = float(sigmoid(binormal_threshold(logit(s), y, w)))
    elif rule == "target-sensitivity-lcb":
        t = float(sigmoid(binormal_sensitivity_bound_threshold(logit(s), y, w, target_sensitivity)))
    else:
        t = empirical_threshold(s, y, w, rule, target_sensitivity)
    return float(np.clip(t, THRESHOLD_CLIP, 1 - THRESHOLD_CLIP))


def empirical_threshold(
    s: np.ndarray, y: np.ndarray, w: np.ndarray, rule: Literal["youden", "target-sensitivity"], target: float
) -> float:
    """``youden``: maximise sensitivity + specificity - 1, the highest such threshold on ties (as
    ``fedfreeze.metrics.youden_threshold``); ``target-sensitivity``: the highest threshold whose
    sensitivity reaches the target. Always one of the cases' scores."""
    order = np.argsort(-s, kind="stable")
    s, y, w = s[order], y[order], w[order]
    tpr = np.cumsum(w * y) / w[y].sum()
    fpr = np.cumsum(w * ~y) / w[~y].sum()
    last = np.r_[s[1:] != s[:-1], True]  # the last case of each run of equal scores
    thresholds, tpr, fpr = s[last], tpr[last], fpr[last]
    if rule == "youden":
        return float(thresholds[int(np.argmax(tpr - fpr))])
    return float(thresholds[int(np.argmax(tpr >= target - 1e-12))])  # tpr only grows as the threshold falls


def class_moments(z: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float, float, float, float, float]:
    """Weighted mean and standard deviation (n - 1 form, with the weights' effective n) of each class:
    ``(mu0, sd0, n0, mu1, sd1, n1)``. A class whose scores do not vary is a ``DataError``."""
    out: list[float] = []
    for cls in (False, True):
        zc, wc = z[y == cls], w[y == cls]
        total = wc.sum()
        mu = float((wc * zc).sum() / total)
        n_eff = float(total**2 / (wc**2).sum())  # Kish: equal weights give the count; bootstrap repeats count less
        var = float((wc * (zc - mu) ** 2).sum() / total) * n_eff / max(n_eff - 1.0, 1e-9)
        if not np.isfinite(var) or var <= 1e-12:
            name = "positive" if cls else "negative"
            raise DataError(
                f"the binormal rule needs the {name} cases' scores to vary (got {int((wc > 0).sum())} case(s) "
                "with one score); use --threshold-rule youden, or more labelled cases"
            )
        out += [mu, math.sqrt(var), n_eff]
    return out[0], out[1], out[2], out[3], out[4], out[5]


def binormal_balanced_accuracy(t: np.ndarray | float, mu0: float, sd0: float, mu1: float, sd1: float) -> np.ndarray:
    """Balanced accuracy at logit threshold ``t`` if each class's logit scores were normal."""
    return 0.5 * (ndtr((mu1 - np.asarray(t)) / sd1) + ndtr((np.asarray(t) - mu0) / sd0))


def binormal_threshold(z: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """The logit threshold maximising the binormal balanced accuracy: where the two fitted densities
    cross between the class means (the root of a quadratic; their midpoint when the SDs are equal).
    Scores that rank the classes the wrong way round (mean of the positives at or below the
    negatives') are a ``DataError``: no threshold makes such scores useful."""
    mu0, sd0, _, mu1, sd1, _ = class_moments(z, y, w)
    if mu1 <= mu0:
        raise DataError(
            f"the labelled cases' scores rank the classes the wrong way round (mean logit of positives {mu1:.3f} "
            f"<= negatives {mu0:.3f}): no threshold makes this model useful here; refit the head on these labels (--refit head)"
        )
    if abs(sd1 - sd0) < 1e-9 * max(sd0, sd1):
        return 0.5 * (mu0 + mu1)
    # log N(t; mu1, sd1) = log N(t; mu0, sd0)  <=>  a t^2 + b t + c = 0
    a = 1.0 / sd0**2 - 1.0 / sd1**2
    b = 2.0 * (mu1 / sd1**2 - mu0 / sd0**2)
    c = mu0**2 / sd0**2 - mu1**2 / sd1**2 + 2.0 * math.log(sd0 / sd1)
    disc = b * b - 4 * a * c
    roots = [] if disc < 0 else [(-b + s * math.sqrt(disc)) / (2 * a) for s in (1.0, -1.0)]
    inside = [r for r in roots if mu0 <= r <= mu1]
    if inside:
        return float(max(inside, key=lambda r: float(binormal_balanced_accuracy(r, mu0, sd0, mu1, sd1))))
    # no crossing between the means (very unequal SDs): the grid maximum of the binormal balanced accuracy
    grid = np.linspace(mu0, mu1, 513)
    return float(grid[int(np.argmax(binormal_balanced_accuracy(grid, mu0, sd0, mu1, sd1)))])


def binormal_sensitivity_bound_threshold(z: np.ndarray, y: np.ndarray, w: np.ndarray, target: float) -> float:
    """The highest logit threshold at which the binormal sensitivity reaches ``target`` with 95 %
    confidence: the one-sided normal tolerance bound ``mu1 - k * sd1`` that lies below a share
    ``target`` of the positives' scores in 95 % of samples, with ``k`` from the non-central t
    distribution (exact for normal scores; n is the positives' effective count). Fewer positives give
    a lower, safer threshold."""
    from scipy.stats import nct

    _, _, _, mu1, sd1, n1 = class_moments(z, y, w)
    if not 0.0 < target < 1.0:
        raise DataError(f"a target sensitivity should be in (0, 1) for the binormal bound, got {target}")
    n = max(n1, 2.0)
    k = float(nct.ppf(CONFIDENCE, df=n - 1.0, nc=float(ndtri(target)) * math.sqrt(n))) / math.sqrt(n)
    return float(mu1 - k * sd1)

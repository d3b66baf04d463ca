"""Refit a model's head on a site's few labelled patients, kept close to the head it came with.

When the model ranks a site's patients poorly (a Kermany model scored NIH adults at AUROC 0.49), no
threshold helps: the ranking itself must change. The cheapest change that can is the linear head on
the frozen backbone's pooled features. With tens of labels a free fit overfits, so the fit is
penalised toward the source head (``strength / 2 * ||w - w_source||^2``; the bias is free) and the
cases are weighted so that each class counts half: the refitted scores are then posteriors at a
balanced prior, whose balanced-accuracy threshold is 0.5 (the class-prior correction fedfreeze's
class-balanced training also makes). Features come from the model as it stands (``extract_features``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

from fedfreeze.errors import DataError

DEFAULT_STRENGTH = 1.0


@dataclass(frozen=True)
class HeadFit:
    weight: np.ndarray  # [features]
    bias: float
    converged: bool
    iterations: int

    def scores(self, features: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(np.asarray(features, dtype=np.float64) @ self.weight + self.bias)))


def refit_head(
    features: np.ndarray,
    labels: np.ndarray,
    source_weight: np.ndarray,
    source_bias: float,
    *,
    strength: float = DEFAULT_STRENGTH,
    case_weights: np.ndarray | None = None,
) -> HeadFit:
    """Class-balanced logistic regression on ``features``, penalised toward the source head."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    w0 = np.asarray(source_weight, dtype=np.float64).reshape(-1)
    if x.ndim != 2 or x.shape[1] != len(w0) or len(y) != len(x):
        raise DataError(f"head refit: features {x.shape} do not match {len(y)} labels and a head of {len(w0)} inputs")
    if not strength > 0:
        raise DataError(f"head refit: strength should be positive, got {strength}")
    c = np.ones(len(y)) if case_weights is None else np.asarray(case_weights, dtype=np.float64)
    pos, neg = c[y == 1].sum(), c[y == 0].sum()
    if pos == 0 or neg == 0:
        raise DataError("a head refit needs labelled cases of both classes")
    c = np.where(y == 1, 0.5 * c / pos, 0.5 * c / neg)  # each class weighs a half

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:-1], theta[-1]
        z = x @ w + b
        p = 1.0 / (1.0 + np.exp(-z))
        value = float((c * np.logaddexp(0.0, -(2 * y - 1) * z)).sum() + 0.5 * strength * ((w - w0) ** 2).sum())
        g = c * (p - y)
        return value, np.r_[x.T @ g + strength * (w - w0), g.sum()]

    start = np.r_[w0, float(source_bias)]
    result = minimize(loss, start, jac=True, method="L-BFGS-B", options={"maxiter": 500})
    theta = result.x
    if not np.all(np.isfinite(theta)):
        raise DataError("the head refit diverged (non-finite weights)")
    return HeadFit(theta[:-1], float(theta[-1]), bool(result.success), int(result.nit))


@dataclass(frozen=True)
class RefitPromise:
    """The refit's balanced-accuracy promise at 0.5 on patients its fit did not use (bootstrap)."""

    sensitivity: float
    sensitivity_ci: tuple[float, float]
    specificity: float
    specificity_ci: tuple[float, float]
    balanced_accuracy: float
    balanced_accuracy_ci: tuple[float, float]
    replicates: int
    failed: int


def refit_promise(
    features: np.ndarray,
    labels: np.ndarray,
    patient_class: np.ndarray,
    units: np.ndarray,
    source_weight: np.ndarray,
    source_bias: float,
    *,
    strength: float,
    replicates: int,
    confidence: float,
    seed: int,
) -> RefitPromise:
    """Refit on each patient-level bootstrap resample (stratified by class) and score the patients it
    left out at 0.5: what the procedure promises on patients it was not fitted on."""
    from fedfreeze.adaptation.recalibration import sensitivity_specificity
    from fedfreeze.evaluation.bootstrap import bootstrap_weights, percentile_interval

    weights = bootstrap_weights(patient_class, replicates, seed)
    sens, spec = np.full(replicates, np.nan), np.full(replicates, np.nan)
    failed = 0
    for r in range(replicates):
        w = weights[r, units]
        try:
            fit = refit_head(features, labels, source_weight, source_bias, strength=strength, case_weights=w)
        except DataError:
            failed += 1
            continue
        sens[r], spec[r] = sensitivity_specificity(fit.scores(features), labels, 0.5, mask=w == 0)
    ba = 0.5 * (sens + spec)

    def mean(v: np.ndarray) -> float:
        return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")

    return RefitPromise(
        mean(sens),
        percentile_interval(sens, confidence),
        mean(spec),
        percentile_interval(spec, confidence),
        mean(ba),
        percentile_interval(ba, confidence),
        replicates,
        failed,
    )

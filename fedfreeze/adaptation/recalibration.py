"""Recalibration on a few labelled cases of a new site, and the choice of its decision threshold.

Temperature scaling fits ``p' = sigmoid(a * z)`` and Platt scaling ``p' = sigmoid(a * z + b)`` on the
logit ``z`` of the model's scores, by minimising the log loss of the labels (unpenalised logistic
regression on one feature, by Newton's method with step halving: the loss is convex). Both keep the
ranking of the scores, so they cannot change AUROC; a fit whose slope is not positive would reverse
it, and is refused.

Uncertainty comes from a patient-level bootstrap, stratified by the patient's class (a patient with
any positive image counts as positive): each replicate refits the calibration and re-chooses the
threshold on the resampled patients; the threshold it chooses is then applied to the patients that
replicate left out, which gives sensitivity and specificity of *the rule* on cases it did not see.
The figures on the cases used for fitting are optimistic (the threshold was chosen to suit them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from fedfreeze.adaptation.prevalence import logit, patient_index
from fedfreeze.adaptation.threshold_rules import Rule, choose_threshold
from fedfreeze.errors import DataError
from fedfreeze.evaluation.bootstrap import bootstrap_weights, percentile_interval
from fedfreeze.operating_point import Evidence, OperatingPoint, Promise, ScoreCalibration

Method = Literal["temperature", "platt"]
MIN_PATIENTS_PER_CLASS = 5  # fewer labelled patients of a class than this: no threshold is fitted


def log_loss(z: np.ndarray, y: np.ndarray, a: float = 1.0, b: float = 0.0, weights: np.ndarray | None = None) -> float:
    """Mean (weighted) negative log-likelihood of labels ``y`` under ``sigmoid(a * z + b)``."""
    z, y = np.asarray(z, dtype=np.float64), np.asarray(y, dtype=np.float64)
    w = np.ones_like(z) if weights is None else np.asarray(weights, dtype=np.float64)
    losses = np.logaddexp(0.0, -(2 * y - 1) * (a * z + b))
    return float((w * losses).sum() / w.sum())


def fit_calibration(
    z: np.ndarray, y: np.ndarray, method: Method, weights: np.ndarray | None = None
) -> tuple[float, float]:
    """``(a, b)`` minimising the log loss of ``y`` on ``sigmoid(a * z + b)``; ``b = 0`` for temperature.

    Raises DataError when no finite fit exists (the scores separate the labelled cases) or when the
    slope is not positive (the scores rank the cases the wrong way round).
    """
    z, y = np.asarray(z, dtype=np.float64), np.asarray(y, dtype=np.float64)
    w = np.ones_like(z) if weights is None else np.asarray(weights, dtype=np.float64)
    if not has_finite_fit(z, y, method, w):
        raise DataError(
            f"{method} scaling has no finite fit: the model's scores separate the {int((w > 0).sum())} labelled "
            "cases perfectly; use --calibrate none, or more labelled cases"
        )
    x = z[:, None] if method == "temperature" else np.stack([z, np.ones_like(z)], axis=1)
    theta = np.zeros(x.shape[1])
    theta[0] = 1.0  # start from the model's own calibration

    def loss(t: np.ndarray) -> float:
        return float((w * np.logaddexp(0.0, -(2 * y - 1) * (x @ t))).sum())

    current, converged = loss(theta), False
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(x @ theta)))
        grad = x.T @ (w * (p - y))
        if np.abs(grad).max() <= 1e-9 * w.sum():
            converged = True
            break
        step = np.linalg.lstsq(x.T @ (x * (w * p * (1 - p))[:, None]), grad, rcond=None)[0]
        scale = 1.0
        while scale > 1e-12 and loss(theta - scale * step) > current:
            scale /= 2
        theta = theta - scale * step
        current = loss(theta)
    a, b = float(theta[0]), float(theta[1]) if len(theta) > 1 else 0.0
    if not converged or not (np.isfinite(a) and np.isfinite(b)):
        raise DataError(f"{method} scaling did not converge on the {int((w > 0).sum())} labelled cases")
    if a <= 0:
        raise DataError(
            f"{method} scaling fits a slope a = {a:.3g} <= 0: the model's scores rank the labelled cases the "
            "wrong way round, which a recalibration cannot fix; refit the head on these labels (--refit head)"
        )
    return a, b


def has_finite_fit(z: np.ndarray, y: np.ndarray, method: Method, weights: np.ndarray) -> bool:
    """Whether the unpenalised log loss has a finite minimiser (else the fit runs off to infinity).

    Platt (slope and intercept): the classes' score ranges must overlap, i.e. some negative case
    scores above some positive one. Temperature (slope only): some case must lie on the wrong side
    of logit 0 and some on the right side (strictly), else the loss keeps falling as ``a`` grows.
    """
    keep = weights > 0
    z, y = z[keep], y[keep].astype(bool)
    if not y.any() or y.all():
        return False
    if method == "platt":
        return bool(z[~y].max() > z[y].min())
    margin = np.where(y, z, -z)
    return bool((margin < 0).any() and (margin > 0).any())


def compose(existing: ScoreCalibration | None, a: float, b: float, method: Method, fitted_on: str) -> ScoreCalibration:
    """The card calibration equal to applying ``sigmoid(a * z + b)`` after ``existing`` (a logit map
    after a logit map: ``a * (a0 * z + b0) + b``), so it applies to the model's raw scores."""
    a0, b0 = (existing.a, existing.b) if existing is not None else (1.0, 0.0)
    new_a, new_b = a * a0, a * b0 + b
    kind: Method = "temperature" if method == "temperature" and new_b == 0.0 else "platt"
    return ScoreCalibration(method=kind, a=new_a, b=new_b, fitted_on=fitted_on)


def sensitivity_specificity(
    scores: np.ndarray, labels: np.ndarray, threshold: float, mask: np.ndarray | None = None
) -> tuple[float, float]:
    """At ``threshold``, over the cases in ``mask`` (all by default); NaN for a class absent there."""
    s, y = np.asarray(scores), np.asarray(labels).astype(bool)
    m = np.ones_like(y) if mask is None else np.asarray(mask, dtype=bool)
    predicted = s >= threshold
    pos, neg = m & y, m & ~y
    sens = float(predicted[pos].mean()) if pos.any() else float("nan")
    spec = float((~predicted[neg]).mean()) if neg.any() else float("nan")
    return sens, spec


@dataclass(frozen=True)
class Recalibration:
    """A calibration and threshold fitted on a site's labelled cases, with bootstrap intervals."""

    calibration: str  # "temperature", "platt" or "none"
    a: float
    b: float
    a_ci: tuple[float, float]
    b_ci: tuple[float, float]
    log_loss_before: float
    log_loss_after: float
    rule: str
    target_sensitivity: float | None
    threshold: float
    threshold_ci: tuple[float, float]
    fitted_sensitivity: float  # on the cases used for fitting: optimistic
    fitted_specificity: float
    out_of_bootstrap_sensitivity: float  # the rule applied to patients each replicate left out
    out_of_bootstrap_sensitivity_ci: tuple[float, float]
    out_of_bootstrap_specificity: float
    out_of_bootstrap_specificity_ci: tuple[float, float]
    out_of_bootstrap_balanced_accuracy: float
    out_of_bootstrap_balanced_accuracy_ci: tuple[float, float]
    failed_replicates: int  # replicates with no finite or no positive-slope calibration fit
    failed_threshold_replicates: int  # replicates where the rule found no threshold (e.g. one score per class)
    replicates: int
    confidence: float
    seed: int
    n_images: int
    n_patients: int
    n_positive: int
    n_positive_patients: int
    n_negative_patients: int

    def record(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "interval": "percentile, patient-level bootstrap stratified by class",
            "fitted_figures_are_optimistic": True,
        }

    def promise(self) -> Promise:
        """What the rule promises on patients it was not fitted on (each replicate's left-out patients)."""
        return Promise(
            sensitivity=_finite(self.out_of_bootstrap_sensitivity),
            sensitivity_ci=_finite_pair(self.out_of_bootstrap_sensitivity_ci),
            specificity=_finite(self.out_of_bootstrap_specificity),
            specificity_ci=_finite_pair(self.out_of_bootstrap_specificity_ci),
            balanced_accuracy=_finite(self.out_of_bootstrap_balanced_accuracy),
            balanced_accuracy_ci=_finite_pair(self.out_of_bootstrap_balanced_accuracy_ci),
            how=(
                f"the rule refitted on {self.replicates} patient-level bootstrap resamples (stratified by class) and "
                f"applied to the patients each left out; {self.confidence:.0%} percentile intervals (slightly "
                "pessimistic: each refit sees about 63 % of the patients)"
            ),
        )

    def operating_point(
        self,
        *,
        site: str,
        calibration: ScoreCalibration | None,
        rule: str,
        evidence: Evidence,
        model_sha256: str,
        created_utc: str,
        fedfreeze_version: str,
    ) -> OperatingPoint:
        """The site's operating point from this fit: its threshold, counts, interval and promise."""
        return OperatingPoint(
            site=site,
            threshold=self.threshold,
            calibration=calibration,
            rule=rule,
            evidence=evidence,
            labels_used=True,
            model_sha256=model_sha256,
            n_images=self.n_images,
            n_patients=self.n_patients,
            n_positive_patients=self.n_positive_patients,
            n_negative_patients=self.n_negative_patients,
            threshold_ci=self.threshold_ci if all(np.isfinite(self.threshold_ci)) else None,
            promise=self.promise(),
            created_utc=created_utc,
            fedfreeze_version=fedfreeze_version,
        )


def require_patients_per_class(patient_class: np.ndarray, minimum: int = MIN_PATIENTS_PER_CLASS) -> None:
    """A threshold fitted on fewer than ``minimum`` patients of a class says little: refuse, naming it."""
    counts = [int((patient_class == c).sum()) for c in (0, 1)]
    if min(counts) < minimum:
        raise DataError(
            f"fitting an operating point needs at least {minimum} labelled patients of each class; got "
            f"{counts[0]} negative and {counts[1]} positive (label more patients: fedfreeze suggest lists which)"
        )


def recalibrate(
    scores: np.ndarray,
    labels: np.ndarray,
    patient_ids: Sequence[str],
    *,
    method: Method | Literal["none"],
    rule: Rule,
    target_sensitivity: float = 0.9,
    replicates: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    min_patients_per_class: int = MIN_PATIENTS_PER_CLASS,
) -> Recalibration:
    """Fit the calibration on the logit of ``scores``, choose the threshold on the recalibrated
    scores, and bootstrap both by patient."""
    z = logit(scores)
    y = np.asarray(labels).astype(int)
    if len(np.unique(y)) < 2:
        raise DataError(f"recalibration needs labelled cases of both classes, got only class {int(y[0])} (n={len(y)})")
    units, n_patients = patient_index(patient_ids)
    patient_class = np.zeros(n_patients, dtype=int)
    np.maximum.at(patient_class, units, y)
    require_patients_per_class(patient_class, min_patients_per_class)
    a, b = fit_calibration(z, y, method) if method != "none" else (1.0, 0.0)
    calibrated = 1.0 / (1.0 + np.exp(-(a * z + b)))
    threshold = choose_threshold(calibrated, y, rule, target_sensitivity)
    fitted_sens, fitted_spec = sensitivity_specificity(calibrated, y, threshold)

    unit_weights = bootstrap_weights(patient_class, replicates, seed)
    a_reps, b_reps, t_reps, sens_reps, spec_reps = (np.full(replicates, np.nan) for _ in range(5))
    failed = failed_threshold = 0
    for r in range(replicates):
        w = unit_weights[r, units]
        try:
            t_reps[r] = choose_threshold(calibrated, y, rule, target_sensitivity, w)  # both classes: stratified
        except DataError:  # e.g. a resample whose cases of a class share one score: counted, not hidden
            failed_threshold += 1
        else:
            sens_reps[r], spec_reps[r] = sensitivity_specificity(calibrated, y, t_reps[r], mask=w == 0)
        if method != "none":
            try:
                a_reps[r], b_reps[r] = fit_calibration(z, y, method, w)
            except DataError:  # separated or reversed in this replicate: counted, not hidden
                failed += 1
    ba_reps = 0.5 * (sens_reps + spec_reps)

    def interval(values: np.ndarray) -> tuple[float, float]:
        return percentile_interval(values, confidence)

    return Recalibration(
        calibration=method,
        a=a,
        b=b,
        a_ci=interval(a_reps) if method != "none" else (1.0, 1.0),
        b_ci=interval(b_reps) if method == "platt" else (0.0, 0.0),
        log_loss_before=log_loss(z, y),
        log_loss_after=log_loss(z, y, a, b),
        rule=rule,
        target_sensitivity=target_sensitivity if rule.startswith("target-sensitivity") else None,
        threshold=threshold,
        threshold_ci=interval(t_reps),
        fitted_sensitivity=fitted_sens,
        fitted_specificity=fitted_spec,
        out_of_bootstrap_sensitivity=_nanmean(sens_reps),
        out_of_bootstrap_sensitivity_ci=interval(sens_reps),
        out_of_bootstrap_specificity=_nanmean(spec_reps),
        out_of_bootstrap_specificity_ci=interval(spec_reps),
        out_of_bootstrap_balanced_accuracy=_nanmean(ba_reps),
        out_of_bootstrap_balanced_accuracy_ci=interval(ba_reps),
        failed_replicates=failed,
        failed_threshold_replicates=failed_threshold,
        replicates=replicates,
        confidence=confidence,
        seed=seed,
        n_images=len(y),
        n_patients=n_patients,
        n_positive=int(y.sum()),
        n_positive_patients=int(patient_class.sum()),
        n_negative_patients=int(n_patients - patient_class.sum()),
    )


def _nanmean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _finite_pair(pair: tuple[float, float]) -> tuple[float, float] | None:
    return (float(pair[0]), float(pair[1])) if all(np.isfinite(v) for v in pair) else None

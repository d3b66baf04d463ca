"""External validation of a binary model on one hospital's labelled cases: what it would do there.

``external_validation`` gathers what a hospital should read before trusting a model: the contract
metrics at the model's stored threshold (the same figures ``classification_metrics`` gives), their
patient-level bootstrap confidence intervals, calibration (Brier, ECE, reliability table), a
threshold analysis and per-class score summaries. Plain NumPy, no Flower, no torch: benchmarks and
``fedfreeze adapt`` call it on scores they already hold.

The bootstrap draws *patients* with replacement within class strata (a patient whose images carry
both labels forms a third, "mixed" stratum), so every replicate keeps the set's case mix and a
patient's images always move together: several images of one patient are one piece of evidence,
not several (``fedfreeze.evaluation.bootstrap``; percentile intervals). Brier and ECE get intervals
too; ECE's leans high (the ECE of a resample is biased upwards, most for small sets), so read it as
a spread rather than as centred on the point estimate.

With only one class present AUROC, balanced accuracy and F1 are undefined; the result then holds
``None`` for them (and for whichever of sensitivity / specificity has no cases), lists them under
``undefined`` and names the class present in ``single_class``; everything defined is still there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedfreeze.errors import DataError
from fedfreeze.evaluation.bootstrap import FoldCases, bootstrap_weights, percentile_interval, weighted_metrics
from fedfreeze.evaluation.calibration import (
    ECE_BINS,
    ECE_DEFINITION,
    reliability_table,
    weighted_brier,
    weighted_ece,
)
from fedfreeze.metrics import METRIC_KEYS, binary_metrics, youden_threshold

CI_KEYS = (*METRIC_KEYS, "brier", "ece")
CI_METHOD = "patient-level bootstrap, stratified by class (patients drawn with replacement), percentile interval"
YOUDEN_NOTE = (
    "diagnostic only, not for choosing a threshold: it is fitted to the data it is scored on, "
    "so its figures are optimistic"
)
HISTOGRAM_BINS = 20


def external_validation(
    labels: np.ndarray | Sequence[int],
    scores: np.ndarray | Sequence[float],
    patient_ids: Sequence[str] | np.ndarray,
    threshold: float,
    *,
    bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Everything an external validation reports, as one JSON-ready dict (see the module docstring).

    Top-level keys: the contract metrics at ``threshold`` (``auroc, balanced_accuracy, f1,
    sensitivity, specificity, threshold, n, tp, fp, tn, fn``), then ``n_patients``, ``n_positive``,
    ``n_negative``, ``undefined``, ``single_class``, ``ci`` (``None`` when ``bootstrap`` is 0),
    ``calibration``, ``thresholds`` and ``score_summary``.
    """
    y, s, patients = _check_inputs(labels, scores, patient_ids, threshold, bootstrap, confidence)
    present = sorted(set(y.tolist()))
    both = len(present) == 2
    point = _metrics_at(y, s, threshold)
    undefined = [key for key in METRIC_KEYS if point[key] is None]
    unit_names, units = np.unique(patients, return_inverse=True)
    weights_point = np.ones((1, len(y)))
    result: dict[str, Any] = {
        **point,
        "n_patients": int(len(unit_names)),
        "n_positive": int(np.sum(y == 1)),
        "n_negative": int(np.sum(y == 0)),
        "undefined": undefined,
        "single_class": None if both else int(present[0]),
        "ci": _bootstrap_ci(y, s, units, threshold, bootstrap, confidence, seed) if bootstrap else None,
        "calibration": {
            "brier": float(weighted_brier(y, s, weights_point)[0]),
            "ece": float(weighted_ece(y, s, weights_point, ECE_BINS)[0]),
            "ece_bins": ECE_BINS,
            "ece_definition": ECE_DEFINITION,
            "mean_score": float(s.mean()),
            "observed_positive_rate": float(y.mean()),
            "reliability": reliability_table(y, s, ECE_BINS),
        },
        "thresholds": threshold_analysis(y, s, threshold),
        "score_summary": [score_summary(s[y == label], label) for label in (0, 1)],
    }
    return result


def threshold_analysis(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, Any]:
    """Metrics at the stored threshold, at 0.5 and at this set's own Youden threshold (diagnostic only)."""
    rows = [
        {"name": "stored", "note": "the model's threshold, the one it is used with", **_threshold_row(y, s, threshold)},
        {"name": "0.5", "note": "the untuned default", **_threshold_row(y, s, 0.5)},
    ]
    if len(set(y.tolist())) == 2:
        best = youden_threshold(y, s)
        rows.append({"name": "youden_on_this_set", "note": YOUDEN_NOTE, **_threshold_row(y, s, best)})
    return {"rows": rows, "youden_note": YOUDEN_NOTE}


def score_summary(values: np.ndarray, label: int) -> dict[str, Any]:
    """Distribution of one class's scores: moments, quartiles and a 20-bin histogram on [0, 1]."""
    counts, edges = np.histogram(values, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    row: dict[str, Any] = {
        "label": int(label),
        "n": int(len(values)),
        "histogram_edges": edges.tolist(),
        "histogram_counts": counts.tolist(),
    }
    if len(values) == 0:
        return {**row, **{key: None for key in ("mean", "std", "min", "q25", "median", "q75", "max")}}
    q25, median, q75 = np.quantile(values, [0.25, 0.5, 0.75])
    return {
        **row,
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        "min": float(values.min()),
        "q25": float(q25),
        "median": float(median),
        "q75": float(q75),
        "max": float(values.max()),
    }


def patient_strata(labels: np.ndarray, units: np.ndarray, n_units: int) -> np.ndarray:
    """Each patient's class stratum: ``"0"``, ``"1"``, or ``"mixed"`` when its images carry both labels."""
    has_pos = np.zeros(n_units, dtype=bool)
    has_neg = np.zeros(n_units, dtype=bool)
    has_pos[units[labels == 1]] = True
    has_neg[units[labels == 0]] = True
    return np.where(has_pos & has_neg, "mixed", np.where(has_pos, "1", "0"))


def _bootstrap_ci(
    y: np.ndarray, s: np.ndarray, units: np.ndarray, threshold: float, replicates: int, confidence: float, seed: int
) -> dict[str, Any]:
    n_units = int(units.max()) + 1
    weights = bootstrap_weights(patient_strata(y, units, n_units), replicates, seed)  # [B, patients]
    metrics = weighted_metrics(FoldCases(units=units, labels=y, scores=s), weights, threshold)
    case_weights = weights[:, units]  # every image carries its patient's weight
    metrics["brier"] = weighted_brier(y, s, case_weights)
    metrics["ece"] = weighted_ece(y, s, case_weights, ECE_BINS)
    intervals: dict[str, Any] = {}
    for key in CI_KEYS:
        low, high = percentile_interval(metrics[key], confidence)
        intervals[key] = [low, high] if np.isfinite(low) else None
    return {"method": CI_METHOD, "confidence": confidence, "replicates": replicates, "seed": seed, **intervals}


def _metrics_at(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, Any]:
    """``binary_metrics`` when both classes are present; otherwise what is defined, ``None`` for the rest."""
    if len(set(y.tolist())) == 2:
        return binary_metrics(y, s, threshold)
    row = _threshold_row(y, s, threshold)
    return {
        "auroc": None,
        **{k: row[k] for k in ("balanced_accuracy", "f1", "sensitivity", "specificity")},
        "threshold": float(threshold),
        "n": int(len(y)),
        **{k: row[k] for k in ("tp", "fp", "tn", "fn")},
    }


def _threshold_row(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, Any]:
    """Threshold-dependent metrics; a ratio with no cases in its denominator is ``None``."""
    if len(set(y.tolist())) == 2:
        full = binary_metrics(y, s, threshold)
        return {
            k: full[k]
            for k in ("threshold", "sensitivity", "specificity", "balanced_accuracy", "f1", "tp", "fp", "tn", "fn")
        }
    positive, predicted = y == 1, s >= threshold
    tp, fn = int(np.sum(predicted & positive)), int(np.sum(~predicted & positive))
    fp, tn = int(np.sum(predicted & ~positive)), int(np.sum(~predicted & ~positive))
    return {
        "threshold": float(threshold),
        "sensitivity": tp / (tp + fn) if tp + fn else None,
        "specificity": tn / (tn + fp) if tn + fp else None,
        "balanced_accuracy": None,
        "f1": None,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def _check_inputs(
    labels: Any, scores: Any, patient_ids: Any, threshold: float, bootstrap: int, confidence: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels)
    patients = np.asarray([str(p) for p in patient_ids])
    if s.ndim != 1:
        raise DataError(f"external validation needs 1-D positive-class scores (binary models), got shape {s.shape}")
    if len(s) == 0:
        raise DataError("external validation needs labelled cases, got none")
    if y.shape != s.shape or patients.shape != s.shape:
        raise DataError(
            f"external validation needs one label and one patient id per score: got {y.shape} labels, "
            f"{patients.shape} patient ids for {s.shape} scores"
        )
    if not np.all(np.isin(y, (0, 1))):
        raise DataError(f"external validation needs binary labels 0/1, got {sorted(set(y.tolist()))}")
    outside = ~(np.isfinite(s) & (s >= 0) & (s <= 1))
    if outside.any():
        first = int(np.flatnonzero(outside)[0])
        raise DataError(
            f"external validation needs scores in [0, 1] (probabilities), got {float(s[first])} at case {first}"
        )
    if not 0.0 < threshold < 1.0:
        raise DataError(f"threshold should be in (0, 1), got {threshold}")
    if bootstrap < 0:
        raise DataError(f"bootstrap replicates should be 0 (off) or positive, got {bootstrap}")
    if not 0.0 < confidence < 1.0:
        raise DataError(f"confidence should be in (0, 1), got {confidence}")
    return y.astype(int), s, patients

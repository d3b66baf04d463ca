"""Classification metrics with one contract for every model: site-level, federated or pooled.

Binary tasks score the positive-class probability at a decision threshold; multi-class tasks use
the arg-max and macro averages (AUROC one-vs-rest).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score, roc_curve

from fedfreeze.errors import DataError

METRIC_KEYS = ("auroc", "balanced_accuracy", "f1", "sensitivity", "specificity")


def binary_metrics(y_true: np.ndarray, p_pos: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """AUROC, balanced accuracy, F1, sensitivity and specificity of scores ``p_pos`` at ``threshold``."""
    y_true = np.asarray(y_true).astype(int)
    p_pos = np.asarray(p_pos, dtype=float)
    _require_both_classes(y_true, "AUROC")
    y_pred = (p_pos >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    return {
        "auroc": float(roc_auc_score(y_true, p_pos)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "f1": float(f1_score(y_true, y_pred, zero_division=0.0)),
        "sensitivity": float(tp / (tp + fn)),
        "specificity": float(tn / (tn + fp)),
        "threshold": float(threshold),
        "n": int(len(y_true)),
        "tp": int(tp),
        "fp": int(fp),
        "tn": int(tn),
        "fn": int(fn),
    }


def multiclass_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Macro AUROC (one-vs-rest), balanced accuracy, macro F1, macro sensitivity and specificity."""
    y_true = np.asarray(y_true).astype(int)
    classes = probs.shape[1]
    _require_both_classes(y_true, "AUROC")
    y_pred = probs.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred, labels=list(range(classes)))
    tp = np.diag(cm)
    fn = cm.sum(axis=1) - tp
    fp = cm.sum(axis=0) - tp
    tn = cm.sum() - tp - fn - fp
    present = cm.sum(axis=1) > 0
    if present.all():
        auroc = roc_auc_score(y_true, probs, multi_class="ovr", average="macro")
    else:  # a class absent from y_true: average AUROC over the classes present
        auroc = np.mean([roc_auc_score(y_true == k, probs[:, k]) for k in np.flatnonzero(present)])
    return {
        "auroc": float(auroc),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "f1": float(f1_score(y_true, y_pred, average="macro", labels=np.flatnonzero(present), zero_division=0.0)),
        "sensitivity": float(np.mean(tp[present] / (tp + fn)[present])),
        "specificity": float(np.mean(tn / np.maximum(tn + fp, 1))),
        "accuracy": float((y_pred == y_true).mean()),
        "n": int(len(y_true)),
    }


def classification_metrics(y_true: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Binary metrics for 1-D scores, multi-class metrics for ``[N, K]`` probabilities."""
    if np.asarray(scores).ndim == 1:
        return binary_metrics(y_true, scores, threshold)
    return multiclass_metrics(y_true, scores)


def youden_threshold(y_true: np.ndarray, p_pos: np.ndarray) -> float:
    """The score threshold maximising sensitivity + specificity - 1 (Youden's J).

    Choose it on predictions the model did not train on (out-of-fold or validation scores).
    """
    y_true = np.asarray(y_true).astype(int)
    _require_both_classes(y_true, "Youden's J")
    fpr, tpr, thresholds = roc_curve(y_true, p_pos)
    finite = np.isfinite(thresholds)
    best = int(np.argmax(np.where(finite, tpr - fpr, -np.inf)))
    return float(np.clip(thresholds[best], 1e-6, 1 - 1e-6))


def summarize(results: Sequence[dict[str, float]], keys: Sequence[str] = METRIC_KEYS) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation of each metric over folds."""
    out = {}
    for key in keys:
        values = [r[key] for r in results if key in r and not math.isnan(r[key])]
        if values:
            out[key] = {
                "mean": float(np.mean(values)),
                "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                "n": len(values),
            }
    return out


def _require_both_classes(y_true: np.ndarray, what: str) -> None:
    if len(y_true) == 0:
        raise DataError(f"{what} needs labelled examples, got none")
    present = np.unique(y_true)
    if len(present) < 2:
        raise DataError(
            f"{what} needs at least two classes in the labels, but only class {int(present[0])} "
            f"is present (n={len(y_true)})"
        )

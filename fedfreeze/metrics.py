"""Classification metrics with one contract for every model: site-level, federated or pooled.

Binary tasks score the positive-class probability at a decision threshold; multi-class tasks use
the arg-max and macro averages (AUROC one-vs-rest). Plain NumPy (the tests check every figure
against scikit-learn): a federated site imports this in every message's fresh process, where
scikit-learn's import alone would cost more than half a second.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedfreeze.errors import DataError

METRIC_KEYS = ("auroc", "balanced_accuracy", "f1", "sensitivity", "specificity")


def binary_metrics(y_true: np.ndarray, p_pos: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """AUROC, balanced accuracy, F1, sensitivity and specificity of scores ``p_pos`` at ``threshold``."""
    y_true = np.asarray(y_true).astype(int)
    p_pos = np.asarray(p_pos, dtype=float)
    _require_both_classes(y_true, "AUROC")
    positive = y_true == 1
    predicted = p_pos >= threshold
    tp = int(np.sum(predicted & positive))
    fn = int(np.sum(~predicted & positive))
    fp = int(np.sum(predicted & ~positive))
    tn = int(np.sum(~predicted & ~positive))
    sensitivity, specificity = tp / (tp + fn), tn / (tn + fp)
    return {
        "auroc": auroc(y_true, p_pos),
        "balanced_accuracy": float((sensitivity + specificity) / 2),
        "f1": float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0,
        "sensitivity": float(sensitivity),
        "specificity": float(specificity),
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
    cm = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    tp = np.diag(cm)
    fn = cm.sum(axis=1) - tp
    fp = cm.sum(axis=0) - tp
    tn = cm.sum() - tp - fn - fp
    present = cm.sum(axis=1) > 0
    recall = tp[present] / (tp + fn)[present]
    f1 = np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)[present]
    # one-vs-rest AUROC, macro over the classes present in y_true
    macro_auroc = np.mean([auroc((y_true == k).astype(int), probs[:, k]) for k in np.flatnonzero(present)])
    return {
        "auroc": float(macro_auroc),
        "balanced_accuracy": float(np.mean(recall)),
        "f1": float(np.mean(f1)),
        "sensitivity": float(np.mean(recall)),
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
    p_pos = np.asarray(p_pos, dtype=float)
    _require_both_classes(y_true, "Youden's J")
    thresholds = np.unique(p_pos)[::-1]  # every distinct score, highest first
    order = np.sort(p_pos[y_true == 1])
    negatives = np.sort(p_pos[y_true == 0])
    # cases at or above each threshold
    tpr = (len(order) - np.searchsorted(order, thresholds, side="left")) / len(order)
    fpr = (len(negatives) - np.searchsorted(negatives, thresholds, side="left")) / len(negatives)
    best = int(np.argmax(tpr - fpr))
    return float(np.clip(thresholds[best], 1e-6, 1 - 1e-6))


def auroc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the Mann-Whitney statistic with ties counted one half."""
    y_true = np.asarray(y_true).astype(int)
    scores = np.asarray(scores, dtype=float)
    _require_both_classes(y_true, "AUROC")
    ranks = midranks(scores)
    n_pos = int(np.sum(y_true == 1))
    n_neg = len(y_true) - n_pos
    return float((ranks[y_true == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank (what AUROC and DeLong's placements count)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse]


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

"""Pooled figures computed the plain way, from every raw score: what the coordinator's estimate from
released cells is checked against."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def exact_figures(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """AUROC (scikit-learn), sensitivity, specificity and balanced accuracy at ``threshold``."""
    pred = p >= threshold
    figures = {
        "auroc": float(roc_auc_score(y, p)),
        "sensitivity": float(pred[y == 1].mean()),
        "specificity": float((~pred[y == 0]).mean()),
    }
    figures["balanced_accuracy"] = (figures["sensitivity"] + figures["specificity"]) / 2
    return figures

"""Which examples an epoch visits: inverse-frequency class-balanced draws, or a plain shuffle."""

from __future__ import annotations

import numpy as np


def class_balanced_weights(labels: np.ndarray) -> np.ndarray:
    """Per-example weight ``1 / count(class)``, normalised: every class is drawn equally often."""
    counts = np.bincount(labels)
    weights = 1.0 / counts[labels]
    return weights / weights.sum()


def epoch_order(labels: np.ndarray, balanced: bool, rng: np.random.Generator) -> np.ndarray:
    """Indices for one epoch of ``len(labels)`` draws (with replacement when balanced)."""
    n = len(labels)
    if balanced:
        return rng.choice(n, size=n, replace=True, p=class_balanced_weights(labels))
    return rng.permutation(n)

"""What a model's scores looked like, class by class, on validation cases of the data that trained it.

A new site without labels cannot measure anything about a model, but it can ask whether its images'
scores look like the training sites' did under some prevalence: if only the class mix changed, the
site's score distribution is a mixture ``pi * f1 + (1 - pi) * f0`` of the reference class
distributions. Label-free adaptation (EM prevalence, AdaBN) is only vouched for when that holds
(``adaptation/reliability.py``); on the real new sites we tried, it did not, and both methods made
the model worse without a word.

The reference is stored in the model folder (``ModelCard.reference_scores``) as estimated counts per
class on the federation's fixed score bins (``evaluation.pooled.score_bin_edges``), made from cells of
at least ``min_cell_count`` cases (``evaluation.cells``): a federation stores the coordinator's pooled
estimate from the cells the sites released anyway; ``site-train`` stores its out-of-fold
cross-validation scores released the same way, so the folder tells no more about single patients than
a federation's round does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import Field, field_validator

from fedfreeze.config import Section
from fedfreeze.evaluation.cells import ReleasedCells, release_cells
from fedfreeze.evaluation.pooled import class_histograms, estimated_counts, score_bin_edges

REFERENCE_BINS = 200
REFERENCE_LOGIT_RANGE = 12.0


class ReferenceScores(Section):
    """Estimated per-class counts of validation scores on ``bins`` fixed score bins: the model's raw
    scores, before any calibration the card holds (what a site's check compares its own raw scores with)."""

    bins: int = Field(REFERENCE_BINS, ge=2)
    logit_range: float = Field(REFERENCE_LOGIT_RANGE, gt=0.0, allow_inf_nan=False)
    counts: list[list[float]] = Field(description="[negatives, positives]: estimated counts on each bin")
    n: list[int] = Field(description="cases per class")
    min_cell_count: int = Field(ge=1, description="every released cell behind the counts held 0 or at least this many")
    source: str = Field(description="which cases, scored by which model")

    @field_validator("counts")
    @classmethod
    def _two_rows(cls, value: list[list[float]]) -> list[list[float]]:
        if len(value) != 2 or any(not all(np.isfinite(v) and v >= 0 for v in row) for row in value):
            raise ValueError("counts should be two rows (negatives, positives) of finite non-negative numbers")
        return value

    def edges(self) -> np.ndarray:
        return score_bin_edges(self.bins, self.logit_range)

    def densities(self, floor: float = 1e-3) -> np.ndarray:
        """``[2, bins]`` each class's share of its cases per bin, mixed with ``floor`` of a uniform
        share so that a bin no reference case fell in is unlikely, not impossible."""
        counts = np.asarray(self.counts, dtype=np.float64)
        if counts.shape != (2, self.bins):
            raise ValueError(f"counts should be [2, {self.bins}], got {list(counts.shape)}")
        shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1e-12)
        return (1.0 - floor) * shares + floor / self.bins


def reference_from_histograms(
    hist_neg: Sequence[float], hist_pos: Sequence[float], min_cell_count: int, source: str
) -> ReferenceScores:
    """The reference from per-class counts estimated on ``score_bin_edges(len(hist_neg))`` (a
    federation's pooled histograms, estimated from the sites' cells)."""
    counts = [[round(float(v), 4) for v in row] for row in (hist_neg, hist_pos)]
    return ReferenceScores(
        bins=len(counts[0]),
        counts=counts,
        n=[round(sum(row)) for row in counts],
        min_cell_count=min_cell_count,
        source=source,
    )


def reference_from_releases(releases: Sequence[ReleasedCells], min_cell_count: int, source: str) -> ReferenceScores:
    """The pooled reference from sites' released cells (on ``REFERENCE_BINS`` score bins)."""
    edges = score_bin_edges(REFERENCE_BINS, REFERENCE_LOGIT_RANGE)
    total = np.sum([np.asarray(a, dtype=float) for a in estimated_counts(releases, edges)], axis=0)
    return reference_from_histograms(total[0], total[1], min_cell_count, source)


def reference_from_scores(labels: np.ndarray, scores: np.ndarray, min_cell_count: int, source: str) -> ReferenceScores:
    """A site's own reference from its exact scores, released as cells first (as a site does in a round)."""
    edges = score_bin_edges(REFERENCE_BINS, REFERENCE_LOGIT_RANGE)
    cut = REFERENCE_BINS // 2  # the 0.5 edge
    cells = release_cells(
        class_histograms(np.asarray(labels), np.asarray(scores), edges),
        min_cell_count,
        anchors=[[cut], [cut]],
        walk=["down", "up"],
    )
    return reference_from_releases([cells], min_cell_count, source)

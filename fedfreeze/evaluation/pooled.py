"""Federated metrics of the pooled validation data, from per-class histograms on fixed score bins.

A weighted mean of per-site AUROCs (what Flower and most frameworks report) is not the AUROC of the
pooled data: AUROC ranks every positive against every negative, across sites too, and sites score
on different scales. So the coordinator computes every figure from pooled per-class histograms of
the scores on fixed bins. A site never sends those histograms as they are: it releases coarser
cells that each hold 0 or at least ``federation.min-cell-count`` cases (:mod:`fedfreeze.evaluation.cells`),
and the coordinator estimates the histograms from the cells. The functions here take histograms of
counts (integers) or of estimated counts (non-negative floats).

Bin ``b`` holds scores ``edges[b] <= s < edges[b + 1]`` (the last bin also holds 1.0), so at a
threshold ``t = edges[k]`` the predicted positives (``s >= t``, as in :mod:`fedfreeze.metrics`)
are exactly bins ``k`` and up. Thresholds are therefore always interior edges (:func:`snap_threshold`).
With exact histograms, balanced accuracy and F1 at an edge are exact, and AUROC is within half the
share of positive-negative pairs that share a bin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from fedfreeze.errors import DataError
from fedfreeze.evaluation.cells import ReleasedCells, allocate, binary_bounds, count_bounds, one_d_array

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]


def score_bin_edges(bins: int = 200, logit_range: float = 12.0) -> FloatArray:
    """``bins + 1`` probability edges: 0.0, a grid uniform in logit space, then 1.0.

    Sigmoid scores crowd near 0 and 1, where a uniform grid would put most cases of a confident model
    into the two end bins. The grid is symmetric about 0.5, and 0.5 is an edge when ``bins`` is even.

    Parameters
    ----------
    bins
        Number of bins, at least 2.
    logit_range
        Interior edges run from ``sigmoid(-logit_range)`` to ``sigmoid(logit_range)``.
    """
    if isinstance(bins, bool) or not isinstance(bins, Integral) or bins < 2:
        raise ValueError(f"bins should be an integer >= 2, got {bins!r}")
    if isinstance(logit_range, bool) or not isinstance(logit_range, Real) or not 0 < logit_range < math.inf:
        raise ValueError(f"logit_range should be a positive finite number, got {logit_range!r}")
    if bins == 2:
        logits = np.zeros(1)
    else:
        logits = np.linspace(-float(logit_range), float(logit_range), int(bins) - 1)
        logits = (logits - logits[::-1]) / 2  # exactly antisymmetric, so the middle logit is exactly 0
    edges = np.concatenate(([0.0], 1.0 / (1.0 + np.exp(-logits)), [1.0]))
    if not np.all(np.diff(edges) > 0):
        raise ValueError(
            f"logit_range={logit_range} with bins={bins} gives edges that round to 0, 1 or each other "
            "in float64; use a smaller logit_range or fewer bins"
        )
    return edges


def edge_logits(edges: ArrayLike) -> FloatArray:
    """The edges on the logit scale: ``-inf`` and ``inf`` at 0 and 1 (what a binormal fit works on)."""
    e = _as_edges(edges)
    with np.errstate(divide="ignore"):
        return np.log(e) - np.log1p(-e)


def snap_threshold(threshold: float, edges: ArrayLike) -> float:
    """The edge strictly inside (0, 1) nearest to ``threshold``: where binned counts are exact."""
    e = _as_edges(edges)
    if isinstance(threshold, bool) or not isinstance(threshold, Real) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold should be a number in [0, 1], got {threshold!r}")
    interior = e[1:-1]
    return float(interior[np.argmin(np.abs(interior - float(threshold)))])


def confusion_from_histograms(
    hist_neg: ArrayLike, hist_pos: ArrayLike, edges: ArrayLike, threshold: float
) -> tuple[Any, Any, Any, Any]:
    """``(tp, fp, tn, fn)`` at ``threshold``, an interior edge: integers for histograms of counts,
    floats for estimated ones."""
    neg, pos = _as_histograms(hist_neg, hist_pos)
    e = _edges_for(edges, len(neg))
    k = _edge_index(threshold, e)
    return _number(pos[k:].sum()), _number(neg[k:].sum()), _number(neg[:k].sum()), _number(pos[:k].sum())


def pooled_auroc(hist_neg: ArrayLike, hist_pos: ArrayLike) -> float:
    """Mann-Whitney AUROC of binned scores: P(pos bin > neg bin) + 0.5 * P(same bin).

    With exact histograms it differs from the AUROC of the raw scores by at most
    ``0.5 * sum(hist_pos * hist_neg) / (n_pos * n_neg)``: only pairs sharing a bin can be ranked
    differently.
    """
    neg, pos = _as_histograms(hist_neg, hist_pos)
    n_neg, n_pos = neg.sum(), pos.sum()
    _require_both_classes(n_pos, n_neg, "AUROC")
    below = np.cumsum(neg) - neg  # negatives in strictly lower bins
    if neg.dtype.kind == pos.dtype.kind == "i":
        twice_wins = 2 * _dot(pos, below) + _dot(pos, neg)
        return twice_wins / (2 * int(n_pos) * int(n_neg))  # exact integers, one rounding
    return float((np.dot(pos, below) + 0.5 * np.dot(pos, neg)) / (n_pos * n_neg))


def class_histograms(y_true: ArrayLike, p_pos: ArrayLike, edges: ArrayLike) -> IntArray:
    """Exact per-class counts ``[2, bins]`` of one site's labels ``y_true`` (0/1) and positive-class
    scores ``p_pos`` on the bins of ``edges``: row 0 the negatives, row 1 the positives. They stay at
    the site; what it releases is :func:`fedfreeze.evaluation.cells.release_cells` of them."""
    e = _as_edges(edges)
    y = np.asarray(y_true)
    p = np.asarray(p_pos, dtype=float)
    if y.ndim != 1 or p.ndim != 1 or len(y) != len(p):
        raise DataError(f"y_true and p_pos should be 1-D of equal length, got shapes {y.shape} and {p.shape}")
    if not np.isin(y, (0, 1)).all():
        raise DataError(f"y_true should hold only 0 and 1, got values {np.unique(y)[:8].tolist()}")
    bad = ~((p >= 0.0) & (p <= 1.0))  # NaN fails both comparisons
    if bad.any():
        raise DataError(f"p_pos should be probabilities in [0, 1], got {int(bad.sum())} outside, e.g. {p[bad][0]}")
    bins = len(e) - 1
    bin_of = np.minimum(np.searchsorted(e, p, side="right") - 1, bins - 1)
    return np.stack([np.bincount(bin_of[y == c], minlength=bins) for c in (0, 1)]).astype(np.int64)


def histogram_metrics(hist_neg: ArrayLike, hist_pos: ArrayLike, edges: ArrayLike, threshold: float) -> dict[str, Any]:
    """Pooled binary figures, with the keys of :func:`fedfreeze.metrics.binary_metrics`, from
    per-class histograms (counts or estimated counts) at ``threshold``, an interior edge
    (see :func:`snap_threshold`)."""
    neg, pos = _as_histograms(hist_neg, hist_pos)
    e = _edges_for(edges, len(neg))
    tp, fp, tn, fn = confusion_from_histograms(neg, pos, e, threshold)
    auroc = pooled_auroc(neg, pos)  # raises unless both classes are present
    sensitivity, specificity = tp / (tp + fn), tn / (tn + fp)
    return {
        "auroc": auroc,
        "balanced_accuracy": float((sensitivity + specificity) / 2),
        "f1": float(2 * tp / (2 * tp + fp + fn)),  # > 0: positives exist
        "sensitivity": float(sensitivity),
        "specificity": float(specificity),
        "threshold": float(threshold),
        "n": _number(neg.sum() + pos.sum()),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def estimated_counts(releases: Sequence[ReleasedCells], edges: ArrayLike | None = None) -> list[FloatArray]:
    """Each site's per-class counts ``[classes, units]`` estimated from its released cells: on score
    bins (``edges`` given) by the binormal allocation, on predicted classes by Turnbull's (see
    :func:`fedfreeze.evaluation.cells.allocate`)."""
    if edges is None:
        return allocate(releases, "pooled")
    return allocate(releases, "binormal", positions=edge_logits(edges))


def released_metrics(
    releases: Sequence[ReleasedCells], estimated: Sequence[ArrayLike], edges: ArrayLike, threshold: float
) -> dict[str, Any]:
    """Pooled binary figures at ``threshold`` from the sites' cells and their estimated counts.

    The figures come from the estimated histograms; ``ranges`` holds, for each figure, the lowest and
    highest value any cases consistent with the cells would give; ``exact`` says whether the cells
    fix the confusion counts at this threshold (then ``tp``, ``fp``, ``tn``, ``fn`` are integers).
    """
    e = _as_edges(edges)
    total = np.sum([np.asarray(a, dtype=float) for a in estimated], axis=0)
    out = histogram_metrics(total[0], total[1], e, threshold)
    cut = _edge_index(threshold, e)
    tp_lo, tp_hi = count_bounds(releases, 1, cut)
    fp_lo, fp_hi = count_bounds(releases, 0, cut)
    n_neg, n_pos = (int(v) for v in np.sum([r.totals() for r in releases], axis=0))
    out["n"] = n_neg + n_pos
    if tp_lo == tp_hi:
        out["tp"], out["fn"] = tp_lo, n_pos - tp_lo
    if fp_lo == fp_hi:
        out["fp"], out["tn"] = fp_lo, n_neg - fp_lo
    out["exact"] = tp_lo == tp_hi and fp_lo == fp_hi
    out["ranges"] = binary_bounds(releases, cut)
    return out


def youden_threshold_from_histograms(hist_neg: ArrayLike, hist_pos: ArrayLike, edges: ArrayLike) -> float:
    """The interior edge maximising sensitivity + specificity - 1 (Youden's J) on pooled histograms.

    Empty bins make runs of equal J; ties go to the edge closest to 0.5, the uncalibrated default.
    """
    neg, pos = _as_histograms(hist_neg, hist_pos)
    e = _edges_for(edges, len(neg))
    n_neg, n_pos = neg.sum(), pos.sum()
    _require_both_classes(n_pos, n_neg, "Youden's J")
    k = np.arange(1, len(neg))
    # J * n_pos * n_neg: integers for counts, so equal J compare equal; estimated counts within rounding
    scaled_j = _at_or_above(pos)[k] * n_neg - _at_or_above(neg)[k] * n_pos
    best = k[scaled_j >= scaled_j.max() - _TIE * n_pos * n_neg]
    return float(e[best[np.argmin(np.abs(e[best] - 0.5))]])


def threshold_for_sensitivity(hist_neg: ArrayLike, hist_pos: ArrayLike, edges: ArrayLike, target: float) -> float:
    """The largest interior edge whose pooled sensitivity is at least ``target``.

    The largest such edge keeps the most specificity. ``hist_neg`` is only checked for shape.
    """
    if isinstance(target, bool) or not isinstance(target, Real) or not 0.0 < target <= 1.0:
        raise ValueError(f"target should be a sensitivity in (0, 1], got {target!r}")
    neg, pos = _as_histograms(hist_neg, hist_pos)
    e = _edges_for(edges, len(neg))
    n_pos = pos.sum()
    if n_pos == 0:
        raise DataError("a sensitivity target needs positive cases, but hist_pos is empty")
    sensitivity = _at_or_above(pos)[1:-1] / n_pos  # at edges 1 .. bins - 1, non-increasing
    reached = np.flatnonzero(sensitivity >= target - _TIE)
    if len(reached) == 0:
        raise DataError(
            f"no threshold inside (0, 1) reaches sensitivity {target}: the highest, at {e[1]}, is {sensitivity[0]}"
        )
    return float(e[1 + reached[-1]])


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    """Weighted mean of per-site metrics: what other frameworks report, for comparison only."""
    v = np.asarray(values, dtype=float)
    w = np.asarray(weights, dtype=float)
    if v.ndim != 1 or v.shape != w.shape or len(v) == 0:
        raise ValueError(f"values and weights should be non-empty and of equal length, got {v.shape} and {w.shape}")
    if not np.isfinite(v).all():
        raise ValueError(f"values should be finite, got {v.tolist()}")
    if not (np.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
        raise ValueError(f"weights should be non-negative, finite and not all zero, got {w.tolist()}")
    return float(np.dot(v, w) / w.sum())


def multiclass_confusion(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int) -> IntArray:
    """``[K, K]`` counts, rows the true class and columns the predicted one (as sklearn)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, Integral) or num_classes < 2:
        raise ValueError(f"num_classes should be an integer >= 2, got {num_classes!r}")
    k = int(num_classes)
    t = _as_class_labels(y_true, "y_true", k)
    p = _as_class_labels(y_pred, "y_pred", k)
    if len(t) != len(p):
        raise DataError(f"y_true and y_pred should have equal length, got {len(t)} and {len(p)}")
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k).astype(np.int64)


def pooled_multiclass_metrics(matrices: Sequence[ArrayLike]) -> dict[str, Any]:
    """Accuracy, balanced accuracy and macro F1 of the pooled data from per-site ``[K, K]`` matrices
    (rows the true class): exact from counts, estimates from estimated counts.

    Balanced accuracy and F1 average over the classes present in the pooled labels, as
    :func:`fedfreeze.metrics.multiclass_metrics` does.
    """
    if len(matrices) == 0:
        raise ValueError("matrices should hold at least one site, got none")
    arrays = [np.asarray(m) for m in matrices]
    for i, m in enumerate(arrays):
        if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape != arrays[0].shape:
            raise DataError(f"matrix {i} should be square like matrix 0 {arrays[0].shape}, got shape {m.shape}")
        if m.dtype.kind not in "iuf" or not np.isfinite(m).all() or (m < 0).any():
            raise DataError(f"matrix {i} should hold non-negative counts, got dtype {m.dtype}")
    exact = all(m.dtype.kind in "iu" for m in arrays)
    total = np.sum(arrays, axis=0).astype(np.int64 if exact else np.float64)
    n = _number(total.sum())
    if n == 0:
        raise DataError("the pooled confusion matrix is empty")
    correct = np.diag(total)
    support = total.sum(axis=1)
    predicted = total.sum(axis=0)
    present = support > 0
    return {
        "accuracy": float(correct.sum() / n),
        "balanced_accuracy": float(np.mean(correct[present] / support[present])),
        "f1": float(np.mean(2 * correct[present] / (support + predicted)[present])),
        "n": n,
    }


# --- helpers -----------------------------------------------------------------------------------


_TIE = 1e-12  # estimated counts: figures this close (relative to their scale) are ties


def _number(value: Any) -> Any:
    """A NumPy sum as a Python int (counts) or float (estimated counts)."""
    return int(value) if np.asarray(value).dtype.kind in "iu" else float(value)


def _as_count_array(value: Any, name: str) -> IntArray | FloatArray:
    """A fresh 1-D array of non-negative counts: int64 for integers, float64 for estimated counts."""
    arr = one_d_array(value, name, "iuf", "counts")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise DataError(f"{name} should hold finite counts, got {arr[~np.isfinite(arr)][0]}")
    if (arr < 0).any():
        raise DataError(f"{name} should hold non-negative counts, got {arr.min()}")
    if arr.dtype.kind == "f":
        return arr.astype(np.float64)
    return arr.astype(np.int64)


def _as_histograms(hist_neg: ArrayLike, hist_pos: ArrayLike) -> tuple[Any, Any]:
    neg = _as_count_array(hist_neg, "hist_neg")
    pos = _as_count_array(hist_pos, "hist_pos")
    if len(neg) != len(pos) or len(neg) < 2:
        raise DataError(
            f"hist_neg and hist_pos should have the same number (>= 2) of bins, got {len(neg)} and {len(pos)}"
        )
    if neg.dtype != pos.dtype:  # one of counts, one of estimated counts: both as floats
        return neg.astype(np.float64), pos.astype(np.float64)
    return neg, pos


def _as_edges(edges: ArrayLike) -> FloatArray:
    e = np.asarray(edges, dtype=float)
    if e.ndim != 1 or len(e) < 3:
        raise ValueError(f"edges should be 1-D with at least 3 values (see score_bin_edges), got shape {e.shape}")
    if e[0] != 0.0 or e[-1] != 1.0 or not np.all(np.diff(e) > 0):
        raise ValueError(f"edges should increase strictly from 0.0 to 1.0, got {len(e)} values from {e[0]} to {e[-1]}")
    return e


def _edges_for(edges: ArrayLike, bins: int) -> FloatArray:
    e = _as_edges(edges)
    if len(e) != bins + 1:
        raise ValueError(f"edges should have {bins + 1} values for histograms of {bins} bins, got {len(e)}")
    return e


def _edge_index(threshold: float, edges: FloatArray) -> int:
    """Index ``k`` with ``edges[k] == threshold``, ``0 < k < bins``; counts are exact only there."""
    k = int(np.searchsorted(edges, threshold))
    if not 0 < k < len(edges) - 1 or edges[k] != threshold:
        raise ValueError(
            f"threshold should be an edge strictly inside (0, 1) so binned counts are exact, got {threshold!r}; "
            "pass it through snap_threshold first"
        )
    return k


def _at_or_above(hist: Any) -> Any:
    """``out[k]`` = cases in bins ``k`` and up, for ``k = 0 .. bins``."""
    return np.concatenate((np.cumsum(hist[::-1])[::-1], [0]))


def _dot(a: IntArray, b: IntArray) -> int:
    return sum(int(x) * int(y) for x, y in zip(a, b, strict=True))  # Python ints cannot overflow


def _require_both_classes(n_pos: float, n_neg: float, what: str) -> None:
    if n_pos == 0 or n_neg == 0:
        raise DataError(f"{what} needs both classes, got {n_pos} positives and {n_neg} negatives")


def _as_class_labels(values: ArrayLike, name: str, num_classes: int) -> IntArray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise DataError(f"{name} should be 1-D class indices, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise DataError(f"{name} should hold integer class indices, got dtype {arr.dtype}")
    bad = (arr < 0) | (arr >= num_classes)
    if bad.any():
        raise DataError(f"{name} should hold classes 0 .. {num_classes - 1}, got {arr[bad][0]}")
    return arr.astype(np.int64)


def youden_mid_threshold_from_histograms(
    hist_neg: ArrayLike, hist_pos: ArrayLike, edges: ArrayLike, tolerance: float = 0.02
) -> float:
    """The middle, in logit space, of the widest run of edges whose J is within ``tolerance`` of its maximum.

    Why: on near-perfect validation J is flat over a wide range of thresholds and its arg-max is set
    by one or two cases, so plain Youden lands anywhere on the plateau (0.275 in a federation where
    0.87 was best on external data). The middle of the plateau is the pick farthest from both classes.
    The edges are uniform in logit space, so the middle index is the middle logit.
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, Real) or not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance should be in [0, 1), got {tolerance!r}")
    neg, pos = _as_histograms(hist_neg, hist_pos)
    e = _edges_for(edges, len(neg))
    n_neg, n_pos = neg.sum(), pos.sum()
    _require_both_classes(n_pos, n_neg, "Youden's J")
    k = np.arange(1, len(neg))
    j = _at_or_above(pos)[k] / n_pos - _at_or_above(neg)[k] / n_neg
    near = j >= j.max() - tolerance - 1e-12
    best_start, best_len, start = 0, 0, None
    for i, flag in enumerate([*near.tolist(), False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            if i - start > best_len:
                best_start, best_len = start, i - start
            start = None
    middle = best_start + (best_len - 1) / 2
    lo, hi = int(np.floor(middle)), int(np.ceil(middle))
    pick = lo if abs(e[k[lo]] - 0.5) <= abs(e[k[hi]] - 0.5) else hi  # an even run: the edge nearer 0.5
    return float(e[k[pick]])


THRESHOLD_RULES = ("youden", "youden-mid", "target-sensitivity")


def choose_threshold(
    rule: str | float,
    hist_neg: ArrayLike,
    hist_pos: ArrayLike,
    edges: ArrayLike,
    *,
    target_sensitivity: float = 0.9,
    tolerance: float = 0.02,
) -> float:
    """The operating threshold a rule picks on pooled histograms (a number is snapped to an edge).

    One function for the coordinator, the benchmarks and any post-hoc analysis of ``metrics.json``.
    """
    if isinstance(rule, str) and rule == "youden":
        return youden_threshold_from_histograms(hist_neg, hist_pos, edges)
    if isinstance(rule, str) and rule == "youden-mid":
        return youden_mid_threshold_from_histograms(hist_neg, hist_pos, edges, tolerance)
    if isinstance(rule, str) and rule == "target-sensitivity":
        return threshold_for_sensitivity(hist_neg, hist_pos, edges, target_sensitivity)
    if isinstance(rule, str):
        raise ValueError(f"threshold rule should be one of {', '.join(THRESHOLD_RULES)} or a number, got {rule!r}")
    return snap_threshold(float(rule), edges)


def threshold_interval(
    rule: str | float,
    hist_neg: ArrayLike,
    hist_pos: ArrayLike,
    edges: ArrayLike,
    *,
    target_sensitivity: float = 0.9,
    tolerance: float = 0.02,
    replicates: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """A bootstrap interval of the threshold a rule picks: how far the pick moves when the validation
    cases are redrawn (each class's histogram, of counts or estimated counts, resampled
    multinomially at its own size).

    A wide interval says the stored threshold is close to arbitrary on this validation data.
    """
    neg, pos = _as_histograms(hist_neg, hist_pos)
    n_neg, n_pos = round(float(neg.sum())), round(float(pos.sum()))  # estimated counts still sum to whole cases
    _require_both_classes(n_pos, n_neg, "a threshold interval")
    rng = np.random.default_rng(seed)
    picks = []
    for _ in range(replicates):
        b_neg = rng.multinomial(n_neg, neg / neg.sum())
        b_pos = rng.multinomial(n_pos, pos / pos.sum())
        try:
            picks.append(
                choose_threshold(rule, b_neg, b_pos, edges, target_sensitivity=target_sensitivity, tolerance=tolerance)
            )
        except DataError:
            continue  # a target sensitivity no threshold reaches in this replicate
    if not picks:
        raise DataError("no bootstrap replicate gave a threshold")
    alpha = (1.0 - confidence) / 2
    return float(np.quantile(picks, alpha)), float(np.quantile(picks, 1 - alpha))

"""Federated metrics that equal the metrics of the pooled validation data.

A weighted mean of per-site AUROCs (what Flower and most frameworks report) is not the AUROC of the
pooled data: AUROC ranks every positive against every negative, across sites too, and sites score
on different scales. So each site sends sufficient statistics instead of scores: its confusion
counts at the server's threshold and per-class histograms of its scores on fixed bins. Summed, they
give pooled balanced accuracy and F1 exactly, pooled AUROC to within the pos-neg pairs that share
a bin, and let the server choose the operating threshold on the pooled data. No score, label or
case identifier leaves a site, only counts; a bin holding one case still tells that some case of
that class scored in that range (counts are not differentially private).

Bin ``b`` holds scores ``edges[b] <= s < edges[b + 1]`` (the last bin also holds 1.0), so at a
threshold ``t = edges[k]`` the predicted positives (``s >= t``, as in :mod:`fedfreeze.metrics`)
are exactly bins ``k`` and up. Thresholds are therefore always interior edges (:func:`snap_threshold`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from numbers import Integral, Real
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from fedfreeze.errors import DataError, ProtocolError

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


def snap_threshold(threshold: float, edges: ArrayLike) -> float:
    """The edge strictly inside (0, 1) nearest to ``threshold``: where binned counts are exact."""
    e = _as_edges(edges)
    if isinstance(threshold, bool) or not isinstance(threshold, Real) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold should be a number in [0, 1], got {threshold!r}")
    interior = e[1:-1]
    return float(interior[np.argmin(np.abs(interior - float(threshold)))])


def confusion_from_histograms(
    hist_neg: ArrayLike, hist_pos: ArrayLike, edges: ArrayLike, threshold: float
) -> tuple[int, int, int, int]:
    """``(tp, fp, tn, fn)`` at ``threshold``, an interior edge, where the counts are exact."""
    neg, pos = _as_histograms(hist_neg, hist_pos)
    e = _edges_for(edges, len(neg))
    k = _edge_index(threshold, e)
    return int(pos[k:].sum()), int(neg[k:].sum()), int(neg[:k].sum()), int(pos[:k].sum())


def pooled_auroc(hist_neg: ArrayLike, hist_pos: ArrayLike) -> float:
    """Mann-Whitney AUROC of binned scores: P(pos bin > neg bin) + 0.5 * P(same bin).

    Differs from the AUROC of the raw scores by at most ``0.5 * sum(hist_pos * hist_neg) /
    (n_pos * n_neg)``: only pairs sharing a bin can be ranked differently.
    """
    neg, pos = _as_histograms(hist_neg, hist_pos)
    n_neg, n_pos = int(neg.sum()), int(pos.sum())
    _require_both_classes(n_pos, n_neg, "AUROC")
    below = np.cumsum(neg) - neg  # negatives in strictly lower bins
    twice_wins = 2 * _dot(pos, below) + _dot(pos, neg)
    return twice_wins / (2 * n_pos * n_neg)  # exact integers, one rounding


@dataclass(frozen=True, eq=False)
class SiteStats:
    """What one site sends for a binary task: counts at the threshold and per-class score histograms.

    Construction checks that the counts and histograms agree, so a summed ``SiteStats`` is always
    the statistics of some pooled data set. Histograms are read-only ``int64`` copies.
    """

    n: int
    tp: int
    fp: int
    tn: int
    fn: int
    threshold: float
    hist_neg: IntArray
    hist_pos: IntArray

    def __post_init__(self) -> None:
        values = _validated({f.name: getattr(self, f.name) for f in fields(self)}, name=str, bins=None)
        for field_name, value in values.items():
            object.__setattr__(self, field_name, value)

    @property
    def bins(self) -> int:
        return len(self.hist_neg)

    @classmethod
    def from_scores(cls, y_true: ArrayLike, p_pos: ArrayLike, edges: ArrayLike, threshold: float) -> SiteStats:
        """Statistics of one site's labels ``y_true`` (0/1) and positive-class scores ``p_pos``."""
        e = _as_edges(edges)
        _edge_index(threshold, e)
        y = np.asarray(y_true)
        p = np.asarray(p_pos, dtype=float)
        if y.ndim != 1 or p.ndim != 1 or len(y) != len(p):
            raise DataError(f"y_true and p_pos should be 1-D of equal length, got shapes {y.shape} and {p.shape}")
        if not np.isin(y, (0, 1)).all():
            raise DataError(f"y_true should hold only 0 and 1, got values {np.unique(y)[:8].tolist()}")
        bad = ~((p >= 0.0) & (p <= 1.0))  # NaN fails both comparisons
        if bad.any():
            raise DataError(f"p_pos should be probabilities in [0, 1], got {int(bad.sum())} outside, e.g. {p[bad][0]}")
        is_pos = y == 1
        bin_of = np.minimum(np.searchsorted(e, p, side="right") - 1, len(e) - 2)
        predicted = p >= threshold
        return cls(
            n=len(y),
            tp=int(np.sum(predicted & is_pos)),
            fp=int(np.sum(predicted & ~is_pos)),
            tn=int(np.sum(~predicted & ~is_pos)),
            fn=int(np.sum(~predicted & is_pos)),
            threshold=float(threshold),
            hist_neg=np.bincount(bin_of[~is_pos], minlength=len(e) - 1),
            hist_pos=np.bincount(bin_of[is_pos], minlength=len(e) - 1),
        )

    def to_metrics(self, prefix: str = "") -> dict[str, int | float | list[int]]:
        """Flat ints, a float and lists of ints: what a Flower ``MetricRecord`` holds."""
        out: dict[str, int | float | list[int]] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[_metric_key(prefix, f.name)] = value.tolist() if isinstance(value, np.ndarray) else value
        return out

    @classmethod
    def from_metrics(cls, record: Mapping[str, Any], prefix: str = "", *, bins: int) -> SiteStats:
        """Read a site's record, raising :class:`ProtocolError` naming the key when it is malformed.

        Checks every key is present, counts are non-negative integers, both histograms have ``bins``
        entries, and the counts agree with the histograms, so a misbehaving site is reported, not
        summed in.
        """
        if isinstance(bins, bool) or not isinstance(bins, Integral) or bins < 2:
            raise ValueError(f"bins should be an integer >= 2, got {bins!r}")
        missing = [_metric_key(prefix, f.name) for f in fields(cls) if _metric_key(prefix, f.name) not in record]
        if missing:
            raise ProtocolError(f"site metrics lack key(s) {missing}")
        raw = {f.name: record[_metric_key(prefix, f.name)] for f in fields(cls)}
        try:
            return cls(**_validated(raw, name=lambda field_name: _metric_key(prefix, field_name), bins=int(bins)))
        except DataError as err:  # the record came over the wire: a protocol fault, not the coordinator's data
            raise ProtocolError(f"site metrics: {err}") from None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SiteStats):
            return NotImplemented
        return all(np.array_equal(getattr(self, f.name), getattr(other, f.name)) for f in fields(self))

    __hash__ = None  # type: ignore[assignment]  # holds arrays


def pool(stats: Sequence[SiteStats]) -> SiteStats:
    """The statistics of the pooled data: sums over sites, which must share threshold and bins."""
    if len(stats) == 0:
        raise ValueError("stats should hold at least one site, got none")
    first = stats[0]
    for i, site in enumerate(stats[1:], start=1):
        if site.threshold != first.threshold:
            raise DataError(
                f"site {i} scored at threshold {site.threshold} but site 0 at {first.threshold}; "
                "all sites must score at the server's threshold"
            )
        if site.bins != first.bins:
            raise DataError(f"site {i} sent histograms of {site.bins} bins but site 0 sent {first.bins}")
    return SiteStats(
        n=sum(s.n for s in stats),
        tp=sum(s.tp for s in stats),
        fp=sum(s.fp for s in stats),
        tn=sum(s.tn for s in stats),
        fn=sum(s.fn for s in stats),
        threshold=first.threshold,
        hist_neg=np.sum([s.hist_neg for s in stats], axis=0),
        hist_pos=np.sum([s.hist_pos for s in stats], axis=0),
    )


def pooled_metrics(stats: Sequence[SiteStats], edges: ArrayLike, threshold: float | None = None) -> dict[str, float]:
    """Metrics of the pooled data, with the keys of :func:`fedfreeze.metrics.binary_metrics`.

    With ``threshold=None``, at the sites' common threshold from their reported counts, each
    cross-checked against its own histograms (a site that miscounts is caught, not summed in).
    With a threshold (an interior edge, see :func:`snap_threshold`), from the pooled histograms.
    """
    total = pool(stats)
    e = _edges_for(edges, total.bins)
    if threshold is None:
        for i, site in enumerate(stats):
            binned = confusion_from_histograms(site.hist_neg, site.hist_pos, e, site.threshold)
            if binned != (site.tp, site.fp, site.tn, site.fn):
                raise DataError(
                    f"site {i} reports (tp, fp, tn, fn) = {(site.tp, site.fp, site.tn, site.fn)} at threshold "
                    f"{site.threshold}, but its histograms give {binned}"
                )
        threshold = total.threshold
        tp, fp, tn, fn = total.tp, total.fp, total.tn, total.fn
    else:
        tp, fp, tn, fn = confusion_from_histograms(total.hist_neg, total.hist_pos, e, threshold)
    auroc = pooled_auroc(total.hist_neg, total.hist_pos)  # raises unless both classes are present
    sensitivity, specificity = tp / (tp + fn), tn / (tn + fp)
    return {
        "auroc": auroc,
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "f1": 2 * tp / (2 * tp + fp + fn),  # > 0: positives exist
        "sensitivity": sensitivity,
        "specificity": specificity,
        "threshold": float(threshold),
        "n": total.n,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def youden_threshold_from_histograms(hist_neg: ArrayLike, hist_pos: ArrayLike, edges: ArrayLike) -> float:
    """The interior edge maximising sensitivity + specificity - 1 (Youden's J) on pooled histograms.

    Empty bins make runs of equal J; ties go to the edge closest to 0.5, the uncalibrated default.
    """
    neg, pos = _as_histograms(hist_neg, hist_pos)
    e = _edges_for(edges, len(neg))
    n_neg, n_pos = int(neg.sum()), int(pos.sum())
    _require_both_classes(n_pos, n_neg, "Youden's J")
    k = np.arange(1, len(neg))
    # J * n_pos * n_neg as integers, so equal J compare equal
    scaled_j = _at_or_above(pos)[k] * n_neg - _at_or_above(neg)[k] * n_pos
    best = k[scaled_j == scaled_j.max()]
    return float(e[best[np.argmin(np.abs(e[best] - 0.5))]])


def threshold_for_sensitivity(hist_neg: ArrayLike, hist_pos: ArrayLike, edges: ArrayLike, target: float) -> float:
    """The largest interior edge whose pooled sensitivity is at least ``target``.

    The largest such edge keeps the most specificity. ``hist_neg`` is only checked for shape.
    """
    if isinstance(target, bool) or not isinstance(target, Real) or not 0.0 < target <= 1.0:
        raise ValueError(f"target should be a sensitivity in (0, 1], got {target!r}")
    neg, pos = _as_histograms(hist_neg, hist_pos)
    e = _edges_for(edges, len(neg))
    n_pos = int(pos.sum())
    if n_pos == 0:
        raise DataError("a sensitivity target needs positive cases, but hist_pos is empty")
    sensitivity = _at_or_above(pos)[1:-1] / n_pos  # at edges 1 .. bins - 1, non-increasing
    reached = np.flatnonzero(sensitivity >= target)
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


def pooled_multiclass_metrics(matrices: Sequence[ArrayLike]) -> dict[str, float]:
    """Exact accuracy, balanced accuracy and macro F1 of the pooled data from per-site matrices.

    Balanced accuracy and F1 average over the classes present in the pooled labels, as
    :func:`fedfreeze.metrics.multiclass_metrics` does.
    """
    if len(matrices) == 0:
        raise ValueError("matrices should hold at least one site, got none")
    arrays = [np.asarray(m) for m in matrices]
    for i, m in enumerate(arrays):
        if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape != arrays[0].shape:
            raise DataError(f"matrix {i} should be square like matrix 0 {arrays[0].shape}, got shape {m.shape}")
        if m.dtype.kind not in "iu" or (m < 0).any():
            raise DataError(f"matrix {i} should hold non-negative integer counts, got dtype {m.dtype}")
    total = np.sum(arrays, axis=0).astype(np.int64)
    n = int(total.sum())
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


def _metric_key(prefix: str, field_name: str) -> str:
    return prefix + field_name.replace("_", "-")


def _validated(raw: Mapping[str, Any], name: Callable[[str], str], bins: int | None) -> dict[str, Any]:
    """SiteStats fields checked and normalised; errors use ``name(field)`` (a record key or field)."""
    out: dict[str, Any] = {c: _as_count(raw[c], name(c)) for c in ("n", "tp", "fp", "tn", "fn")}
    t = raw["threshold"]
    if isinstance(t, bool) or not isinstance(t, Real) or not 0.0 < float(t) < 1.0:
        raise DataError(f"{name('threshold')} should be a number strictly inside (0, 1), got {t!r}")
    out["threshold"] = float(t)
    neg = _as_count_array(raw["hist_neg"], name("hist_neg"))
    pos = _as_count_array(raw["hist_pos"], name("hist_pos"))
    expected = len(neg) if bins is None else bins
    for field_name, hist in (("hist_neg", neg), ("hist_pos", pos)):
        if len(hist) != expected:
            raise DataError(f"{name(field_name)} should have {expected} bins, got {len(hist)}")
    if int(neg.sum()) + int(pos.sum()) != out["n"]:
        raise DataError(
            f"{name('n')} is {out['n']} but {name('hist_neg')} and {name('hist_pos')} hold "
            f"{int(neg.sum()) + int(pos.sum())} cases"
        )
    if out["tp"] + out["fn"] != int(pos.sum()):
        raise DataError(
            f"{name('tp')} + {name('fn')} is {out['tp'] + out['fn']} "
            f"but {name('hist_pos')} holds {int(pos.sum())} positives"
        )
    if out["tn"] + out["fp"] != int(neg.sum()):
        raise DataError(
            f"{name('tn')} + {name('fp')} is {out['tn'] + out['fp']} "
            f"but {name('hist_neg')} holds {int(neg.sum())} negatives"
        )
    for field_name, hist in (("hist_neg", neg), ("hist_pos", pos)):
        hist.setflags(write=False)
        out[field_name] = hist
    return out


def _as_count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise DataError(f"{name} should be an integer count, got {value!r} ({type(value).__name__})")
    if value < 0:
        raise DataError(f"{name} should be non-negative, got {value}")
    return int(value)


def _as_count_array(value: Any, name: str) -> IntArray:
    """A fresh 1-D int64 array of non-negative counts (floats rejected, not rounded)."""
    try:
        arr = np.array(value)
    except (ValueError, OverflowError) as err:
        raise DataError(f"{name} should be a list of integer counts: {err}") from None
    if arr.ndim != 1:
        raise DataError(f"{name} should be a 1-D list of counts, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise DataError(f"{name} should hold integer counts, got dtype {arr.dtype} (e.g. {arr[0]!r})")
    if (arr < 0).any():
        raise DataError(f"{name} should hold non-negative counts, got {arr.min()}")
    return arr.astype(np.int64)


def _as_histograms(hist_neg: ArrayLike, hist_pos: ArrayLike) -> tuple[IntArray, IntArray]:
    neg = _as_count_array(hist_neg, "hist_neg")
    pos = _as_count_array(hist_pos, "hist_pos")
    if len(neg) != len(pos) or len(neg) < 2:
        raise DataError(
            f"hist_neg and hist_pos should have the same number (>= 2) of bins, got {len(neg)} and {len(pos)}"
        )
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


def _at_or_above(hist: IntArray) -> IntArray:
    """``out[k]`` = cases in bins ``k`` and up, for ``k = 0 .. bins``."""
    return np.concatenate((np.cumsum(hist[::-1])[::-1], [0]))


def _dot(a: IntArray, b: IntArray) -> int:
    return sum(int(x) * int(y) for x, y in zip(a, b, strict=True))  # Python ints cannot overflow


def _require_both_classes(n_pos: int, n_neg: int, what: str) -> None:
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
    n_neg, n_pos = int(neg.sum()), int(pos.sum())
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
    cases are redrawn (each class's histogram resampled multinomially at its own size).

    A wide interval says the stored threshold is close to arbitrary on this validation data.
    """
    neg, pos = _as_histograms(hist_neg, hist_pos)
    n_neg, n_pos = int(neg.sum()), int(pos.sum())
    _require_both_classes(n_pos, n_neg, "a threshold interval")
    rng = np.random.default_rng(seed)
    picks = []
    for _ in range(replicates):
        b_neg = rng.multinomial(n_neg, neg / n_neg)
        b_pos = rng.multinomial(n_pos, pos / n_pos)
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

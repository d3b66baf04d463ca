"""What a site releases about its validation cases: counts on cells that each hold none or at least k.

A site's exact validation statistics are per-class counts on a fixed axis: score bins for a binary
task (:func:`fedfreeze.evaluation.pooled.score_bin_edges`), predicted classes for a multi-class
one. With a small validation split most non-empty (class, bin) counts are 1, and a count of 1 tells
the coordinator one case's label and its score to within a bin. So a site releases coarser cells
(:func:`release_cells`), per class a partition of the whole axis into contiguous cells:

* **every cell holds at least ``min_count`` cases of its class** (or 0, only for a cell that ends
  at an anchor below). A class with fewer than ``min_count`` cases in all is one cell, the whole
  axis: how many validation cases of that class the site holds, with nothing about their scores;
* **anchors**: the site first cuts at edges both sides agree on before seeing any score (the
  round's threshold, then the common edges the coordinator chose from an earlier round's pooled
  scores, :func:`common_edges`; for a multi-class row, the edges around its own class, so the
  correct predictions stay a cell of their own), each in turn when every part then holds 0 or at
  least ``min_count``;
* then, walking through each stretch in a direction fixed beforehand (for a binary task: negatives
  from the top down, positives from the bottom up, so cells are finest where the classes meet), it
  closes a cell as soon as it holds ``min_count`` cases and what is left of the stretch holds
  ``min_count`` more (the rest joins the last cell);
* **a cut between two cases sits at the coarsest edge of a fixed halving tree inside the gap**
  between them (the axis halved at ``(lo + hi) // 2``, each half again: on score bins the first
  cut is the 0.5 edge). A cut placed next to a case (as merging bins until a count reaches k does)
  would give that case's bin away; here a cut says only that the gap between the two cases holds
  that edge and no coarser one. An outlier, far from the other cases of its class, shares its
  cell with at least ``min_count - 1`` of them, and the cut sits far from it.

What is not hidden: every cell's count (>= k), each class's total at the site; an anchor left
uncut says that cutting there would have left between 1 and ``min_count - 1`` cases of the class on
one side of it, within the cell that holds it (a site with a few false positives, say: not how
many, nor which); and a cut in a dense stretch of scores
says that the cases on either side lie within the two halves of a small tree node (at worst: that
each of two adjacent bins holds at least one case of the class, not how many, nor which). The counts are not differentially private: a coordinator that knows all but one
of a cell's cases learns something about the last one.

The coordinator, which sees only cells, needs per-unit counts for its metrics: :func:`allocate`
spreads each cell's count over the units it covers in proportion to the pooled distribution of
that class estimated from every site's cells (Turnbull's self-consistent estimator for grouped
data: an EM from a uniform start, so within a stretch of units no cell tells apart the shape stays
flat), or uniformly (``method="uniform"``). :func:`binary_bounds` gives what the cells fix
exactly: the range of AUROC and of the figures at a threshold over all cases consistent with them.
With ``min_count = 1`` every unit is a cell of its own (the exact counts) and everything is exact.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from fedfreeze.errors import DataError, ProtocolError

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]

CELL_KEYS = ("cell-class", "cell-start", "cell-count")  # a release in a reply's metrics, after a prefix
ALLOCATIONS = ("binormal", "pooled", "uniform")
BINORMAL_PRIOR = (0.0, 10.0, math.log(2.0), 1.5)  # mean of the logit ~ N(0, 10^2), log sd ~ N(log 2, 1.5^2)
EM_ITERATIONS = 5000
EM_TOLERANCE = 1e-13  # largest change of a unit's share that still counts as moving


def tree_split(lo: int, hi: int) -> int:
    """Where the fixed tree cuts the node ``[lo, hi)`` (``hi - lo >= 2``)."""
    return (lo + hi) // 2


def coarsest_edge(first: int, last: int, units: int) -> int:
    """The edge in ``first .. last`` (``1 <= first <= last < units``) closest to the tree's root:
    the first one a walk down the fixed tree meets (unique: a node's cut lies between its halves)."""
    if not 1 <= first <= last < units:
        raise ValueError(f"edges {first} .. {last} should lie strictly inside the axis [0, {units}]")
    lo, hi = 0, units
    while True:
        mid = tree_split(lo, hi)
        if first <= mid <= last:
            return mid
        lo, hi = (lo, mid) if last < mid else (mid, hi)


@dataclass(frozen=True, eq=False)
class ReleasedCells:
    """One site's release: for each class, contiguous cells covering the whole axis, with their counts.

    Cells are listed class by class (``cls`` non-decreasing), each class's in order of ``start``;
    a cell ends where the next cell of its class starts (the last at ``units``). Construction checks
    the layout; the count rule is checked by :meth:`check` against the round's ``min_count``.
    """

    units: int
    classes: int
    cls: IntArray
    start: IntArray
    count: IntArray

    def __post_init__(self) -> None:
        for name in ("units", "classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
                raise ValueError(f"{name} should be an integer >= 1, got {value!r}")
            object.__setattr__(self, name, int(value))
        for name in ("cls", "start", "count"):
            arr = _int_array(getattr(self, name), name)
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        if not len(self.cls) == len(self.start) == len(self.count):
            raise DataError(
                f"cell-class, cell-start and cell-count should have equal lengths, got "
                f"{len(self.cls)}, {len(self.start)} and {len(self.count)}"
            )
        if (self.count < 0).any():
            raise DataError(f"cell-count should hold non-negative counts, got {int(self.count.min())}")
        if len(self.cls) and ((self.cls < 0).any() or (self.cls >= self.classes).any()):
            raise DataError(f"cell-class should hold classes 0 .. {self.classes - 1}, got {sorted(set(self.cls))}")
        if (np.diff(self.cls) < 0).any():
            raise DataError("cell-class should list the cells class by class (non-decreasing)")
        for c in range(self.classes):
            starts = self.start[self.cls == c]
            if len(starts) == 0 or starts[0] != 0 or (np.diff(starts) <= 0).any() or starts[-1] >= self.units:
                raise DataError(
                    f"class {c}: cell-start should rise strictly from 0 to below {self.units} (cells covering "
                    f"the whole axis), got {starts.tolist()[:8]}"
                )

    # ------------------------------------------------------------------ reading
    @property
    def stop(self) -> IntArray:
        """Where each cell ends: the next cell of its class starts, or the axis ends."""
        nxt = np.append(self.start[1:], self.units)
        same = np.append(self.cls[1:] == self.cls[:-1], False)
        return np.where(same, nxt, self.units).astype(np.int64)

    def cells_of(self, c: int) -> list[tuple[int, int, int]]:
        """``(start, stop, count)`` of class ``c``'s cells."""
        mask = self.cls == c
        return list(zip(self.start[mask].tolist(), self.stop[mask].tolist(), self.count[mask].tolist(), strict=True))

    def totals(self) -> IntArray:
        """Cases per class (the counts of each class's cells summed)."""
        return np.bincount(self.cls, weights=self.count, minlength=self.classes).astype(np.int64)

    @property
    def n(self) -> int:
        return int(self.count.sum())

    def smallest_nonempty(self) -> int | None:
        """The smallest count of a non-empty cell narrower than the whole axis (None if there is none);
        a whole-axis cell is its class's total."""
        narrow = (self.count > 0) & ((self.stop - self.start) < self.units)
        return int(self.count[narrow].min()) if narrow.any() else None

    def check(self, min_count: int) -> None:
        """Raise :class:`DataError` unless every cell narrower than the axis holds 0 or ``>= min_count``."""
        smallest = self.smallest_nonempty()
        if smallest is not None and smallest < min_count:
            i = int(np.flatnonzero((self.count == smallest) & ((self.stop - self.start) < self.units))[0])
            raise DataError(
                f"cell [{int(self.start[i])}, {int(self.stop[i])}) of class {int(self.cls[i])} holds "
                f"{smallest} case(s): fewer than min-cell-count = {min_count} (so small a count can single a case out)"
            )

    # ------------------------------------------------------------------ wire
    def to_metrics(self, prefix: str = "") -> dict[str, list[int]]:
        """Three parallel lists of ints: what a Flower ``MetricRecord`` holds."""
        return {
            prefix + key: arr.tolist() for key, arr in zip(CELL_KEYS, (self.cls, self.start, self.count), strict=True)
        }

    @classmethod
    def from_metrics(
        cls, record: Mapping[str, Any], prefix: str = "", *, classes: int, units: int, min_count: int
    ) -> ReleasedCells:
        """Read a site's release and check it against the round's ``min_count``; a malformed or
        rule-breaking one is a :class:`ProtocolError` naming the key (a misbehaving site is reported,
        not pooled)."""
        missing = [prefix + key for key in CELL_KEYS if prefix + key not in record]
        if missing:
            raise ProtocolError(f"site metrics lack key(s) {missing}")
        try:
            cells = cls(units, classes, *(_int_array(record[prefix + key], prefix + key) for key in CELL_KEYS))
            cells.check(min_count)
        except DataError as err:
            raise ProtocolError(f"site metrics: {err}") from None
        return cells


def release_cells(
    counts: ArrayLike,
    min_count: int,
    anchors: Sequence[Sequence[int]] | None = None,
    walk: Sequence[Literal["up", "down"]] | None = None,
) -> ReleasedCells:
    """The cells a site releases from its exact per-class counts ``[classes, units]``.

    ``anchors[c]``: edges (``0 < edge < units``) to cut class ``c``'s axis at first, tried in the order
    given: an edge is kept when every part, cut at it and at the edges kept before it, holds 0 or at
    least ``min_count`` cases (so the first anchor, the round's threshold, is kept whenever it can be,
    and later ones only where they leave no small part). Each part is then cut
    walking in the direction ``walk[c]`` (``"up"`` from its low end, ``"down"`` from its high end;
    by default away from its anchor, up when it has none): a cell closes once it holds ``min_count``
    cases and the rest of the part holds ``min_count`` more, so cells are finest where the walk
    starts and the rest gathers where it ends; every cut between two cases sits at
    :func:`coarsest_edge` of the gap between their bins. ``min_count = 1`` releases
    the exact counts, every unit a cell.
    """
    if isinstance(min_count, bool) or not isinstance(min_count, Integral) or min_count < 1:
        raise ValueError(f"min_count should be an integer >= 1, got {min_count!r}")
    table = np.asarray(counts)
    if table.ndim != 2 or table.shape[1] < 1 or table.dtype.kind not in "iu" or (table < 0).any():
        raise DataError(f"counts should be a [classes, units] table of non-negative integers, got {table.shape}")
    classes, units = table.shape
    if anchors is not None and len(anchors) != classes:
        raise ValueError(f"anchors should hold one list of edges per class ({classes}), got {len(anchors)}")
    if walk is not None and (len(walk) != classes or any(w not in ("up", "down") for w in walk)):
        raise ValueError(f"walk should hold 'up' or 'down' for each of the {classes} classes, got {walk!r}")
    k = int(min_count)
    cls_, start_, count_ = [], [], []
    for c, row in enumerate(table.astype(np.int64)):
        tried = [int(e) for e in (anchors[c] if anchors is not None else ())]
        if any(not 0 < e < units for e in tried):
            raise ValueError(f"anchors of class {c} should lie strictly inside (0, {units}), got {tried}")
        bounds = _kept_anchors(row, tried, k, units)
        starts: list[int] = []
        if k == 1:  # nothing to hide: the exact histogram, every unit a cell
            bounds, starts = [], list(range(units))
        for lo, hi in itertools.pairwise(bounds):
            # by default away from the anchor: up from an anchor at lo, down from one at hi; up with none
            upward = walk[c] == "up" if walk is not None else lo > 0 or hi == units
            starts += _cut_part(row, lo, hi, k, upward=upward)
        starts = sorted(starts)
        for lo, hi in itertools.pairwise([*starts, units]):
            cls_.append(c)
            start_.append(lo)
            count_.append(int(row[lo:hi].sum()))
    return ReleasedCells(units, classes, np.array(cls_), np.array(start_), np.array(count_))


def _cut_part(row: IntArray, lo: int, hi: int, k: int, *, upward: bool) -> list[int]:
    """Starts of the cells of ``[lo, hi)``: walking up from ``lo`` (or down from ``hi``), close a cell
    once it holds ``k`` cases and the rest holds ``k`` more; cut at the coarsest edge of the gap."""
    total = int(row[lo:hi].sum())
    starts = [lo]
    occupied = [b for b in range(lo, hi) if row[b] > 0]
    if not upward:
        occupied.reverse()
    held = 0
    for here, there in itertools.pairwise(occupied):
        held += int(row[here])
        if held >= k and total - held >= k:  # close the cell between the bins ``here`` and ``there``
            first, last = (here + 1, there) if upward else (there + 1, here)
            starts.append(coarsest_edge(first, last, len(row)))
            total -= held
            held = 0
    return starts


def allocate(
    releases: Sequence[ReleasedCells],
    method: Literal["binormal", "pooled", "uniform"] = "pooled",
    *,
    positions: ArrayLike | None = None,
) -> list[FloatArray]:
    """Each site's counts ``[classes, units]`` as the coordinator estimates them from the cells.

    A cell's count is spread over its units in proportion to ``p``, a distribution of the class
    estimated from every site's cells of that class:

    * ``"binormal"`` (binary scores): per class a normal distribution of the logit, fitted by
      maximum likelihood to the cells (the binormal model of ROC analysis for rating categories,
      Dorfman & Alf 1969), with a weak prior (mean ~ N(0, 10^2), log sd ~ N(log 2, 1.5^2): less
      than one case's weight) so a class whose cells say nothing still gets a fit; needs
      ``positions``, the logits of the ``units + 1`` edges (infinite at the ends);
    * ``"pooled"``: Turnbull's self-consistent (EM) estimate from a uniform start: no shape assumed,
      flat wherever no cell tells units apart (for an axis with no order, e.g. predicted classes);
    * ``"uniform"``: flat.

    Every cell keeps its count, so each site's totals and every count the cells fix exactly are
    unchanged; a cell of one unit is exact whatever the method.
    """
    if method not in ALLOCATIONS:
        raise ValueError(f"method should be one of {', '.join(ALLOCATIONS)}, got {method!r}")
    if len(releases) == 0:
        raise ValueError("releases should hold at least one site, got none")
    units, classes = releases[0].units, releases[0].classes
    for i, r in enumerate(releases):
        if (r.units, r.classes) != (units, classes):
            raise DataError(
                f"site {i} released cells on {r.classes} classes x {r.units} units, site 0 on {classes} x {units}"
            )
    logits = None
    if method == "binormal":
        if positions is None:
            raise ValueError("the binormal allocation needs positions: the logits of the units + 1 edges")
        logits = np.asarray(positions, dtype=float)
        if logits.shape != (units + 1,) or (np.diff(logits) <= 0).any():
            raise ValueError(f"positions should be {units + 1} increasing logits, got shape {logits.shape}")
    out = [np.zeros((classes, units)) for _ in releases]
    for c in range(classes):
        rows = [(i, s, e, count) for i, r in enumerate(releases) for s, e, count in r.cells_of(c) if count > 0]
        if not rows:
            continue
        owner = [row[0] for row in rows]
        starts = np.array([row[1] for row in rows])
        stops = np.array([row[2] for row in rows])
        counts = np.array([row[3] for row in rows], dtype=float)
        p = np.full(units, 1.0 / units)
        if method == "pooled":
            p = _turnbull(starts, stops, counts, p)
        elif logits is not None:
            p = _binormal(starts, stops, counts, logits)
        mass = _interval_sums(p, starts, stops)
        for j, i in enumerate(owner):
            s, e = starts[j], stops[j]
            share = p[s:e] / mass[j] if mass[j] > 0 else np.full(e - s, 1.0 / (e - s))
            out[i][c, s:e] += counts[j] * share
    return out


def pair_bounds(releases: Sequence[ReleasedCells]) -> tuple[float, float]:
    """The lowest and highest AUROC of any cases consistent with the binary cells (class 1 positive).

    A positive cell wholly above a negative cell wins all its pairs, one wholly below loses them;
    pairs of overlapping cells (the same bin included) could go either way.
    """
    neg = [(s, e, n) for r in releases for s, e, n in r.cells_of(0) if n > 0]
    pos = [(s, e, n) for r in releases for s, e, n in r.cells_of(1) if n > 0]
    n_neg, n_pos = sum(n for *_, n in neg), sum(n for *_, n in pos)
    if n_neg == 0 or n_pos == 0:
        raise DataError(f"AUROC needs both classes, got {n_pos} positives and {n_neg} negatives")
    wins = unknown = 0
    for ps, pe, pn in pos:
        for ns, ne, nn in neg:
            if ps >= ne:
                wins += pn * nn
            elif pe > ns:
                unknown += pn * nn
    total = n_pos * n_neg
    return wins / total, (wins + unknown) / total


def count_bounds(releases: Sequence[ReleasedCells], c: int, cut: int) -> tuple[int, int]:
    """The fewest and most cases of class ``c`` in units ``>= cut`` (at or above the threshold edge
    ``cut``) that the cells allow: cells wholly above count, cells that straddle the cut may."""
    sure = maybe = 0
    for r in releases:
        for s, e, n in r.cells_of(c):
            if s >= cut:
                sure += n
            elif e > cut:
                maybe += n
    return sure, sure + maybe


def binary_bounds(releases: Sequence[ReleasedCells], cut: int) -> dict[str, list[float]]:
    """The range of each pooled binary figure at threshold edge ``cut`` over all cases consistent with
    the cells: what the released statistics fix, whatever the allocation assumed within cells."""
    tp_lo, tp_hi = count_bounds(releases, 1, cut)
    fp_lo, fp_hi = count_bounds(releases, 0, cut)
    n_pos = sum(int(r.totals()[1]) for r in releases)
    n_neg = sum(int(r.totals()[0]) for r in releases)
    sens = [tp_lo / n_pos, tp_hi / n_pos]
    spec = [(n_neg - fp_hi) / n_neg, (n_neg - fp_lo) / n_neg]
    # F1 = 2 tp / (tp + n_pos + fp): rises with tp, falls with fp
    f1 = [2 * tp_lo / (tp_lo + n_pos + fp_hi), 2 * tp_hi / (tp_hi + n_pos + fp_lo)]
    return {
        "auroc": list(pair_bounds(releases)),
        "balanced_accuracy": [(sens[0] + spec[0]) / 2, (sens[1] + spec[1]) / 2],
        "sensitivity": sens,
        "specificity": spec,
        "f1": f1,
    }


# --- helpers -----------------------------------------------------------------------------------


def _allowed(count: int, k: int) -> bool:
    return count == 0 or count >= k


def _kept_anchors(row: IntArray, tried: Sequence[int], k: int, units: int) -> list[int]:
    """``[0, *kept anchors, units]``: each anchor, in the order tried, kept when every part then holds
    0 or at least ``k`` cases (whether an anchor is kept depends only on counts of at least k, or 0)."""
    kept: list[int] = []
    for edge in tried:
        if edge in kept:
            continue
        bounds = [0, *sorted([*kept, edge]), units]
        if all(_allowed(int(row[lo:hi].sum()), k) for lo, hi in itertools.pairwise(bounds)):
            kept.append(edge)
    return [0, *sorted(kept), units]


def common_edges(pooled: ArrayLike, quantiles: int = 16) -> list[int]:
    """The common edges a round's cells are cut at (after the threshold's), from the pooled counts of
    an earlier round (``[units]``, estimated or exact): the edges nearest the ``quantiles``-quantiles
    of the pooled scores, in halving order (the median, then the quartiles, ...), so the first cuts a
    site tries split the scores where they are, not where a fixed grid put them. Chosen by the
    coordinator before any site scores the round's model; empty when the pooled counts hold no case."""
    counts = np.asarray(pooled, dtype=float)
    units = len(counts)
    if counts.ndim != 1 or units < 2 or not np.isfinite(counts).all() or (counts < 0).any():
        raise ValueError(f"pooled should be non-negative finite counts on at least 2 units, got shape {counts.shape}")
    order: list[int] = []
    if counts.sum() <= 0:
        return order
    share = np.cumsum(counts) / counts.sum()
    # the edge after the unit where the pooled share first reaches q, kept strictly inside the axis
    found = sorted(
        {int(np.clip(np.searchsorted(share, q) + 1, 1, units - 1)) for q in np.arange(1, quantiles) / quantiles}
    )

    def halve(lo: int, hi: int) -> None:
        if lo < hi:
            mid = (lo + hi) // 2
            order.append(found[mid])
            halve(lo, mid)
            halve(mid + 1, hi)

    halve(0, len(found))
    return order


def _turnbull(starts: IntArray, stops: IntArray, counts: FloatArray, p: FloatArray) -> FloatArray:
    """Self-consistent (EM) estimate of a distribution over units from counts on intervals."""
    total = counts.sum()
    units = len(p)
    for _ in range(EM_ITERATIONS):
        mass = np.maximum(_interval_sums(p, starts, stops), np.finfo(float).tiny)
        ratio = np.zeros(units + 1)
        np.add.at(ratio, starts, counts / mass)
        np.add.at(ratio, stops, -counts / mass)
        new = p * np.cumsum(ratio)[:units] / total
        if np.abs(new - p).max() < EM_TOLERANCE:
            return new
        p = new
    return p


def _binormal(starts: IntArray, stops: IntArray, counts: FloatArray, logits: FloatArray) -> FloatArray:
    """Mass of each unit under a normal distribution of the logit fitted to the cells (maximum
    likelihood under the weak prior ``BINORMAL_PRIOR``; cells of the whole axis carry no information)."""
    from scipy.optimize import minimize
    from scipy.special import ndtr

    units = len(logits) - 1
    informative = (stops - starts) < units
    lo, hi, n = logits[starts[informative]], logits[stops[informative]], counts[informative]
    m0, m_sd, s0, s_sd = BINORMAL_PRIOR

    def interval_mass(a: FloatArray, b: FloatArray) -> FloatArray:
        # upper-tail intervals through the survival function, so far-out cells keep their precision
        return np.where(a > 0, ndtr(-a) - ndtr(-b), ndtr(b) - ndtr(a))

    def penalty(theta: FloatArray) -> float:
        mu, log_sd = float(theta[0]), float(theta[1])
        sd = math.exp(log_sd)
        pr = np.maximum(interval_mass((lo - mu) / sd, (hi - mu) / sd), 1e-300)
        prior = 0.5 * ((mu - m0) / m_sd) ** 2 + 0.5 * ((log_sd - s0) / s_sd) ** 2
        return prior - float(np.dot(n, np.log(pr)))

    fit = minimize(penalty, np.array([m0, s0]), method="Nelder-Mead", options={"xatol": 1e-6, "fatol": 1e-9})
    mu, sd = float(fit.x[0]), math.exp(float(fit.x[1]))
    z = (logits - mu) / sd
    return interval_mass(z[:-1], z[1:])


def _interval_sums(p: FloatArray, starts: IntArray, stops: IntArray) -> FloatArray:
    below = np.concatenate(([0.0], np.cumsum(p)))
    return below[stops] - below[starts]


def one_d_array(value: Any, name: str, kinds: str, what: str) -> NDArray[Any]:
    """A fresh 1-D array of ``value`` whose dtype kind is one of ``kinds`` (an empty list gives int64);
    else a ``DataError`` naming ``name`` and saying it should hold ``what``. Shared by the cells' and
    the pooled statistics' readers of what a site sent."""
    try:
        arr = np.array(value)
    except (ValueError, OverflowError) as err:
        raise DataError(f"{name} should be a list of {what}: {err}") from None
    if arr.ndim != 1:
        raise DataError(f"{name} should be a 1-D list of {what}, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in kinds:
        raise DataError(f"{name} should hold {what}, got dtype {arr.dtype} (e.g. {arr[0]!r})")
    return arr


def _int_array(value: Any, name: str) -> IntArray:
    return one_d_array(value, name, "iu", "integers").astype(np.int64)

"""Released cells: the rule a site's validation statistics obey, their wire format, and the
coordinator's figures from them against scikit-learn on the pooled raw scores."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fedfreeze.errors import ProtocolError
from fedfreeze.evaluation.cells import (
    ReleasedCells,
    allocate,
    binary_bounds,
    coarsest_edge,
    release_cells,
    tree_split,
)
from fedfreeze.evaluation.pooled import (
    class_histograms,
    edge_logits,
    estimated_counts,
    pooled_auroc,
    released_metrics,
    score_bin_edges,
    snap_threshold,
)
from tests.federation.reference import exact_figures

EDGES = score_bin_edges(200)
HALF = int(np.searchsorted(EDGES, snap_threshold(0.5, EDGES)))  # the 0.5 edge: 100
KS = (2, 3, 5, 10)


def _site(rng: np.random.Generator, n: int, prevalence: float, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores of a small validation split of a good model, with an outlier of each class."""
    y = (rng.random(n) < prevalence).astype(int)
    y[:2] = [0, 1]
    logit = rng.normal(np.where(y == 1, 2.5, -2.5) + shift, 1.3)
    logit[:2] = [4.0, -4.0]  # a false positive far up, a false negative far down
    return y, 1 / (1 + np.exp(-logit))


@pytest.fixture(scope="module")
def sites() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(13)
    return [_site(rng, n, prev, shift) for n, prev, shift in [(25, 0.7, 0.0), (40, 0.5, 0.5), (60, 0.3, -0.5)]]


def _histograms(sites: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    return [class_histograms(y, p, EDGES) for y, p in sites]


def _cells_of(table: np.ndarray, k: int) -> ReleasedCells:
    """As a site releases them: anchored at 0.5, negatives cut from the top down, positives from the
    bottom up (site_runtime.validation_release)."""
    return release_cells(table, k, anchors=[[HALF], [HALF]], walk=["down", "up"])


# --- the rule ------------------------------------------------------------------------------------


def test_exact_histograms_single_cases_out(sites: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Why the rule: on small validation splits most cases sit alone in their (class, bin)."""
    for table in _histograms(sites):
        assert (table == 1).sum() > 0.4 * table.sum()


@pytest.mark.parametrize("k", KS)
def test_every_released_cell_holds_none_or_at_least_k(sites: list[tuple[np.ndarray, np.ndarray]], k: int) -> None:
    for table in _histograms(sites):
        cells = _cells_of(table, k)
        cells.check(k)
        assert cells.totals().tolist() == table.sum(axis=1).tolist()
        for c in (0, 1):
            spans = cells.cells_of(c)
            assert spans[0][0] == 0 and spans[-1][1] == 200  # the whole axis, no gap
            for start, stop, count in spans:
                assert table[c, start:stop].sum() == count
                assert count == 0 or count >= k or (start, stop) == (0, 200)


@pytest.mark.parametrize("k", KS)
def test_a_cut_between_two_cases_sits_at_the_coarsest_edge_of_their_gap(
    sites: list[tuple[np.ndarray, np.ndarray]], k: int
) -> None:
    """A cut never hugs a case: it is the edge nearest the tree's root inside the gap between the
    highest bin below it and the lowest bin above it (anchors aside)."""
    for table in _histograms(sites):
        cells = _cells_of(table, k)
        for c in (0, 1):
            occupied = np.flatnonzero(table[c])
            for start, _, _ in cells.cells_of(c)[1:]:
                if start == HALF:
                    continue
                below, above = occupied[occupied < start].max(), occupied[occupied >= start].min()
                assert start == coarsest_edge(int(below) + 1, int(above), 200)


def test_an_outlier_shares_its_cell_and_its_cut_is_far_from_it() -> None:
    table = np.zeros((2, 200), dtype=np.int64)
    table[0, [30, 31, 33, 35, 40, 44, 47, 52, 56]] = 1
    table[0, 170] = 1  # one negative scored far up: alone in its bin, and in its half
    cells = _cells_of(table, 5)
    cut = coarsest_edge(41, 44, 200)  # walking down: between the fifth negative from the top (bin 44) and bin 40
    assert cut == 43
    assert cells.cells_of(0) == [(0, cut, 5), (cut, 200, 5)]  # not cut at 0.5: one negative above it
    exact = release_cells(table, 1)
    assert (170, 171, 1) in exact.cells_of(0)  # what k = 1 (the exact histogram) gives away


def test_cells_are_finest_where_the_walk_starts() -> None:
    table = np.zeros((2, 200), dtype=np.int64)
    table[0, [10, 20, 30, 40, 50, 60, 70]] = 1  # 7 negatives, k = 3: a cell of 3 and one of 4
    assert [n for *_, n in release_cells(table, 3, walk=["down", "up"]).cells_of(0)] == [4, 3]
    assert [n for *_, n in release_cells(table, 3, walk=["up", "up"]).cells_of(0)] == [3, 4]
    with pytest.raises(ValueError, match=r"walk should hold 'up' or 'down' for each of the 2 classes"):
        release_cells(table, 3, walk=["up"])


def test_the_anchor_keeps_the_counts_at_the_threshold_exact_when_it_can() -> None:
    table = np.zeros((2, 200), dtype=np.int64)
    table[0, [20, 30, 40, 60, 70]] = 1
    table[1, [95, 99, 120, 130, 140, 150, 160]] = 1  # two positives below 0.5: fewer than k = 3
    cells = release_cells(table, 3, anchors=[[HALF], [HALF]])
    assert cells.cells_of(0)[-1] == (HALF, 200, 0)  # negatives: cut at 0.5, none above
    assert all(start != HALF for start, _, _ in cells.cells_of(1)[1:])  # positives: no cut at 0.5
    assert release_cells(table, 2, anchors=[[HALF], [HALF]]).cells_of(1)[1][0] == HALF


def test_k_one_releases_the_exact_histogram(sites: list[tuple[np.ndarray, np.ndarray]]) -> None:
    tables = _histograms(sites)
    releases = [_cells_of(t, 1) for t in tables]
    for table, cells in zip(tables, releases, strict=True):
        assert len(cells.count) == 400
        np.testing.assert_allclose(allocate([cells], "uniform")[0], table, atol=1e-12)
    for method in ("binormal", "pooled", "uniform"):
        np.testing.assert_allclose(
            np.sum(allocate(releases, method, positions=edge_logits(EDGES)), axis=0), sum(tables)
        )


def test_a_class_below_k_is_its_total_alone() -> None:
    table = np.zeros((2, 10), dtype=np.int64)
    table[0, 2], table[1, [7, 8, 9]] = 2, [3, 3, 3]
    cells = release_cells(table, 3)
    assert cells.cells_of(0) == [(0, 10, 2)]  # the class's total, nothing about its scores
    assert cells.smallest_nonempty() == 3


def test_coarsest_edge_walks_down_the_tree() -> None:
    assert tree_split(0, 200) == 100 and coarsest_edge(1, 199, 200) == 100
    assert coarsest_edge(101, 180, 200) == 150
    assert coarsest_edge(101, 101, 200) == 101
    assert coarsest_edge(3, 5, 8) == 4
    with pytest.raises(ValueError, match=r"edges 0 .. 3 should lie strictly inside the axis \[0, 8\]"):
        coarsest_edge(0, 3, 8)


def test_release_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"min_count should be an integer >= 1, got 0"):
        release_cells(np.zeros((2, 4), dtype=int), 0)
    with pytest.raises(ValueError, match=r"counts should be a \[classes, units\] table of non-negative integers"):
        release_cells(np.zeros((2, 4)), 3)
    with pytest.raises(ValueError, match=r"anchors of class 0 should lie strictly inside \(0, 4\), got \[4\]"):
        release_cells(np.zeros((2, 4), dtype=int), 3, anchors=[[4], [2]])


# --- the wire -------------------------------------------------------------------------------------


def _release() -> ReleasedCells:
    table = np.zeros((2, 200), dtype=np.int64)
    table[0, [10, 20, 30, 40, 50, 60]] = 1
    table[1, [110, 120, 130, 140, 150, 160]] = 1
    return release_cells(table, 3, anchors=[[HALF], [HALF]])


def test_cells_round_trip_as_plain_lists_of_ints() -> None:
    cells = _release()
    record = cells.to_metrics("val-")
    assert set(record) == {"val-cell-class", "val-cell-start", "val-cell-count"}
    assert all(type(v) is int for values in record.values() for v in values)
    back = ReleasedCells.from_metrics(record, "val-", classes=2, units=200, min_count=3)
    assert back.cells_of(0) == cells.cells_of(0) and back.cells_of(1) == cells.cells_of(1)


def _with(key: str, value: Callable[[list[int]], list[Any]]) -> Callable[[dict[str, Any]], None]:
    def edit(record: dict[str, Any]) -> None:
        record[key] = value(record[key])

    return edit


@pytest.mark.parametrize(
    ("edit", "min_count", "match"),
    [
        (lambda r: r.pop("val-cell-count"), 3, r"lack key\(s\) \['val-cell-count'\]"),
        (_with("val-cell-count", lambda v: v[:-1]), 3, r"equal lengths, got \d+, \d+ and \d+"),
        (_with("val-cell-count", lambda v: [-1, *v[1:]]), 3, r"cell-count should hold non-negative counts"),
        (_with("val-cell-count", lambda v: [float(x) for x in v]), 3, r"val-cell-count should hold integers"),
        (_with("val-cell-class", lambda v: [2] * len(v)), 3, r"cell-class should hold classes 0 .. 1"),
        (_with("val-cell-class", lambda v: v[::-1]), 3, r"class by class"),
        (_with("val-cell-start", lambda v: [5, *v[1:]]), 3, r"class 0: cell-start should rise strictly from 0"),
        (_with("val-cell-start", lambda v: [0, 250, *v[2:]]), 3, r"cell-start should rise strictly from 0 to below"),
        (lambda r: None, 4, r"holds 3 case\(s\): fewer than min-cell-count = 4"),
    ],
)
def test_a_malformed_or_rule_breaking_release_is_a_protocol_error(
    edit: Callable[[dict[str, Any]], None], min_count: int, match: str
) -> None:
    record: dict[str, Any] = dict(_release().to_metrics("val-"))
    edit(record)
    with pytest.raises(ProtocolError, match=match):
        ReleasedCells.from_metrics(record, "val-", classes=2, units=200, min_count=min_count)


# --- the coordinator's figures from cells ---------------------------------------------------------


@pytest.mark.parametrize("k", KS)
def test_ranges_hold_the_exact_figures_and_the_estimates(sites: list[tuple[np.ndarray, np.ndarray]], k: int) -> None:
    y = np.concatenate([s[0] for s in sites])
    p = np.concatenate([s[1] for s in sites])
    releases = [_cells_of(t, k) for t in _histograms(sites)]
    estimated = estimated_counts(releases, EDGES)
    for threshold in (0.5, snap_threshold(0.3, EDGES)):
        m = released_metrics(releases, estimated, EDGES, threshold)
        exact = exact_figures(y, p, threshold)
        for key, value in exact.items():
            lo, hi = m["ranges"][key]
            assert lo - 1e-12 <= value <= hi + 1e-12, (key, value, lo, hi)
            assert lo - 1e-9 <= m[key] <= hi + 1e-9, (key, m[key], lo, hi)
        assert m["n"] == len(y)


def test_counts_at_an_anchor_are_exact_integers(sites: list[tuple[np.ndarray, np.ndarray]]) -> None:
    y = np.concatenate([s[0] for s in sites])
    p = np.concatenate([s[1] for s in sites])
    releases = [_cells_of(t, 3) for t in _histograms(sites)]
    cut_everywhere = all(any(s == HALF for s, _, _ in r.cells_of(c)) for r in releases for c in (0, 1))
    m = released_metrics(releases, estimated_counts(releases, EDGES), EDGES, 0.5)
    assert m["exact"] == cut_everywhere
    if cut_everywhere:
        assert (m["tp"], m["fn"]) == (int(((p >= 0.5) & (y == 1)).sum()), int(((p < 0.5) & (y == 1)).sum()))
        assert type(m["tp"]) is int


def test_binary_bounds_on_a_worked_example() -> None:
    neg = ReleasedCells(4, 2, np.array([0, 0, 1]), np.array([0, 2, 0]), np.array([3, 0, 0]))
    pos = ReleasedCells(4, 2, np.array([0, 1, 1]), np.array([0, 0, 1]), np.array([0, 0, 3]))
    bounds = binary_bounds([neg, pos], 2)  # negatives in [0, 2), positives in [1, 4): pairs overlap in bin 1
    assert bounds["auroc"] == [0.0, 1.0]  # all three positive cells overlap the negative one
    assert bounds["specificity"] == [1.0, 1.0] and bounds["sensitivity"] == [0.0, 1.0]


def test_allocation_keeps_every_cell_count(sites: list[tuple[np.ndarray, np.ndarray]]) -> None:
    releases = [_cells_of(t, 5) for t in _histograms(sites)]
    for method in ("binormal", "pooled", "uniform"):
        for cells, counts in zip(releases, allocate(releases, method, positions=edge_logits(EDGES)), strict=True):
            for c in (0, 1):
                for start, stop, count in cells.cells_of(c):
                    assert counts[c, start:stop].sum() == pytest.approx(count, abs=1e-9)
    with pytest.raises(ValueError, match="the binormal allocation needs positions"):
        allocate(releases, "binormal")


def test_binormal_estimate_is_close_where_uniform_spreading_is_not() -> None:
    """Why the coordinator fits a binormal shape: coarse cells spread flat over the logit axis (or by
    Turnbull's estimate, flat where no cell tells bins apart) put cases where none are. (Here every
    site has a far false positive and a far false negative, which a binormal fit smooths over: it
    is closer, not exact; the ranges say how far off it can be.)"""
    rng = np.random.default_rng(5)
    sites = [_site(rng, 50, 0.6) for _ in range(4)]
    y = np.concatenate([s[0] for s in sites])
    p = np.concatenate([s[1] for s in sites])
    releases = [_cells_of(t, 5) for t in _histograms(sites)]
    error = {}
    for method in ("binormal", "pooled", "uniform"):
        total = np.sum(allocate(releases, method, positions=edge_logits(EDGES)), axis=0)
        error[method] = abs(pooled_auroc(total[0], total[1]) - roc_auc_score(y, p))
    assert error["binormal"] < 0.1 and 2 * error["binormal"] < min(error["pooled"], error["uniform"]), error

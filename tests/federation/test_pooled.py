"""Pooled federated metrics checked against sklearn on the concatenated site data."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import (
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
    roc_curve,
)

from fedfreeze.errors import ProtocolError
from fedfreeze.evaluation.pooled import (
    SiteStats,
    confusion_from_histograms,
    multiclass_confusion,
    pool,
    pooled_auroc,
    pooled_metrics,
    pooled_multiclass_metrics,
    score_bin_edges,
    snap_threshold,
    threshold_for_sensitivity,
    weighted_mean,
    youden_threshold_from_histograms,
)

EDGES = score_bin_edges(200)
THRESHOLD = snap_threshold(0.5, EDGES)
OTHER_EDGE = float(EDGES[120])
Site = tuple[np.ndarray, np.ndarray]


def _site(rng: np.random.Generator, n: int, prevalence: float, shift: float, spread: float) -> Site:
    """Labels and sigmoid scores of one site, with ties, exact 0 and 1, and scores on edges."""
    y = (rng.random(n) < prevalence).astype(int)
    p = 1 / (1 + np.exp(-rng.normal(np.where(y == 1, 1.2, -1.2) + shift, spread)))
    p[: n // 5] = np.round(p[: n // 5], 2)  # a fifth reported to two decimals: exact ties
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    for j, value in enumerate([0.0, 1.0, THRESHOLD, OTHER_EDGE]):  # both classes at each special value
        p[pos[2 * j : 2 * j + 2]] = value
        p[neg[len(neg) - 2 * j - 2 : len(neg) - 2 * j]] = value
    return y, p


@pytest.fixture(scope="module")
def sites() -> list[Site]:
    """Three sites differing in size, prevalence and calibration."""
    rng = np.random.default_rng(20240611)
    return [_site(rng, 300, 0.2, 0.0, 1.3), _site(rng, 250, 0.5, 1.0, 1.0), _site(rng, 400, 0.1, -1.0, 1.6)]


@pytest.fixture(scope="module")
def site_stats(sites: list[Site]) -> list[SiteStats]:
    return [SiteStats.from_scores(y, p, EDGES, THRESHOLD) for y, p in sites]


def _concatenated(sites: list[Site]) -> Site:
    return np.concatenate([y for y, _ in sites]), np.concatenate([p for _, p in sites])


# --- bin edges and thresholds --------------------------------------------------------------------


def test_bin_edges_are_uniform_in_logit_and_symmetric() -> None:
    assert len(EDGES) == 201 and EDGES[0] == 0.0 and EDGES[-1] == 1.0
    assert np.all(np.diff(EDGES) > 0)
    interior = EDGES[1:-1]
    steps = np.diff(np.log(interior / (1 - interior)))
    np.testing.assert_allclose(steps, 24 / 198, rtol=1e-6)
    np.testing.assert_allclose(interior + interior[::-1], 1.0, atol=1e-15)
    assert EDGES[100] == 0.5 and THRESHOLD == 0.5
    np.testing.assert_array_equal(score_bin_edges(2), [0.0, 0.5, 1.0])


@pytest.mark.parametrize("bins", [96, 100, 190, 200, 296])
def test_half_is_an_edge_for_every_even_bin_count(bins: int) -> None:
    # np.linspace alone misses 0.0 by a rounding error for some counts (96, 190, 296 at range 12)
    edges = score_bin_edges(bins)
    assert edges[bins // 2] == 0.5 and snap_threshold(0.5, edges) == 0.5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bins": 1}, r"bins should be an integer >= 2, got 1"),
        ({"bins": 2.5}, r"bins should be an integer >= 2, got 2.5"),
        ({"logit_range": 0.0}, r"logit_range should be a positive finite number, got 0.0"),
        ({"logit_range": float("inf")}, r"logit_range should be a positive finite number, got inf"),
        ({"logit_range": 40.0}, r"logit_range=40.0 with bins=200 gives edges that round"),
    ],
)
def test_bin_edges_reject_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        score_bin_edges(**kwargs)


def test_snap_threshold_picks_the_nearest_interior_edge() -> None:
    assert snap_threshold(0.0, EDGES) == EDGES[1]
    assert snap_threshold(1.0, EDGES) == EDGES[-2]
    target = 0.3
    snapped = snap_threshold(target, EDGES)
    assert snapped in EDGES and np.abs(EDGES[1:-1] - target).min() == abs(snapped - target)
    with pytest.raises(ValueError, match=r"threshold should be a number in \[0, 1\], got 1.5"):
        snap_threshold(1.5, EDGES)
    with pytest.raises(ValueError, match=r"edges should increase strictly from 0.0 to 1.0"):
        snap_threshold(0.5, [0.0, 0.6, 0.4, 1.0])


# --- exact counts, balanced accuracy and F1 --------------------------------------------------------


def test_summed_site_counts_are_the_pooled_confusion_matrix(sites: list[Site], site_stats: list[SiteStats]) -> None:
    y, p = _concatenated(sites)
    tn, fp, fn, tp = confusion_matrix(y, (p >= THRESHOLD).astype(int), labels=[0, 1]).ravel()
    total = pool(site_stats)
    assert (total.tp, total.fp, total.tn, total.fn, total.n) == (tp, fp, tn, fn, len(y))
    # scores lying exactly on the threshold count as positive, as in fedfreeze.metrics
    assert np.sum((p == THRESHOLD) & (y == 1)) >= 6 and np.sum((p == THRESHOLD) & (y == 0)) >= 6


def test_histogram_counts_are_exact_at_every_interior_edge(sites: list[Site], site_stats: list[SiteStats]) -> None:
    y, p = _concatenated(sites)
    total = pool(site_stats)
    for edge in EDGES[1:-1]:
        predicted = p >= edge
        expected = (
            np.sum(predicted & (y == 1)),
            np.sum(predicted & (y == 0)),
            np.sum(~predicted & (y == 0)),
            np.sum(~predicted & (y == 1)),
        )
        assert confusion_from_histograms(total.hist_neg, total.hist_pos, EDGES, edge) == expected


@pytest.mark.parametrize("threshold", [None, OTHER_EDGE])
def test_pooled_balanced_accuracy_and_f1_equal_sklearn(
    sites: list[Site], site_stats: list[SiteStats], threshold: float | None
) -> None:
    y, p = _concatenated(sites)
    at = THRESHOLD if threshold is None else threshold
    y_pred = (p >= at).astype(int)
    m = pooled_metrics(site_stats, EDGES, threshold)
    assert m["threshold"] == at
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, y_pred), abs=1e-12)
    assert m["f1"] == pytest.approx(f1_score(y, y_pred), abs=1e-12)
    tn, fp, fn, tp = confusion_matrix(y, y_pred).ravel()
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["n"]) == (tp, fp, tn, fn, len(y))
    assert m["sensitivity"] == tp / (tp + fn) and m["specificity"] == tn / (tn + fp)


def test_from_scores_rejects_unusable_input() -> None:
    y, p = np.array([0, 1, 1]), np.array([0.1, 0.6, 0.9])
    with pytest.raises(ValueError, match=r"threshold should be an edge strictly inside \(0, 1\).*snap_threshold"):
        SiteStats.from_scores(y, p, EDGES, 0.51)
    with pytest.raises(ValueError, match=r"threshold should be an edge strictly inside"):
        SiteStats.from_scores(y, p, EDGES, 1.0)
    with pytest.raises(ValueError, match=r"y_true should hold only 0 and 1, got values \[0, 1, 2\]"):
        SiteStats.from_scores([0, 1, 2], p, EDGES, THRESHOLD)
    with pytest.raises(ValueError, match=r"p_pos should be probabilities in \[0, 1\], got 1 outside, e.g. 1.2"):
        SiteStats.from_scores(y, [0.1, 1.2, 0.5], EDGES, THRESHOLD)
    with pytest.raises(ValueError, match=r"p_pos should be probabilities in \[0, 1\], got 1 outside, e.g. nan"):
        SiteStats.from_scores(y, [0.1, np.nan, 0.5], EDGES, THRESHOLD)
    with pytest.raises(ValueError, match=r"equal length, got shapes \(3,\) and \(2,\)"):
        SiteStats.from_scores(y, p[:2], EDGES, THRESHOLD)


# --- AUROC ----------------------------------------------------------------------------------------


def test_pooled_auroc_on_a_worked_example() -> None:
    # positive in bin 1 beats both bin-0 negatives and ties one (2.5); the two in bin 2 beat all three (6)
    assert pooled_auroc([2, 1, 0], [0, 1, 2]) == 8.5 / 9
    assert pooled_auroc([0, 3, 0], [0, 4, 0]) == 0.5
    with pytest.raises(ValueError, match=r"AUROC needs both classes, got 0 positives and 3 negatives"):
        pooled_auroc([2, 1, 0], [0, 0, 0])
    with pytest.raises(ValueError, match=r"hist_pos should hold non-negative counts, got -1"):
        pooled_auroc([2, 1, 0], [0, -1, 2])


def test_pooled_auroc_is_within_the_bin_width_bound(sites: list[Site], site_stats: list[SiteStats]) -> None:
    y, p = _concatenated(sites)
    total = pool(site_stats)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    # only pos-neg pairs in the same bin can be ordered differently, each by at most 0.5
    bound = 0.5 * int(np.dot(total.hist_pos, total.hist_neg)) / (n_pos * n_neg)
    gap = abs(pooled_metrics(site_stats, EDGES)["auroc"] - roc_auc_score(y, p))
    assert 0 < gap <= bound < 0.005


def test_weighted_mean_of_site_aurocs_is_not_the_pooled_auroc(sites: list[Site], site_stats: list[SiteStats]) -> None:
    y, p = _concatenated(sites)
    exact = roc_auc_score(y, p)
    mean_of_sites = weighted_mean([roc_auc_score(sy, sp) for sy, sp in sites], [len(sy) for sy, _ in sites])
    binned = pooled_metrics(site_stats, EDGES)["auroc"]
    assert abs(mean_of_sites - exact) > 0.02
    assert abs(binned - exact) < abs(mean_of_sites - exact) / 100


# --- thresholds chosen on pooled histograms -----------------------------------------------------


def test_youden_from_histograms_is_within_one_bin_of_roc_curve(sites: list[Site], site_stats: list[SiteStats]) -> None:
    y, p = _concatenated(sites)
    total = pool(site_stats)
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    best = int(np.argmax(tpr - fpr))
    exact_j = tpr[best] - fpr[best]
    chosen = youden_threshold_from_histograms(total.hist_neg, total.hist_pos, EDGES)
    predicted = p >= chosen
    chosen_j = predicted[y == 1].mean() - predicted[y == 0].mean()
    # the exact optimum lies in one bin; moving the threshold to that bin's edges costs at most its cases
    b = int(np.searchsorted(EDGES, thresholds[best], side="right") - 1)
    one_bin = total.hist_pos[b] / y.sum() + total.hist_neg[b] / (1 - y).sum()
    assert 0 <= exact_j - chosen_j <= one_bin
    assert exact_j - chosen_j < 0.02


def test_youden_ties_go_to_the_edge_closest_to_half() -> None:
    edges = score_bin_edges(10)  # interior edges 1..9, 0.5 at index 5
    hist_neg = [5, 3, 0, 0, 0, 0, 0, 0, 0, 0]  # perfectly separated: J = 1 from edge 2 to edge 8
    hist_pos = [0, 0, 0, 0, 0, 0, 0, 0, 2, 4]
    assert youden_threshold_from_histograms(hist_neg, hist_pos, edges) == 0.5
    shifted = [0, 0, 0, 0, 0, 0, 0, 0, 0, 6]  # J = 1 from edge 2 to 9: 0.5 still in the run
    assert youden_threshold_from_histograms(hist_neg, shifted, edges) == 0.5
    low = [5, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    low_pos = [0, 6, 0, 0, 0, 0, 0, 0, 0, 0]  # J = 1 only at edge 1
    assert youden_threshold_from_histograms(low, low_pos, edges) == edges[1]


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95, 0.97])  # 6 positives score exactly 0: at most 0.973
def test_threshold_for_sensitivity_is_the_largest_edge_reaching_target(
    sites: list[Site], site_stats: list[SiteStats], target: float
) -> None:
    y, p = _concatenated(sites)
    total = pool(site_stats)
    chosen = threshold_for_sensitivity(total.hist_neg, total.hist_pos, EDGES, target)
    k = int(np.flatnonzero(EDGES == chosen)[0])
    assert (p[y == 1] >= chosen).mean() >= target
    assert (p[y == 1] >= EDGES[k + 1]).mean() < target


def test_threshold_for_sensitivity_rejects_unreachable_or_bad_targets() -> None:
    edges = score_bin_edges(4)
    with pytest.raises(ValueError, match=r"no threshold inside \(0, 1\) reaches sensitivity 1.0.*is 0.75"):
        threshold_for_sensitivity([1, 1, 1, 1], [1, 1, 1, 1], edges, 1.0)
    with pytest.raises(ValueError, match=r"target should be a sensitivity in \(0, 1\], got 0.0"):
        threshold_for_sensitivity([1, 1, 1, 1], [1, 1, 1, 1], edges, 0.0)
    with pytest.raises(ValueError, match=r"edges should have 5 values for histograms of 4 bins, got 201"):
        threshold_for_sensitivity([1, 1, 1, 1], [1, 1, 1, 1], EDGES, 0.5)


# --- the wire format ----------------------------------------------------------------------------


def test_metrics_round_trip_as_plain_ints_floats_and_lists(site_stats: list[SiteStats]) -> None:
    record = site_stats[0].to_metrics("val-")
    assert set(record) == {f"val-{k}" for k in ("n", "tp", "fp", "tn", "fn", "threshold", "hist-neg", "hist-pos")}
    assert type(record["val-tp"]) is int and type(record["val-threshold"]) is float
    assert type(record["val-hist-pos"]) is list and all(type(c) is int for c in record["val-hist-pos"])
    assert SiteStats.from_metrics(record, "val-", bins=200) == site_stats[0]
    assert SiteStats.from_metrics(record, "val-", bins=200) != site_stats[1]


def _with(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(record: dict[str, Any]) -> None:
        record[key] = value(record) if callable(value) else value

    return edit


def _moved_one_case(record: dict[str, Any]) -> list[int]:
    hist = list(record["val-hist-pos"])
    hist[-1] += 1
    return hist


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda r: r.pop("val-tp"), r"lack key\(s\) \['val-tp'\]"),
        (lambda r: r.pop("val-hist-neg"), r"lack key\(s\) \['val-hist-neg'\]"),
        (_with("val-fp", -1), r"val-fp should be non-negative, got -1"),
        (_with("val-tn", 3.0), r"val-tn should be an integer count, got 3.0 \(float\)"),
        (_with("val-n", True), r"val-n should be an integer count, got True \(bool\)"),
        (_with("val-hist-pos", lambda r: r["val-hist-pos"][:-1]), r"val-hist-pos should have 200 bins, got 199"),
        (_with("val-hist-neg", lambda r: [float(c) for c in r["val-hist-neg"]]), r"val-hist-neg should hold integer"),
        (_with("val-hist-neg", lambda r: [-1] + r["val-hist-neg"][1:]), r"val-hist-neg should hold non-negative"),
        (_with("val-hist-pos", lambda r: [[1, 2]]), r"val-hist-pos should be a 1-D list of counts, got shape"),
        (_with("val-n", lambda r: r["val-n"] + 1), r"val-n is \d+ but val-hist-neg and val-hist-pos hold"),
        (
            lambda r: (_with("val-hist-pos", _moved_one_case)(r), _with("val-n", lambda r: r["val-n"] + 1)(r)),
            r"val-tp \+ val-fn is \d+ but val-hist-pos holds",
        ),
        (
            _with("val-tn", lambda r: r["val-tn"] + 1),
            r"val-tn \+ val-fp is \d+ but val-hist-neg holds",
        ),
        (_with("val-threshold", 1.0), r"val-threshold should be a number strictly inside \(0, 1\), got 1.0"),
        (_with("val-threshold", "0.5"), r"val-threshold should be a number strictly inside \(0, 1\), got '0.5'"),
    ],
)
def test_from_metrics_names_the_bad_key(
    site_stats: list[SiteStats], edit: Callable[[dict[str, Any]], Any], match: str
) -> None:
    record: dict[str, Any] = dict(site_stats[0].to_metrics("val-"))
    edit(record)
    with pytest.raises(ProtocolError, match=match):  # it came over the wire
        SiteStats.from_metrics(record, "val-", bins=200)


def test_pool_rejects_sites_that_disagree(site_stats: list[SiteStats]) -> None:
    y, p = np.array([0, 1, 1, 0]), np.array([0.1, 0.7, 0.4, 0.6])
    other_threshold = SiteStats.from_scores(y, p, EDGES, OTHER_EDGE)
    with pytest.raises(ValueError, match=rf"site 1 scored at threshold {OTHER_EDGE} but site 0 at 0.5"):
        pool([site_stats[0], other_threshold])
    coarse = SiteStats.from_scores(y, p, score_bin_edges(100), THRESHOLD)
    with pytest.raises(ValueError, match=r"site 2 sent histograms of 100 bins but site 0 sent 200"):
        pool([site_stats[0], site_stats[1], coarse])
    with pytest.raises(ValueError, match=r"stats should hold at least one site, got none"):
        pool([])


def test_pooled_metrics_catches_a_site_whose_counts_disagree_with_its_histograms(
    site_stats: list[SiteStats],
) -> None:
    s = site_stats[1]  # one positive moved from predicted positive to negative: sums still agree
    miscounted = SiteStats(s.n, s.tp - 1, s.fp, s.tn, s.fn + 1, s.threshold, s.hist_neg, s.hist_pos)
    with pytest.raises(ValueError, match=r"site 1 reports \(tp, fp, tn, fn\) = .* but its histograms give"):
        pooled_metrics([site_stats[0], miscounted], EDGES)
    with pytest.raises(ValueError, match=r"edges should have 201 values for histograms of 200 bins, got 101"):
        pooled_metrics(site_stats, score_bin_edges(100))


def test_site_stats_are_read_only_copies(site_stats: list[SiteStats]) -> None:
    s = site_stats[0]
    hist = np.array(s.hist_pos)
    stats = SiteStats(s.n, s.tp, s.fp, s.tn, s.fn, s.threshold, s.hist_neg, hist)
    hist[0] += 100  # the caller's array changes; the stats do not
    assert stats == site_stats[0]
    with pytest.raises(ValueError, match="read-only"):
        stats.hist_pos[0] = 1


def test_weighted_mean_and_its_errors() -> None:
    assert weighted_mean([0.8, 0.9], [1, 3]) == pytest.approx(0.875)
    with pytest.raises(ValueError, match=r"equal length, got \(2,\) and \(1,\)"):
        weighted_mean([0.8, 0.9], [1])
    with pytest.raises(ValueError, match=r"weights should be non-negative, finite and not all zero, got \[0.0, 0.0\]"):
        weighted_mean([0.8, 0.9], [0, 0])


# --- multi-class ----------------------------------------------------------------------------------


def test_pooled_multiclass_metrics_equal_sklearn_on_concatenation() -> None:
    rng = np.random.default_rng(7)
    k = 4
    sites = []
    for n, weights in [(120, [0.5, 0.3, 0.2, 0.0]), (80, [0.1, 0.1, 0.8, 0.0]), (200, [0.25, 0.25, 0.25, 0.25])]:
        y = rng.choice(k, size=n, p=weights)
        y_pred = np.where(rng.random(n) < 0.7, y, rng.integers(0, k, n))
        sites.append((y, y_pred))
    sites[2] = (np.where(sites[2][0] == 3, 0, sites[2][0]), sites[2][1])  # class 3 predicted, never true
    y = np.concatenate([s[0] for s in sites])
    y_pred = np.concatenate([s[1] for s in sites])
    matrices = [multiclass_confusion(sy, sp, k) for sy, sp in sites]
    np.testing.assert_array_equal(sum(matrices), confusion_matrix(y, y_pred, labels=list(range(k))))
    m = pooled_multiclass_metrics(matrices)
    present = np.unique(y)
    assert present.tolist() == [0, 1, 2]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        balanced = balanced_accuracy_score(y, y_pred)
    assert m["n"] == len(y)
    assert m["accuracy"] == pytest.approx(np.mean(y == y_pred), abs=1e-12)
    assert m["balanced_accuracy"] == pytest.approx(balanced, abs=1e-12)
    assert m["f1"] == pytest.approx(f1_score(y, y_pred, labels=present, average="macro"), abs=1e-12)


def test_multiclass_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match=r"y_pred should hold classes 0 .. 2, got 3"):
        multiclass_confusion([0, 1, 2], [0, 1, 3], 3)
    with pytest.raises(ValueError, match=r"num_classes should be an integer >= 2, got 1"):
        multiclass_confusion([0, 0], [0, 0], 1)
    with pytest.raises(ValueError, match=r"y_true and y_pred should have equal length, got 3 and 2"):
        multiclass_confusion([0, 1, 2], [0, 1], 3)
    with pytest.raises(ValueError, match=r"matrix 1 should be square like matrix 0 \(3, 3\), got shape \(2, 2\)"):
        pooled_multiclass_metrics([np.eye(3, dtype=int), np.eye(2, dtype=int)])
    with pytest.raises(ValueError, match=r"matrix 0 should hold non-negative integer counts"):
        pooled_multiclass_metrics([np.eye(3)])
    with pytest.raises(ValueError, match=r"the pooled confusion matrix is empty"):
        pooled_multiclass_metrics([np.zeros((3, 3), dtype=int)])

"""Pooled federated metrics checked against sklearn on the concatenated site data (from exact
histograms here; from released cells in test_cells.py)."""

from __future__ import annotations

import warnings
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

from fedfreeze.evaluation.pooled import (
    class_histograms,
    confusion_from_histograms,
    histogram_metrics,
    multiclass_confusion,
    pooled_auroc,
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
def total(sites: list[Site]) -> np.ndarray:
    """The pooled exact histograms ``[2, bins]``: the sum of the sites' (release_cells with k = 1)."""
    return np.sum([class_histograms(y, p, EDGES) for y, p in sites], axis=0)


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


def test_summed_site_counts_are_the_pooled_confusion_matrix(sites: list[Site], total: np.ndarray) -> None:
    y, p = _concatenated(sites)
    tn, fp, fn, tp = confusion_matrix(y, (p >= THRESHOLD).astype(int), labels=[0, 1]).ravel()
    assert confusion_from_histograms(total[0], total[1], EDGES, THRESHOLD) == (tp, fp, tn, fn)
    assert int(total.sum()) == len(y)
    # scores lying exactly on the threshold count as positive, as in fedfreeze.metrics
    assert np.sum((p == THRESHOLD) & (y == 1)) >= 6 and np.sum((p == THRESHOLD) & (y == 0)) >= 6


def test_histogram_counts_are_exact_at_every_interior_edge(sites: list[Site], total: np.ndarray) -> None:
    y, p = _concatenated(sites)
    for edge in EDGES[1:-1]:
        predicted = p >= edge
        expected = (
            np.sum(predicted & (y == 1)),
            np.sum(predicted & (y == 0)),
            np.sum(~predicted & (y == 0)),
            np.sum(~predicted & (y == 1)),
        )
        assert confusion_from_histograms(total[0], total[1], EDGES, edge) == expected


@pytest.mark.parametrize("threshold", [THRESHOLD, OTHER_EDGE])
def test_pooled_balanced_accuracy_and_f1_equal_sklearn(sites: list[Site], total: np.ndarray, threshold: float) -> None:
    y, p = _concatenated(sites)
    y_pred = (p >= threshold).astype(int)
    m = histogram_metrics(total[0], total[1], EDGES, threshold)
    assert m["threshold"] == threshold
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, y_pred), abs=1e-12)
    assert m["f1"] == pytest.approx(f1_score(y, y_pred), abs=1e-12)
    tn, fp, fn, tp = confusion_matrix(y, y_pred).ravel()
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["n"]) == (tp, fp, tn, fn, len(y))
    assert all(type(m[key]) is int for key in ("tp", "fp", "tn", "fn", "n"))  # counts stay exact integers
    assert m["sensitivity"] == tp / (tp + fn) and m["specificity"] == tn / (tn + fp)


def test_estimated_counts_give_the_same_figures_as_float_histograms(total: np.ndarray) -> None:
    """The coordinator's histograms are estimated counts (floats): every function takes them."""
    exact = histogram_metrics(total[0], total[1], EDGES, OTHER_EDGE)
    floats = histogram_metrics(total[0].astype(float), total[1].astype(float), EDGES, OTHER_EDGE)
    for key, value in exact.items():
        assert floats[key] == pytest.approx(value, abs=1e-12), key
    assert type(floats["tp"]) is float
    assert youden_threshold_from_histograms(total[0] * 1.0, total[1] * 1.0, EDGES) == youden_threshold_from_histograms(
        total[0], total[1], EDGES
    )
    with pytest.raises(ValueError, match=r"hist_neg should hold finite counts, got nan"):
        pooled_auroc([np.nan, 1.0], [1.0, 0.0])


def test_class_histograms_reject_unusable_input() -> None:
    y, p = np.array([0, 1, 1]), np.array([0.1, 0.6, 0.9])
    assert class_histograms(y, p, score_bin_edges(2)).tolist() == [[1, 0], [0, 2]]
    with pytest.raises(ValueError, match=r"y_true should hold only 0 and 1, got values \[0, 1, 2\]"):
        class_histograms([0, 1, 2], p, EDGES)
    with pytest.raises(ValueError, match=r"p_pos should be probabilities in \[0, 1\], got 1 outside, e.g. 1.2"):
        class_histograms(y, [0.1, 1.2, 0.5], EDGES)
    with pytest.raises(ValueError, match=r"p_pos should be probabilities in \[0, 1\], got 1 outside, e.g. nan"):
        class_histograms(y, [0.1, np.nan, 0.5], EDGES)
    with pytest.raises(ValueError, match=r"equal length, got shapes \(3,\) and \(2,\)"):
        class_histograms(y, p[:2], EDGES)
    with pytest.raises(ValueError, match=r"threshold should be an edge strictly inside \(0, 1\).*snap_threshold"):
        histogram_metrics([1, 0], [0, 1], score_bin_edges(2), 0.51)


# --- AUROC ----------------------------------------------------------------------------------------


def test_pooled_auroc_on_a_worked_example() -> None:
    # positive in bin 1 beats both bin-0 negatives and ties one (2.5); the two in bin 2 beat all three (6)
    assert pooled_auroc([2, 1, 0], [0, 1, 2]) == 8.5 / 9
    assert pooled_auroc([0, 3, 0], [0, 4, 0]) == 0.5
    with pytest.raises(ValueError, match=r"AUROC needs both classes, got 0 positives and 3 negatives"):
        pooled_auroc([2, 1, 0], [0, 0, 0])
    with pytest.raises(ValueError, match=r"hist_pos should hold non-negative counts, got -1"):
        pooled_auroc([2, 1, 0], [0, -1, 2])


def test_pooled_auroc_is_within_the_bin_width_bound(sites: list[Site], total: np.ndarray) -> None:
    y, p = _concatenated(sites)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    # only pos-neg pairs in the same bin can be ordered differently, each by at most 0.5
    bound = 0.5 * int(np.dot(total[1], total[0])) / (n_pos * n_neg)
    gap = abs(pooled_auroc(total[0], total[1]) - roc_auc_score(y, p))
    assert 0 < gap <= bound < 0.005


def test_weighted_mean_of_site_aurocs_is_not_the_pooled_auroc(sites: list[Site], total: np.ndarray) -> None:
    y, p = _concatenated(sites)
    exact = roc_auc_score(y, p)
    mean_of_sites = weighted_mean([roc_auc_score(sy, sp) for sy, sp in sites], [len(sy) for sy, _ in sites])
    binned = pooled_auroc(total[0], total[1])
    assert abs(mean_of_sites - exact) > 0.02
    assert abs(binned - exact) < abs(mean_of_sites - exact) / 100


# --- thresholds chosen on pooled histograms -----------------------------------------------------


def test_youden_from_histograms_is_within_one_bin_of_roc_curve(sites: list[Site], total: np.ndarray) -> None:
    y, p = _concatenated(sites)
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    best = int(np.argmax(tpr - fpr))
    exact_j = tpr[best] - fpr[best]
    chosen = youden_threshold_from_histograms(total[0], total[1], EDGES)
    predicted = p >= chosen
    chosen_j = predicted[y == 1].mean() - predicted[y == 0].mean()
    # the exact optimum lies in one bin; moving the threshold to that bin's edges costs at most its cases
    b = int(np.searchsorted(EDGES, thresholds[best], side="right") - 1)
    one_bin = total[1][b] / y.sum() + total[0][b] / (1 - y).sum()
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
    sites: list[Site], total: np.ndarray, target: float
) -> None:
    y, p = _concatenated(sites)
    chosen = threshold_for_sensitivity(total[0], total[1], EDGES, target)
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


# --- weighted mean ------------------------------------------------------------------------------


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
    with pytest.raises(ValueError, match=r"matrix 0 should hold non-negative counts"):
        pooled_multiclass_metrics([-np.eye(3)])
    with pytest.raises(ValueError, match=r"matrix 0 should hold non-negative counts"):
        pooled_multiclass_metrics([np.full((3, 3), np.nan)])
    estimated = pooled_multiclass_metrics([np.eye(3) * 2.5])  # estimated counts: floats
    assert estimated["accuracy"] == 1.0 and estimated["n"] == 7.5
    with pytest.raises(ValueError, match=r"the pooled confusion matrix is empty"):
        pooled_multiclass_metrics([np.zeros((3, 3), dtype=int)])

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fedfreeze.errors import DataError
from fedfreeze.metrics import binary_metrics, multiclass_metrics, summarize, youden_threshold


def test_binary_metrics_on_a_worked_example():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    p = np.array([0.1, 0.4, 0.6, 0.2, 0.8, 0.7, 0.3, 0.9, 0.55, 0.45])
    m = binary_metrics(y, p, threshold=0.5)
    # at 0.5: TN=3 FP=1 TP=4 FN=2
    assert (m["tn"], m["fp"], m["tp"], m["fn"]) == (3, 1, 4, 2)
    assert m["sensitivity"] == pytest.approx(4 / 6)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["balanced_accuracy"] == pytest.approx((4 / 6 + 3 / 4) / 2)
    assert m["f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 2))
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p))
    assert m["n"] == 10


def test_threshold_moves_the_operating_point():
    y = np.array([0, 0, 1, 1])
    p = np.array([0.2, 0.35, 0.3, 0.9])
    assert binary_metrics(y, p, 0.5)["sensitivity"] == 0.5
    assert binary_metrics(y, p, 0.25)["sensitivity"] == 1.0


def test_one_class_is_a_clear_error():
    with pytest.raises(DataError, match=r"only class 1 is present \(n=3\)"):
        binary_metrics(np.array([1, 1, 1]), np.array([0.2, 0.5, 0.9]))
    with pytest.raises(DataError, match="got none"):
        binary_metrics(np.array([]), np.array([]))


def test_multiclass_macro_metrics():
    y = np.array([0, 1, 2, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.2, 0.7], [0.1, 0.1, 0.8], [0.2, 0.2, 0.6]])
    m = multiclass_metrics(y, probs)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx((1 + 0 + 1) / 3)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))


def test_summarize_mean_and_sample_std():
    s = summarize([{"auroc": 0.8}, {"auroc": 0.9}, {"auroc": 1.0}], keys=["auroc"])
    assert s["auroc"]["mean"] == pytest.approx(0.9)
    assert s["auroc"]["std"] == pytest.approx(0.1)


def test_numpy_metrics_equal_sklearn_on_random_scores_with_ties():
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_curve

    rng = np.random.default_rng(3)
    for _trial in range(20):
        n = int(rng.integers(5, 300))
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        p = np.round(rng.random(n), int(rng.integers(1, 4)))  # rounding makes ties
        t = float(rng.choice(p))
        m = binary_metrics(y, p, t)
        assert m["auroc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p >= t), abs=1e-12)
        assert m["f1"] == pytest.approx(f1_score(y, p >= t, zero_division=0.0), abs=1e-12)
        fpr, tpr, thr = roc_curve(y, p)
        best_j = np.max(tpr - fpr)
        chosen = youden_threshold(y, p)
        assert (np.mean(p[y == 1] >= chosen) - np.mean(p[y == 0] >= chosen)) == pytest.approx(best_j, abs=1e-12)


def test_numpy_multiclass_equals_sklearn():
    from sklearn.metrics import balanced_accuracy_score, f1_score

    rng = np.random.default_rng(4)
    y = rng.integers(0, 4, 200)
    probs = rng.dirichlet(np.ones(4), 200)
    m = multiclass_metrics(y, probs)
    pred = probs.argmax(1)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"), abs=1e-12)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-12)
    assert m["f1"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-12)

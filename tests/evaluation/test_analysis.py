"""The analysis on synthetic fold results: pooled vs per-site scopes, pairing checks, the t-test."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import ttest_1samp

from fedfreeze.errors import DataError
from fedfreeze.evaluation.analysis import analyze, corrected_t_test
from fedfreeze.metrics import auroc


def fake_results(
    rng: np.random.Generator, strength: float, *, repeats: int = 2, folds: int = 2, noise_seed: int | None = None
) -> list[dict]:
    """Two sites, 10 patients per class each, every patient tested once per repeat."""
    noise = np.random.default_rng(noise_seed) if noise_seed is not None else rng
    out = []
    for r in range(repeats):
        for k in range(folds):
            p = {"site": [], "patient_id": [], "source": [], "label": [], "score": []}
            for site in ("s1", "s2"):
                for i in range(k, 20, folds):
                    label = (i // folds) % 2
                    p["site"].append(site)
                    p["patient_id"].append(f"{site}-p{i}")
                    p["source"].append(f"{site}/img{i}.png")
                    p["label"].append(label)
                    p["score"].append(float(1 / (1 + np.exp(-(strength * label + noise.normal())))))
            out.append({"repeat": r, "fold": k, "n_train": {"s1": 10, "s2": 10}, "predictions": p})
    return out


def test_pooled_is_one_auroc_over_all_sites_not_a_mean(rng):
    results = {"a": fake_results(rng, 1.0)}
    # make site s2's scores much higher than s1's: each site alone ranks well, pooled less so
    for r in results["a"]:
        p = r["predictions"]
        p["score"] = [s + (5.0 if site == "s2" else 0.0) for s, site in zip(p["score"], p["site"], strict=False)]
    summary = analyze(results, [], threshold=0.5, replicates=200, confidence=0.95, seed=0)
    fold0 = results["a"][0]["predictions"]
    assert summary["folds"]["a"]["pooled"][0]["auroc"] == pytest.approx(
        auroc(np.array(fold0["label"]), np.array(fold0["score"]))
    )
    site_mean = np.mean([summary["arms"]["a"][s]["metrics"]["auroc"]["mean"] for s in ("s1", "s2")])
    assert summary["arms"]["a"]["pooled"]["metrics"]["auroc"]["mean"] != pytest.approx(site_mean)


def test_a_real_difference_is_found_and_no_difference_is_not(rng):
    strong, weak = fake_results(rng, 3.0, noise_seed=1), fake_results(rng, 0.5, noise_seed=1)
    same = fake_results(rng, 3.0, noise_seed=1)
    summary = analyze(
        {"strong": strong, "weak": weak, "same": same},
        [("strong", "weak"), ("strong", "same")],
        threshold=0.5,
        replicates=500,
        confidence=0.95,
        seed=0,
    )
    differ, identical = (c["scopes"]["pooled"] for c in summary["comparisons"])
    assert differ["delong"]["p_value"] < 0.01 and differ["metrics"]["auroc"]["bootstrap"]["p_value"] < 0.01
    assert differ["metrics"]["auroc"]["bootstrap"]["ci_low"] > 0
    assert identical["delong"]["p_value"] == 1.0 and identical["metrics"]["auroc"]["difference"] == 0.0
    assert set(summary["comparisons"][0]["scopes"]) == {"pooled", "s1", "s2"}


def test_arms_tested_on_different_cases_are_refused(rng):
    a, b = fake_results(rng, 1.0), fake_results(rng, 1.0)
    b[0]["predictions"]["source"][0] = "elsewhere.png"
    with pytest.raises(DataError, match="tested on different cases in repeat 1 fold 1"):
        analyze({"a": a, "b": b}, [("a", "b")], threshold=0.5, replicates=100, confidence=0.95, seed=0)


def test_corrected_t_test_inflates_the_variance_by_the_test_train_ratio():
    d = [0.02, 0.05, -0.01, 0.04, 0.03, 0.00]
    result = corrected_t_test(d, test_train_ratio=0.25)
    j, mean, var = len(d), np.mean(d), np.var(d, ddof=1)
    assert result["t"] == pytest.approx(mean / np.sqrt((1 / j + 0.25) * var))
    assert result["df"] == j - 1
    naive = ttest_1samp(d, 0.0)
    assert result["p_value"] > naive.pvalue  # the plain paired t-test over CV folds is anti-conservative
    assert corrected_t_test(d, test_train_ratio=0.0)["p_value"] == pytest.approx(naive.pvalue)

"""The patient-level bootstrap: coverage where the true AUROC is known, clusters, paired p-values."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from fedfreeze.evaluation.bootstrap import (
    FoldCases,
    bootstrap_weights,
    fold_mean_replicates,
    paired_p_value,
    percentile_interval,
    weighted_metrics,
)
from fedfreeze.metrics import binary_metrics


def coverage(make_sample, truth: float, *, repetitions: int, replicates: int, cluster: bool) -> float:
    """Share of 95% percentile intervals that contain ``truth``."""
    rng = np.random.default_rng(12345)
    hits = 0
    for rep in range(repetitions):
        patient, labels, scores = make_sample(rng)
        units = patient if cluster else np.arange(len(labels))
        strata = np.array([labels[units == u][0] for u in range(units.max() + 1)])
        weights = bootstrap_weights(strata.astype(str), replicates, seed=rep)
        boot = fold_mean_replicates([FoldCases(units, labels, scores)], weights, 0.5)
        low, high = percentile_interval(boot["auroc"], 0.95)
        hits += low <= truth <= high
    return hits / repetitions


def test_auroc_interval_covers_the_binormal_truth_about_95_percent():
    """Binormal scores, N(0,1) for negatives and N(d,1) for positives: AUROC = Phi(d / sqrt(2))."""
    d, n = 1.2, 40

    def sample(rng):
        labels = np.r_[np.ones(n, int), np.zeros(n, int)]
        return np.arange(2 * n), labels, np.r_[rng.normal(d, 1, n), rng.normal(0, 1, n)]

    rate = coverage(sample, float(norm.cdf(d / np.sqrt(2))), repetitions=300, replicates=400, cluster=False)
    # 300 intervals: the binomial SD of the rate is 0.013; the percentile interval runs a little short
    assert 0.90 <= rate <= 0.98, rate


def test_patient_bootstrap_keeps_coverage_when_images_of_a_patient_are_correlated():
    """Three images per patient sharing a patient effect: resampling images would pretend there are
    three times as many independent cases (too narrow); resampling patients keeps the coverage."""
    d, n, per, sd_patient, sd_image = 1.0, 25, 3, 1.0, 0.3
    truth = float(norm.cdf(d / np.sqrt(2 * (sd_patient**2 + sd_image**2))))

    def sample(rng):
        patient_label = np.r_[np.ones(n, int), np.zeros(n, int)]
        effect = rng.normal(0, sd_patient, 2 * n) + d * patient_label
        patient = np.repeat(np.arange(2 * n), per)
        return patient, patient_label[patient], effect[patient] + rng.normal(0, sd_image, len(patient))

    by_patient = coverage(sample, truth, repetitions=150, replicates=250, cluster=True)
    by_image = coverage(sample, truth, repetitions=150, replicates=250, cluster=False)
    assert 0.88 <= by_patient <= 0.99, by_patient
    assert by_image < 0.85, by_image  # the naive interval is too narrow: the check above can fail


def test_unit_weights_reproduce_the_plain_metrics(rng):
    labels = np.r_[np.ones(30, int), np.zeros(20, int)]
    scores = np.round(rng.random(50), 2)
    ones = np.ones((1, 50))
    got = weighted_metrics(FoldCases(np.arange(50), labels, scores), ones, 0.4)
    want = binary_metrics(labels, scores, 0.4)
    for key, values in got.items():
        assert values[0] == pytest.approx(want[key]), key


def test_weights_resample_within_strata():
    strata = np.array(["a|0"] * 5 + ["a|1"] * 3 + ["b|1"] * 4)
    w = bootstrap_weights(strata, 200, seed=1)
    assert w.shape == (200, 12)
    np.testing.assert_array_equal(w[:, :5].sum(1), 5)
    np.testing.assert_array_equal(w[:, 5:8].sum(1), 3)
    np.testing.assert_array_equal(w[:, 8:].sum(1), 4)
    assert np.array_equal(w, bootstrap_weights(strata, 200, seed=1))


def test_paired_p_value():
    rng = np.random.default_rng(0)
    centred = rng.normal(0.0, 0.01, 999)
    assert paired_p_value(0.05, centred + 0.05) == pytest.approx(1 / 1000)  # 5 SD away: at the floor
    assert 0.2 < paired_p_value(0.01, centred + 0.01) < 0.5  # 1 SD: p about 0.32
    assert paired_p_value(0.0, centred) == 1.0

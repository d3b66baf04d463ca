"""Temperature and Platt scaling against scikit-learn, threshold rules, and their bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from fedfreeze.adaptation.prevalence import logit
from fedfreeze.adaptation.recalibration import (
    choose_threshold,
    compose,
    fit_calibration,
    log_loss,
    recalibrate,
    sensitivity_specificity,
)
from fedfreeze.errors import DataError
from fedfreeze.metrics import youden_threshold
from fedfreeze.model_io import ScoreCalibration


@pytest.fixture(scope="module")
def cases(test_scores, test_set):
    """Real scores and labels, made overconfident and shifted (a miscalibrated model at a new site)."""
    y = test_set.labels.numpy()
    z = 2.5 * logit(test_scores) + 0.8
    return z, y


def test_platt_matches_unpenalised_logistic_regression(cases) -> None:
    z, y = cases
    a, b = fit_calibration(z, y, "platt")
    reference = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(z[:, None], y)
    assert a == pytest.approx(reference.coef_[0, 0], rel=1e-5)
    assert b == pytest.approx(reference.intercept_[0], abs=1e-5)
    assert log_loss(z, y, a, b) < log_loss(z, y)


def test_temperature_matches_logistic_regression_without_intercept(cases) -> None:
    z, y = cases
    a, b = fit_calibration(z, y, "temperature")
    reference = LogisticRegression(C=np.inf, fit_intercept=False, tol=1e-12, max_iter=10_000).fit(z[:, None], y)
    assert b == 0.0
    assert a == pytest.approx(reference.coef_[0, 0], rel=1e-5)
    assert a < 1.0  # the scores were made overconfident: the temperature cools them
    assert log_loss(z, y, a) < log_loss(z, y)


def test_weights_count_as_repeated_cases(cases) -> None:
    z, y = cases
    weights = np.ones(len(z))
    weights[::3] = 2.0
    weights[1::7] = 0.0
    keep = np.repeat(np.arange(len(z)), weights.astype(int))
    for method in ("temperature", "platt"):
        assert fit_calibration(z, y, method, weights) == pytest.approx(
            fit_calibration(z[keep], y[keep], method), rel=1e-7
        )
    assert choose_threshold(z, y, "youden", weights=weights) == choose_threshold(z[keep], y[keep], "youden")


def test_separated_or_reversed_cases_are_refused() -> None:
    z = np.array([-2.0, -1.0, -0.5, 0.5, 1.0, 2.0])
    y = np.array([0, 0, 0, 1, 1, 1])
    for method in ("temperature", "platt"):
        with pytest.raises(DataError, match=f"{method} scaling has no finite fit: .* separate the 6 labelled cases"):
            fit_calibration(z, y, method)
    z_noisy = np.array([-2.0, -1.0, 0.7, -0.5, 1.0, 2.0])
    with pytest.raises(DataError, match=r"slope a = -.* wrong way round"):
        fit_calibration(z_noisy, 1 - y, "platt")


def test_youden_rule_is_the_metrics_youden_threshold(cases) -> None:
    z, y = cases
    p = 1 / (1 + np.exp(-z))
    assert choose_threshold(p, y, "youden") == pytest.approx(youden_threshold(y, p))


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95])
def test_target_sensitivity_is_the_highest_threshold_reaching_it(cases, target: float) -> None:
    z, y = cases
    p = 1 / (1 + np.exp(-z))
    t = choose_threshold(p, y, "target-sensitivity", target)
    assert sensitivity_specificity(p, y, t)[0] >= target
    higher = np.unique(p[p > t])
    assert len(higher) == 0 or sensitivity_specificity(p, y, higher[0])[0] < target


def test_compose_applies_after_the_existing_calibration() -> None:
    existing = ScoreCalibration(method="platt", a=0.7, b=-0.3)
    raw = np.linspace(0.01, 0.99, 50)
    combined = compose(existing, 1.6, 0.4, "platt", fitted_on="x")
    by_steps = 1 / (1 + np.exp(-(1.6 * logit(existing.apply(raw)) + 0.4)))
    np.testing.assert_allclose(combined.apply(raw), by_steps, rtol=1e-10)
    assert compose(None, 0.5, 0.0, "temperature", "x").method == "temperature"


def test_recalibrate_reports_threshold_uncertainty_by_patient(cases, test_set) -> None:
    z, y = cases
    p = 1 / (1 + np.exp(-z))
    fit = recalibrate(p, y, test_set.patient_ids, method="platt", rule="youden", replicates=300)
    assert fit.n_patients == len(set(test_set.patient_ids)) < fit.n_images
    assert fit.threshold_ci[0] <= fit.threshold <= fit.threshold_ci[1]
    assert fit.a_ci[0] < fit.a < fit.a_ci[1]
    calibrated = 1 / (1 + np.exp(-(fit.a * z + fit.b)))
    assert fit.threshold == pytest.approx(youden_threshold(y, calibrated))
    assert (fit.fitted_sensitivity, fit.fitted_specificity) == sensitivity_specificity(calibrated, y, fit.threshold)
    # left-out patients judge the rule less kindly than the cases it was fitted on, on average
    assert (
        fit.out_of_bootstrap_sensitivity + fit.out_of_bootstrap_specificity
        <= fit.fitted_sensitivity + fit.fitted_specificity
    )
    assert 0 <= fit.out_of_bootstrap_sensitivity_ci[0] <= fit.out_of_bootstrap_sensitivity_ci[1] <= 1

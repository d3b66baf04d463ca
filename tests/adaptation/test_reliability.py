"""The label-free check: it vouches for scores drawn from a reference mixture, refuses scores the
reference cannot explain, and refuses an AdaBN that flips the ranking even where the flipped scores
fit a symmetric reference as well as the right ones."""

from __future__ import annotations

import numpy as np
import pytest

from fedfreeze.adaptation.reliability import (
    MIN_IMAGES,
    check_batchnorm,
    check_prevalence,
    mixture_fit,
    spearman,
)
from fedfreeze.reference_scores import reference_from_scores


def binormal_scores(n: int, prevalence: float, rng: np.random.Generator, shift0: float = 0.0) -> np.ndarray:
    y = rng.random(n) < prevalence
    z = np.where(y, rng.normal(2.0, 1.0, n), rng.normal(-2.0 + shift0, 1.0, n))
    return 1.0 / (1.0 + np.exp(-z)), y


@pytest.fixture(scope="module")
def reference():
    scores, y = binormal_scores(4000, 0.5, np.random.default_rng(0))
    return reference_from_scores(y.astype(int), scores, 5, "synthetic binormal")


def test_scores_from_a_reference_mixture_are_vouched_for(reference) -> None:
    rng = np.random.default_rng(1)
    for prevalence in (0.2, 0.5, 0.8):
        scores, y = binormal_scores(600, prevalence, rng)
        fit = mixture_fit(scores, reference, seed=0)
        assert fit.prevalence == pytest.approx(y.mean(), abs=0.05)
        assert check_prevalence(fit, float(y.mean())).vouched


def test_a_shifted_class_is_refused_and_em_disagreeing_with_the_mixture_too(reference) -> None:
    rng = np.random.default_rng(2)
    scores, y = binormal_scores(600, 0.6, rng, shift0=2.0)  # the negatives' scores moved up, as at a real new site
    verdict = check_prevalence(mixture_fit(scores, reference, seed=0), 0.9)
    assert not verdict.vouched and "do not look like the training sites'" in verdict.reason
    good, yg = binormal_scores(600, 0.3, rng)
    verdict = check_prevalence(mixture_fit(good, reference, seed=0), 0.6)  # EM off by 0.3
    assert not verdict.vouched and "differ by" in verdict.reason


def test_too_few_images_cannot_be_vouched_for(reference) -> None:
    scores, _ = binormal_scores(MIN_IMAGES - 1, 0.5, np.random.default_rng(3))
    verdict = check_prevalence(mixture_fit(scores, reference), 0.5)
    assert not verdict.vouched and f"at least {MIN_IMAGES} are needed" in verdict.reason


def test_adabn_that_flips_the_ranking_is_refused(reference) -> None:
    scores, _ = binormal_scores(600, 0.5, np.random.default_rng(4))
    flipped = 1.0 - scores  # a symmetric reference explains the flipped scores just as well
    before, after = mixture_fit(scores, reference, seed=0), mixture_fit(flipped, reference, seed=0)
    assert after.acceptable()  # so the distribution alone cannot catch it
    rho = spearman(scores, flipped)
    assert rho == pytest.approx(-1.0)
    verdict = check_batchnorm(before, after, rho)
    assert not verdict.vouched and "reordered the site's images" in verdict.reason
    assert check_batchnorm(before, before, 1.0).vouched

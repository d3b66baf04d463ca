"""A new site's class prevalence from a model's scores alone, and the prior shift it implies.

Saerens, Latinne & Decaestecker (2002), "Adjusting the outputs of a classifier to new a priori
probabilities: a simple procedure", Neural Computation 14(1):21-41. If the model's scores are
posteriors ``P_t(y=1|x)`` for the prior ``pi_t`` it was trained for, and only the prior changes at the
new site (the class-conditional image distributions stay), the posterior at prior ``pi`` is the
score shifted on the logit scale::

    logit P(y=1|x) = logit P_t(y=1|x) + logit(pi) - logit(pi_t)

EM estimates ``pi``: the E-step shifts every score to the current ``pi``, the M-step sets ``pi`` to
the mean shifted posterior. Its fixed point is the maximum-likelihood prior of the mixture
``pi p(x|1) + (1 - pi) p(x|0)`` (their section 2.3). fedfreeze trains with class-balanced sampling,
so the scores of a model it trained are for ``pi_t = 0.5``.

How far to trust it: the estimate is only as good as the scores' calibration at the training
prior; a model that ranks the site's images poorly pulls it towards ``pi_t``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fedfreeze.errors import ConfigError, DataError
from fedfreeze.evaluation.bootstrap import bootstrap_weights, percentile_interval

EPS = 1e-12


def logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p / (1 - p))


def prior_shift(prior: float, train_prior: float) -> float:
    """The logit shift that turns posteriors at ``train_prior`` into posteriors at ``prior``."""
    return float(logit(prior) - logit(train_prior))


def shift_posteriors(scores: np.ndarray, prior: float, train_prior: float) -> np.ndarray:
    """Scores (posteriors at ``train_prior``) as posteriors at ``prior``."""
    return 1.0 / (1.0 + np.exp(-(logit(scores) + prior_shift(prior, train_prior))))


def check_prior(value: float, name: str) -> float:
    if not 0.0 < value < 1.0:
        raise ConfigError(f"{name} should be a prevalence strictly between 0 and 1, got {value}")
    return float(value)


@dataclass(frozen=True)
class EMResult:
    prevalence: float
    iterations: int
    converged: bool


def em_prevalence(
    scores: np.ndarray, train_prior: float = 0.5, *, tol: float = 1e-10, max_iter: int = 100_000
) -> EMResult:
    """Saerens-Latinne-Decaestecker EM for the prevalence of class 1, started at ``train_prior``."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or len(scores) == 0:
        raise DataError(f"prevalence estimation needs a non-empty 1-D array of scores, got shape {scores.shape}")
    check_prior(train_prior, "train prior")
    prior = train_prior
    for iteration in range(1, max_iter + 1):
        updated = float(np.mean(shift_posteriors(scores, prior, train_prior)))  # E-step, then M-step
        if abs(updated - prior) < tol:
            return EMResult(updated, iteration, True)
        prior = updated
    return EMResult(prior, max_iter, False)


def likelihood_prevalence(scores: np.ndarray, weights: np.ndarray, train_prior: float) -> np.ndarray:
    """The maximum-likelihood prevalence, EM's fixed point, for each row of ``weights`` ``[B, N]``.

    Why not EM here: EM converges linearly, slowly when the scores carry little information, and a
    bootstrap needs a thousand fits. The log-likelihood ``sum_i w_i log(pi u_i + (1 - pi) v_i)``
    (``u = p / pi_t``, ``v = (1 - p) / (1 - pi_t)``) is concave in ``pi``, so its maximiser is the root
    of a decreasing derivative (or an end of [0, 1]): 60 bisection steps, all rows at once.
    """
    p = np.clip(np.asarray(scores, dtype=np.float64), EPS, 1 - EPS)
    u, v = p / train_prior, (1 - p) / (1 - train_prior)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))

    def slope(pi: np.ndarray) -> np.ndarray:
        return (w * ((u - v) / (pi[:, None] * u + (1 - pi[:, None]) * v))).sum(axis=1)

    low, high = np.zeros(len(w)), np.ones(len(w))
    for _ in range(60):
        mid = (low + high) / 2
        rising = slope(mid) > 0
        low, high = np.where(rising, mid, low), np.where(rising, high, mid)
    return (low + high) / 2


def patient_index(patient_ids: Sequence[str]) -> tuple[np.ndarray, int]:
    """Each image's patient as an index into the sorted unique ids, and how many patients there are."""
    uniques, inverse = np.unique(np.asarray(list(patient_ids), dtype=object).astype(str), return_inverse=True)
    return inverse.astype(np.int64), len(uniques)


@dataclass(frozen=True)
class PrevalenceEstimate:
    """The site's estimated prevalence of the positive class, with a patient-level bootstrap interval."""

    prevalence: float
    ci_low: float
    ci_high: float
    confidence: float
    train_prior: float
    em_iterations: int
    em_converged: bool
    replicates: int
    seed: int
    n_images: int
    n_patients: int
    mean_score: float  # the mean of the scores before the shift, for comparison

    def record(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "method": "EM (Saerens, Latinne & Decaestecker 2002)",
            "interval": "percentile, patient-level bootstrap",
        }


def estimate_prevalence(
    scores: np.ndarray,
    patient_ids: Sequence[str],
    train_prior: float = 0.5,
    *,
    replicates: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PrevalenceEstimate:
    """EM's estimate, and a percentile interval from resampling *patients* with replacement (a
    patient's images enter a replicate together, so several images of one patient are not counted
    as independent evidence)."""
    scores = np.asarray(scores, dtype=np.float64)
    if len(patient_ids) != len(scores):
        raise DataError(f"{len(patient_ids)} patient ids for {len(scores)} scores")
    fit = em_prevalence(scores, train_prior)
    units, n_patients = patient_index(patient_ids)
    weights = bootstrap_weights(np.zeros(n_patients, dtype=int), replicates, seed)[:, units]
    low, high = percentile_interval(likelihood_prevalence(scores, weights, train_prior), confidence)
    return PrevalenceEstimate(
        prevalence=fit.prevalence,
        ci_low=low,
        ci_high=high,
        confidence=confidence,
        train_prior=train_prior,
        em_iterations=fit.iterations,
        em_converged=fit.converged,
        replicates=replicates,
        seed=seed,
        n_images=len(scores),
        n_patients=n_patients,
        mean_score=float(scores.mean()),
    )

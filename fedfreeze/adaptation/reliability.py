"""Can a label-free adaptation be vouched for at this site? A check that needs no labels.

Label-free adaptation rests on an assumption the site cannot see: EM prevalence assumes only the class
mix changed (the model's scores stay posteriors, up to the prior); AdaBN assumes re-estimated BatchNorm
statistics undo the change of acquisition. On a real new hospital both failed silently (EM put the
prevalence at 0.918 against 0.625; AdaBN cut AUROC from 0.966 to 0.885).

Both assumptions predict something the site *can* see: its images' scores should look like a mixture
``pi * f1 + (1 - pi) * f0`` of the model's reference class distributions (``reference_scores.py``, from
the training sites' validation). :func:`mixture_fit` fits ``pi`` by maximum likelihood on the score bins
and measures the misfit as the total-variation distance between the site's scores and the fitted
mixture, over groups of bins of equal expected mass; a parametric bootstrap from the fitted mixture
says how large a distance sampling alone gives at this many images. The check vouches only when the
misfit is small in absolute terms *and* explainable by sampling; for EM it also asks that EM's
prevalence agree with the mixture's. For AdaBN it asks the same of the adapted model's scores, and
refuses an adaptation that reordered the site's images (Spearman's rho between the source and adapted
scores below ``MIN_SPEARMAN``): a reordering changes what the model ranks, which no label checked (a
flipped ranking fits a symmetric reference as well as the right one).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fedfreeze.errors import DataError
from fedfreeze.reference_scores import ReferenceScores

GROUPS = 10  # bins are merged into this many groups of equal expected mass for the distance
# Chosen on benchmarks/results/adaptation-check (57 cases; optimistic: chosen and counted on the same cases):
# held-out Kermany patients at 4 prevalences and 2 mild shifts fitted at 0.090-0.121, the sites where EM's
# prevalence was off by more than 0.10 at 0.148 (noise) and 0.468 (NIH); at 100 images sampling alone gave
# 0.11-0.16, so smaller sites cannot be told apart and nothing is vouched for there.
MAX_DISTANCE = 0.13  # a misfit above this (total variation) is not vouched for
MIN_IMAGES = 150  # fewer images than this: nothing can be vouched for
MAX_PREVALENCE_GAP = 0.10  # EM and the mixture fit must agree on the prevalence to within this
MIN_SPEARMAN = 0.9  # AdaBN reordering the site's images more than this is not vouched for


@dataclass(frozen=True)
class MixtureFit:
    """How well a site's scores fit a mixture of the reference class distributions."""

    prevalence: float  # the mixture's share of the positive class (maximum likelihood on the bins)
    distance: float  # total variation between the site's scores and the fitted mixture (grouped bins)
    p_value: float  # share of parametric-bootstrap draws from the fitted mixture at least as distant
    n_images: int
    replicates: int

    def acceptable(self) -> bool:
        """Small misfit on enough images. The p-value is reported, not used: it treats the reference as
        exact, while it was itself estimated from a few hundred validation cases (on the benchmark the
        unshifted held-out patients had p = 0.005 at 450 images)."""
        return self.n_images >= MIN_IMAGES and self.distance <= MAX_DISTANCE

    def text(self) -> str:
        return (
            f"misfit {self.distance:.3f} (total variation; at most {MAX_DISTANCE:g} on at least {MIN_IMAGES} images "
            f"vouches), p = {self.p_value:.3f} against sampling at {self.n_images} images; mixture prevalence "
            f"{self.prevalence:.3f}"
        )


def _histogram(scores: np.ndarray, reference: ReferenceScores) -> np.ndarray:
    edges = reference.edges()
    idx = np.clip(np.searchsorted(edges, np.asarray(scores, dtype=np.float64), side="right") - 1, 0, reference.bins - 1)
    return np.bincount(idx, minlength=reference.bins).astype(np.float64)


def fit_prevalence(hist: np.ndarray, dens: np.ndarray, iterations: int = 500) -> float:
    """Maximum-likelihood mixture weight of class 1 for binned counts (EM on the mixture weight)."""
    pi = 0.5
    for _ in range(iterations):
        mix = pi * dens[1] + (1.0 - pi) * dens[0]
        updated = float((hist * pi * dens[1] / mix).sum() / hist.sum())
        if abs(updated - pi) < 1e-10:
            return updated
        pi = updated
    return pi


def _groups(expected: np.ndarray, groups: int) -> np.ndarray:
    """Group index of each bin: consecutive bins in ``groups`` stretches of about equal expected mass."""
    cum = np.cumsum(expected) / expected.sum()
    return np.minimum((cum * groups - 1e-12).astype(int).clip(0), groups - 1)


def _distance(hist: np.ndarray, mix: np.ndarray, group: np.ndarray, groups: int) -> float:
    observed = np.bincount(group, weights=hist, minlength=groups) / hist.sum()
    expected = np.bincount(group, weights=mix, minlength=groups)
    return 0.5 * float(np.abs(observed - expected).sum())


def mixture_fit(scores: np.ndarray, reference: ReferenceScores, *, replicates: int = 200, seed: int = 0) -> MixtureFit:
    """Fit ``pi`` to the site's scores, then the misfit and its parametric-bootstrap p-value."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or len(scores) == 0:
        raise DataError(f"the reliability check needs a non-empty 1-D array of scores, got shape {scores.shape}")
    dens = reference.densities()
    hist = _histogram(scores, reference)
    pi = fit_prevalence(hist, dens)
    mix = pi * dens[1] + (1.0 - pi) * dens[0]
    group = _groups(mix, GROUPS)
    observed = _distance(hist, mix, group, GROUPS)
    rng = np.random.default_rng(seed)
    n = int(hist.sum())
    draws = rng.multinomial(n, mix / mix.sum(), size=replicates).astype(np.float64)
    null = np.empty(replicates)
    for r, h in enumerate(draws):
        p = fit_prevalence(h, dens)
        m = p * dens[1] + (1.0 - p) * dens[0]
        null[r] = _distance(h, m, _groups(m, GROUPS), GROUPS)
    p_value = float((1 + (null >= observed - 1e-12).sum()) / (replicates + 1))
    return MixtureFit(pi, observed, p_value, n, replicates)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks on ties)."""
    from scipy.stats import spearmanr

    rho = spearmanr(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)).statistic
    return float(rho) if np.isfinite(rho) else 0.0


@dataclass(frozen=True)
class Verdict:
    """Whether a label-free step is vouched for, why, and the figures behind it (stored either way)."""

    step: str  # "prevalence-em" or "batchnorm-statistics"
    vouched: bool
    reason: str
    figures: dict[str, Any]

    def record(self) -> dict[str, Any]:
        return asdict(self)


def check_prevalence(fit: MixtureFit, em_prevalence: float) -> Verdict:
    """EM's prior shift is vouched for when the scores fit a reference mixture and EM agrees with it."""
    figures = {"mixture": asdict(fit), "em_prevalence": em_prevalence}
    if not fit.acceptable():
        return Verdict("prevalence-em", False, _misfit_reason(fit, "a change of prevalence alone"), figures)
    gap = abs(em_prevalence - fit.prevalence)
    if gap > MAX_PREVALENCE_GAP:
        return Verdict(
            "prevalence-em",
            False,
            f"EM's prevalence {em_prevalence:.3f} and the reference mixture's {fit.prevalence:.3f} differ by "
            f"{gap:.3f} (more than {MAX_PREVALENCE_GAP:g}): the model's scores are not posteriors at this site",
            figures,
        )
    return Verdict("prevalence-em", True, f"the scores fit a change of prevalence ({fit.text()})", figures)


def check_batchnorm(before: MixtureFit, after: MixtureFit, rho: float) -> Verdict:
    """AdaBN is vouched for when the adapted scores fit a reference mixture (the shift it should undo is
    gone) and fit it no worse than the source model's did."""
    figures = {"before": asdict(before), "after": asdict(after), "spearman_source_vs_adapted": rho}
    if rho < MIN_SPEARMAN:
        return Verdict(
            "batchnorm-statistics",
            False,
            f"it reordered the site's images (Spearman {rho:.3f} between the source and adapted scores, below "
            f"{MIN_SPEARMAN:g}): a change of ranking no label checked",
            figures,
        )
    if not after.acceptable():
        return Verdict(
            "batchnorm-statistics",
            False,
            _misfit_reason(after, "the re-estimated statistics") + f"; it reordered the images (Spearman {rho:.3f})",
            figures,
        )
    if after.distance > before.distance + 0.02 and before.acceptable():
        return Verdict(
            "batchnorm-statistics",
            False,
            f"the adapted scores fit the reference worse than the source model's ({after.distance:.3f} against "
            f"{before.distance:.3f}); it reordered the images (Spearman {rho:.3f})",
            figures,
        )
    return Verdict(
        "batchnorm-statistics",
        True,
        f"the adapted scores fit the reference ({after.text()}); Spearman {rho:.3f} against the source model",
        figures,
    )


def _misfit_reason(fit: MixtureFit, what: str) -> str:
    if fit.n_images < MIN_IMAGES:
        return f"only {fit.n_images} images: at least {MIN_IMAGES} are needed to check {what} without labels"
    return f"the site's scores do not look like the training sites' under any prevalence, so {what} cannot be vouched for ({fit.text()})"

"""``fedfreeze adapt`` without labels: AdaBN and EM prevalence, each only when the label-free check
(``reliability.py``) vouches for it at this site."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedfreeze import __version__
from fedfreeze.adaptation.batchnorm import reestimate_all_bn
from fedfreeze.adaptation.options import AdaptationRefused, AdaptOptions
from fedfreeze.adaptation.prevalence import estimate_prevalence, logit, prior_shift
from fedfreeze.adaptation.recalibration import compose
from fedfreeze.adaptation.reliability import Verdict, check_batchnorm, check_prevalence, mixture_fit, spearman
from fedfreeze.data.dataset import ImageSet
from fedfreeze.errors import DataError
from fedfreeze.model_io import ModelCard, model_scores, model_sha256
from fedfreeze.models.grouped import GroupedNet
from fedfreeze.operating_point import OperatingPoint
from fedfreeze.provenance import now_utc
from fedfreeze.training.engine import predict_scores

THRESHOLD_CLIP = 1e-6
EDGE = 1e-3  # an EM prevalence this close to 0 or 1 is a boundary fit, not an estimate


def record_verdict(verdict: Verdict, options: AdaptOptions, record: dict[str, Any], lines: list[str]) -> None:
    """Record a label-free check; refuse a step it cannot vouch for unless the site allowed that."""
    record["checks"].append(verdict.record())
    step = "prevalence (EM)" if verdict.step == "prevalence-em" else "BatchNorm re-estimation (AdaBN)"
    if verdict.vouched:
        lines.append(f"check: {step} vouched for: {verdict.reason}")
        return
    if not options.allow_unverified:
        raise AdaptationRefused(
            f"refused {step} at this site, nothing written: {verdict.reason}; label some patients instead "
            "(fedfreeze suggest, then fedfreeze adapt --labels use), or --allow-unverified to store it flagged"
        )
    lines.append(f"check: {step} NOT vouched for, stored anyway (--allow-unverified): {verdict.reason}")


def _no_reference(step: str) -> Verdict:
    return Verdict(
        step,
        False,
        "the model folder holds no reference scores (a folder written before fedfreeze recorded them), so no "
        "label-free step can be checked",
        {},
    )


def batchnorm_step(
    model: GroupedNet,
    card: ModelCard,
    data: ImageSet,
    options: AdaptOptions,
    device: torch.device,
    labelled: bool,
    record: dict[str, Any],
    lines: list[str],
) -> None:
    # the reference holds the model's raw scores (before any calibration the card holds): compare like with like
    before = predict_scores(model, data.images, device) if card.model.num_classes == 2 else None
    layers = reestimate_all_bn(model, data.images, device)
    record["batchnorm"] = {"reestimated": True, "layers": layers, "n_images": len(data)}
    lines.append(
        f"BatchNorm statistics: re-estimated in all {layers} layers on the site's images (every weight unchanged)"
    )
    if before is None:  # multi-class: no score distribution to check against
        return
    after = predict_scores(model, data.images, device)
    rho = spearman(before, after)
    record["batchnorm"]["spearman_source_vs_adapted"] = rho
    if labelled:  # the labelled operating point's promise is estimated on the adapted scores
        lines.append(f"BatchNorm statistics: Spearman {rho:.3f} between the source and adapted scores")
        return
    if card.reference_scores is None:
        verdict = _no_reference("batchnorm-statistics")
    else:
        fit_before = mixture_fit(before, card.reference_scores, seed=options.seed)
        fit_after = mixture_fit(after, card.reference_scores, seed=options.seed)
        verdict = check_batchnorm(fit_before, fit_after, rho)
    record_verdict(verdict, options, record, lines)


def prevalence_step(
    model: GroupedNet,
    card: ModelCard,
    data: ImageSet,
    options: AdaptOptions,
    device: torch.device,
    site: str,
    record: dict[str, Any],
    lines: list[str],
) -> OperatingPoint:
    train_prior = options.train_prior if options.train_prior is not None else 0.5
    objective = options.objective or "balanced-accuracy"
    scores = model_scores(model, card, data.images, device)
    estimate = estimate_prevalence(
        scores,
        data.patient_ids,
        train_prior,
        replicates=options.replicates,
        confidence=options.confidence,
        seed=options.seed,
    )
    if not EDGE <= estimate.prevalence <= 1 - EDGE:
        after_bn = (
            " (re-estimated BatchNorm statistics move with the site's class mix)" if options.bn == "reestimate" else ""
        )
        raise DataError(
            f"EM puts the prevalence of {card.class_names[1]!r} at {estimate.prevalence:.4f}, the edge of [0, 1]: "
            f"either {record['data']} holds (almost) one class only, or the model's scores there are not posteriors "
            f"at the training prior {train_prior:g} moved by a change of prevalence{after_bn}; a shift to the edge "
            "would set every score to 0 or 1, so none is stored (use --prevalence none, or labels)"
        )
    if card.reference_scores is None:
        verdict = _no_reference("prevalence-em")
    else:
        raw = predict_scores(model, data.images, device)  # the reference's scale: before any card calibration
        verdict = check_prevalence(mixture_fit(raw, card.reference_scores, seed=options.seed), estimate.prevalence)
    record_verdict(verdict, options, record, lines)
    delta = prior_shift(estimate.prevalence, train_prior)
    calibration = compose(
        None,
        1.0,
        delta,
        "platt",
        fitted_on=f"prior shift to the EM prevalence {estimate.prevalence:.4f} at site {site}",
    )
    base = card.threshold
    if objective == "accuracy":
        threshold = 0.5
        rule = "0.5 on the prior-corrected posterior: the Bayes rule for accuracy at the site's prevalence"
    else:
        threshold = float(1.0 / (1.0 + np.exp(-(logit(base) + delta))))
        rule = "the global threshold mapped through the prior shift: balanced accuracy's Bayes decision does not depend on prevalence"
    threshold = float(np.clip(threshold, THRESHOLD_CLIP, 1 - THRESHOLD_CLIP))
    record["prevalence"] = estimate.record()
    record["calibration"] = {"method": "prior shift (platt, a = 1)", "logit_shift": delta}
    record["threshold"] = {"objective": objective, "rule": rule, "before": base, "after": threshold}
    positive = card.class_names[1]
    pct = f"{options.confidence:.0%}"
    converged = "" if estimate.em_converged else f" (EM did not converge in {estimate.em_iterations} iterations)"
    lines += [
        f"estimated prevalence of {positive!r} at this site: {estimate.prevalence:.3f} "
        f"({pct} CI {estimate.ci_low:.3f}-{estimate.ci_high:.3f}, patient-level bootstrap, "
        f"{estimate.replicates} replicates){converged}; the model's scores assume {train_prior:g}; "
        f"mean score {estimate.mean_score:.3f}",
        f"calibration at site {site!r}: scores shifted by {delta:+.3f} on the logit scale, so they are posteriors "
        f"at the site's prevalence (platt a = {calibration.a:.4g}, b = {calibration.b:+.4g})",
        f"operating point of site {site!r}: threshold {base:.4f} -> {threshold:.4f} ({objective}: "
        + (
            "every decision unchanged)"
            if objective == "balanced-accuracy"
            else "the Bayes rule for accuracy at this prevalence; decisions change)"
        ),
    ]
    return OperatingPoint(
        site=site,
        threshold=threshold,
        calibration=calibration,
        rule=f"prior shift ({objective})",
        evidence="label-free-prevalence",
        labels_used=False,
        model_sha256=model_sha256(model),
        n_images=len(data),
        n_patients=estimate.n_patients,
        created_utc=now_utc(),
        fedfreeze_version=__version__,
    )

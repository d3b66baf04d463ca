"""``fedfreeze adapt`` with labels: a site operating point from a few labelled patients (threshold and
calibration, ``recalibration.py``), or a refitted head when the model ranks the site's patients poorly
(``head_refit.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfreeze import __version__
from fedfreeze.adaptation.head_refit import DEFAULT_STRENGTH as HEAD_STRENGTH
from fedfreeze.adaptation.head_refit import refit_head, refit_promise
from fedfreeze.adaptation.options import AdaptOptions
from fedfreeze.adaptation.prevalence import patient_index
from fedfreeze.adaptation.recalibration import Recalibration, compose, recalibrate, require_patients_per_class
from fedfreeze.adaptation.threshold_rules import Rule
from fedfreeze.data.dataset import ImageSet
from fedfreeze.errors import ConfigError
from fedfreeze.metrics import binary_metrics
from fedfreeze.model_io import ModelCard, model_scores, model_sha256
from fedfreeze.models.grouped import GroupedNet
from fedfreeze.operating_point import OperatingPoint, Promise, ScoreCalibration
from fedfreeze.provenance import now_utc
from fedfreeze.training.engine import extract_features

REFIT_REPLICATES = 200  # each replicate refits the head: the promise of --refit head uses at most this many
DEFAULT_RULE: Rule = "binormal"


def refit_step(
    model: GroupedNet,
    card: ModelCard,
    data: ImageSet,
    options: AdaptOptions,
    device: torch.device,
    site: str,
    record: dict[str, Any],
    lines: list[str],
) -> OperatingPoint:
    """Refit the head on the labelled patients' features (``head_refit.py``); the operating point is 0.5."""
    data.require_classes(2, why="a head refit needs labelled cases of both classes")
    y = data.labels.numpy()
    units, n_patients = patient_index(data.patient_ids)
    patient_class = np.zeros(n_patients, dtype=int)
    np.maximum.at(patient_class, units, y)
    require_patients_per_class(patient_class)
    before = model_scores(model, card, data.images, device)
    features = extract_features(model, data.images, device).numpy().astype(np.float64)
    fc = model.head.fc
    if fc.out_features != 1:
        raise ConfigError("--refit head is for binary models (one logit)")
    w0, b0 = fc.weight.detach().double().numpy()[0], float(fc.bias.detach()[0])
    fit = refit_head(features, y, w0, b0, strength=HEAD_STRENGTH)
    replicates = min(options.replicates, REFIT_REPLICATES)
    promise = refit_promise(
        features,
        y,
        patient_class,
        units,
        w0,
        b0,
        strength=HEAD_STRENGTH,
        replicates=replicates,
        confidence=options.confidence,
        seed=options.seed,
    )
    with torch.no_grad():
        fc.weight.copy_(torch.as_tensor(fit.weight, dtype=fc.weight.dtype)[None])
        fc.bias.fill_(fit.bias)
    moved = float(np.linalg.norm(fit.weight - w0)) / max(float(np.linalg.norm(w0)), 1e-12)
    auroc_before = binary_metrics(y, before, 0.5)["auroc"]
    record["head_refit"] = {
        "strength": HEAD_STRENGTH,
        "converged": fit.converged,
        "iterations": fit.iterations,
        "relative_change": moved,
        "auroc_before_on_labelled": auroc_before,
        "promise": {**promise.__dict__},
    }
    record["threshold"] = {"rule": "0.5 (class-balanced head)", "before": card.threshold, "after": 0.5}
    pct = f"{options.confidence:.0%}"
    lines += [
        f"head refit on {n_patients} labelled patients' features (class-balanced, penalised toward the source head, "
        f"strength {HEAD_STRENGTH:g}): weights moved by {moved:.1%}; the source model's AUROC on these patients was "
        f"{auroc_before:.3f}",
        f"operating point of site {site!r}: threshold 0.5 (the refitted head is class-balanced)",
        f"  promised on patients the fit did not use ({replicates} bootstrap refits): sensitivity "
        f"{promise.sensitivity:.3f} ({pct} {promise.sensitivity_ci[0]:.3f}-{promise.sensitivity_ci[1]:.3f}), "
        f"specificity {promise.specificity:.3f} ({pct} {promise.specificity_ci[0]:.3f}-{promise.specificity_ci[1]:.3f}), "
        f"balanced accuracy {promise.balanced_accuracy:.3f} ({pct} {promise.balanced_accuracy_ci[0]:.3f}-"
        f"{promise.balanced_accuracy_ci[1]:.3f})",
        "note: the refitted head is this site's model: other sites' operating points are dropped from this folder",
    ]
    return OperatingPoint(
        site=site,
        threshold=0.5,
        rule="0.5 (class-balanced head refit)",
        evidence="labelled-patients",
        labels_used=True,
        model_sha256=model_sha256(model),
        n_images=len(data),
        n_patients=n_patients,
        n_positive_patients=int(patient_class.sum()),
        n_negative_patients=int(n_patients - patient_class.sum()),
        promise=Promise(
            sensitivity=_finite(promise.sensitivity),
            sensitivity_ci=_pair(promise.sensitivity_ci),
            specificity=_finite(promise.specificity),
            specificity_ci=_pair(promise.specificity_ci),
            balanced_accuracy=_finite(promise.balanced_accuracy),
            balanced_accuracy_ci=_pair(promise.balanced_accuracy_ci),
            how=f"the head refitted on {replicates} patient-level bootstrap resamples (stratified by class), each "
            "scored at 0.5 on the patients it left out",
        ),
        created_utc=now_utc(),
        fedfreeze_version=__version__,
    )


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _pair(pair: tuple[float, float]) -> tuple[float, float] | None:
    return (float(pair[0]), float(pair[1])) if all(np.isfinite(v) for v in pair) else None


def labelled_step(
    model: GroupedNet,
    card: ModelCard,
    data: ImageSet,
    options: AdaptOptions,
    device: torch.device,
    site: str,
    record: dict[str, Any],
    data_path: str | Path,
) -> tuple[OperatingPoint, Recalibration]:
    data.require_classes(2, why="recalibration and threshold choice need labelled cases of both classes")
    method = options.calibrate or "temperature"
    rule = options.threshold_rule or DEFAULT_RULE
    target = options.target_sensitivity if options.target_sensitivity is not None else 0.9
    scores = model_scores(model, card, data.images, device)
    fit = recalibrate(
        scores,
        data.labels.numpy(),
        data.patient_ids,
        method=method,
        rule=rule,
        target_sensitivity=target,
        replicates=options.replicates,
        confidence=options.confidence,
        seed=options.seed,
    )
    calibration: ScoreCalibration | None = None
    if method != "none":
        calibration = compose(
            None,
            fit.a,
            fit.b,
            method,
            fitted_on=f"{fit.n_images} labelled images of {fit.n_patients} patients at site {site}",
        )
    record["recalibration"] = fit.record()
    record["threshold"] = {"rule": rule, "before": card.threshold, "after": fit.threshold}
    point = fit.operating_point(
        site=site,
        calibration=calibration,
        rule=rule if not rule.startswith("target") else f"{rule} {target:g}",
        evidence="labelled-patients",
        model_sha256=model_sha256(model),
        created_utc=now_utc(),
        fedfreeze_version=__version__,
    )
    return point, fit


def labelled_lines(fit: Recalibration, before: float, site: str) -> list[str]:
    pct = f"{fit.confidence:.0%}"
    lines = []
    if fit.calibration == "temperature":
        lines.append(
            f"calibration: temperature scaling a = 1/T = {fit.a:.3f} ({pct} CI {fit.a_ci[0]:.3f}-"
            f"{fit.a_ci[1]:.3f}); log loss {fit.log_loss_before:.3f} -> {fit.log_loss_after:.3f}"
        )
    elif fit.calibration == "platt":
        lines.append(
            f"calibration: Platt scaling a = {fit.a:.3f} ({pct} CI {fit.a_ci[0]:.3f}-{fit.a_ci[1]:.3f}), "
            f"b = {fit.b:+.3f} ({pct} CI {fit.b_ci[0]:+.3f} to {fit.b_ci[1]:+.3f}); "
            f"log loss {fit.log_loss_before:.3f} -> {fit.log_loss_after:.3f}"
        )
    else:
        lines.append("calibration: unchanged (--calibrate none)")
    names = {"youden": "Youden's J", "binormal": "binormal: balanced accuracy of normal fits to each class's logits"}
    rule = names.get(fit.rule) or f"{fit.rule} {fit.target_sensitivity:g}"
    failed = fit.failed_replicates + fit.failed_threshold_replicates
    lines += [
        f"operating point of site {site!r} ({rule}): threshold {fit.threshold:.4f} ({pct} CI "
        f"{fit.threshold_ci[0]:.4f}-{fit.threshold_ci[1]:.4f}); the global threshold {before:.4f} stays for other sites",
        f"  fitted on {fit.n_patients} patients ({fit.n_positive_patients} positive, {fit.n_negative_patients} "
        f"negative; {fit.n_images} images): sensitivity {fit.fitted_sensitivity:.3f}, specificity "
        f"{fit.fitted_specificity:.3f}  <- OPTIMISTIC: fitted on these cases",
        f"  promised on patients the fit did not use (the rule on each bootstrap replicate's left-out patients): "
        f"sensitivity {fit.out_of_bootstrap_sensitivity:.3f} ({pct} {fit.out_of_bootstrap_sensitivity_ci[0]:.3f}-"
        f"{fit.out_of_bootstrap_sensitivity_ci[1]:.3f}), specificity {fit.out_of_bootstrap_specificity:.3f} "
        f"({pct} {fit.out_of_bootstrap_specificity_ci[0]:.3f}-{fit.out_of_bootstrap_specificity_ci[1]:.3f}), "
        f"balanced accuracy {fit.out_of_bootstrap_balanced_accuracy:.3f} ({pct} "
        f"{fit.out_of_bootstrap_balanced_accuracy_ci[0]:.3f}-{fit.out_of_bootstrap_balanced_accuracy_ci[1]:.3f})"
        + (f"; {failed} of {fit.replicates} replicates could not be fitted" if failed else ""),
        "note: judge the operating point with fedfreeze evaluate on other patients of this site",
    ]
    return lines

"""``fedfreeze adapt``: a new site adapts a trained model folder to itself, without sharing its data.

What runs depends on what the site's data holds and the options:

* **unlabelled images** (a manifest without a ``label`` column, or ``labels="ignore"``): optionally
  re-estimate the BatchNorm statistics (AdaBN, ``bn="reestimate"``), then estimate the site's
  prevalence by EM from the model's scores (``prevalence.py``) and store the prior-corrected
  posterior as the card's calibration: a logit shift ``delta = logit(pi_site) - logit(pi_train)``
  (Platt with ``a = 1``, ``b = delta``, composed with any calibration the card had). The stored
  threshold then moves so that the decisions stay the intended ones:

  - ``objective="balanced-accuracy"`` (default): the Bayes decision for balanced accuracy weighs the
    classes equally whatever their prevalence, so it does not depend on the prevalence; the
    threshold is mapped through the same shift, ``t' = sigmoid(logit(t) + delta)``, and every
    decision is unchanged (only the probabilities now mean the site's posteriors);
  - ``objective="accuracy"``: the threshold becomes 0.5 on the corrected posterior, the Bayes rule
    for accuracy at the site's prevalence (fewer positives called where they are rarer).

* **a few labelled cases**: fit temperature or Platt scaling on them and choose the threshold by
  Youden's J or a target sensitivity, with patient-level bootstrap intervals
  (``recalibration.py``); BatchNorm re-estimation may run first, on the same images.

The new folder holds the (possibly re-estimated) weights and a card whose ``adaptations`` list gains
one record: what was done, from which model (its folder and the sha256 of its weights.pt), on
which data and how many images and patients, the estimates with their intervals, the fedfreeze
version and the UTC date. The card's ``provenance`` (what trained the source model) is kept as it
was, and the folder's ``MODEL_CARD.md`` is written anew with this adaptation listed. Scores always
come from ``model_io.model_scores``, so a calibration the source card already held is respected and
composed with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from fedfreeze import __version__
from fedfreeze.adaptation.batchnorm import reestimate_all_bn
from fedfreeze.adaptation.prevalence import check_prior, estimate_prevalence, logit, prior_shift
from fedfreeze.adaptation.recalibration import Recalibration, Rule, compose, recalibrate
from fedfreeze.config import parse_config
from fedfreeze.data.dataset import ImageSet, load_image_set
from fedfreeze.errors import ConfigError, DataError
from fedfreeze.model_io import (
    WEIGHTS_FILE,
    ModelCard,
    ScoreCalibration,
    file_sha256,
    load_model,
    model_scores,
    save_model,
)
from fedfreeze.models.grouped import GroupedNet
from fedfreeze.outputs import Output, output_folder
from fedfreeze.training.engine import resolve_device

THRESHOLD_CLIP = 1e-6
EDGE = 1e-3  # an EM prevalence this close to 0 or 1 is a boundary fit, not an estimate


@dataclass(frozen=True)
class AdaptOptions:
    """What ``adapt`` does. ``None`` means "not given": the option's default for the mode that runs;
    an option given for the other mode is an error, never silently ignored."""

    bn: Literal["keep", "reestimate"] = "keep"
    labels: Literal["auto", "use", "ignore"] = "auto"
    # unlabelled mode
    prevalence: Literal["em", "none"] | None = None  # default "em"
    train_prior: float | None = None  # default 0.5: fedfreeze trains with class-balanced sampling
    objective: Literal["balanced-accuracy", "accuracy"] | None = None  # default "balanced-accuracy"
    # labelled mode
    calibrate: Literal["temperature", "platt", "none"] | None = None  # default "temperature"
    threshold_rule: Rule | None = None  # default "youden"
    target_sensitivity: float | None = None  # default 0.9, with threshold_rule="target-sensitivity"
    # both
    replicates: int = 1000
    confidence: float = 0.95
    seed: int = 0
    split: str | None = None
    device: str = "auto"
    outside_paths: bool = False  # the manifest may name images outside its folder

    def check(self) -> None:
        if self.replicates < 1:
            raise ConfigError(f"--bootstrap should be at least 1 replicate, got {self.replicates}")
        if not 0.0 < self.confidence < 1.0:
            raise ConfigError(f"--confidence should be between 0 and 1, got {self.confidence}")
        if self.train_prior is not None:
            check_prior(self.train_prior, "--train-prior")
        if self.target_sensitivity is not None and not 0.0 < self.target_sensitivity <= 1.0:
            raise ConfigError(f"--target-sensitivity should be in (0, 1], got {self.target_sensitivity}")
        if self.target_sensitivity is not None and self.threshold_rule != "target-sensitivity":
            raise ConfigError("--target-sensitivity applies with --threshold-rule target-sensitivity only")


UNLABELLED_OPTIONS = {"prevalence": "--prevalence", "train_prior": "--train-prior", "objective": "--objective"}
LABELLED_OPTIONS = {
    "calibrate": "--calibrate",
    "threshold_rule": "--threshold-rule",
    "target_sensitivity": "--target-sensitivity",
}


@dataclass
class AdaptResult:
    out: Path
    record: dict[str, Any]
    threshold_before: float
    threshold_after: float
    card: ModelCard
    lines: list[str] = field(default_factory=list)  # what changed, for the terminal


def adapt_model(
    model_dir: str | Path,
    data_path: str | Path,
    out_dir: str | Path,
    options: AdaptOptions | None = None,
    *,
    progress: bool = False,
    force: bool = False,
) -> AdaptResult:
    """Adapt the model in ``model_dir`` to the site whose images are at ``data_path``; write ``out_dir``
    (all or nothing; an existing non-empty ``out_dir`` only with ``force``, ``outputs.py``)."""
    options = options or AdaptOptions()
    options.check()
    model_dir = Path(model_dir)
    with output_folder(out_dir, force=force, inputs={"--model": model_dir, "--data": data_path}) as out:
        return _adapt(model_dir, data_path, out, options, progress)


def _adapt(
    model_dir: Path, data_path: str | Path, output: Output, options: AdaptOptions, progress: bool
) -> AdaptResult:
    """The adaptation itself, written into ``output.work`` (renamed to ``output.final`` when it returns)."""
    device = resolve_device(options.device)
    model, card = load_model(model_dir)
    cfg = card.model
    data = load_image_set(
        data_path,
        image_size=cfg.input_size,
        channels=cfg.in_channels,
        split=options.split,
        class_names=card.class_names,
        num_classes=cfg.num_classes,
        progress=progress,
        labels="optional",
        outside_paths=options.outside_paths,
    )
    data.require_nonempty(f"adapt needs the site's images, and {data_path} lists none")
    labelled = _use_labels(options, data, data_path)
    _check_mode(options, labelled, cfg.num_classes, model_dir)

    steps: list[str] = []
    record: dict[str, Any] = {
        "kind": "",
        "source_model": str(model_dir.resolve()),
        "source_weights_sha256": file_sha256(model_dir / WEIGHTS_FILE),
        "data": str(Path(data_path).resolve()),
        "n_images": len(data),
        "n_patients": len(set(data.patient_ids)),
        "labels_used": labelled,
    }
    lines = [
        f"adapt: {len(data)} images of {record['n_patients']} patients from {data_path} "
        f"({'labels used' if labelled else 'no labels used'})"
    ]
    if options.bn == "reestimate":
        layers = reestimate_all_bn(model, data.images, device)
        steps.append("batchnorm-statistics")
        record["batchnorm"] = {"reestimated": True, "layers": layers, "n_images": len(data)}
        lines.append(
            f"BatchNorm statistics: re-estimated in all {layers} layers on the site's images (every weight unchanged)"
        )
    else:
        record["batchnorm"] = {"reestimated": False}

    calibration, threshold = card.calibration, card.threshold
    if cfg.num_classes == 2 and not labelled and (options.prevalence or "em") == "em":
        calibration, threshold = _prevalence_step(model, card, data, options, device, record, lines)
        steps.append("prevalence-em")
    elif labelled:
        calibration, threshold, fit = _labelled_step(model, card, data, options, device, record, data_path)
        if fit.calibration != "none":
            steps.append(f"recalibration-{fit.calibration}")
        steps.append(f"threshold-{fit.rule}")
        lines.extend(_labelled_lines(fit, card.threshold))
    record["kind"] = "+".join(steps)
    record["fedfreeze_version"] = __version__
    record["date_utc"] = datetime.now(UTC).isoformat(timespec="seconds")
    fields = {
        **card.model_dump(),
        "threshold": threshold,
        "adaptations": [*card.adaptations, record],
        "calibration": None if calibration is None else calibration.model_dump(),
    }
    new_card: ModelCard = parse_config(fields, ModelCard, "the adapted model card")

    # --bn keep: bit-identical weights, the same sha256 as the source's
    save_model(output.work, model, new_card, weights_from=model_dir / WEIGHTS_FILE if options.bn == "keep" else None)
    out = output.final
    lines.append(f"model:   {out}  (score it with: fedfreeze evaluate --model {out} --data ...)")
    return AdaptResult(
        out=out, record=record, threshold_before=card.threshold, threshold_after=threshold, card=new_card, lines=lines
    )


def _use_labels(options: AdaptOptions, data: ImageSet, data_path: str | Path) -> bool:
    if options.labels == "use" and not data.has_labels:
        raise DataError(f"labels requested but {data_path} has no label column")
    return data.has_labels and options.labels != "ignore"


def _check_mode(options: AdaptOptions, labelled: bool, num_classes: int, model_dir: Path) -> None:
    """Refuse options that do not apply to the mode that runs, and binary-only steps on multi-class models."""
    other = UNLABELLED_OPTIONS if labelled else LABELLED_OPTIONS
    given = [flag for name, flag in other.items() if getattr(options, name) is not None]
    if given:
        why = (
            "the labelled cases are used (--labels ignore to adapt without them)"
            if labelled
            else "no labels are used (the data has no label column, or --labels ignore)"
        )
        raise ConfigError(f"{', '.join(given)} do(es) not apply here: {why}")
    binary_steps = labelled or (options.prevalence or "em") == "em"
    if num_classes != 2 and binary_steps:
        step = "recalibration and threshold choice are" if labelled else "prevalence estimation (EM) is"
        raise ConfigError(
            f"model {model_dir} has {num_classes} classes: {step} for binary models only "
            "(use --labels ignore --prevalence none to re-estimate BatchNorm statistics alone)"
        )
    if not labelled and options.bn == "keep" and options.prevalence == "none":
        raise ConfigError("nothing to adapt: --bn keep and --prevalence none (choose --bn reestimate, or EM)")


def _prevalence_step(
    model: GroupedNet,
    card: ModelCard,
    data: ImageSet,
    options: AdaptOptions,
    device: torch.device,
    record: dict[str, Any],
    lines: list[str],
) -> tuple[ScoreCalibration, float]:
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
    delta = prior_shift(estimate.prevalence, train_prior)
    calibration = compose(
        card.calibration,
        1.0,
        delta,
        "platt",
        fitted_on=f"prior shift to the EM prevalence {estimate.prevalence:.4f} of {record['data']}",
    )
    if objective == "accuracy":
        threshold = 0.5
        rule = "0.5 on the prior-corrected posterior: the Bayes rule for accuracy at the site's prevalence"
    else:
        threshold = float(1.0 / (1.0 + np.exp(-(logit(card.threshold) + delta))))
        rule = "mapped through the prior shift: balanced accuracy's Bayes decision does not depend on prevalence"
    threshold = float(np.clip(threshold, THRESHOLD_CLIP, 1 - THRESHOLD_CLIP))
    record["prevalence"] = estimate.record()
    record["calibration"] = {
        "method": "prior shift (platt, a = 1)",
        "logit_shift": delta,
        "card_calibration": calibration.model_dump(),
    }
    record["threshold"] = {"objective": objective, "rule": rule, "before": card.threshold, "after": threshold}
    positive = card.class_names[1]
    pct = f"{options.confidence:.0%}"
    converged = "" if estimate.em_converged else f" (EM did not converge in {estimate.em_iterations} iterations)"
    lines += [
        f"estimated prevalence of {positive!r} at this site: {estimate.prevalence:.3f} "
        f"({pct} CI {estimate.ci_low:.3f}-{estimate.ci_high:.3f}, patient-level bootstrap, "
        f"{estimate.replicates} replicates){converged}; the model's scores assume {train_prior:g}; "
        f"mean score {estimate.mean_score:.3f}",
        f"calibration: scores shifted by {delta:+.3f} on the logit scale, so they are posteriors at the site's "
        f"prevalence (stored as platt a = {calibration.a:.4g}, b = {calibration.b:+.4g})",
        f"threshold: {card.threshold:.4f} -> {threshold:.4f} ({objective}: "
        + (
            "every decision unchanged)"
            if objective == "balanced-accuracy"
            else "the Bayes rule for accuracy at this prevalence; decisions change)"
        ),
    ]
    return calibration, threshold


def _labelled_step(
    model: GroupedNet,
    card: ModelCard,
    data: ImageSet,
    options: AdaptOptions,
    device: torch.device,
    record: dict[str, Any],
    data_path: str | Path,
) -> tuple[ScoreCalibration | None, float, Recalibration]:
    data.require_classes(2, why="recalibration and threshold choice need labelled cases of both classes")
    method = options.calibrate or "temperature"
    rule = options.threshold_rule or "youden"
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
    calibration = card.calibration
    if method != "none":
        calibration = compose(
            card.calibration,
            fit.a,
            fit.b,
            method,
            fitted_on=f"{fit.n_images} labelled images of {fit.n_patients} patients in {data_path}",
        )
    record["recalibration"] = fit.record()
    record["calibration"] = None if calibration is None else {"card_calibration": calibration.model_dump()}
    record["threshold"] = {"rule": rule, "before": card.threshold, "after": fit.threshold}
    return calibration, fit.threshold, fit


def _labelled_lines(fit: Recalibration, before: float) -> list[str]:
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
    rule = "Youden's J" if fit.rule == "youden" else f"target sensitivity {fit.target_sensitivity:g}"
    lines += [
        f"threshold ({rule}): {before:.4f} -> {fit.threshold:.4f} ({pct} CI {fit.threshold_ci[0]:.4f}-"
        f"{fit.threshold_ci[1]:.4f})",
        f"  on the {fit.n_images} cases used for fitting ({fit.n_positive} positive): sensitivity "
        f"{fit.fitted_sensitivity:.3f}, specificity {fit.fitted_specificity:.3f}  <- OPTIMISTIC: fitted on these cases",
        f"  the same rule on the patients each bootstrap replicate left out: sensitivity "
        f"{fit.out_of_bootstrap_sensitivity:.3f} ({pct} {fit.out_of_bootstrap_sensitivity_ci[0]:.3f}-"
        f"{fit.out_of_bootstrap_sensitivity_ci[1]:.3f}), specificity {fit.out_of_bootstrap_specificity:.3f} "
        f"({pct} {fit.out_of_bootstrap_specificity_ci[0]:.3f}-{fit.out_of_bootstrap_specificity_ci[1]:.3f})"
        + (
            f"; the calibration could not be fitted in {fit.failed_replicates} of {fit.replicates} replicates"
            if fit.failed_replicates
            else ""
        ),
        "note: figures on the cases used for fitting are optimistic; judge the adapted model with "
        "fedfreeze evaluate on other patients of this site",
    ]
    return lines

"""``fedfreeze adapt``: a new site adapts a trained model folder to itself, without sharing its data.

What it makes is a **site operating point** (``fedfreeze/operating_point.py``): the threshold (and a
recalibration of the scores) this site runs the model at, stored under the site's name beside the
global model's threshold, which stays as training chose it. The new folder's ``local_site`` names the
site, so ``fedfreeze evaluate`` on it uses that operating point.

* **a few labelled patients** (the normal path; ``fedfreeze suggest`` lists which to label): fit
  temperature or Platt scaling on them and choose the threshold by a rule that is sound at small n
  (``binormal`` by default, ``adaptation/threshold_rules.py``); what the operating point promises
  (sensitivity, specificity, balanced accuracy with intervals) is estimated on the patients each
  bootstrap replicate left out (``recalibration.py``). At least ``MIN_PATIENTS_PER_CLASS`` labelled
  patients of each class are required. BatchNorm re-estimation may run first, on the same images.
* **unlabelled images** (``labels="ignore"`` or no label column): optionally re-estimate the
  BatchNorm statistics (AdaBN, ``bn="reestimate"``), then estimate the site's prevalence by EM from
  the model's scores (``prevalence.py``) and store the prior-corrected posterior as the operating
  point's calibration, with the threshold mapped so that decisions stay the intended ones
  (``objective``). Neither step can be checked against labels, and on a real new site both made the
  model worse without a word, so each must pass a label-free check first (``reliability.py``: do the
  site's scores look like the training sites' under some prevalence?); a step the check cannot
  vouch for is refused with one line, unless ``allow_unverified``, which stores it flagged as such.

Re-estimated BatchNorm statistics change the weights: the operating points the source folder held
were fitted for other weights and are dropped (the record says which). The new folder's
``adaptations`` list gains one record: what was done, from which model (its folder and the sha256 of
its weights.pt), on which data and how many images and patients, the estimates with their intervals,
the check's verdicts, the fedfreeze version and the UTC date. Scores always come from
``model_io.model_scores``, so a calibration the source card already held is respected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedfreeze import __version__
from fedfreeze.adaptation.label_free import batchnorm_step, prevalence_step
from fedfreeze.adaptation.labelled import labelled_lines, labelled_step, refit_step
from fedfreeze.adaptation.options import LABELLED_OPTIONS, UNLABELLED_OPTIONS, AdaptationRefused, AdaptOptions
from fedfreeze.config import parse_config
from fedfreeze.data.dataset import ImageSet, load_image_set
from fedfreeze.errors import ConfigError, DataError
from fedfreeze.model_io import WEIGHTS_FILE, ModelCard, file_sha256, load_model, save_model
from fedfreeze.operating_point import OperatingPoint
from fedfreeze.outputs import Output, output_folder
from fedfreeze.provenance import manifest_of, manifest_sha256
from fedfreeze.training.engine import resolve_device

__all__ = ["AdaptOptions", "AdaptResult", "AdaptationRefused", "adapt_model", "site_name_of"]


@dataclass
class AdaptResult:
    out: Path
    record: dict[str, Any]
    threshold_before: float
    threshold_after: float
    card: ModelCard
    lines: list[str] = field(default_factory=list)  # what changed, for the terminal


def site_name_of(data_path: str | Path) -> str:
    """A site's default name from its data's path: the folder of a ``manifest.csv``, else the file's stem."""
    path = Path(data_path)
    if path.is_dir():
        return path.resolve().name
    return path.resolve().parent.name if path.name == "manifest.csv" else path.stem


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
    site = (options.site or site_name_of(data_path)).strip()
    manifest = manifest_of(data_path)

    steps: list[str] = []
    record: dict[str, Any] = {
        "kind": "",
        "site": site,
        "source_model": str(model_dir.resolve()),
        "source_weights_sha256": file_sha256(model_dir / WEIGHTS_FILE),
        "data": str(Path(data_path).resolve()),
        "data_fingerprint": manifest_sha256(manifest) if manifest is not None else None,
        "n_images": len(data),
        "n_patients": len(set(data.patient_ids)),
        "labels_used": labelled,
        "checks": [],
    }
    lines = [
        f"adapt: {len(data)} images of {record['n_patients']} patients from {data_path}, site {site!r}"
        f"{'' if options.site else ' (named after the data; --site to name it)'} "
        f"({'labels used' if labelled else 'no labels used'})"
    ]
    operating_points = dict(card.operating_points)
    if options.bn == "reestimate":
        batchnorm_step(model, card, data, options, device, labelled, record, lines)
        steps.append("batchnorm-statistics")
        if operating_points:  # fitted for the weights before: they do not apply to these
            record["dropped_operating_points"] = sorted(operating_points)
            lines.append(
                f"operating points dropped (fitted for the weights before re-estimation): {', '.join(sorted(operating_points))}"
            )
            operating_points = {}
    else:
        record["batchnorm"] = {"reestimated": False}

    point: OperatingPoint | None = None
    if cfg.num_classes == 2 and not labelled and (options.prevalence or "em") == "em":
        point = prevalence_step(model, card, data, options, device, site, record, lines)
        steps.append("prevalence-em")
    elif labelled and options.refit == "head":
        point = refit_step(model, card, data, options, device, site, record, lines)
        steps.append("head-refit")
        if operating_points:
            record["dropped_operating_points"] = sorted(operating_points)
            lines.append(f"operating points dropped (fitted for the old head): {', '.join(sorted(operating_points))}")
            operating_points = {}
    elif labelled:
        point, fit = labelled_step(model, card, data, options, device, site, record, data_path)
        if fit.calibration != "none":
            steps.append(f"recalibration-{fit.calibration}")
        steps.append(f"threshold-{fit.rule}")
        lines.extend(labelled_lines(fit, card.threshold, site))
    if point is not None:
        point = point.model_copy(update={"data_fingerprint": record["data_fingerprint"]})
        operating_points[site] = point
        record["operating_point"] = point.model_dump()
    record["kind"] = "+".join(steps)
    record["fedfreeze_version"] = __version__
    record["date_utc"] = datetime.now(UTC).isoformat(timespec="seconds")
    fields = {
        **card.model_dump(),
        **({"calibration": None} if options.refit == "head" else {}),  # the refit head replaces it
        "adaptations": [*card.adaptations, record],
        "operating_points": {name: p.model_dump() for name, p in operating_points.items()},
        "local_site": site if point is not None else card.local_site,
    }
    new_card: ModelCard = parse_config(fields, ModelCard, "the adapted model card")

    # --bn keep (and no head refit): bit-identical weights, the same sha256 as the source's
    same_weights = options.bn == "keep" and options.refit != "head"
    save_model(output.work, model, new_card, weights_from=model_dir / WEIGHTS_FILE if same_weights else None)
    out = output.final
    lines.append(f"model:   {out}  (score it with: fedfreeze evaluate --model {out} --data ...)")
    after = point.threshold if point is not None else card.threshold
    return AdaptResult(
        out=out, record=record, threshold_before=card.threshold, threshold_after=after, card=new_card, lines=lines
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

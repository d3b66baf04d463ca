"""``fedfreeze evaluate``: score a saved model folder on labelled data it never saw.

For a binary model this is an external validation (``fedfreeze.evaluation.external``): the
contract metrics at the stored threshold with patient-level bootstrap intervals, calibration and a
threshold analysis. Multi-class models get the contract metrics only. Every result names where
the model came from in one line (``provenance``, from the card; "not recorded" for an older folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedfreeze.data.dataset import load_image_set
from fedfreeze.errors import CheckpointError, ConfigError, DataError
from fedfreeze.evaluation.external import external_validation
from fedfreeze.metrics import classification_metrics
from fedfreeze.model_io import load_model, model_scores, model_sha256, read_card
from fedfreeze.operating_point import in_use
from fedfreeze.outputs import is_partial
from fedfreeze.provenance import provenance_line
from fedfreeze.training.engine import resolve_device


def evaluate_model(
    model_dir: str | Path,
    data_path: str | Path,
    *,
    split: str | None = None,
    device: str = "auto",
    progress: bool = False,
    bootstrap: int = 1000,
    seed: int = 0,
    allow_single_class: bool = False,
    outside_paths: bool = False,
    site: str | None = None,
) -> dict[str, Any]:
    """Metrics of the model in ``model_dir`` on ``data_path`` at the threshold in use at ``site``.

    The threshold is the site's operating point when the folder holds one for ``site`` (None: the
    folder's own site, ``local_site``), else the global model's (``operating_point.in_use``);
    ``operating_point`` says which, and whether it was validated at that site.

    The returned keys ``auroc, balanced_accuracy, f1, sensitivity, specificity, n`` (and, for a binary
    model, ``threshold, tp, fp, tn, fn``) are a stable contract: every model, site-level or federated,
    is judged by them. A binary model adds ``ci``, ``calibration``, ``thresholds`` and
    ``score_summary`` (see ``external_validation``); ``bootstrap=0`` turns the intervals off.
    ``provenance`` is one line saying what produced the model (``provenance.provenance_line``).

    Data holding one class only is a ``DataError``, unless ``allow_single_class`` (binary models):
    then the undefined metrics are ``None`` and ``single_class`` names the class present, so the
    caller can still report what is defined.
    """
    if bootstrap < 0:
        raise ConfigError(f"bootstrap (--bootstrap) should be 0 (no intervals) or a positive count, got {bootstrap}")
    dev = resolve_device(device)
    if is_partial(model_dir):
        raise CheckpointError(
            f"{model_dir} is in an unfinished run's partial folder (.NAME.partial): evaluate the finished folder"
        )
    model, card = load_model(model_dir)
    cfg = card.model
    data = load_image_set(
        data_path,
        image_size=cfg.input_size,
        channels=cfg.in_channels,
        split=split,
        class_names=card.class_names,
        num_classes=cfg.num_classes,
        progress=progress,
        outside_paths=outside_paths,
    )
    data.require_nonempty()
    binary = cfg.num_classes == 2
    if not (binary and allow_single_class):
        data.require_classes(2, why="AUROC needs both classes in the evaluation data")
    use = in_use(card.threshold, card.operating_points, card.local_site, site, model_sha256(model), binary=binary)
    scores = use.apply(model_scores(model, card, data.images, dev))
    about = {
        "model": str(model_dir),
        "data": str(data_path),
        "backbone": cfg.backbone,
        "provenance": provenance_line(card.provenance, card.threshold, card.adaptations),
        "operating_point": use.record(),
    }
    if not binary:
        return {**classification_metrics(data.labels.numpy(), scores, card.threshold), **about}
    result = external_validation(
        data.labels.numpy(), scores, data.patient_ids, use.threshold, bootstrap=bootstrap, seed=seed
    )
    card_calibration = card.calibration.model_dump(by_alias=True) if card.calibration is not None else None
    site_calibration = use.calibration.model_dump(by_alias=True) if use.calibration is not None else None
    return {
        **result,
        **about,
        "class_names": list(card.class_names),
        "score_calibration": card_calibration,
        "site_calibration": site_calibration,
    }


def single_class_message(result: dict[str, Any]) -> str:
    """The one line that says why AUROC and balanced accuracy are missing: which file, which class."""
    label = result["single_class"]
    name = result["class_names"][label] if "class_names" in result else str(label)
    return (
        f"{result['data']}: only class {name!r} (label {label}, n={result['n']}) is present, so AUROC and "
        f"balanced accuracy are undefined (they need both classes); the defined figures are printed"
    )


def format_text(result: dict[str, Any]) -> str:
    """Plain-text lines: what produced the model, each metric with its interval, then Brier and ECE,
    the threshold and n."""
    lines = [result["provenance"]] if result.get("provenance") else []
    if (result.get("operating_point") or {}).get("line") and "threshold" in result:
        lines.append(result["operating_point"]["line"])
    ci = result.get("ci") or {}
    calibration = result.get("calibration")
    for key in ("auroc", "balanced_accuracy", "f1", "sensitivity", "specificity"):
        if key in result:
            lines.append(_metric_line(key, result[key], ci.get(key)))
    if calibration is not None:
        lines.append(_metric_line("brier", calibration["brier"], ci.get("brier")))
        lines.append(_metric_line("ece", calibration["ece"], ci.get("ece")))
        lines.append(
            f"{'mean_score':<18} {calibration['mean_score']:.4f}  "
            f"(observed positive rate {calibration['observed_positive_rate']:.4f})"
        )
    if "threshold" in result:
        validated = (result.get("operating_point") or {}).get("validated_at_site")
        whose = "this site's operating point" if validated else "the global model's, not validated at this site"
        lines.append(f"{'threshold':<18} {result['threshold']:.4f}  ({whose})")
    if "n_patients" in result:
        lines.append(
            f"{'n':<18} {result['n']}  ({result['n_patients']} patients, {result['n_positive']} positive, "
            f"{result['n_negative']} negative)"
        )
    elif "n" in result:
        lines.append(f"{'n':<18} {result['n']}")
    if ci:
        lines.append(
            f"intervals: {ci['confidence']:.0%} {ci['method']}, {ci['replicates']} replicates, seed {ci['seed']}"
        )
    if "thresholds" in result:
        lines.append(
            "threshold analysis (the Youden row is diagnostic only, not for choosing a threshold: "
            "it is fitted to the data it is scored on):"
        )
        for row in result["thresholds"]["rows"]:
            lines.append(
                f"  {row['name']:<20} t={row['threshold']:.4f}  sensitivity {_fmt(row['sensitivity'])}  "
                f"specificity {_fmt(row['specificity'])}  balanced_accuracy {_fmt(row['balanced_accuracy'])}"
            )
    return "\n".join(lines)


def require_binary_model(model_dir: str | Path, what: str) -> None:
    """Calibration, score plots and intervals exist for binary models only: say so before scoring."""
    card = read_card(model_dir)
    if card.model.num_classes != 2:
        raise DataError(
            f"{what} needs a binary model; {model_dir} has {card.model.num_classes} classes "
            f"(run without {what} for its contract metrics)"
        )


def _metric_line(key: str, value: float | None, interval: list[float] | None) -> str:
    if value is None:
        return f"{key:<18} undefined (one class only)"
    line = f"{key:<18} {value:.4f}"
    return line + f"  [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else line


def _fmt(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.4f}"

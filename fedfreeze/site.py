"""``fedfreeze site-train``: one site's repeated patient-level cross-validation, then a refit.

Every fold starts from the same pretrained backbone, so the probe's backbone features are the
same for every fold: they are computed once for all images and each fold takes its rows.

With ``init`` (``--init MODEL_DIR``) every fold and the refit start from a trained model folder
instead (``init_from.py``), and the folder's model, un-adapted, is scored on the same test
folds: ``metrics.json`` then holds its fold metrics (``baseline``) and a paired comparison
(``comparison``: DeLong's test over folds on AUROC, and per-metric differences).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fedfreeze.config import SiteConfig
from fedfreeze.data.dataset import ImageSet, load_image_set
from fedfreeze.data.splits import patient_folds
from fedfreeze.errors import ConfigError
from fedfreeze.evaluation.delong import FoldScores, delong_test_over_folds
from fedfreeze.inference.engine import InferenceSettings
from fedfreeze.init_from import InitModel, data_class_names, load_init
from fedfreeze.metrics import METRIC_KEYS, classification_metrics, summarize, youden_threshold
from fedfreeze.model_io import ModelCard, make_card, model_scores, save_model
from fedfreeze.models.grouped import GroupedNet
from fedfreeze.models.registry import build_model
from fedfreeze.outputs import Output, output_folder
from fedfreeze.provenance import Provenance, site_train_provenance
from fedfreeze.reference_scores import ReferenceScores, reference_from_scores
from fedfreeze.training.engine import (
    EpochLog,
    fit,
    model_adapter_groups,
    predict_scores,
    resolve_device,
)
from fedfreeze.training.features import FeatureCache
from fedfreeze.training.schedule import check_groups, check_rate_groups

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"


def require_training(cfg: SiteConfig) -> None:
    """A fresh model must train: with no epochs at all its head would stay random and be saved as a
    model (with ``--init`` a start model is kept as it is, which is allowed)."""
    if cfg.train.recipe == "standard" and cfg.train.probe_epochs == 0 and cfg.train.epochs == 0:
        raise ConfigError(
            "train.probe-epochs = 0 and train.epochs = 0: nothing would train, and the model would keep a "
            "random head; give one of them at least 1 epoch (or start from a trained model with --init)"
        )


def new_model(cfg: SiteConfig, seed: int) -> GroupedNet:
    """A fresh pretrained model with the configured adapters; the seed fixes the head's init."""
    require_training(cfg)
    torch.manual_seed(seed)
    model, _ = build_model(cfg.model, model_adapter_groups(cfg.train), cfg.train.adapter_rank)
    check_groups(cfg.train.unfreeze, list(model.groups))
    check_rate_groups(cfg.train, list(model.groups))
    return model


def train_on(
    cfg: SiteConfig,
    data: ImageSet,
    indices: np.ndarray,
    *,
    seed: int,
    device: torch.device,
    cache: FeatureCache,
    bar_label: str,
    progress: bool,
    init: InitModel | None = None,
) -> tuple[GroupedNet, list[EpochLog]]:
    """Train a fresh model on ``data[indices]`` through the whole schedule (under ``train.recipe =
    "dual"``: the dual-input-output stage from scratch, the merge, then the merged model's probe and
    progressive unfreezing, ``training/dual.py``; the merged model is returned). With ``init`` the
    model starts as a copy of that trained model instead of the config's pretrained backbone."""
    dual = cfg.train.recipe == "dual"
    images, labels = data.images[indices], data.labels[indices]
    total = cfg.train.probe_epochs + cfg.train.epochs + (cfg.train.dual.epochs if dual else 0)
    with tqdm(total=total, desc=bar_label, unit="epoch", leave=False, disable=not progress) as bar:

        def on_epoch(log: EpochLog) -> None:
            bar.set_postfix(loss=f"{log.loss:.3f}", parts="+".join(log.parts))
            bar.update(1)

        if dual:
            from fedfreeze.models.dual import build_dual
            from fedfreeze.training.dual import fit_dual

            torch.manual_seed(seed)
            dual_model = build_dual(cfg.model)
            check_groups(cfg.train.unfreeze, list(dual_model.groups))
            check_rate_groups(cfg.train, list(dual_model.groups))
            merged, dual_logs = fit_dual(
                dual_model,
                images,
                labels,
                cfg.train,
                rng=np.random.default_rng(seed),
                device=device,
                features=lambda m: cache.features(m, images, device),
                on_epoch=on_epoch,
            )
            return merged, list(dual_logs)
        if init is None:
            model = new_model(cfg, seed)
        else:
            torch.manual_seed(seed)  # dropout and augmentation draws, as for a fresh model
            model = init.start_model()
        needs_features = cfg.train.probe_epochs > 0 and not cfg.train.probe_augment
        feats = cache.features(model, data.images, device)[indices] if needs_features else None
        logs = fit(
            model,
            images,
            labels,
            cfg.train,
            rng=np.random.default_rng(seed),
            device=device,
            probe_features=feats,
            on_epoch=on_epoch,
        )
    return model, logs


def site_train(
    cfg: SiteConfig,
    data_path: str | Path,
    out_dir: str | Path,
    *,
    split: str | None = None,
    device: str = "auto",
    progress: bool = True,
    init: str | Path | None = None,
    force: bool = False,
    outside_paths: bool = False,
) -> dict[str, Any]:
    """Cross-validate, refit on all data, and write ``metrics.json`` and the model folder; with
    ``init`` (a model folder) start from it and compare the adapted models with it. The folder is
    written all or nothing; an existing non-empty one is replaced only with ``force`` (``outputs.py``)."""
    with output_folder(out_dir, force=force, inputs={"--init": init, "--data": data_path}) as output:
        return _site_train(
            cfg,
            data_path,
            output,
            split=split,
            device=device,
            progress=progress,
            init=init,
            outside_paths=outside_paths,
        )


def _site_train(
    cfg: SiteConfig,
    data_path: str | Path,
    output: Output,
    *,
    split: str | None,
    device: str,
    progress: bool,
    init: str | Path | None,
    outside_paths: bool,
) -> dict[str, Any]:
    """``site_train``'s work, written into ``output.work``."""
    dev = resolve_device(device)
    start = None if init is None else load_init(init, cfg)  # a mismatch stops before any image loads
    if start is None:
        require_training(cfg)
    if start is not None and cfg.model.num_classes != 2:
        raise ConfigError(
            f"model.num-classes: --init compares the adapted models with {start.folder} by "
            f"DeLong's test on AUROC, which needs a binary task, got {cfg.model.num_classes}"
        )
    out = output.work
    started = time.perf_counter()
    data = load_image_set(
        data_path,
        image_size=cfg.model.input_size,
        channels=cfg.model.in_channels,
        split=split,
        class_names=cfg.model.class_names if start is None else data_class_names(start, cfg),
        num_classes=cfg.model.num_classes,
        progress=progress,
        outside_paths=outside_paths,
    )
    data.require_nonempty()
    data.require_classes(2, why="cross-validated AUROC needs both classes")
    names = data.source_names()  # as predictions.csv records them
    folds = patient_folds(
        data.labels.numpy(), data.patient_ids, folds=cfg.cv.folds, repeats=cfg.cv.repeats, seed=cfg.cv.seed
    )
    inference = InferenceSettings.of(cfg.train)  # the engine and precision of every forward-only pass
    cache = FeatureCache(inference=inference)
    fold_results: list[dict[str, Any]] = []
    oof_rows: list[tuple[int, int, str, int, Any]] = []
    memory: dict[str, Any] = {}
    # the un-adapted model does not change from fold to fold: score every image once
    init_scores = None if start is None else model_scores(start.model.to(dev), start.card, data.images, dev)
    baseline_folds: list[dict[str, Any]] = []
    paired: list[FoldScores] = []
    for number, fold in enumerate(tqdm(folds, desc="folds", unit="fold", disable=not progress)):
        label = f"repeat {fold.repeat + 1} fold {fold.fold + 1}/{cfg.cv.folds}"
        model, logs = train_on(
            cfg,
            data,
            fold.train,
            seed=cfg.train.seed + number,
            device=dev,
            cache=cache,
            bar_label=label,
            progress=progress,
            init=start,
        )
        scores = predict_scores(model, data.images[fold.test], dev, inference=inference)
        metrics = classification_metrics(data.labels[fold.test].numpy(), scores, cfg.cv.threshold)
        fold_results.append(
            {
                "repeat": fold.repeat,
                "fold": fold.fold,
                "n_train": int(len(fold.train)),
                "n_test": int(len(fold.test)),
                **metrics,
                "train_seconds": float(sum(log.seconds for log in logs)),
                "epochs": [log.record() for log in logs],
            }
        )
        if number == 0:
            memory = memory_plans(cfg, logs, progress=progress)
        for i, score in zip(fold.test, scores, strict=True):
            oof_rows.append((fold.repeat, fold.fold, names[i], int(data.labels[i]), score))
        if start is not None and init_scores is not None:  # (both or neither)
            y_test = data.labels[fold.test].numpy()
            base = classification_metrics(y_test, init_scores[fold.test], start.card.threshold)
            baseline_folds.append(
                {
                    "repeat": fold.repeat,
                    "fold": fold.fold,
                    "n_test": int(len(fold.test)),
                    "threshold": start.card.threshold,
                    **base,
                }
            )
            paired.append(
                FoldScores(
                    labels=y_test,
                    scores_a=np.asarray(scores),
                    scores_b=init_scores[fold.test],
                    case_ids=[data.patient_ids[i] for i in fold.test],
                )
            )
        if progress:
            tqdm.write(
                f"{label}: AUROC {metrics['auroc']:.3f}  balanced acc {metrics['balanced_accuracy']:.3f}  "
                f"F1 {metrics['f1']:.3f}"
            )

    summary = summarize(fold_results)
    report: dict[str, Any] = {
        "data": str(data_path),
        "n_images": len(data),
        "n_patients": len(set(data.patient_ids)),
        "class_counts": dict(zip(data.class_names, data.class_counts(), strict=True)),
        "config": cfg.model_dump(by_alias=True),
        "folds": fold_results,
        "summary": summary,
        "memory": memory,
    }
    if start is not None:
        report["init"] = {
            "model": str(start.folder),
            "weights_sha256": start.weights_sha256,
            "threshold": start.card.threshold,
            "calibration": None if start.card.calibration is None else start.card.calibration.method,
            "new_adapter_groups": list(start.new_adapter_groups),
        }
        report["baseline"] = {"folds": baseline_folds, "summary": summarize(baseline_folds)}
        report["comparison"] = compare_with_init(
            fold_results, baseline_folds, paired, cfg.cv.threshold, start.card.threshold
        )
    threshold = choose_model_threshold(cfg, data, oof_rows)
    report["model_threshold"] = threshold
    if cfg.cv.refit:
        everything = np.arange(len(data))
        model, logs = train_on(
            cfg,
            data,
            everything,
            seed=cfg.train.seed + len(folds),
            device=dev,
            cache=cache,
            bar_label="refit on all data",
            progress=progress,
            init=start,
        )
        provenance = site_train_provenance(
            config=cfg.model_dump(mode="json", by_alias=True),
            data_path=data_path,
            data=data,
            threshold=threshold,
            report=report,
            started_from=None if start is None else started_from(start),
        )
        if start is None:
            card = make_card(
                model,
                cfg.model,
                threshold=threshold["value"],
                class_names=data.class_names,
                trained_by="fedfreeze site-train",
                notes={"data": str(data_path), "n_images": len(data)},
                provenance=provenance,
            )
        else:
            card = adapted_card(model, start, cfg, report, threshold["value"], data.class_names, provenance)
        card.reference_scores = out_of_fold_reference(oof_rows)
        save_model(out, model, card)
        report["model"] = str(output.final)
        report["refit_seconds"] = float(sum(log.seconds for log in logs))
    report["feature_cache"] = {"hits": cache.hits, "misses": cache.misses}
    report["seconds"] = time.perf_counter() - started
    (out / METRICS_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    extra = None
    if init_scores is not None:  # the same order as oof_rows: fold by fold, test rows in order
        extra = [(data.patient_ids[i], float(init_scores[i])) for fold in folds for i in fold.test]
    _write_predictions(out / PREDICTIONS_FILE, oof_rows, data.class_names, extra)
    return report


def compare_with_init(
    adapted: list[dict[str, Any]],
    baseline: list[dict[str, Any]],
    paired: list[FoldScores],
    adapted_threshold: float,
    init_threshold: float,
) -> dict[str, Any]:
    """The adapted fold models against the un-adapted init model on the same test folds: DeLong's
    test on the mean AUROC over folds (``a`` = adapted, ``b`` = init), and each metric's paired
    fold differences (adapted minus init; thresholded metrics at each model's own threshold)."""
    delong = delong_test_over_folds(paired)
    differences = {}
    for key in METRIC_KEYS:
        diffs = np.array([a[key] - b[key] for a, b in zip(adapted, baseline, strict=True)], dtype=float)
        differences[key] = {
            "adapted_mean": float(np.mean([a[key] for a in adapted])),
            "init_mean": float(np.mean([b[key] for b in baseline])),
            "difference_mean": float(diffs.mean()),
            "difference_std": float(diffs.std(ddof=1)) if len(diffs) > 1 else 0.0,
        }
    return {
        "delong": delong.to_dict(),
        "differences": differences,
        "thresholds": {
            "adapted": adapted_threshold,
            "init": init_threshold,
            "rule": "each model at its own threshold: the adapted fold models at cv.threshold, "
            "the init model at its card's threshold (its calibration applied)",
        },
    }


def adapted_card(
    model: GroupedNet,
    start: InitModel,
    cfg: SiteConfig,
    report: dict[str, Any],
    threshold: float,
    class_names: list[str],
    provenance: Provenance | None = None,
) -> ModelCard:
    """The refit model's card: the init model's architecture and lineage, with this adaptation
    appended to its earlier ones, and this run's provenance (``started_from`` names the init model
    and keeps its provenance). Its calibration is not carried over: it was fitted to the init
    model's scores, not to the adapted model's."""
    record = {
        "kind": "site-train --init",
        "from": str(start.folder.resolve()),
        "from_weights_sha256": start.weights_sha256,
        "data": report["data"],
        "n_images": report["n_images"],
        "n_patients": report["n_patients"],
        "cv": {
            "folds": cfg.cv.folds,
            "repeats": cfg.cv.repeats,
            "adapted": report["summary"],
            "init": report["baseline"]["summary"],
        },
        "comparison_p": report["comparison"]["delong"]["p_value"],
        "auroc_difference": report["comparison"]["delong"]["difference"],
    }
    model_cfg = start.card.model.model_copy(update={"dropout": cfg.model.dropout})
    return make_card(
        model,
        model_cfg,
        threshold=threshold,
        class_names=class_names,
        trained_by="fedfreeze site-train --init",
        pretrained_format=start.card.pretrained_format,
        notes={"data": report["data"], "n_images": report["n_images"], "init": str(start.folder)},
        adaptations=[*start.card.adaptations, record],
        provenance=provenance,
    )


def started_from(start: InitModel) -> dict[str, Any]:
    """What a ``site-train --init`` model started from: the folder, its weights' sha256 and the
    provenance that folder recorded (None for a folder written before provenance was recorded)."""
    earlier = start.card.provenance
    return {
        "model": str(start.folder.resolve()),
        "weights_sha256": start.weights_sha256,
        "provenance": None if earlier is None else earlier.model_dump(mode="json", by_alias=True),
    }


def format_comparison(report: dict[str, Any]) -> str:
    """The two-row before/after table and one sentence no stronger than the test."""
    comp = report["comparison"]
    diffs, delong, th = comp["differences"], comp["delong"], comp["thresholds"]
    base, adapted = report["baseline"]["summary"], report["summary"]

    def cell(summary: dict[str, Any], key: str) -> str:
        return f"{summary[key]['mean']:.3f} ± {summary[key]['std']:.3f}"

    lines = [
        f"  {'model':<26} {'AUROC':<15} {'balanced acc':<15} threshold",
        f"  {'init (as given)':<26} {cell(base, 'auroc'):<15} {cell(base, 'balanced_accuracy'):<15} "
        f"{th['init']:.3f} (its card)",
        f"  {'adapted (site-train)':<26} {cell(adapted, 'auroc'):<15} {cell(adapted, 'balanced_accuracy'):<15} "
        f"{th['adapted']:.3f} (cv.threshold)",
    ]
    d, p = delong["difference"], delong["p_value"]
    ci = f"{delong['confidence']:.0%} CI {delong['ci_low']:+.3f} to {delong['ci_high']:+.3f}"
    ba = diffs["balanced_accuracy"]["difference_mean"]
    if p < 0.05:
        verdict = (
            f"adapting {'helped' if d > 0 else 'hurt'} on these patients: mean fold AUROC "
            f"{'higher' if d > 0 else 'lower'} by {abs(d):.3f} ({ci}, DeLong p = {p:.3g})"
        )
    else:
        verdict = (
            f"adapting did not significantly change AUROC: difference {d:+.3f} ({ci}, DeLong p = {p:.3g}); "
            "the test cannot tell the two apart on these folds"
        )
    lines.append(f"{verdict}; balanced accuracy difference {ba:+.3f} (each at its own threshold)")
    return "\n".join(lines)


def memory_plans(cfg: SiteConfig, logs: list[EpochLog], *, progress: bool = False) -> dict[str, Any]:
    """What the engine trained each phase with (batch size, freezing rate, activation storage and,
    under ``max-train-memory-mb``, its estimate), for metrics.json; printed when a budget is set."""
    phases = [{"first_epoch": log.epoch, "parts": log.parts, **log.memory_plan} for log in logs if log.memory_plan]
    budget = cfg.train.max_train_memory_mb
    if progress and budget is not None:
        for p in phases:
            rate = "schedule" if p["rate"] is None else f"dynamic freezing rate {p['rate']:g}"
            estimate = "" if p["estimate_mb"] is None else f", estimate {p['estimate_mb']['total']:.0f} MB"
            tqdm.write(
                f"memory budget {budget:g} MB, phase {'+'.join(p['parts'])}: batch {p['batch_size']}, "
                f"{rate}, activation storage {p['storage']}{estimate}"
            )
    return {"freezing": cfg.train.freezing, "max_train_memory_mb": budget, "phases": phases}


REFERENCE_MIN_CELL = 5  # the federation's default min-cell-count: the folder tells no more than a round does


def out_of_fold_reference(oof_rows: list[tuple[int, int, str, int, Any]]) -> ReferenceScores | None:
    """The first repeat's out-of-fold scores as the model's reference score distribution (binary models):
    the scores of the fold models on patients they did not train on, released as cells of at least 5."""
    rows = [row for row in oof_rows if row[0] == 0 and np.ndim(row[4]) == 0]
    labels = np.array([row[3] for row in rows])
    if not rows or len(set(labels.tolist())) < 2:
        return None
    return reference_from_scores(
        labels,
        np.array([float(row[4]) for row in rows]),
        REFERENCE_MIN_CELL,
        f"out-of-fold cross-validation scores at the training site ({len(rows)} images, first repeat), "
        f"released as cells of >= {REFERENCE_MIN_CELL} cases",
    )


def choose_model_threshold(
    cfg: SiteConfig, data: ImageSet, oof_rows: list[tuple[int, int, str, int, Any]]
) -> dict[str, Any]:
    """The decision threshold stored with the refit model, and the out-of-fold figures behind it.

    Youden's J on out-of-fold scores uses only predictions from models that did not train on the
    case, so it is an honest choice for the model refit on all the data.
    """
    if data.num_classes != 2:
        return {"value": 0.5, "rule": "arg-max (multi-class)"}
    labels = np.array([row[3] for row in oof_rows])
    scores = np.array([float(row[4]) for row in oof_rows])
    if cfg.cv.model_threshold == "youden-oof":
        value, rule = youden_threshold(labels, scores), "Youden's J on out-of-fold scores"
    else:
        value, rule = float(cfg.cv.model_threshold), "configured"
    oof = classification_metrics(labels, scores, value)
    return {
        "value": value,
        "rule": rule,
        "out_of_fold_at_threshold": oof,
        "out_of_fold_at_fold_threshold": classification_metrics(labels, scores, cfg.cv.threshold),
    }


def _write_predictions(
    path: Path,
    rows: list[tuple[int, int, str, int, Any]],
    class_names: list[str],
    init_rows: list[tuple[str, float]] | None = None,
) -> None:
    """Out-of-fold scores of every case (kept at the site: they never leave it); with ``--init``
    also each case's patient and the un-adapted init model's score (calibrated, as it would be used)."""
    import csv

    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        binary = len(class_names) == 2
        score_cols = ["score"] if binary else [f"p_{name}" for name in class_names]
        extra_cols = [] if init_rows is None else ["patient_id", "init_score"]
        writer.writerow(["repeat", "fold", "source", "label", *score_cols, *extra_cols])
        # with --init, every digit: the comparison in metrics.json can be recomputed exactly from this file
        digits = ".6f" if init_rows is None else ".17g"
        for number, (repeat, fold, source, label, score) in enumerate(rows):
            values = [f"{float(score):{digits}}"] if binary else [f"{float(s):.6f}" for s in score]
            if init_rows is not None:
                values += [init_rows[number][0], f"{init_rows[number][1]:{digits}}"]
            writer.writerow([repeat, fold, source, label, *values])


def format_summary(summary: dict[str, dict[str, float]]) -> str:
    """``AUROC 0.912 ± 0.031`` lines for the terminal."""
    names = {
        "auroc": "AUROC",
        "balanced_accuracy": "balanced accuracy",
        "f1": "F1",
        "sensitivity": "sensitivity",
        "specificity": "specificity",
    }
    return "\n".join(f"  {names[k]:<18} {v['mean']:.3f} ± {v['std']:.3f}" for k, v in summary.items() if k in names)

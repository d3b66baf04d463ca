"""``fedfreeze site-train``: one site's repeated patient-level cross-validation, then a refit.

Every fold starts from the same pretrained backbone, so the probe's backbone features are the
same for every fold: they are computed once for all images and each fold takes its rows.
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
from fedfreeze.metrics import classification_metrics, summarize, youden_threshold
from fedfreeze.model_io import make_card, save_model
from fedfreeze.models.grouped import GroupedNet
from fedfreeze.models.registry import build_model
from fedfreeze.training.engine import (
    EpochLog,
    fit,
    model_adapter_groups,
    predict_scores,
    resolve_device,
)
from fedfreeze.training.features import FeatureCache
from fedfreeze.training.schedule import check_groups

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"


def new_model(cfg: SiteConfig, seed: int) -> GroupedNet:
    """A fresh pretrained model with the configured adapters; the seed fixes the head's init."""
    torch.manual_seed(seed)
    model, _ = build_model(cfg.model, model_adapter_groups(cfg.train), cfg.train.adapter_rank)
    check_groups(cfg.train.unfreeze, list(model.groups))
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
) -> tuple[GroupedNet, list[EpochLog]]:
    """Train a fresh model on ``data[indices]`` through the whole schedule (under ``train.recipe =
    "dual"``: the dual-input-output stage from scratch, the merge, then the merged model's probe and
    progressive unfreezing, ``training/dual.py``; the merged model is returned)."""
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
            merged, dual_logs = fit_dual(dual_model, images, labels, cfg.train, rng=np.random.default_rng(seed),
                                         device=device, features=lambda m: cache.features(m, images, device),
                                         on_epoch=on_epoch)
            return merged, list(dual_logs)
        model = new_model(cfg, seed)
        needs_features = cfg.train.probe_epochs > 0 and not cfg.train.probe_augment
        feats = cache.features(model, data.images, device)[indices] if needs_features else None
        logs = fit(model, images, labels, cfg.train, rng=np.random.default_rng(seed), device=device,
                   probe_features=feats, on_epoch=on_epoch)
    return model, logs


def site_train(
    cfg: SiteConfig,
    data_path: str | Path,
    out_dir: str | Path,
    *,
    split: str | None = None,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Cross-validate, refit on all data, and write ``metrics.json`` and the model folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    dev = resolve_device(device)
    data = load_image_set(
        data_path,
        image_size=cfg.model.input_size,
        channels=cfg.model.in_channels,
        split=split,
        class_names=cfg.model.class_names,
        num_classes=cfg.model.num_classes,
        progress=progress,
    )
    data.require_nonempty()
    data.require_classes(2, why="cross-validated AUROC needs both classes")
    folds = patient_folds(
        data.labels.numpy(), data.patient_ids, folds=cfg.cv.folds, repeats=cfg.cv.repeats, seed=cfg.cv.seed
    )
    cache = FeatureCache()
    fold_results: list[dict[str, Any]] = []
    oof_rows: list[tuple[int, int, str, int, Any]] = []
    memory: dict[str, Any] = {}
    for number, fold in enumerate(tqdm(folds, desc="folds", unit="fold", disable=not progress)):
        label = f"repeat {fold.repeat + 1} fold {fold.fold + 1}/{cfg.cv.folds}"
        model, logs = train_on(
            cfg, data, fold.train, seed=cfg.train.seed + number, device=dev, cache=cache,
            bar_label=label, progress=progress,
        )
        scores = predict_scores(model, data.images[fold.test], dev)
        metrics = classification_metrics(data.labels[fold.test].numpy(), scores, cfg.cv.threshold)
        fold_results.append({
            "repeat": fold.repeat, "fold": fold.fold, "n_train": int(len(fold.train)),
            "n_test": int(len(fold.test)), **metrics,
            "train_seconds": float(sum(log.seconds for log in logs)),
            "epochs": [log.record() for log in logs],
        })
        if number == 0:
            memory = memory_plans(cfg, logs, progress=progress)
        for i, score in zip(fold.test, scores, strict=True):
            oof_rows.append((fold.repeat, fold.fold, data.sources[i], int(data.labels[i]), score))
        if progress:
            tqdm.write(f"{label}: AUROC {metrics['auroc']:.3f}  balanced acc {metrics['balanced_accuracy']:.3f}  "
                       f"F1 {metrics['f1']:.3f}")

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
    threshold = choose_model_threshold(cfg, data, oof_rows)
    report["model_threshold"] = threshold
    if cfg.cv.refit:
        everything = np.arange(len(data))
        model, logs = train_on(
            cfg, data, everything, seed=cfg.train.seed + len(folds), device=dev, cache=cache,
            bar_label="refit on all data", progress=progress,
        )
        card = make_card(
            model, cfg.model, threshold=threshold["value"], class_names=data.class_names,
            trained_by="fedfreeze site-train", notes={"data": str(data_path), "n_images": len(data)},
        )
        save_model(out, model, card)
        report["model"] = str(out)
        report["refit_seconds"] = float(sum(log.seconds for log in logs))
    report["feature_cache"] = {"hits": cache.hits, "misses": cache.misses}
    report["seconds"] = time.perf_counter() - started
    (out / METRICS_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    _write_predictions(out / PREDICTIONS_FILE, oof_rows, data.class_names)
    return report


def memory_plans(cfg: SiteConfig, logs: list[EpochLog], *, progress: bool = False) -> dict[str, Any]:
    """What the engine trained each phase with (batch size, freezing rate, activation storage and,
    under ``max-train-memory-mb``, its estimate), for metrics.json; printed when a budget is set."""
    phases = [{"first_epoch": log.epoch, "parts": log.parts, **log.memory_plan} for log in logs if log.memory_plan]
    budget = cfg.train.max_train_memory_mb
    if progress and budget is not None:
        for p in phases:
            rate = "schedule" if p["rate"] is None else f"dynamic freezing rate {p['rate']:g}"
            estimate = "" if p["estimate_mb"] is None else f", estimate {p['estimate_mb']['total']:.0f} MB"
            tqdm.write(f"memory budget {budget:g} MB, phase {'+'.join(p['parts'])}: batch {p['batch_size']}, "
                       f"{rate}, activation storage {p['storage']}{estimate}")
    return {"freezing": cfg.train.freezing, "max_train_memory_mb": budget, "phases": phases}


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
    return {"value": value, "rule": rule, "out_of_fold_at_threshold": oof,
            "out_of_fold_at_fold_threshold": classification_metrics(labels, scores, cfg.cv.threshold)}


def _write_predictions(path: Path, rows: list[tuple[int, int, str, int, Any]], class_names: list[str]) -> None:
    """Out-of-fold scores of every case (kept at the site: they never leave it)."""
    import csv

    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        binary = len(class_names) == 2
        score_cols = ["score"] if binary else [f"p_{name}" for name in class_names]
        writer.writerow(["repeat", "fold", "source", "label", *score_cols])
        for repeat, fold, source, label, score in rows:
            values = [f"{float(score):.6f}"] if binary else [f"{float(s):.6f}" for s in score]
            writer.writerow([repeat, fold, source, label, *values])


def format_summary(summary: dict[str, dict[str, float]]) -> str:
    """``AUROC 0.912 ± 0.031`` lines for the terminal."""
    names = {"auroc": "AUROC", "balanced_accuracy": "balanced accuracy", "f1": "F1",
             "sensitivity": "sensitivity", "specificity": "specificity"}
    return "\n".join(f"  {names[k]:<18} {v['mean']:.3f} ± {v['std']:.3f}" for k, v in summary.items() if k in names)

"""Stats-privacy benchmark: what the minimum cell count (``federation.min-cell-count``) costs the
pooled validation figures, against the exact figures of the pooled raw scores (scikit-learn).

A real model scores real validation splits: a logistic-regression probe on frozen ImageNet
EfficientNet-Lite0 features, fitted on Kermany patients that no site holds. The other Kermany
patients (a seeded sample) are dealt to ``--sites`` sites by ``fedfreeze.data.partition.assign_sites``
(IID, by patient), and each site keeps a patient-level validation split of a realistic size
(``--sizes``: about 25 images per site as in the demo, and about 50). For every draw (``--reps``)
and every ``k`` in ``--ks``, each site releases its cells (``fedfreeze.evaluation.cells.release_cells``,
exactly what a site sends, anchored at the 0.5 edge) and the coordinator's figures are computed from
them as the coordinator computes them (``allocate``, ``pooled_auroc``, ``histogram_metrics``,
``choose_threshold``), with each allocation of a cell's count over its bins (``binormal``: the
coordinator's; ``pooled``: Turnbull's EM; ``uniform``: flat).
``k = 1`` is the release of the exact 200-bin histograms (what sites sent before the rule).

    .venv/bin/python benchmarks/stats_privacy.py [--reps 200] [--sites 4] [--work /tmp/fedfreeze-stats-privacy]

Results: ``benchmarks/results/stats-privacy/`` (results.json, table.csv, table.md, run.json). The
backbone features are cached under ``--work``: a second run skips the CNN (about 1.5 minutes on 2
cores then; the features of the 1,456 images take a few minutes more the first time).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import KERMANY, write_run  # noqa: E402

DRAWS_FILE = "draws.json.gz"

RESULTS = HERE / "results" / "stats-privacy"
ALLOCATIONS: tuple[Literal["binormal", "pooled", "uniform"], ...] = ("binormal", "pooled", "uniform")
RULES = ("youden", "youden-mid")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=100, help="draws of sites and validation splits per size")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--sizes", default="25,50", help="validation images per site (targets), comma-separated")
    parser.add_argument("--ks", default="1,3,5,10,20", help="min-cell-count values, comma-separated")
    parser.add_argument("--probe-patients", type=int, default=300, help="patients the probe is fitted on")
    parser.add_argument("--weak-probe-patients", type=int, default=20, help="patients the weak probe is fitted on")
    parser.add_argument("--pool-patients", type=int, default=500, help="patients dealt to the sites")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--bins", type=int, default=200, help="federation.score-bins")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/fedfreeze-stats-privacy"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    started = time.time()
    ks = [int(k) for k in args.ks.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]

    labels, patients, models = score_kermany(args)
    for name, model in models.items():
        log(f"model {name}: pool AUROC {model['info']['pool_auroc']:.4f} ({model['info']['model']})")

    draws: list[dict[str, Any]] = []
    for name, model in models.items():
        for size in sizes:
            rng = np.random.default_rng([args.seed, size])  # the same sites and splits for every model
            for rep in range(args.reps):
                sites = draw_sites(labels, patients, args.sites, size, int(rng.integers(2**31)))
                draws.append(
                    {
                        "model": name,
                        "size": size,
                        "rep": rep,
                        **evaluate_draw(labels, model["scores"], sites, ks, args.bins),
                    }
                )
            log(f"{name}, size {size}: {args.reps} draws")

    summary = summarise(draws, list(models), sizes, ks)
    results = {
        "what": "pooled validation figures from released cells vs the exact figures of the pooled raw scores",
        "models": {name: model["info"] for name, model in models.items()},
        "sites": args.sites,
        "bins": args.bins,
        "reps": args.reps,
        "ks": ks,
        "sizes": sizes,
        "threshold": "0.5 snapped to the nearest bin edge (the default rule); youden and youden-mid replayed",
        "summary": summary,
        "draws": DRAWS_FILE,  # every draw's figures, gzipped: 2.7 MB as plain JSON
    }
    args.out.mkdir(parents=True, exist_ok=True)
    with gzip.open(args.out / DRAWS_FILE, "wt", encoding="utf-8") as handle:
        json.dump(draws, handle)
    write_tables(summary, args.out)
    write_run(
        args.out,
        results,
        started,
        extra={"data": str(KERMANY), "work": str(args.work), "tables": ["table.csv", "table.md"], "draws": DRAWS_FILE},
    )
    log(f"wrote {args.out}")
    print((args.out / "table.md").read_text())
    return 0


# ---------------------------------------------------------------------- the model and its scores
def score_kermany(args: argparse.Namespace) -> tuple[np.ndarray, list[str], dict[str, dict[str, Any]]]:
    """Labels and patients of the pool images (patients no probe saw), and the scores of two probes:
    one fitted on ``--probe-patients`` patients, a weaker one on ``--weak-probe-patients`` of them."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from fedfreeze.config import ModelConfig
    from fedfreeze.data.dataset import load_image_set
    from fedfreeze.models.registry import build_model
    from fedfreeze.training.features import FeatureCache

    manifest = KERMANY / "manifest.csv"
    if not manifest.is_file():
        raise SystemExit(f"benchmark data not found: {manifest} (set FEDFREEZE_SHARED_DATA)")
    rows = list(csv.DictReader(manifest.open()))
    by_patient: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_patient.setdefault(r["patient_id"], []).append(r)
    rng = np.random.default_rng(args.seed)
    order = [sorted(by_patient)[i] for i in rng.permutation(len(by_patient))]
    probe_ids = order[: args.probe_patients]
    pool_ids = order[args.probe_patients : args.probe_patients + args.pool_patients]

    args.work.mkdir(parents=True, exist_ok=True)
    model, _ = build_model(ModelConfig(input_size=args.input_size), [], 8)
    cache = FeatureCache(args.work / "features")
    device = torch.device("cpu")

    def features(name: str, ids: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        path = args.work / f"{name}.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label", "patient_id"])
            for pid in ids:
                for r in by_patient[pid]:
                    writer.writerow([str(KERMANY / r["path"]), r["label"], pid])
        t = time.perf_counter()
        data = load_image_set(path, image_size=args.input_size, channels=3, progress=False, outside_paths=True)
        feats = cache.features(model, data.images, device).numpy()
        log(f"{name}: {len(data)} images, features in {time.perf_counter() - t:.0f} s")
        return feats, data.labels.numpy(), list(data.patient_ids)

    x_probe, y_probe, p_probe = features("probe", probe_ids)
    x_pool, y_pool, p_pool = features("pool", pool_ids)
    models = {}
    for name, patients in (("probe", args.probe_patients), ("weak probe", args.weak_probe_patients)):
        keep = np.isin(p_probe, probe_ids[:patients])
        probe = LogisticRegression(max_iter=3000, class_weight="balanced", random_state=args.seed)
        probe.fit(x_probe[keep], y_probe[keep])
        scores = probe.predict_proba(x_pool)[:, 1].astype(np.float64)
        models[name] = {
            "scores": scores,
            "info": {
                "model": "LogisticRegression(class_weight='balanced') on frozen ImageNet EfficientNet-Lite0 features "
                f"of {int(keep.sum())} images of {patients} patients",
                "input_size": args.input_size,
                "pool_images": len(y_pool),
                "pool_patients": len(pool_ids),
                "pool_auroc": float(roc_auc_score(y_pool, scores)),
                "pool_positive_share": float(y_pool.mean()),
            },
        }
    return y_pool, p_pool, models


def draw_sites(labels: np.ndarray, patients: list[str], n_sites: int, size: int, seed: int) -> list[np.ndarray]:
    """Each site's validation images (indices into the pool): patients dealt to sites, then a
    patient-level validation split of about ``size`` images per site."""
    from fedfreeze.data.partition import assign_sites
    from fedfreeze.data.splits import split_patients

    site_of = assign_sites(labels, patients, n_sites, alpha=None, seed=seed)
    out = []
    for s in range(n_sites):
        idx = np.flatnonzero(site_of == s)
        fraction = min(0.8, size / len(idx))
        _, val = split_patients(labels[idx], [patients[i] for i in idx], test_fraction=fraction, seed=seed + s)
        out.append(idx[val])
    return out


# ---------------------------------------------------------------------- one draw
def evaluate_draw(
    labels: np.ndarray, scores: np.ndarray, sites: list[np.ndarray], ks: list[int], bins: int
) -> dict[str, Any]:
    """The exact figures of the pooled raw scores, and for each k and allocation the coordinator's."""
    from sklearn.metrics import roc_auc_score, roc_curve

    from fedfreeze.evaluation.cells import allocate, binary_bounds, release_cells
    from fedfreeze.evaluation.pooled import (
        choose_threshold,
        class_histograms,
        edge_logits,
        histogram_metrics,
        pooled_auroc,
        score_bin_edges,
        snap_threshold,
    )

    edges = score_bin_edges(bins)
    t05 = snap_threshold(0.5, edges)
    cut = int(np.searchsorted(edges, t05))
    y = np.concatenate([labels[i] for i in sites])
    p = np.concatenate([scores[i] for i in sites])
    fpr, tpr, thr = roc_curve(y, p)
    j = tpr - fpr
    exact_youden = float(min(thr[int(np.argmax(j))], 1.0))
    exact = {
        "auroc": float(roc_auc_score(y, p)),
        "balanced_accuracy": balanced_accuracy(y, p, t05),
        "youden_threshold": exact_youden,
        "balanced_accuracy_at_youden": balanced_accuracy(y, p, exact_youden),
    }
    hists = [class_histograms(labels[i], scores[i], edges) for i in sites]
    singled = sum(int((h == 1).sum()) for h in hists)
    exact_bins = np.sum(hists, axis=0)
    exact_picks = {rule: choose_threshold(rule, exact_bins[0], exact_bins[1], edges) for rule in RULES}
    out: dict[str, Any] = {
        "n": len(y),
        "site_n": [len(i) for i in sites],
        "positives": int(y.sum()),
        "exact": exact,
        "cases_alone_in_their_bin": singled,
        "by_k": {},
    }
    for k in ks:
        # what a site sends (site_runtime.validation_release): anchored at the round's threshold, each
        # class's cells finest on the side facing the other class
        releases = [release_cells(h, k, [[cut], [cut]], ["down", "up"]) for h in hists]
        bounds = binary_bounds(releases, cut)
        row: dict[str, Any] = {
            "cells": int(sum(len(r.count) for r in releases)),
            "smallest_narrow_cell": min((r.smallest_nonempty() or math.inf) for r in releases),
            "classes_released_whole": int(sum(len(r.cells_of(c)) == 1 for r in releases for c in (0, 1))),
            "auroc_bounds": bounds["auroc"],
            "exact_at_0.5": bool(bounds["sensitivity"][0] == bounds["sensitivity"][1])
            and bool(bounds["specificity"][0] == bounds["specificity"][1]),
            "balanced_accuracy_bounds": bounds["balanced_accuracy"],
        }
        for method in ALLOCATIONS:
            pooled = np.sum(allocate(releases, method, positions=edge_logits(edges)), axis=0)
            neg, pos = pooled[0], pooled[1]
            m = histogram_metrics(neg, pos, edges, t05)
            est: dict[str, Any] = {"auroc": pooled_auroc(neg, pos), "balanced_accuracy": m["balanced_accuracy"]}
            for rule in RULES:
                t = choose_threshold(rule, neg, pos, edges)
                est[f"{rule}_threshold"] = t
                est[f"balanced_accuracy_at_{rule}"] = balanced_accuracy(y, p, t)  # what the pick is worth
                est[f"{rule}_threshold_exact_bins"] = exact_picks[rule]
            row[method] = est
        out["by_k"][str(k)] = row
    return out


def balanced_accuracy(y: np.ndarray, p: np.ndarray, t: float) -> float:
    pred = p >= t
    return float(((pred & (y == 1)).sum() / (y == 1).sum() + (~pred & (y == 0)).sum() / (y == 0).sum()) / 2)


def logit(t: float) -> float:
    t = min(max(t, 1e-12), 1 - 1e-12)
    return math.log(t / (1 - t))


# ---------------------------------------------------------------------- summary
def summarise(draws: list[dict[str, Any]], models: list[str], sizes: list[int], ks: list[int]) -> list[dict[str, Any]]:
    """Per model, validation size, k and allocation: the errors of the coordinator's figures."""
    rows = []
    for model in models:
        for size in sizes:
            these = [d for d in draws if d["model"] == model and d["size"] == size]
            for k in ks:
                at = [d["by_k"][str(k)] for d in these]
                for method in ALLOCATIONS:
                    err_auc = [a[method]["auroc"] - d["exact"]["auroc"] for a, d in zip(at, these, strict=True)]
                    err_ba = [
                        a[method]["balanced_accuracy"] - d["exact"]["balanced_accuracy"]
                        for a, d in zip(at, these, strict=True)
                    ]
                    inside = [
                        a["auroc_bounds"][0] - 1e-12 <= d["exact"]["auroc"] <= a["auroc_bounds"][1] + 1e-12
                        for a, d in zip(at, these, strict=True)
                    ]
                    row: dict[str, Any] = {
                        "model": model,
                        "val_per_site": size,
                        "n_pooled_mean": float(np.mean([d["n"] for d in these])),
                        "k": k,
                        "allocation": method,
                        "auroc_exact_mean": float(np.mean([d["exact"]["auroc"] for d in these])),
                        "auroc_abs_error_mean": float(np.mean(np.abs(err_auc))),
                        "auroc_abs_error_p95": float(np.quantile(np.abs(err_auc), 0.95)),
                        "auroc_bias": float(np.mean(err_auc)),
                        "auroc_range_width_mean": float(np.mean([np.diff(a["auroc_bounds"])[0] for a in at])),
                        "auroc_exact_within_range": float(np.mean(inside)),
                        "ba05_abs_error_mean": float(np.mean(np.abs(err_ba))),
                        "ba05_abs_error_p95": float(np.quantile(np.abs(err_ba), 0.95)),
                        "ba05_exact_share": float(np.mean([a["exact_at_0.5"] for a in at])),
                        "cells_mean": float(np.mean([a["cells"] for a in at])),
                        "classes_released_whole_mean": float(np.mean([a["classes_released_whole"] for a in at])),
                        "cases_alone_in_their_bin_mean": float(np.mean([d["cases_alone_in_their_bin"] for d in these])),
                        # the exact histograms (k = 1): the share of validation images alone in their (class, bin)
                        "cases_alone_share_mean": float(
                            np.mean([d["cases_alone_in_their_bin"] / d["n"] for d in these])
                        ),
                    }
                    for rule in RULES:
                        picks = [a[method][f"{rule}_threshold"] for a in at]
                        row[f"{rule}_logit_shift_vs_k1_mean"] = float(
                            np.mean(
                                [
                                    abs(logit(t) - logit(a[method][f"{rule}_threshold_exact_bins"]))
                                    for t, a in zip(picks, at, strict=True)
                                ]
                            )
                        )
                        row[f"{rule}_logit_shift_vs_exact_youden_mean"] = float(
                            np.mean(
                                [
                                    abs(logit(t) - logit(d["exact"]["youden_threshold"]))
                                    for t, d in zip(picks, these, strict=True)
                                ]
                            )
                        )
                        row[f"{rule}_ba_loss_vs_exact_youden_mean"] = float(
                            np.mean(
                                [
                                    d["exact"]["balanced_accuracy_at_youden"]
                                    - a[method][f"balanced_accuracy_at_{rule}"]
                                    for a, d in zip(at, these, strict=True)
                                ]
                            )
                        )
                    rows.append(row)
    return rows


def write_tables(summary: list[dict[str, Any]], out: Path) -> None:
    """table.csv: every row; table.md: the coordinator's allocation (binormal) for every setting, then
    the three allocations side by side at k = 5."""
    with (out / "table.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    lines = [
        "| model (pooled AUROC) | validation images per site (pooled) | min-cell-count | pooled AUROC error, mean "
        "(95th pct) | AUROC range the cells allow, width | balanced accuracy at 0.5, error mean (95th pct) | "
        "counts at 0.5 exact | Youden pick, BA lost vs exact |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        if r["allocation"] != "binormal":
            continue
        lines.append(
            f"| {r['model']} ({r['auroc_exact_mean']:.3f}) | {r['val_per_site']} ({r['n_pooled_mean']:.0f}) | {r['k']} | "
            f"{r['auroc_abs_error_mean']:.4f} ({r['auroc_abs_error_p95']:.4f}) | {r['auroc_range_width_mean']:.3f} | "
            f"{r['ba05_abs_error_mean']:.4f} ({r['ba05_abs_error_p95']:.4f}) | {r['ba05_exact_share']:.0%} | "
            f"{r['youden_ba_loss_vs_exact_youden_mean']:+.4f} |"
        )
    lines += [
        "",
        "| model | validation images per site | allocation (k = 5) | pooled AUROC error, mean (95th pct) | "
        "balanced accuracy at 0.5, error mean (95th pct) |",
        "|---|---|---|---|---|",
    ]
    for r in summary:
        if r["k"] == 5:
            lines.append(
                f"| {r['model']} | {r['val_per_site']} | {r['allocation']} | {r['auroc_abs_error_mean']:.4f} "
                f"({r['auroc_abs_error_p95']:.4f}) | {r['ba05_abs_error_mean']:.4f} ({r['ba05_abs_error_p95']:.4f}) |"
            )
    (out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())

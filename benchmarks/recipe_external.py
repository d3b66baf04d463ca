"""Choosing the default recipe with a real new hospital in the benchmark, not only synthetic shifts.

The shift benchmark chose the defaults on Kermany patients under synthetic acquisition shifts; on a real
change of site (patient-disjoint external paediatric X-rays) its ranking of recipes did not hold. This
benchmark trains each candidate the same way (``benchmarks/shift_arms.py``: 3 label-skewed Kermany sites,
128 px, the real ServerApp and ClientApp in process) and judges it on

* **NIH adults, a real new hospital, after the site's own calibration**: the site labels 60 patients
  suggested by ``fedfreeze suggest`` from a pool half of its patients and refits the head
  (``fedfreeze adapt --labels use --refit head``: the model ranks NIH at chance as it is, so no
  threshold helps); AUROC, balanced accuracy and ECE on the other half, mean over ``--draws`` draws;
* **the held-out Kermany patients** as acquired and under the 7 synthetic shifts (the second opinion),
  with no labels: AUROC, balanced accuracy at the stored threshold and at the Youden threshold of the
  federation's pooled validation histograms (the threshold rule), and ECE.

Candidates: this checkout's defaults; label smoothing 0.1; per-image histogram equalisation inside the
model (``model.intensity = "equalize"``); SWA over the last 3 rounds; temperature scaling on the pooled
validation (``federation.calibrate``); WiSE-FT 0.5.

    .venv/bin/python benchmarks/recipe_external.py [--work /tmp/fedfreeze-shift-work] [--draws 20]

Results: ``benchmarks/results/recipe-external/``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import machine, write_run  # noqa: E402
from label_budget import log, patient_split  # noqa: E402

RESULTS = HERE / "results" / "recipe-external"
BUDGET = 60


def candidates() -> list[Any]:
    from shift_arms import QUICK_ROUNDS, ArmSpec

    return [
        ArmSpec("defaults", "this checkout's defaults", "federated", {}, QUICK_ROUNDS),
        ArmSpec("label-smoothing-0.1", "defaults + train.label-smoothing = 0.1", "federated",
                {"train.label-smoothing": 0.1}, QUICK_ROUNDS),
        ArmSpec("equalize", "defaults + model.intensity = equalize (per-image histogram equalisation)", "federated",
                {"model.intensity": "equalize"}, QUICK_ROUNDS),
        ArmSpec("swa-3", "defaults + federation.swa-rounds = 3", "federated", {"federation.swa-rounds": 3},
                QUICK_ROUNDS),
        ArmSpec("temperature", "defaults + federation.calibrate = temperature", "federated",
                {"federation.calibrate": "temperature"}, QUICK_ROUNDS),
        ArmSpec("wise-0.5", "defaults + federation.wise-alpha = 0.5", "federated", {"federation.wise-alpha": 0.5},
                QUICK_ROUNDS),
    ]  # fmt: skip


def zero_shot(labels: np.ndarray, scores: np.ndarray, stored: float, youden: float | None) -> dict[str, Any]:
    from fedfreeze.evaluation.calibration import expected_calibration_error
    from fedfreeze.metrics import classification_metrics

    at = classification_metrics(labels, scores, stored)
    out = {
        "auroc": at["auroc"],
        "balanced_accuracy": at["balanced_accuracy"],
        "sensitivity": at["sensitivity"],
        "specificity": at["specificity"],
        "ece": expected_calibration_error(labels, scores),
    }
    if youden is not None:
        out["balanced_accuracy_youden"] = classification_metrics(labels, scores, youden)["balanced_accuracy"]
    return out


def nih_after_refit(model: Any, card: Any, s: Any, draws: int) -> dict[str, Any]:
    """The head refitted on 60 suggested NIH patients, judged on the other half (mean over draws)."""
    import torch

    from fedfreeze.adaptation.head_refit import refit_head
    from fedfreeze.adaptation.suggest import suggest_patients
    from fedfreeze.evaluation.calibration import expected_calibration_error
    from fedfreeze.metrics import classification_metrics
    from fedfreeze.model_io import model_scores
    from fedfreeze.training.engine import extract_features

    device = torch.device("cpu")
    feats = extract_features(model, s.images, device).numpy().astype(np.float64)
    scores = model_scores(model, card, s.images, device)
    fc = model.head.fc
    w0, b0 = fc.weight.detach().double().numpy()[0], float(fc.bias.detach()[0])
    labels, pids = np.asarray(s.labels), np.asarray(s.patient_ids, dtype=object).astype(str)
    rows = []
    for r in range(draws):
        rng = np.random.default_rng([r, 2026])
        pool, held = patient_split(pids, labels, rng)
        pool_idx = np.flatnonzero(np.isin(pids, pool))
        chosen = [p.patient_id for p in suggest_patients(scores[pool_idx], list(pids[pool_idx]), BUDGET, seed=r)]
        fit_idx, eval_idx = np.flatnonzero(np.isin(pids, chosen)), np.flatnonzero(np.isin(pids, held))
        fit = refit_head(feats[fit_idx], labels[fit_idx], w0, b0)
        refit = fit.scores(feats[eval_idx])
        m = classification_metrics(labels[eval_idx], refit, 0.5)
        rows.append(
            {
                "auroc": m["auroc"],
                "balanced_accuracy": m["balanced_accuracy"],
                "ece": expected_calibration_error(labels[eval_idx], refit),
            }
        )
    return {
        k: {
            "mean": float(np.mean([x[k] for x in rows])),
            "low": float(np.percentile([x[k] for x in rows], 2.5)),
            "high": float(np.percentile([x[k] for x in rows], 97.5)),
        }
        for k in ("auroc", "balanced_accuracy", "ece")
    }


def youden_of(histograms: dict[str, Any] | None) -> float | None:
    from fedfreeze.evaluation.pooled import youden_threshold_from_histograms

    if not histograms:
        return None
    return float(youden_threshold_from_histograms(histograms["neg"], histograms["pos"], histograms["edges"]))


def markdown(out: dict[str, Any], meta: dict[str, Any]) -> str:
    def f(v: dict[str, float]) -> str:
        return f"{v['mean']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"

    lines = [
        "# The default recipe, chosen with a real new hospital in the benchmark",
        "",
        f"Command: `{meta['command']}`  ",
        f"{meta['data']}  ",
        f"Machine: {meta['machine']}; wall time {meta['wall']:.0f} s.",
        "",
        f"## NIH adults (a real new hospital), after the site's own calibration: head refit on {BUDGET} suggested "
        f"patients, judged on the other half (mean [2.5-97.5 percentiles] over {meta['draws']} draws)",
        "",
        "| arm | NIH AUROC | NIH balanced accuracy | NIH ECE | NIH AUROC as is |",
        "| --- | --- | --- | --- | --- |",
    ]
    for arm, r in out.items():
        n = r["nih_refit"]
        lines.append(
            f"| {arm} | {f(n['auroc'])} | {f(n['balanced_accuracy'])} | {f(n['ece'])} | "
            f"{r['sets']['nih-adult']['auroc']:.3f} |"
        )
    lines += [
        "",
        "## Kermany held-out patients, no labels (as acquired; mean of the 7 synthetic shifts)",
        "",
        "| arm | threshold stored / Youden of pooled validation | AUROC | BA at stored | BA at Youden | ECE | "
        "shifted AUROC | shifted BA at stored | shifted BA at Youden | shifted ECE |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arm, r in out.items():
        h = r["sets"]["kermany-held-out"]
        sh = r["shifted_mean"]
        y = r["youden_threshold"]
        lines.append(
            f"| {arm} | {r['threshold']:.3f} / {y:.3f} | {h['auroc']:.3f} | {h['balanced_accuracy']:.3f} | "
            f"{h.get('balanced_accuracy_youden', float('nan')):.3f} | {h['ece']:.3f} | {sh['auroc']:.3f} | "
            f"{sh['balanced_accuracy']:.3f} | {sh.get('balanced_accuracy_youden', float('nan')):.3f} | {sh['ece']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/fedfreeze-shift-work"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arms", default=None, help="comma-separated arm names (default: all)")
    args = parser.parse_args(argv)
    import shift_arms
    import torch
    from shift_data import FULL, load_sets, make_split

    from fedfreeze.model_io import load_model, model_scores

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    command = "python " + " ".join(
        shlex.quote(a) for a in ["benchmarks/recipe_external.py", *(argv if argv is not None else sys.argv[1:])]
    )
    base = args.work / f"full-seed{args.seed}"
    split = make_split(base, FULL, args.seed)
    sets = load_sets(base, FULL.input_size, args.seed)
    sites = {name: base / "sites" / name for name in split["sites"]}
    scorer = shift_arms.PrefixScorer(FULL.input_size)
    arms = [a for a in candidates() if args.arms is None or a.name in args.arms.split(",")]
    out: dict[str, Any] = {}
    for arm in arms:
        result = shift_arms.run_arm(
            arm, sizes=FULL, seed=args.seed, quick=False, sites=sites, sets=sets, work=base, scorer=scorer, log=log
        )
        arm_dir = base / "arms" / arm.name.replace("/", "-")
        kept = arm_dir / f"recipe-external-draws{args.draws}.json"  # this arm's figures, for a rerun with more arms
        if kept.is_file() and kept.stat().st_mtime >= (arm_dir / "result.json").stat().st_mtime:
            out[arm.name] = json.loads(kept.read_text())
            log(f"{arm.name}: figures kept from {kept}")
            continue
        model_dir = arm_dir / "federation" / "model"
        model, card = load_model(model_dir)
        youden = youden_of(result.get("histograms"))
        if youden is not None and card.calibration is not None:  # the histograms hold raw scores
            youden = float(card.calibration.apply(np.array([youden]))[0])
        figures = {}
        for s in sets:
            scores = model_scores(model, card, s.images, torch.device("cpu"))
            figures[s.name] = zero_shot(np.asarray(s.labels), scores, card.threshold, youden)
        shifted = [figures[s.name] for s in sets if s.group == "shifted"]
        nih = next(s for s in sets if s.name == "nih-adult")
        out[arm.name] = {
            "description": arm.description,
            "threshold": card.threshold,
            "youden_threshold": youden if youden is not None else float("nan"),
            "sets": figures,
            "shifted_mean": {k: float(np.mean([f[k] for f in shifted])) for k in shifted[0]},
            "nih_refit": nih_after_refit(model, card, nih, args.draws),
        }
        kept.write_text(json.dumps(out[arm.name], indent=1))
        log(f"{arm.name}: NIH after refit AUROC {out[arm.name]['nih_refit']['auroc']['mean']:.3f}")
    site_text = ", ".join(f"{k} {v['images']} images ({v['normal']} normal)" for k, v in split["sites"].items())
    meta = {
        "command": command,
        "data": (
            f"Training sites {site_text}, "
            f"128 px; held-out Kermany {split['held_out']['images']} images / {split['held_out']['patients']} patients; "
            f"NIH {split['nih']['images']} images / {split['nih']['patients']} patients, split by patient per draw."
        ),
        "machine": f"{machine()['cpu']}, {args.threads} torch threads",
        "wall": time.perf_counter() - started,
        "draws": args.draws,
    }
    table = markdown(out, meta)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table)
    write_run(args.out, {"arms": out, "meta": meta}, started, command=command, extra={"work": str(args.work)})
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

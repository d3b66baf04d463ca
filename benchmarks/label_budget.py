"""Label budget: how many labelled patients a new site needs to set its operating point, and which.

The source model is the shift benchmark's ``defaults`` arm (this checkout's default federated recipe
on 3 label-skewed Kermany sites, 128 px; trained through ``benchmarks/shift_arms.py`` and cached under
``--work``). Every site of the benchmark is scored once (the model's scores and its pooled features):
NIH adult chest X-rays (a real new hospital and population), the held-out Kermany patients as
acquired, and the same patients under the shift benchmark's 7 synthetic acquisition shifts (a second
opinion, not a real site).

For each site and each of ``--repeats`` draws, the site's patients are split by class into a pool (half)
that may be labelled and an evaluation half that nothing is fitted or chosen on. From the pool, ``n``
patients (n = 10, 20, 30, 60, 120) are picked **at random** or **suggested** (``fedfreeze suggest``:
one per stratum of the score range) and labelled; then

* ``youden``: temperature scaling + Youden's J (``fedfreeze adapt --labels use`` before this change);
* ``binormal``: temperature scaling + the binormal rule (the new default), refused (global threshold
  kept) when fewer than 5 patients of a class were labelled, as ``adapt`` refuses;
* ``head-refit``: the head refitted on the labelled patients' features toward the source head,
  class-balanced, threshold 0.5 (``adaptation/head_refit.py``), with the same minimum;

each judged on the evaluation half: balanced accuracy at its threshold, AUROC, ECE. ``n = 0`` is the
model as it is at its global threshold. Figures are means over draws with the 2.5-97.5 percentiles of
the draws (they include which patients were labelled and which were evaluated).

    .venv/bin/python benchmarks/label_budget.py [--repeats 50] [--work /tmp/fedfreeze-shift-work]

Results: ``benchmarks/results/label-budget/`` (results.json, table.md, run.json).
"""

from __future__ import annotations

import argparse
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

RESULTS = HERE / "results" / "label-budget"
BUDGETS = (10, 20, 30, 60, 120)
SELECTIONS = ("random", "suggested")
METHODS = ("youden", "binormal", "head-refit")
MIN_PER_CLASS = 5


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def source_model(work: Path, seed: int, threads: int) -> tuple[Path, list[Any], dict[str, Any]]:
    """The shift benchmark's ``defaults`` arm (trained once, cached under ``work``) and its sets."""
    import shift_arms
    import torch
    from shift_data import FULL, load_sets, make_split

    torch.set_num_threads(threads)
    base = work / f"full-seed{seed}"
    split = make_split(base, FULL, seed)
    sets = load_sets(base, FULL.input_size, seed)
    sites = {name: base / "sites" / name for name in split["sites"]}
    arm = next(a for a in shift_arms.ARMS if a.name == "defaults")
    result = shift_arms.run_arm(
        arm,
        sizes=FULL,
        seed=seed,
        quick=False,
        sites=sites,
        sets=sets,
        work=base,
        scorer=shift_arms.PrefixScorer(FULL.input_size),
        log=log,
    )
    model_dir = base / "arms" / "defaults" / "federation" / "model"
    return model_dir, sets, {"split": split, "histograms": result.get("histograms")}


def scores_and_features(model_dir: Path, sets: list[Any]) -> dict[str, dict[str, np.ndarray]]:
    """Each set's card scores and pooled features; the scores are checked against ``model_scores``."""
    import torch

    from fedfreeze.model_io import load_model, model_scores
    from fedfreeze.training.engine import extract_features

    model, card = load_model(model_dir)
    device = torch.device("cpu")
    out = {}
    for s in sets:
        feats = extract_features(model, s.images, device).numpy().astype(np.float64)
        head = model.head.fc
        w = head.weight.detach().numpy().astype(np.float64)[0]
        b = float(head.bias.detach().numpy()[0])
        scores = 1.0 / (1.0 + np.exp(-(feats @ w + b)))
        check = model_scores(model, card, s.images[:16], device)
        if card.calibration is not None or not np.allclose(scores[:16], check, atol=1e-5):
            raise SystemExit(f"{s.name}: scores from the features differ from model_scores")
        out[s.name] = {"scores": scores, "features": feats, "w": w, "b": np.array([b])}
    return out


def patient_split(pids: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Pool and evaluation patients, half of each class each (a patient's class: its largest label)."""
    patients = np.unique(pids)
    cls = np.array([labels[pids == p].max() for p in patients])
    pool, held = [], []
    for c in (0, 1):
        members = rng.permutation(patients[cls == c])
        half = len(members) // 2
        pool += list(members[:half])
        held += list(members[half:])
    return np.array(sorted(pool)), np.array(sorted(held))


def fit_and_judge(
    method: str,
    chosen: np.ndarray,
    evaluation: np.ndarray,
    data: dict[str, np.ndarray],
    labels: np.ndarray,
    pids: np.ndarray,
    threshold: float,
    strength: float,
) -> dict[str, Any]:
    """Fit ``method`` on the images of the ``chosen`` patients; figures on the evaluation images."""
    from fedfreeze.adaptation.head_refit import refit_head
    from fedfreeze.adaptation.recalibration import fit_calibration
    from fedfreeze.adaptation.threshold_rules import choose_threshold, logit
    from fedfreeze.errors import DataError
    from fedfreeze.evaluation.calibration import expected_calibration_error
    from fedfreeze.metrics import classification_metrics

    fit_idx = np.flatnonzero(np.isin(pids, chosen))
    eval_idx = np.flatnonzero(np.isin(pids, evaluation))
    y_fit = labels[fit_idx]
    patient_cls = {p: labels[pids == p].max() for p in chosen}
    per_class = [sum(1 for v in patient_cls.values() if v == c) for c in (0, 1)]
    scores = data["scores"]
    refused = False
    eval_scores = scores[eval_idx]
    t = threshold
    try:
        if method == "youden":  # the old adapt: both classes needed, no minimum
            if min(per_class) == 0:
                raise DataError("one class only")
            a, b = fit_calibration(logit(scores[fit_idx]), y_fit, "temperature")
            cal = 1.0 / (1.0 + np.exp(-(a * logit(scores) + b)))
            t = choose_threshold(cal[fit_idx], y_fit, "youden")
            eval_scores = cal[eval_idx]
        elif method == "binormal":
            if min(per_class) < MIN_PER_CLASS:
                raise DataError("too few patients of a class")
            try:
                a, b = fit_calibration(logit(scores[fit_idx]), y_fit, "temperature")
            except DataError:  # separated: the rule needs no calibration; keep the scores
                a, b = 1.0, 0.0
            cal = 1.0 / (1.0 + np.exp(-(a * logit(scores) + b)))
            t = choose_threshold(cal[fit_idx], y_fit, "binormal")
            eval_scores = cal[eval_idx]
        else:
            if min(per_class) < MIN_PER_CLASS:
                raise DataError("too few patients of a class")
            fit = refit_head(data["features"][fit_idx], y_fit, data["w"], float(data["b"][0]), strength=strength)
            eval_scores = fit.scores(data["features"][eval_idx])
            t = 0.5
    except DataError:
        refused, eval_scores, t = True, scores[eval_idx], threshold
    y_eval = labels[eval_idx]
    m = classification_metrics(y_eval, eval_scores, t)
    return {
        "balanced_accuracy": m["balanced_accuracy"],
        "auroc": m["auroc"],
        "sensitivity": m["sensitivity"],
        "specificity": m["specificity"],
        "ece": expected_calibration_error(y_eval, eval_scores),
        "threshold": t,
        "refused": refused,
        "labelled_per_class": per_class,
    }


def as_is(evaluation: np.ndarray, data: dict[str, np.ndarray], labels: np.ndarray, pids: np.ndarray, t: float) -> dict:
    """The model as it is, at its global threshold, on the evaluation images."""
    from fedfreeze.evaluation.calibration import expected_calibration_error
    from fedfreeze.metrics import classification_metrics

    idx = np.flatnonzero(np.isin(pids, evaluation))
    m = classification_metrics(labels[idx], data["scores"][idx], t)
    keys = ("balanced_accuracy", "auroc", "sensitivity", "specificity")
    return {
        **{k: m[k] for k in keys},
        "ece": expected_calibration_error(labels[idx], data["scores"][idx]),
        "threshold": t,
        "refused": False,
        "labelled_per_class": [0, 0],
    }


def summarise(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(np.mean(arr)),
        "low": float(np.percentile(arr, 2.5)),
        "high": float(np.percentile(arr, 97.5)),
    }


def run(
    sets: list[Any], data: dict[str, dict[str, np.ndarray]], repeats: int, threshold: float, strength: float
) -> dict[str, Any]:
    from fedfreeze.adaptation.suggest import suggest_patients

    out: dict[str, Any] = {}
    for s in sets:
        labels, pids = np.asarray(s.labels), np.asarray(s.patient_ids, dtype=object).astype(str)
        d = data[s.name]
        rows: dict[str, list[dict[str, Any]]] = {}
        for r in range(repeats):
            rng = np.random.default_rng([r, 2026])
            pool, held = patient_split(pids, labels, rng)
            rows.setdefault("0", []).append(as_is(held, d, labels, pids, threshold))
            pool_idx = np.flatnonzero(np.isin(pids, pool))
            for n in BUDGETS:
                if n > len(pool):
                    continue
                picks = {
                    "random": rng.choice(pool, size=n, replace=False),
                    "suggested": np.array(
                        [p.patient_id for p in suggest_patients(d["scores"][pool_idx], list(pids[pool_idx]), n, seed=r)]
                    ),
                }
                for selection, chosen in picks.items():
                    for method in METHODS:
                        key = f"{n}|{selection}|{method}"
                        rows.setdefault(key, []).append(
                            fit_and_judge(method, chosen, held, d, labels, pids, threshold, strength)
                        )
        out[s.name] = {
            key: {
                "n_draws": len(items),
                "refused": float(np.mean([i["refused"] for i in items])),
                **{
                    metric: summarise([i[metric] for i in items])
                    for metric in ("balanced_accuracy", "auroc", "sensitivity", "specificity", "ece")
                },
            }
            for key, items in rows.items()
        }
        log(f"{s.name}: done")
    return out


def markdown(out: dict[str, Any], sets: list[Any], meta: dict[str, Any]) -> str:
    def cell(entry: dict[str, Any], metric: str) -> str:
        v = entry[metric]
        text = f"{v['mean']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"
        return text + (f" ({entry['refused']:.0%} refused)" if entry.get("refused") else "")

    lines = [
        "# Label budget: a new site's operating point from few labelled patients",
        "",
        f"Command: `{meta['command']}`  ",
        f"{meta['data']}  ",
        f"{meta['repeats']} draws per site: the site's patients split by class into a pool that may be labelled "
        "and an evaluation half nothing is fitted on; mean over draws [2.5-97.5 percentiles of the draws]. "
        f"Machine: {meta['machine']}; wall time {meta['wall']:.0f} s.",
        "",
    ]
    shifted = [s.name for s in sets if s.group == "shifted"]
    groups = [
        ("nih-adult", ["nih-adult"]),
        ("kermany-held-out", ["kermany-held-out"]),
        ("shifted (mean of 7)", shifted),
    ]
    for title, names in groups:
        present = [n for n in names if n in out]
        if not present:
            continue
        lines += [f"## {title}", ""]
        for metric, label in (("balanced_accuracy", "balanced accuracy"), ("auroc", "AUROC")):
            lines += [f"{label} on the evaluation half", ""]
            header = ["labelled patients", *[f"{sel} + {m}" for sel in SELECTIONS for m in METHODS]]
            lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
            base = _mean_entry([out[n]["0"] for n in present])
            lines.append("| 0 (model as it is) | " + " | ".join([cell(base, metric)] * (len(header) - 1)) + " |")
            for n in BUDGETS:
                keys = [f"{n}|{sel}|{m}" for sel in SELECTIONS for m in METHODS]
                if not all(k in out[present[0]] for k in keys):
                    continue
                row = [cell(_mean_entry([out[nm][k] for nm in present]), metric) for k in keys]
                lines.append(f"| {n} | " + " | ".join(row) + " |")
            lines.append("")
    return "\n".join(lines) + "\n"


def _mean_entry(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """One set's entry as is; several sets' entries averaged (their means and percentile bounds)."""
    if len(entries) == 1:
        return entries[0]
    merged: dict[str, Any] = {"refused": float(np.mean([e["refused"] for e in entries]))}
    for metric in ("balanced_accuracy", "auroc", "sensitivity", "specificity", "ece"):
        merged[metric] = {k: float(np.mean([e[metric][k] for e in entries])) for k in ("mean", "low", "high")}
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/fedfreeze-shift-work"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="the shift benchmark's split seed")
    parser.add_argument("--strength", type=float, default=None, help="head refit penalty (default: the library's)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    from fedfreeze.adaptation.head_refit import DEFAULT_STRENGTH
    from fedfreeze.model_io import read_card

    started = time.perf_counter()
    command = "python " + " ".join(
        shlex.quote(a) for a in ["benchmarks/label_budget.py", *(argv if argv is not None else sys.argv[1:])]
    )
    strength = args.strength if args.strength is not None else DEFAULT_STRENGTH
    model_dir, sets, info = source_model(args.work, args.seed, args.threads)
    threshold = read_card(model_dir).threshold
    log(f"source model {model_dir} (threshold {threshold}); scoring {len(sets)} sets")
    data = scores_and_features(model_dir, sets)
    out = run(sets, data, args.repeats, threshold, strength)
    split = info["split"]
    meta = {
        "command": command,
        "data": (
            f"Source model: the shift benchmark's `defaults` arm (3 label-skewed Kermany sites, "
            f"{sum(v['images'] for v in split['sites'].values())} images, 128 px, global threshold {threshold:g}). "
            f"Sites: NIH {split['nih']['images']} images / {split['nih']['patients']} patients; held-out Kermany "
            f"{split['held_out']['images']} images / {split['held_out']['patients']} patients, as acquired and under 7 "
            f"synthetic shifts. Head refit strength {strength:g}; binormal and head refit need {MIN_PER_CLASS} patients "
            "per class (else refused: the global threshold stays)."
        ),
        "repeats": args.repeats,
        "machine": f"{machine()['cpu']}, {args.threads} torch threads",
        "wall": time.perf_counter() - started,
    }
    table = markdown(out, sets, meta)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table)
    write_run(
        args.out,
        {"figures": out, "budgets": BUDGETS, "methods": METHODS, "selections": SELECTIONS, "meta": meta},
        started,
        command=command,
        extra={"work": str(args.work), "threads": args.threads, "model": str(model_dir)},
    )
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

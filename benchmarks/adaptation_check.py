"""Does the label-free check catch label-free adaptation that hurts? AdaBN and EM on real and shifted sites.

The source model is the shift benchmark's ``defaults`` arm (cached under ``--work``, as in
``label_budget.py``); its reference score distribution is the federation's pooled validation histograms
of the training sites (what ``federation.export.export_model`` now stores in the model folder). Each "site" is
a set of images the check sees without labels: NIH adults (a real new hospital), the held-out Kermany
patients as acquired and at other prevalences (a pure change of class mix, where EM is right to run),
and the held-out patients under the 7 synthetic shifts. Each site is taken whole and as random
subsamples of 100 images.

For each site: EM prevalence on the source scores (``fedfreeze adapt`` without labels), AdaBN
(re-estimated BatchNorm statistics), and the check's verdict on each (``adaptation/reliability.py``).
An adaptation **hurts** when it lowers AUROC or balanced accuracy (at the stored threshold) by more
than 0.02, or, for EM, when its prevalence is off by more than 0.10 (the claim it prints; its default
objective keeps every decision). The table counts, per step, how often it hurt and how often the check
refused it; and how often the check refused an adaptation that did not hurt.

    .venv/bin/python benchmarks/adaptation_check.py [--work /tmp/fedfreeze-shift-work]

Results: ``benchmarks/results/adaptation-check/``.
"""

from __future__ import annotations

import argparse
import copy
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
from label_budget import log, source_model  # noqa: E402

RESULTS = HERE / "results" / "adaptation-check"
HARM = 0.02
PREVALENCE_HARM = 0.10
SUBSAMPLE = 100
SUBSAMPLES = 5


def sites(sets: list[Any], seed: int, subsamples: int = SUBSAMPLES) -> list[dict[str, Any]]:
    """Every benchmark set whole, Kermany held-out at other prevalences, and subsamples of each."""
    out = []
    rng = np.random.default_rng(seed)
    for s in sets:
        labels = np.asarray(s.labels)
        out.append({"name": s.name, "group": s.group, "set": s, "idx": np.arange(len(labels))})
        if s.name == "kermany-held-out":
            pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
            for share in (0.3, 0.5, 0.9):  # positives' share, by dropping images of the other class
                if share * len(neg) / (1 - share) <= len(pos):
                    keep = np.r_[neg, rng.choice(pos, int(share * len(neg) / (1 - share)), replace=False)]
                else:
                    keep = np.r_[pos, rng.choice(neg, int((1 - share) * len(pos) / share), replace=False)]
                out.append({"name": f"{s.name}@{share:g}", "group": "prevalence", "set": s, "idx": np.sort(keep)})
        for k in range(subsamples):
            idx = np.sort(rng.choice(len(labels), min(SUBSAMPLE, len(labels)), replace=False))
            out.append({"name": f"{s.name}/n{SUBSAMPLE}#{k}", "group": s.group + "-small", "set": s, "idx": idx})
    return out


def figures(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    from fedfreeze.evaluation.calibration import expected_calibration_error
    from fedfreeze.metrics import classification_metrics

    m = classification_metrics(labels, scores, threshold)
    return {
        "auroc": m["auroc"],
        "balanced_accuracy": m["balanced_accuracy"],
        "ece": expected_calibration_error(labels, scores),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/fedfreeze-shift-work"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--subsamples", type=int, default=SUBSAMPLES, help="random 100-image sites drawn per set")
    args = parser.parse_args(argv)
    import torch

    from fedfreeze.adaptation.batchnorm import reestimate_all_bn
    from fedfreeze.adaptation.prevalence import estimate_prevalence
    from fedfreeze.adaptation.reliability import check_batchnorm, check_prevalence, mixture_fit, spearman
    from fedfreeze.model_io import load_model, model_scores
    from fedfreeze.reference_scores import reference_from_histograms

    started = time.perf_counter()
    command = "python " + " ".join(
        shlex.quote(a) for a in ["benchmarks/adaptation_check.py", *(argv if argv is not None else sys.argv[1:])]
    )
    model_dir, sets, info = source_model(args.work, args.seed, args.threads)
    hist = info["histograms"]
    reference = reference_from_histograms(hist["neg"], hist["pos"], 5, "the defaults arm's pooled validation")
    model, card = load_model(model_dir)
    device = torch.device("cpu")
    t = card.threshold
    rows = []
    for site in sites(sets, args.seed, args.subsamples):
        s, idx = site["set"], site["idx"]
        images, labels = s.images[idx], np.asarray(s.labels)[idx]
        pids = [s.patient_ids[i] for i in idx]
        before = model_scores(model, card, images, device)
        base = figures(labels, before, t)
        truth = float(labels.mean())
        row: dict[str, Any] = {"site": site["name"], "group": site["group"], "n": len(idx), "prevalence": truth}
        row["source"] = base
        # EM on the source scores
        em = estimate_prevalence(before, pids, 0.5, replicates=200, seed=args.seed)
        fit = mixture_fit(before, reference, seed=args.seed)
        verdict = check_prevalence(fit, em.prevalence)
        row["em"] = {
            "prevalence": em.prevalence,
            "error": abs(em.prevalence - truth),
            "hurts": abs(em.prevalence - truth) > PREVALENCE_HARM,
            "vouched": verdict.vouched,
            "reason": verdict.reason,
            "mixture_prevalence": fit.prevalence,
            "distance": fit.distance,
            "p_value": fit.p_value,
        }
        # AdaBN on this site's images
        adapted = copy.deepcopy(model)
        reestimate_all_bn(adapted, images, device)
        after = model_scores(adapted, card, images, device)
        new = figures(labels, after, t)
        fit_after = mixture_fit(after, reference, seed=args.seed)
        rho = spearman(before, after)
        verdict_bn = check_batchnorm(fit, fit_after, rho)
        drop = max(base["auroc"] - new["auroc"], base["balanced_accuracy"] - new["balanced_accuracy"])
        row["adabn"] = {
            **new,
            "drop": drop,
            "hurts": drop > HARM,
            "vouched": verdict_bn.vouched,
            "reason": verdict_bn.reason,
            "spearman": rho,
            "distance_after": fit_after.distance,
            "p_after": fit_after.p_value,
        }
        rows.append(row)
        log(
            f"{site['name']}: EM {em.prevalence:.3f} (true {truth:.3f}) {'ok' if verdict.vouched else 'REFUSED'}; "
            f"AdaBN AUROC {base['auroc']:.3f}->{new['auroc']:.3f} BA {base['balanced_accuracy']:.3f}->"
            f"{new['balanced_accuracy']:.3f} rho {rho:.3f} {'ok' if verdict_bn.vouched else 'REFUSED'} "
            f"(misfit {fit.distance:.3f}/{fit_after.distance:.3f})"
        )
    summary = {}
    for step in ("em", "adabn"):
        hurts = [r for r in rows if r[step]["hurts"]]
        fine = [r for r in rows if not r[step]["hurts"]]
        summary[step] = {
            "cases": len(rows),
            "hurt": len(hurts),
            "hurt_and_refused": sum(not r[step]["vouched"] for r in hurts),
            "did_not_hurt": len(fine),
            "did_not_hurt_but_refused": sum(not r[step]["vouched"] for r in fine),
            "missed": [r["site"] for r in hurts if r[step]["vouched"]],
        }
    lines = [
        "# Label-free adaptation and its check: AdaBN and EM at real and shifted sites",
        "",
        f"Command: `{command}`  ",
        f"Source model {model_dir} (the shift benchmark's `defaults` arm, 128 px), threshold {t:g}; reference: its "
        "pooled validation histograms. A step hurts when AUROC or balanced accuracy drops by more than "
        f"{HARM} (AdaBN) or the prevalence it prints is off by more than {PREVALENCE_HARM} (EM). Machine: "
        f"{machine()['cpu']}, {args.threads} threads; wall time {time.perf_counter() - started:.0f} s.",
        "",
        "| step | cases | hurt | hurt and refused | missed (hurt, vouched for) | did not hurt | refused anyway |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for step, name in (("em", "EM prevalence"), ("adabn", "AdaBN")):
        m = summary[step]
        lines.append(
            f"| {name} | {m['cases']} | {m['hurt']} | {m['hurt_and_refused']} | {len(m['missed'])} "
            f"{', '.join(m['missed'])} | {m['did_not_hurt']} | {m['did_not_hurt_but_refused']} |"
        )
    lines += [
        "",
        "| site | n | prevalence | EM | misfit / p | EM verdict | AdaBN AUROC | AdaBN BA | rho | AdaBN verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        em, bn, src = r["em"], r["adabn"], r["source"]
        lines.append(
            f"| {r['site']} | {r['n']} | {r['prevalence']:.3f} | {em['prevalence']:.3f} | "
            f"{em['distance']:.3f} / {em['p_value']:.3f} | {'vouched' if em['vouched'] else 'refused'} | "
            f"{src['auroc']:.3f} -> {bn['auroc']:.3f} | {src['balanced_accuracy']:.3f} -> "
            f"{bn['balanced_accuracy']:.3f} | {bn['spearman']:.3f} | {'vouched' if bn['vouched'] else 'refused'} |"
        )
    table = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table)
    write_run(args.out, {"summary": summary, "rows": rows}, started, command=command, extra={"work": str(args.work)})
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The experiment report: ``report.md`` and its figures, readable without the code.

Figures: ``roc.png`` (mean ROC curve of every arm over the folds, all sites' test cases pooled),
``sites.png`` (AUROC and balanced accuracy per site and pooled, with bootstrap intervals) and, when
an arm is federated, ``rounds.png`` (pooled validation AUROC of the global model round by round).
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

import numpy as np

from fedfreeze.evaluation.analysis import POOLED
from fedfreeze.evaluation.bootstrap import METRICS
from fedfreeze.experiment.config import MODES_TEXT, Experiment
from fedfreeze.metrics import auroc

REPORT_FILE = "report.md"
ROC_PLOT = "roc.png"
SITES_PLOT = "sites.png"
ROUNDS_PLOT = "rounds.png"
NAMES = {
    "auroc": "AUROC",
    "balanced_accuracy": "balanced accuracy",
    "f1": "F1",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
}


def format_cell(m: dict[str, Any] | None, ci: bool = True) -> str:
    if not m:
        return "-"
    text = f"{m['mean']:.3f} ± {m['std']:.3f}"
    if ci and np.isfinite(m.get("ci_low", np.nan)):
        text += f" ({m['ci_low']:.3f}–{m['ci_high']:.3f})"
    return text


def format_p(value: float | None, replicates: int | None = None) -> str:
    """``0.031``, ``< 0.001``; a bootstrap p-value at its floor ``1 / (B + 1)`` shows as ``≤`` that floor."""
    if value is None or not np.isfinite(value):
        return "-"
    if replicates is not None and value <= 1.0 / (replicates + 1) + 1e-12:
        return f"≤ {1.0 / (replicates + 1):.4f}"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def p_text(value: float | None, replicates: int | None = None) -> str:
    """``p = 0.031``, ``p < 0.001`` or ``p ≤ 0.0050`` (a bootstrap p-value at its floor)."""
    shown = format_p(value, replicates)
    return f"p {shown}" if shown[0] in "<≤" else f"p = {shown}"


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key in ("model", "train", "federation"):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


# settings an arm of that mode does not use (a federation counts rounds; site training counts epochs)
UNUSED = {
    "federated": ("train.probe-epochs", "train.epochs", "train.unfreeze", "train.method"),
    "site": ("federation.",),
    "pooled": ("federation.",),
}


def arm_differences(summary: dict[str, Any]) -> dict[str, list[str]]:
    """For each arm, the settings it uses in which the arms differ (``key = value``)."""
    flat = {arm: _flatten(spec["config"]) for arm, spec in summary["arms_config"].items()}
    modes = {arm: spec["mode"] for arm, spec in summary["arms_config"].items()}
    keys = sorted({k for f in flat.values() for k in f})
    differing = [k for k in keys if len({repr(f.get(k)) for f in flat.values()}) > 1]
    return {
        arm: [f"`{k} = {f.get(k)}`" for k in differing if not k.startswith(UNUSED[modes[arm]])]
        for arm, f in flat.items()
    }


def write_report(out: Path, exp: Experiment, summary: dict[str, Any], results: dict[str, list[dict[str, Any]]]) -> Path:
    """Write ``report.md`` and the figures into ``out``."""
    figures = [(ROC_PLOT, "Mean ROC curve over folds (all sites' test cases pooled); band: ± 1 SD across folds")]
    plot_roc(out / ROC_PLOT, results)
    plot_sites(out / SITES_PLOT, summary)
    figures.append(
        (
            SITES_PLOT,
            (
                f"AUROC and balanced accuracy per site and pooled: mean over folds with the "
                f"{summary['confidence']:.0%} bootstrap interval"
            ),
        )
    )
    if plot_rounds(out / ROUNDS_PLOT, results):
        figures.append(
            (
                ROUNDS_PLOT,
                (
                    "Federated arms: pooled validation AUROC of the global model after each "
                    "round (sites' validation patients, inside the training folds), "
                    "mean ± SD over folds"
                ),
            )
        )
    text = render(exp, summary, figures)
    path = out / REPORT_FILE
    path.write_text(text, encoding="utf-8")
    return path


def render(exp: Experiment, summary: dict[str, Any], figures: list[tuple[str, str]]) -> str:
    s = exp.settings
    data = summary["data"]
    conf = f"{summary['confidence']:.0%}"
    arms = summary["arms"]
    lines: list[str] = []
    add = lines.append
    planned = summary["folds_planned"]
    finished = summary["folds_finished"]
    add(f"# Experiment report: {Path(exp.source).name}")
    add("")
    add(
        f"Written {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} by `fedfreeze experiment`."
        + (f" Command: `{summary['command']}`." if summary.get("command") else "")
    )
    incomplete = [a for a, n in finished.items() if n < planned]
    if incomplete:
        add("")
        add(
            f"**Incomplete:** {', '.join(f'{a} ({finished[a]}/{planned} folds)' for a in incomplete)}; "
            "run the same command again to continue."
        )
    add("")
    add(
        f"{len(arms)} arm(s) trained and tested on the same folds: {s.repeats} repeat(s) × {s.folds} folds of "
        f"patient-level stratified cross-validation inside each of {len(data['sites'])} site(s); every site keeps "
        f"its own test fold. Figures are the mean ± standard deviation over the {planned} folds, with the "
        f"{conf} bootstrap interval of that mean in brackets."
    )
    add("")
    add("## Data")
    add("")
    names = data["class_names"]
    add(f"`{data['path']}`: {data['images']} images of {data['patients']} patients.")
    add("")
    add("| site | images | patients | " + " | ".join(f"images {n}" for n in names) + " |")
    add("|---|---:|---:|" + "---:|" * len(names))
    for site, info in data["sites"].items():
        counts = " | ".join(str(c) for c in info["class_counts"])
        add(f"| {site} | {info['images']} | {info['patients']} | {counts} |")
    add("")
    add("## Protocol")
    add("")
    add(
        f"- **Folds**: {s.folds}-fold cross-validation repeated {s.repeats} time(s) within each site, split by "
        "patient (all images of a patient on one side), stratified by class; folds are drawn per site and repeat "
        f"(seed {s.seed}), and every arm uses exactly the same folds (see `folds.csv`)."
    )
    if s.test_images == "one-per-patient":
        add(
            "- **One image per patient at test**: each test patient is scored on one image, drawn at random "
            "(fixed per repeat); the patient's other images are used by no one in that fold."
        )
    else:
        add(
            "- **Every image of a test patient is tested**; the bootstrap and DeLong's test treat a patient's "
            "images as one cluster."
        )
    if s.balance_test:
        add(
            "- **Balanced test folds**: each site's test fold holds as many patients of each class (the rarest "
            "class's count, drawn at random); the surplus patients of that fold join its training set."
        )
    add(
        f"- **Threshold metrics** (balanced accuracy, F1, sensitivity, specificity) at a fixed threshold of "
        f"{s.threshold} on the predicted probability, the same for every arm."
    )
    add(
        "- **Pooled** = all sites' test folds scored as one set per fold (one AUROC over every site's cases, "
        "not a mean of site AUROCs). Per-site figures use that site's test fold only."
    )
    add(
        f"- **Intervals**: percentile bootstrap ({s.bootstrap} replicates) resampling patients within each "
        "site × class stratum; a patient's weight applies to all its predictions in every repeat."
    )
    add("")
    add("## Arms")
    add("")
    diffs = arm_differences(summary)
    add("| arm | training | description | settings that differ between arms | seconds per fold | uplink MB per fold |")
    add("|---|---|---|---|---:|---:|")
    for name, spec in summary["arms_config"].items():
        cost = summary.get("cost", {}).get(name, {})
        seconds = f"{cost['seconds_per_fold']:.0f}" if "seconds_per_fold" in cost else "-"
        uplink = f"{cost['uplink_mb_per_fold']:.1f}" if "uplink_mb_per_fold" in cost else "-"
        add(
            f"| **{name}** | {MODES_TEXT[spec['mode']]} | {spec['description'] or '-'} | "
            f"{'<br>'.join(diffs.get(name, [])) or '-'} | {seconds} | {uplink} |"
        )
    add("")
    add("## Results, all sites pooled")
    add("")
    add(f"Mean ± SD over folds ({conf} bootstrap interval).")
    add("")
    add("| arm | folds | " + " | ".join(NAMES[k] for k in METRICS) + " |")
    add("|---|---:|" + "---|" * len(METRICS))
    for arm, scopes in arms.items():
        m = scopes[POOLED]["metrics"]
        add(f"| **{arm}** | {scopes[POOLED]['folds']} | " + " | ".join(format_cell(m.get(k)) for k in METRICS) + " |")
    add("")
    add("## Results per site")
    add("")
    add("| site | arm | " + " | ".join(NAMES[k] for k in METRICS) + " |")
    add("|---|---|" + "---|" * len(METRICS))
    for site in summary["sites"]:
        for arm, scopes in arms.items():
            if site in scopes:
                m = scopes[site]["metrics"]
                add(f"| {site} | {arm} | " + " | ".join(format_cell(m.get(k)) for k in METRICS) + " |")
    add("")
    add("## Paired comparisons")
    add("")
    n_tests = 0
    for comp in summary["comparisons"]:
        first, second = comp["first"], comp["second"]
        pooled = comp["scopes"].get(POOLED)
        if pooled is None:
            continue
        add(f"### {first} − {second}")
        add("")
        d = pooled["delong"]
        add(
            f"AUROC {d['auc_a']:.3f} vs {d['auc_b']:.3f} (mean over {pooled['folds']} folds, pooled): difference "
            f"{d['difference']:+.3f}, {conf} CI {d['ci_low']:+.3f} to {d['ci_high']:+.3f}, z = {d['z']:.2f}, "
            f"**{p_text(d['p_value'])}** ({d['test']})."
        )
        add("")
        add(f"| metric | difference | paired bootstrap {conf} CI | p (paired bootstrap) | p (corrected t-test) |")
        add("|---|---:|---|---:|---:|")
        for k in METRICS:
            m = pooled["metrics"][k]
            b = m["bootstrap"]
            add(
                f"| {NAMES[k]} | {m['difference']:+.3f} | {b['ci_low']:+.3f} to {b['ci_high']:+.3f} | "
                f"{format_p(b['p_value'], b['replicates'])} | {format_p(m['corrected_t']['p_value'])} |"
            )
            n_tests += 2
        n_tests += 1
        add("")
        per_site = [(site, comp["scopes"][site]) for site in summary["sites"] if site in comp["scopes"]]
        if per_site:
            add("Per site, AUROC (DeLong over folds; paired bootstrap):")
            add("")
            add("| site | AUROC first | AUROC second | difference | p (DeLong) | p (bootstrap) |")
            add("|---|---:|---:|---:|---:|---:|")
            for site, c in per_site:
                dd = c["delong"]
                boot_p = format_p(c["metrics"]["auroc"]["bootstrap"]["p_value"], summary["bootstrap_replicates"])
                add(
                    f"| {site} | {dd['auc_a']:.3f} | {dd['auc_b']:.3f} | {dd['difference']:+.3f} | "
                    f"{format_p(dd['p_value'])} | {boot_p} |"
                )
                n_tests += 2
            add("")
    add(
        f"{n_tests} p-values are shown above, none corrected for multiple comparisons: name the comparison "
        "you planned before looking, and treat the others as exploratory."
    )
    add("")
    add("## Figures")
    add("")
    for file, caption in figures:
        add(f"![{caption}]({file})")
        add("")
        add(f"*{caption}.*")
        add("")
    add("## How to read the tests")
    add("")
    add(
        "- **DeLong's test** (DeLong, DeLong & Clarke-Pearson 1988) compares two AUROCs measured on the same "
        "cases, using each case's placement values. Here the compared quantity is the mean AUROC over folds: "
        "each patient's placement terms are summed over the folds (and repeats) that tested it, which reduces to "
        "the classic test for one fold (it reproduces R pROC's `roc.test` z, p and interval on pROC's aSAH "
        "data to 9 significant digits)."
    )
    add(
        "- **Paired bootstrap**: the same resampled patients score both arms, so the interval of the difference "
        "respects the pairing; the p-value is the share of centred replicates at least as far from 0 as the "
        "observed difference."
    )
    add(
        "- Both tests are conditional on the trained models: they say whether the difference could come from "
        "which patients happened to be tested, not whether retraining on other patients would give the same "
        "models. The **corrected resampled t-test** (Nadeau & Bengio 2003; Bouckaert & Frank 2004) on the "
        "per-fold differences also reflects training variability; with few folds it has little power. A plain "
        "paired t-test over cross-validation folds would be anti-conservative (folds share training data), "
        "which is why it is not shown."
    )
    add(
        "- A p-value below 0.05 in one test only is weak evidence; a difference that all three tests support, "
        "with a bootstrap interval that excludes 0, is what a paper can stand on."
    )
    add("")
    add("## Files")
    add("")
    add(
        "`summary.json` (every number above, per fold too), `predictions.csv` (every test prediction of every arm: "
        "re-analyse them with any tool, e.g. pROC), `folds.csv` (which images trained and tested in each fold), "
        "`folds/<fold>/<arm>.json` (each finished result with its training log; a stopped experiment resumes "
        "from these)."
    )
    add("")
    return "\n".join(lines)


# ---------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _roc(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC points (FPR, TPR), one per distinct threshold, from (0, 0) to (1, 1)."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    return np.r_[0.0, fps / max(fps[-1], 1)], np.r_[0.0, tps / max(tps[-1], 1)]


def plot_roc(path: Path, results: dict[str, list[dict[str, Any]]]) -> None:
    plt = _plt()
    grid = np.linspace(0, 1, 101)
    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=100)
    for arm, rs in results.items():
        curves, aucs = [], []
        for r in rs:
            y = np.array(r["predictions"]["label"])
            s = np.array(r["predictions"]["score"])
            if len(set(y.tolist())) < 2:
                continue
            fpr, tpr = _roc(y, s)
            # linear between the ROC points: tied scores give a diagonal segment, whose area is the
            # half credit that ties get in the AUROC
            curves.append(np.interp(grid, fpr, tpr))
            aucs.append(auroc(y, s))
        if not curves:
            continue
        mean, sd = np.mean(curves, axis=0), np.std(curves, axis=0)
        sd_auc = np.std(aucs, ddof=1) if len(aucs) > 1 else 0.0
        (line,) = ax.plot(grid, mean, lw=2, label=f"{arm} (AUROC {np.mean(aucs):.3f} ± {sd_auc:.3f})")
        ax.fill_between(grid, np.clip(mean - sd, 0, 1), np.clip(mean + sd, 0, 1), color=line.get_color(), alpha=0.15)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set(
        xlabel="1 - specificity (false positive rate)",
        ylabel="sensitivity (true positive rate)",
        title="ROC, all sites pooled (mean over folds)",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_sites(path: Path, summary: dict[str, Any]) -> None:
    plt = _plt()
    arms = list(summary["arms"])
    scopes = [POOLED, *summary["sites"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    width = 0.8 / max(len(arms), 1)
    x = np.arange(len(scopes))
    for ax, metric in zip(axes, ("auroc", "balanced_accuracy"), strict=True):
        for i, arm in enumerate(arms):
            means, low, high = [], [], []
            for scope in scopes:
                m = summary["arms"][arm].get(scope, {}).get("metrics", {}).get(metric)
                means.append(m["mean"] if m else np.nan)
                low.append(m["mean"] - m.get("ci_low", m["mean"]) if m else 0)
                high.append(m.get("ci_high", m["mean"]) - m["mean"] if m else 0)
            ax.bar(
                x + (i - (len(arms) - 1) / 2) * width,
                means,
                width,
                label=arm,
                yerr=[np.maximum(low, 0), np.maximum(high, 0)],
                capsize=3,
            )
        ax.set_xticks(x, scopes)
        ax.set_ylim(0.0, 1.05)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{NAMES[metric]} (mean over folds, {summary['confidence']:.0%} bootstrap CI)", fontsize=10)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_rounds(path: Path, results: dict[str, list[dict[str, Any]]]) -> bool:
    """Validation AUROC of the global model per round, for every federated arm; False when there is none."""
    series = {}
    for arm, rs in results.items():
        runs = [r["training"]["rounds"] for r in rs if r["mode"] == "federated" and r["training"].get("rounds")]
        if not runs:
            continue
        length = min(len(run) for run in runs)
        values = np.array(
            [[row["val_auroc"] if row["val_auroc"] is not None else np.nan for row in run[:length]] for run in runs],
            dtype=float,
        )
        series[arm] = (np.arange(length), values)
    if not series:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for arm, (rounds, values) in series.items():
        mean, sd = np.nanmean(values, axis=0), np.nanstd(values, axis=0)
        (line,) = ax.plot(rounds, mean, marker="o", label=arm)
        ax.fill_between(rounds, mean - sd, mean + sd, color=line.get_color(), alpha=0.15)
    ax.set(
        xlabel="global model after round",
        ylabel="pooled validation AUROC",
        title="Federated training, round by round (mean over folds)",
    )
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True

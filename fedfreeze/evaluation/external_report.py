"""The files of an external-validation report: ``evaluation.json``, ``reliability.png``, ``scores.png``.

Both plots are drawn from the result of ``external_validation`` alone (its reliability table and
per-class score histograms), so a benchmark can redraw them from a saved ``evaluation.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

EVALUATION_FILE = "evaluation.json"
RELIABILITY_PLOT = "reliability.png"
SCORES_PLOT = "scores.png"


def write_external_report(folder: str | Path, result: dict[str, Any]) -> list[Path]:
    """Write the three report files into ``folder`` (created if needed); returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / EVALUATION_FILE).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    plot_reliability(result, folder / RELIABILITY_PLOT)
    plot_scores(result, folder / SCORES_PLOT)
    return [folder / EVALUATION_FILE, folder / RELIABILITY_PLOT, folder / SCORES_PLOT]


def plot_reliability(result: dict[str, Any], path: Path) -> None:
    """Observed positive frequency against mean score per bin (marker area ~ cases), with the diagonal."""
    plt = _pyplot()
    calibration = result["calibration"]
    rows = [r for r in calibration["reliability"] if r["count"]]
    fig, (ax, ax_count) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    counts = [r["count"] for r in rows]
    biggest = max(counts) if counts else 1
    ax.plot([r["mean_score"] for r in rows], [r["observed_frequency"] for r in rows], color="tab:blue")
    ax.scatter(
        [r["mean_score"] for r in rows],
        [r["observed_frequency"] for r in rows],
        s=[20 + 180 * c / biggest for c in counts],
        color="tab:blue",
        zorder=3,
        label=f"bins (ECE {calibration['ece']:.3f}, Brier {calibration['brier']:.3f})",
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("observed positive frequency")
    ax.set_title(f"reliability, n={result['n']}")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    every = calibration["reliability"]
    ax_count.bar(
        [(r["lower"] + r["upper"]) / 2 for r in every],
        [r["count"] for r in every],
        width=[0.9 * (r["upper"] - r["lower"]) for r in every],
        color="tab:grey",
    )
    ax_count.set_xlabel("mean score in bin")
    ax_count.set_ylabel("cases")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scores(result: dict[str, Any], path: Path) -> None:
    """Score histograms per class, the stored threshold drawn (and 0.5 dashed when it differs)."""
    plt = _pyplot()
    names = result.get("class_names") or ["class 0", "class 1"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for summary, color in zip(result["score_summary"], ("tab:blue", "tab:red"), strict=False):
        edges, counts = summary["histogram_edges"], summary["histogram_counts"]
        label, name = summary["label"], names[summary["label"]]
        shown = f"label {label}" if name == str(label) else f"{name} (label {label})"
        ax.stairs(counts, edges, fill=True, alpha=0.4, color=color, label=f"{shown}, n={summary['n']}")
        ax.stairs(counts, edges, color=color)
    threshold = result["threshold"]
    ax.axvline(threshold, color="black", label=f"stored threshold {threshold:.3f}")
    if abs(threshold - 0.5) > 1e-9:
        ax.axvline(0.5, color="grey", linestyle="--", label="0.5")
    ax.set_xlim(0, 1)
    recalibrated = result.get("score_calibration")
    how = f"the card's {recalibrated['method']} calibration applied" if recalibrated else "as the model gives it"
    ax.set_xlabel(f"positive-class score ({how})")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt

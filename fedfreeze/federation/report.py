"""The federation's outputs: ``metrics.json``, ``rounds.csv``, ``sites.csv`` and ``rounds.png`` (and, with
``federation.tracking``, the same figures for TensorBoard and MLflow: ``tracking.py``).

``metrics.json`` carries a ``status`` (running, completed, failed with its reason, interrupted with
when and after which round): a run is only a success when it says ``completed``, whatever the
transport reported.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedfreeze.federation.coordinator import Coordinator
from fedfreeze.federation.records import RoundRecord, json_default

METRICS_FILE = "metrics.json"
ROUNDS_CSV = "rounds.csv"
SITES_CSV = "sites.csv"
PLOT_FILE = "rounds.png"


def round_row(record: RoundRecord) -> dict[str, Any]:
    pooled = (record.pooled or {}).get("at_threshold_used", {})
    mean = record.weighted_mean or {}
    sites = record.sites
    train_s = [s.get("train_seconds", 0.0) for s in sites]
    return {
        "round": record.round,
        "evaluated_model": record.evaluated_model,
        "parts": "+".join(record.parts),
        "sites": len(sites),
        "rejected": len(record.rejected),
        "failed": len(record.failures),
        "pooled_auroc": pooled.get("auroc"),
        "pooled_balanced_accuracy": pooled.get("balanced_accuracy"),
        "pooled_f1": pooled.get("f1"),
        "pooled_sensitivity": pooled.get("sensitivity"),
        "pooled_specificity": pooled.get("specificity"),
        "evaluation_sites_auroc": ((record.evaluation_sites or {}).get("at_threshold_used") or {}).get("auroc"),
        "evaluation_sites_balanced_accuracy": ((record.evaluation_sites or {}).get("at_threshold_used") or {}).get(
            "balanced_accuracy"
        ),
        "weighted_mean_auroc": mean.get("auroc"),
        "threshold_used": record.threshold_used,
        "bytes_down": record.bytes_down,
        "bytes_up": record.bytes_up,
        "max_site_train_seconds": max(train_s) if train_s else 0.0,
        "round_seconds": record.round_seconds,
    }


def write_report(
    coord: Coordinator,
    *,
    status: str,
    final: RoundRecord | None = None,
    model_dir: Path | None = None,
    reason: str | None = None,
    exported: dict[str, Any] | None = None,
    interrupted: dict[str, Any] | None = None,
) -> Path:
    """Write every output file for the rounds so far; the plot only once the run has ended."""
    out = coord.out
    out.mkdir(parents=True, exist_ok=True)
    records = list(coord.history) + ([final] if final is not None else [])
    report: dict[str, Any] = {
        "status": status,
        "reason": reason,
        "interrupted": interrupted,
        "completed_rounds": coord.completed,
        "rounds_planned": coord.fed.rounds,
        "resumed_after": coord.resumed_after,  # the rounds before it ran in an earlier process (--resume)
        "threshold": coord.threshold,
        "threshold_rule": str(coord.fed.threshold),
        "model": str(model_dir) if model_dir else None,
        "exported": exported,
        "held_out_check": coord.held_out_check,
        "privacy": next((r.privacy for r in reversed(coord.history) if r.privacy), None),
        "totals": {
            "bytes_down": sum(r.bytes_down for r in records),
            "bytes_up": sum(r.bytes_up for r in records),
            "seconds": time.time() - coord.started,
        },
        "final": asdict(final) if final is not None else None,
        "failed_round": asdict(coord.failed_round) if coord.failed_round is not None else None,
        "rounds": [asdict(r) for r in coord.history],
        "config": coord.cfg.model_dump(by_alias=True),
    }
    tmp = out / (METRICS_FILE + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=json_default) + "\n", encoding="utf-8")
    tmp.replace(out / METRICS_FILE)
    _write_csv(out / ROUNDS_CSV, [round_row(r) for r in records])
    _write_csv(out / SITES_CSV, [{"round": r.round, **site} for r in records for site in r.sites])
    if status != "running" and records:
        plot_rounds(records, out / PLOT_FILE, coord.fed.rounds)
    if coord.tracking is not None:  # federation.tracking: the same figures, to TensorBoard / MLflow
        coord.tracking.export(coord.history, final, status=status, reason=reason)
    return out / METRICS_FILE


# rounds.png's left panel: (rounds.csv column, legend label, line style). Three sources, told apart by
# style: the pooled validation of the training sites (solid), the weighted mean of the sites' own figures
# (dashed: what other frameworks report), the evaluation-only sites, which never train (dotted)
ROUND_LINES = (
    ("pooled_auroc", "pooled validation AUROC", "-"),
    ("pooled_balanced_accuracy", "pooled validation balanced accuracy", "-"),
    ("pooled_f1", "pooled validation F1", "-"),
    ("weighted_mean_auroc", "weighted mean of the sites' own AUROCs", "--"),
    ("evaluation_sites_auroc", "evaluation-only sites: pooled AUROC", ":"),
    ("evaluation_sites_balanced_accuracy", "evaluation-only sites: pooled balanced accuracy", ":"),
)


def rounds_done(metrics: dict[str, Any]) -> str:
    """The rounds a federation ran, as its summary prints them: "6 of 6 rounds (3 probe, 3 fine-tuning)".

    Why not the one count: a run that stopped early (patience, a failure) ran fewer than it planned, a
    resumed run ran only its last rounds in this process (and its seconds count only those), and the
    final evaluation after the last round is no round at all."""
    fed = (metrics.get("config") or {}).get("federation", {})
    done, planned = int(metrics["completed_rounds"]), metrics.get("rounds_planned")
    dual, probe = int(fed.get("dual-rounds", 0)), int(fed.get("probe-rounds", 0))
    kinds = [
        (min(done, dual), "dual-stage"),
        (min(max(done - dual, 0), probe), "probe"),
        (max(done - dual - probe, 0), "fine-tuning"),
    ]
    split = ", ".join(f"{n} {kind}" for n, kind in kinds if n) if fed else ""  # no config: kinds unknown
    after = metrics.get("resumed_after")
    if after:
        ran = f"rounds {after + 1}-{done} in this run" if done > after else "no round in this run"
        split += f"{'; ' if split else ''}{ran}, resumed after round {after}"
    of = f"{done}" if planned is None else f"{done} of {planned}"  # (a metrics.json of an earlier version)
    return f"{of} round{'s' if (done if planned is None else planned) != 1 else ''}" + (f" ({split})" if split else "")


def plot_rounds(records: list[RoundRecord], path: Path, rounds: int) -> None:
    """Pooled validation metrics and bytes per round (each point: the global model a round received)."""
    import matplotlib.pyplot as plt

    fig = rounds_figure(records, rounds)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rounds_figure(records: list[RoundRecord], rounds: int) -> Any:
    """The figure of ``rounds.png`` (a matplotlib ``Figure``), apart from writing it, so a test can read its lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [round_row(r) for r in records]
    x = [r["round"] - 1 for r in rows]  # the round after which the evaluated model was made
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label, style in ROUND_LINES:
        ys = [r[key] for r in rows]
        if any(y is not None for y in ys):
            ax1.plot(x, [float("nan") if y is None else y for y in ys], marker="o", label=label, linestyle=style)
    ax1.set_xlabel("global model after round")
    ax1.set_ylabel("validation metric")
    ax1.set_ylim(0.0, 1.02)
    ax1.legend(loc="lower right", fontsize=8)
    ax1.grid(alpha=0.3)
    train_rows = [r for r in rows if r["round"] <= rounds]  # the final evaluation sends no arrays
    ax2.bar([r["round"] for r in train_rows], [r["bytes_up"] / 1e3 for r in train_rows], color="tab:orange")
    ax2.set_yscale("log")
    ax2.set_xlabel("round")
    ax2.set_ylabel("uplink kB (all sites)")
    for r in train_rows:
        ax2.annotate(
            r["parts"].replace("head+", "").replace("head", "head only"),
            (r["round"], r["bytes_up"] / 1e3),
            fontsize=7,
            ha="center",
            va="bottom",
            rotation=90,
        )
    fig.tight_layout()
    return fig


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)

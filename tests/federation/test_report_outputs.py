"""What a person reads of a federation's report: the rounds counted as they ran, and rounds.png's lines."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt

from fedfreeze.federation.config import load_fed_config
from fedfreeze.federation.records import RoundRecord
from fedfreeze.federation.report import rounds_done, rounds_figure


def metrics(done: int, **extra: Any) -> dict[str, Any]:
    cfg = load_fed_config(None, {"federation.rounds": 6, "federation.probe-rounds": 3})
    return {"completed_rounds": done, "rounds_planned": 6, "config": cfg.model_dump(by_alias=True), **extra}


def test_summary_counts_rounds_by_kind_against_the_plan():
    assert rounds_done(metrics(6)) == "6 of 6 rounds (3 probe, 3 fine-tuning)"
    assert rounds_done(metrics(2)) == "2 of 6 rounds (2 probe)"  # stopped early (patience, a failure)
    assert rounds_done({"completed_rounds": 2}) == "2 rounds"  # a metrics.json without the plan


def test_summary_of_a_resumed_run_says_which_rounds_this_run_ran():
    assert rounds_done(metrics(6, resumed_after=4)) == (
        "6 of 6 rounds (3 probe, 3 fine-tuning; rounds 5-6 in this run, resumed after round 4)"
    )


def record(rnd: int, pooled: float, mean: float, held_out: float) -> RoundRecord:
    return RoundRecord(
        round=rnd,
        parts=["head"],
        pooled={"at_threshold_used": {"auroc": pooled, "balanced_accuracy": pooled - 0.1, "f1": pooled - 0.2}},
        weighted_mean={"auroc": mean},
        evaluation_sites={"at_threshold_used": {"auroc": held_out, "balanced_accuracy": held_out - 0.1}},
        bytes_up=1000,
    )


def test_rounds_png_draws_pooled_weighted_mean_and_evaluation_only_sites_apart():
    fig = rounds_figure([record(1, 0.8, 0.75, 0.7), record(2, 0.85, 0.8, 0.72)], rounds=2)
    try:
        lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
        legend = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    finally:
        plt.close(fig)
    assert sorted(legend) == sorted(lines)  # every line labelled in the legend
    pooled, mean, held_out = (
        lines["pooled validation AUROC"],
        lines["weighted mean of the sites' own AUROCs"],
        lines["evaluation-only sites: pooled AUROC"],
    )
    assert list(held_out.get_ydata()) == [0.7, 0.72] and list(mean.get_ydata()) == [0.75, 0.8]
    assert len({pooled.get_linestyle(), mean.get_linestyle(), held_out.get_linestyle()}) == 3

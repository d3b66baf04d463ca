"""How sure a pooled figure is (federation/estimates.py) and the common grid of cell edges
(evaluation/cells.py): the digits a figure is shown with, whether export-best may choose on it, the
round line, and where sites cut their cells first."""

from __future__ import annotations

import numpy as np
import pytest

from fedfreeze.evaluation.cells import common_edges, release_cells
from fedfreeze.federation.estimates import decimals_for, decisive, figure_text, round_line
from fedfreeze.federation.records import RoundRecord


def test_decimals_follow_the_range() -> None:
    assert [decimals_for(w) for w in (None, 0.0, 0.5, 0.05, 0.049, 0.005, 0.0004)] == [4, 4, 2, 2, 2, 3, 4]


def test_an_estimate_is_shown_beside_its_range_and_an_exact_figure_alone() -> None:
    figures = {"auroc": 0.98642, "ranges": {"auroc": [0.484, 1.0]}}
    assert figure_text(figures, "auroc") == "0.99 (0.48-1.00)"
    assert figure_text(figures, "auroc", exact=True) == "0.9864"
    assert figure_text({"auroc": 0.98642, "ranges": {"auroc": [0.9864, 0.9864]}}, "auroc") == "0.9864"
    assert figure_text({}, "auroc") == "n/a"


def pooled(width: float, min_cell_count: int = 5, secure: bool = False) -> dict:
    cells: dict = {"min_cell_count": 1 if secure else min_cell_count}
    if secure:
        cells["secure_sum"] = {"sites": ["a", "b", "c"], "dropped": []}
    at = {"auroc": 0.95, "balanced_accuracy": 0.9, "f1": 0.9, "ranges": {"auroc": [0.95 - width, 0.95]}}
    return {"at_threshold_used": at, "cells": cells}


def test_export_best_chooses_only_on_decisive_figures() -> None:
    assert decisive(pooled(0.04), 0.05) and not decisive(pooled(0.3), 0.05)
    assert decisive(pooled(0.3, secure=True), 0.05) and decisive(pooled(0.3, min_cell_count=1), 0.05)
    assert decisive({"at_threshold_used": {"accuracy": 0.8}, "cells": {"min_cell_count": 5}}, 0.05)  # no range
    assert not decisive(None, 1.0)


def test_the_round_line_says_where_its_figures_come_from() -> None:
    record = RoundRecord(round=3, parts=["head"], pooled=pooled(0.52), threshold_used=0.5, evaluated_model="m")
    line = round_line(record)
    assert "validation AUROC 0.95 (0.43-0.95)" in line and "0.9500" not in line
    assert "[estimates from cells of >= 5 cases" in line and "weighted mean" not in line
    record.pooled = pooled(0.52, secure=True)
    record.weighted_mean = {"auroc": 0.97, "from": "exact figures shared by 1 of 3 sites"}
    line = round_line(record, final=True)
    assert line.startswith("final evaluation, m: validation AUROC 0.9500, balanced acc 0.9000")
    assert "[exact: secure sum of 3 sites]" in line
    assert "(weighted mean of the exact figures shared by 1 of 3 sites: AUROC 0.9700)" in line


def test_anchors_are_tried_in_order_and_kept_where_they_leave_no_small_part() -> None:
    row = np.zeros(20, dtype=np.int64)
    row[[2, 3, 4, 5, 6, 12, 13, 14, 15, 16, 17]] = 1  # 5 cases low, 6 high
    table = np.stack([row, np.zeros(20, dtype=np.int64)])
    cells = release_cells(table, 3, anchors=[[10, 14, 8], [10]])
    # 10 splits 5 | 6; 14 would leave 2 in [10, 14): skipped; 8 leaves [8, 10) empty: kept
    starts = [s for s, _, _ in cells.cells_of(0)]
    assert 10 in starts and 8 in starts and 14 not in starts
    assert all(n == 0 or n >= 3 for _, _, n in cells.cells_of(0))
    # kept all at once or not at all (the rule before), 14 would have dropped every anchor
    assert 10 in [s for s, _, _ in release_cells(table, 3, anchors=[[10], [10]]).cells_of(0)]


def test_common_edges_split_the_pooled_scores_where_they_are_median_first() -> None:
    pooled_counts = np.zeros(200)
    pooled_counts[120:160] = 5.0  # every score in bins 120..159
    edges = common_edges(pooled_counts, quantiles=4)
    assert edges[0] == 140 and sorted(edges) == [130, 140, 150]  # the median first, then the quartiles
    assert all(120 < e <= 160 for e in common_edges(pooled_counts))
    assert common_edges(np.zeros(200)) == []
    with pytest.raises(ValueError, match="non-negative finite counts"):
        common_edges(np.array([1.0, -1.0, 2.0]))

"""The README demo's round lines (``fedfreeze/configs/fed-demo.toml`` on the shipped sites and held-out
patients, in process): each pooled AUROC estimated from cells is printed beside the range its cells
allow, to no more decimals than that range supports, and the printed estimate never swings between
rounds by more than the ranges it is printed with (issue 26: it swung 0.96, 0.77, 0.98, 0.82, 0.97
while the model barely changed, printed to four decimals without its range)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from fedfreeze.federation.config import SHIPPED_CONFIGS
from fedfreeze.federation.estimates import decimals_for
from tests.federation.conftest import Lines, held_out_site
from tests.federation.test_federation_inprocess import node_configs, run

pytestmark = pytest.mark.slow

LINE = re.compile(r"^(round \d+|final evaluation)\b.*?: validation AUROC (\d\.\d+)(?: \((\d\.\d+)-(\d\.\d+)\))?")


def test_the_demos_round_lines_show_no_swing_larger_than_their_ranges(tmp_path: Path, site_folders):
    nodes = node_configs(site_folders, tmp_path / "state")
    nodes[4] = {
        "data-path": str(held_out_site(tmp_path / "held-out")),
        "site-name": "held-out",
        "state-dir": str(tmp_path / "ho"),
    }
    logger = logging.getLogger("fedfreeze")
    lines, level = Lines(logging.INFO), logger.level
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    try:
        metrics = run(tmp_path / "out", SHIPPED_CONFIGS / "fed-demo.toml", nodes)
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    assert metrics["status"] == "completed", metrics["reason"]
    printed = [m.groups() for m in map(LINE.match, lines.lines) if m]
    assert len(printed) == metrics["completed_rounds"] + 1 == 7, lines.lines
    estimates = []
    for label, value, lo, hi in printed:
        assert lo is not None, f"{label}: an estimate from cells printed without its range"
        width = float(hi) - float(lo)
        decimals = len(value.split(".")[1])
        assert decimals == decimals_for(width) and (decimals < 4 or width < 0.001), (label, value, lo, hi)
        estimates.append((float(value), width))
    # from the first aggregated model on (round 1 scores the untrained head)
    for (before, w_before), (after, w_after) in zip(estimates[1:], estimates[2:], strict=False):
        assert abs(after - before) <= min(w_before, w_after), (estimates, lines.lines)

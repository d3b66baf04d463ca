"""``fedfreeze experiment``: its parser, and the handler that hands the harness the in-process runner."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedfreeze.cli.options import FORCE_HELP, OUTSIDE_HELP, Subcommands


def _experiment(args: argparse.Namespace) -> int:
    from fedfreeze.experiment.command import run_experiment_command
    from fedfreeze.flower.inprocess import run_in_process

    return run_experiment_command(args, run_federation=run_in_process)


def add_parser(sub: Subcommands) -> None:
    """``experiment``."""
    p = sub.add_parser(
        "experiment", help="compare named arms on the same repeated patient-level CV folds; paired tests and a report"
    )
    p.add_argument("--config", required=True, type=Path, help="exp.toml: [experiment], shared tables, [arms.NAME]")
    p.add_argument("--out", required=True, type=Path, help="run folder (written aside, published when the report is)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a stopped experiment (its finished folds are kept), or add to a finished one",
    )
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.add_argument("--data", default=None, help="overrides experiment.data")
    p.add_argument("--allow-outside-paths", action="store_true", help=OUTSIDE_HELP)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the finished folds only")
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads for training (1 is fastest on a busy machine)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_experiment)

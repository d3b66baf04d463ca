"""``fedfreeze experiment``: the command's body (the parser lives in ``fedfreeze.cli``)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fedfreeze.evaluation.analysis import POOLED
from fedfreeze.evaluation.bootstrap import METRICS
from fedfreeze.experiment.report import NAMES, REPORT_FILE, format_cell, p_text

if TYPE_CHECKING:
    from fedfreeze.experiment.runner import FederationRunner


def run_experiment_command(args: argparse.Namespace, *, run_federation: FederationRunner) -> int:
    """Run the experiment ``args`` name; federated arms run through ``run_federation`` (from ``fedfreeze.cli``)."""
    from fedfreeze.experiment.config import load_experiment
    from fedfreeze.experiment.runner import run_experiment

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    exp = load_experiment(args.config, data_override=args.data)
    command = "fedfreeze " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    summary = run_experiment(
        exp,
        args.out,
        device=args.device,
        progress=not args.quiet,
        train=not args.report_only,
        command=command,
        force=args.force,
        resume=args.resume,
        outside_paths=args.allow_outside_paths,
        run_federation=run_federation,
    )
    print_summary(summary, Path(args.out))
    return 0


def print_summary(summary: dict, out: Path) -> None:
    print(
        f"\nexperiment: {len(summary['arms'])} arm(s), folds finished "
        + ", ".join(f"{a} {n}/{summary['folds_planned']}" for a, n in summary["folds_finished"].items())
    )
    print(f"pooled over sites, mean ± SD over folds ({summary['confidence']:.0%} bootstrap CI):")
    for arm, scopes in summary["arms"].items():
        m = scopes[POOLED]["metrics"]
        print(f"  {arm}")
        for key in METRICS:
            print(f"    {NAMES[key]:<18} {format_cell(m.get(key))}")
    for comp in summary["comparisons"]:
        pooled = comp["scopes"].get(POOLED)
        if pooled:
            d = pooled["delong"]
            b = pooled["metrics"]["auroc"]["bootstrap"]
            print(
                f"  {comp['first']} - {comp['second']}: AUROC {d['difference']:+.3f}, DeLong {p_text(d['p_value'])}, "
                f"paired bootstrap {p_text(b['p_value'], b['replicates'])}"
            )
    print(f"report: {out / REPORT_FILE}")

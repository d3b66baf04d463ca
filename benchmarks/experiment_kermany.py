"""A paper-style experiment on real chest X-rays: federated Lite0, pretrained vs random init, and
linear probing + progressive unfreezing vs full fine-tuning, with paired tests and a report.

Data: Kermany paediatric chest X-rays (../shared/data/kermany_cxr_224), patients drawn at random
and dealt to 3 hospital sites: ``--per-class`` patients of each class per site, at most
``--max-images`` images per patient (pneumonia patients have up to dozens). Protocol and arms:
``benchmarks/experiment-kermany.toml``. The report (Markdown and figures) is copied to
``benchmarks/results/experiment-kermany/`` with the command that made it.

    .venv/bin/python benchmarks/experiment_kermany.py [--per-class 60] [--threads 1] [--out runs/experiment-kermany]

Run it again with the same arguments to continue a stopped run.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

REPORT_FILES = ("report.md", "roc.png", "sites.png", "rounds.png")


def make_manifest(out: Path, sites: int, per_class: int, max_images: int, seed: int) -> Path:
    """``sites`` x ``per_class`` patients of each class, dealt to sites at random, with a site column."""
    from common import KERMANY

    source = KERMANY / "manifest.csv"
    if not source.is_file():
        raise SystemExit(f"benchmark data not found: {source} (set FEDFREEZE_SHARED_DATA)")
    rows = list(csv.DictReader(source.open()))
    images: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        images.setdefault(r["patient_id"], []).append(r)
    rng = np.random.default_rng(seed)
    chosen: list[tuple[str, str]] = []  # (patient, site)
    for label in ("0", "1"):
        pool = sorted(p for p, rs in images.items() if rs[0]["label"] == label)
        picked = [pool[i] for i in rng.permutation(len(pool))[: sites * per_class]]
        chosen += [(pid, f"site-{i % sites + 1}") for i, pid in enumerate(picked)]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient_id", "site"])
        for pid, site in sorted(chosen, key=lambda x: (x[1], x[0])):
            for r in sorted(images[pid], key=lambda r: r["path"])[:max_images]:
                writer.writerow([str(KERMANY / r["path"]), r["label"], pid, site])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=HERE / "experiment-kermany.toml")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=60, help="patients of each class per site")
    parser.add_argument("--max-images", type=int, default=3, help="images per patient at most")
    parser.add_argument("--seed", type=int, default=0, help="which patients are drawn")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    parser.add_argument("--out", type=Path, help="work folder (default: runs/<config name>)")
    parser.add_argument(
        "--results",
        help="where the report is copied (default: benchmarks/results/<config name>; '' : not copied)",
    )
    args = parser.parse_args()
    if args.out is None:
        args.out = HERE.parent / "runs" / args.config.stem
    if args.results is None:
        args.results = str(HERE / "results" / args.config.stem)

    import torch

    from fedfreeze.experiment.command import print_summary
    from fedfreeze.experiment.config import load_experiment
    from fedfreeze.experiment.runner import run_experiment
    from fedfreeze.flower.inprocess import run_in_process

    torch.set_num_threads(args.threads)
    manifest = make_manifest(args.out / "data" / "manifest.csv", args.sites, args.per_class, args.max_images, args.seed)
    exp = load_experiment(args.config, data_override=manifest)
    command = "python benchmarks/experiment_kermany.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    started = time.perf_counter()
    summary = run_experiment(
        exp,
        args.out / "run",
        progress=True,
        command=command.strip(),
        resume=True,
        outside_paths=True,  # the manifest names the shared data set; a stopped run continues
        run_federation=run_in_process,
    )
    wall = time.perf_counter() - started
    print_summary(summary, args.out / "run")
    print(
        f"wall time of this invocation: {wall / 60:.1f} min; training time of all folds and arms: "
        f"{summary['seconds']['training_total'] / 60:.1f} min"
    )
    if args.results:
        results = Path(args.results)
        results.mkdir(parents=True, exist_ok=True)
        for name in REPORT_FILES:
            if (args.out / "run" / name).is_file():
                shutil.copy2(args.out / "run" / name, results / name)
        shutil.copy2(args.config, results / args.config.name)
        from common import git_state, write_run

        record = results / "run.json"
        previous = json.loads(record.read_text()) if record.is_file() else {}
        invocations = previous.get("invocations", []) + [
            {"wall_seconds": wall, "trained": summary["trained_now"], "git": git_state()}
        ]
        write_run(
            results,
            None,
            started,
            command=command.strip(),
            extra={
                "results": "report.md",
                "threads": args.threads,
                "invocations": invocations,
                "training_seconds_all_results": summary["seconds"]["training_total"],
                "data": summary["data"],
                "folds_finished": summary["folds_finished"],
            },
        )
        print(f"report copied to {results}")


if __name__ == "__main__":
    main()

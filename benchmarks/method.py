"""The method section's figures (docs/site-training.md): BatchNorm statistics frozen vs updated,
the default learning rates (the seed method's / 5) vs the seed's, and Lite0 from scratch.

Every arm is the real command line (``fedfreeze site-train``, then ``fedfreeze evaluate`` where a
held-out score is needed) on the data that ships with the project
(``fedfreeze/sample_data/kermany_mini``: 300 training images, 100 held-out images of other patients):

* ``frozen-bn`` (the shipped ``site-demo.toml``: ImageNet Lite0, 160 px, 10 probe + 3 fine-tuning
  epochs, the default learning rates, BatchNorm statistics frozen as ``bn-stats = "auto"`` does with
  pretrained weights), ``updated-bn`` (the same, ``bn-stats = "update"``) and ``seed-lr`` (the same,
  the seed method's learning rates, 5x the defaults): 3-fold patient-level cross-validation on the
  same folds, no refit; mean ± std over folds at threshold 0.5;
* ``scratch-update`` and ``scratch-frozen``: Lite0 from random weights at 96 px, every group
  training for 6 epochs (no probe), BatchNorm statistics updated (what ``"auto"`` does from random
  weights) or frozen at their initial values; 2-fold cross-validation, a refit on all 300 images,
  and the refit model scored on the 100 held-out images (AUROC, and the spread of its scores).

    .venv/bin/python benchmarks/method.py [--threads 1] [--arms frozen-bn,updated-bn,...]

Figures: ``benchmarks/results/method/`` (``results.json``: each arm's config, cross-validated
summary and folds, held-out evaluation; ``run.json``: command, commit, machine, wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, write_run  # noqa: E402

DATA = ROOT / "fedfreeze" / "sample_data" / "kermany_mini"
SITE_DEMO = (ROOT / "fedfreeze" / "configs" / "site-demo.toml").read_text()
NO_REFIT = "\nrefit = false\n"
SCRATCH = """[model]
backbone = "efficientnet_lite0"
weights = "none"
input-size = 96

[train]
probe-epochs = 0
epochs = 6
unfreeze = {{ stem = 0.0, layer1 = 0.0, layer2 = 0.0, layer3 = 0.0, layer4 = 0.0 }}
lr = {{ head = 1e-3, layer4 = 1e-3, layer3 = 1e-3, layer2 = 1e-3, layer1 = 1e-3, stem = 1e-3 }}
batch-size = 32
bn-stats = "{bn}"

[cv]
folds = 2
"""

ARMS: dict[str, dict[str, Any]] = {
    "frozen-bn": {"config": SITE_DEMO.replace("[train]\n", '[train]\nbn-stats = "frozen"\n') + NO_REFIT},
    "updated-bn": {"config": SITE_DEMO.replace("[train]\n", '[train]\nbn-stats = "update"\n') + NO_REFIT},
    "seed-lr": {
        "config": re.sub(
            r"(?m)^lr = .*$",
            "lr = { head = 1e-3, layer4 = 5e-4, layer3 = 2.5e-4, layer2 = 1e-4 }   # the seed method's rates",
            SITE_DEMO,
        )
        + NO_REFIT
    },
    "scratch-update": {"config": SCRATCH.format(bn="update"), "held_out": True},
    "scratch-frozen": {"config": SCRATCH.format(bn="frozen"), "held_out": True},
}

# the arms must differ from the shipped config in what they say (a changed site-demo.toml would otherwise
# silently turn an arm into a copy of another)
assert all(SITE_DEMO + NO_REFIT != ARMS[a]["config"] for a in ("frozen-bn", "updated-bn", "seed-lr"))
assert SITE_DEMO.rstrip().endswith("repeats = 1"), "site-demo.toml no longer ends with its [cv] table"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def fedfreeze(args: list[str], threads: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run(
        [sys.executable, "-m", "fedfreeze", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"fedfreeze {' '.join(args)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {list(ARMS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each command (default 1)")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a new temporary one)")
    parser.add_argument(
        "--results", default=None, help="results folder (default benchmarks/results/method; '' : not written)"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="fedfreeze-method-"))
    work.mkdir(parents=True, exist_ok=True)
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; known: {list(ARMS)}")
    results: dict[str, Any] = {}
    for name in arms:
        arm = ARMS[name]
        config = work / f"{name}.toml"
        config.write_text(arm["config"])
        out = work / name
        log(f"{name}: site-train ...")
        t0 = time.perf_counter()
        fedfreeze(
            ["site-train", "--config", str(config), "--data", str(DATA / "train.csv"), "--out", str(out), "--quiet"],
            args.threads,
        )
        report = json.loads((out / "metrics.json").read_text())
        entry: dict[str, Any] = {
            "config": arm["config"],
            "summary": report["summary"],
            "folds": report.get("folds"),
            "site_train_seconds": time.perf_counter() - t0,
        }
        if arm.get("held_out"):
            done = fedfreeze(
                ["evaluate", "--model", str(out), "--data", str(DATA / "test.csv"), "--json"], args.threads
            )
            held = json.loads(done.stdout)
            entry["held_out"] = {
                k: held.get(k) for k in ("auroc", "balanced_accuracy", "sensitivity", "specificity", "n", "threshold")
            }
            entry["held_out"]["ci"] = held.get("ci")
            entry["held_out"]["score_summary"] = held.get("score_summary")
        results[name] = entry
        s = report["summary"]
        log(
            f"{name}: CV AUROC {s['auroc']['mean']:.3f} ± {s['auroc']['std']:.3f}, balanced accuracy "
            f"{s['balanced_accuracy']['mean']:.3f} ± {s['balanced_accuracy']['std']:.3f}"
            + (f"; held-out AUROC {entry['held_out']['auroc']:.3f}" if "held_out" in entry else "")
            + f" ({entry['site_train_seconds']:.0f} s)"
        )
    figures = {
        "setup": {
            "data": str(DATA.relative_to(ROOT)),
            "training_images": 300,
            "held_out_images": 100,
            "threads": args.threads,
            "arms": arms,
        },
        "arms": results,
    }
    if args.results != "":
        out = write_run(Path(args.results) if args.results else RESULTS / "method", figures, started)
        log(f"results: {out}/results.json, run.json")


if __name__ == "__main__":
    main()

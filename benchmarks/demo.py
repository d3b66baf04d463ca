"""The README's demo, recorded: the federation of ``scripts/demo.sh`` and the federated model on the
held-out patients, with its printed output and figures kept in a results folder.

Runs the two commands ``scripts/demo.sh`` runs after its set-up (keep them in step with it):

    fedfreeze simulate --config fed-demo.toml --out WORK/fed-demo --evaluation-site held-out=.../test.csv
    fedfreeze evaluate --model WORK/fed-demo/model --data .../test.csv

    .venv/bin/python benchmarks/demo.py [--work /tmp/fedfreeze-demo]

Figures: ``benchmarks/results/demo/``: ``output.txt`` (what the two commands printed, the lines
the README quotes), ``results.json`` (rounds, uplink, wall time, pooled validation and held-out
figures, the size of the head that travels in probe rounds, the held-out set's images and
patients) and ``run.json`` (command, commit, machine, wall time).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, write_run  # noqa: E402

DATA = ROOT / "fedfreeze" / "sample_data" / "kermany_mini"
FEDFREEZE = [sys.executable, "-m", "fedfreeze"]
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the colours of Flower's log lines


def run(args: list[str]) -> str:
    print("$ fedfreeze " + " ".join(args), flush=True)
    done = subprocess.run([*FEDFREEZE, *args], cwd=ROOT, capture_output=True, text=True, check=False)
    text = done.stdout + done.stderr
    print(text, flush=True)
    if done.returncode != 0:
        raise SystemExit(f"fedfreeze {args[0]} failed (exit {done.returncode})")
    return text


def head_parameters(config: Path) -> int:
    import tomllib

    from fedfreeze.config import ModelConfig
    from fedfreeze.models.registry import build_model

    model_table = tomllib.loads(config.read_text())["model"]
    cfg = ModelConfig(**{k.replace("-", "_"): v for k, v in model_table.items()})
    model, _ = build_model(cfg)
    return sum(p.numel() for p in model.head.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a new temporary one)")
    parser.add_argument(
        "--results", default=None, help="results folder (default benchmarks/results/demo; '' : not written)"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="fedfreeze-demo-"))
    out = work / "fed-demo"
    if out.exists():
        shutil.rmtree(out)  # a fresh federation, as the demo's first run
    test = DATA / "test.csv"
    printed = run(["simulate", "--config", "fed-demo.toml", "--out", str(out), "--evaluation-site", f"held-out={test}"])
    printed += "\n$ fedfreeze evaluate --model OUT/model --data .../test.csv\n"
    printed += run(["evaluate", "--model", str(out / "model"), "--data", str(test)])
    held = json.loads(run(["evaluate", "--model", str(out / "model"), "--data", str(test), "--json"]))
    metrics = json.loads((out / "metrics.json").read_text())
    rows = list(csv.DictReader(test.open()))
    config = ROOT / "fedfreeze" / "configs" / "fed-demo.toml"
    figures: dict[str, Any] = {
        "setup": {
            "config": str(config.relative_to(ROOT)),
            "held_out_images": len(rows),
            "held_out_patients": len({r["patient_id"] for r in rows}),
            "head_parameters": head_parameters(config),
        },
        "federation": {
            "completed_rounds": metrics.get("completed_rounds"),
            "totals": metrics.get("totals"),
            "uplink_mb": sum(r["bytes_up"] for r in metrics["rounds"]) / 1e6,
            "final": metrics.get("final"),
        },
        "held_out_evaluation": {k: v for k, v in held.items() if k not in ("model", "data")},
    }
    if args.results != "":
        folder = Path(args.results) if args.results else RESULTS / "demo"
        write_run(folder, figures, started)
        text = ANSI.sub("", printed).replace(str(out), "runs/fed-demo").replace(str(ROOT) + "/", "")
        (folder / "output.txt").write_text(text)
        print(f"results: {folder}/results.json, output.txt, run.json")


if __name__ == "__main__":
    main()

"""Partial exchange vs full-model FedAvg: uplink bytes, seconds per round and pooled AUROC, in one run.

Arms on the same sites, rounds and seeds, each through the real ServerApp loop and ClientApp
with real serialised messages (``LocalGrid`` stands in for the SuperLink, the same for every arm):

* ``blocks``: fedfreeze's schedule, probe rounds (head only) then layer4 unfrozen and exchanged;
* ``adapters``: the same schedule, but layer4 and layer3 train low-rank adapters instead;
* ``top``: the same schedule with ``model.top-group``: after the probe rounds only Lite0's final 1x1
  ``conv_head`` (the group ``top``, 412k of layer4's 2.67M parameters) trains and travels;
* ``full``: full-model FedAvg, what a Flower user would otherwise write: every layer trains from
  round 1 and travels every round. The training recipe is otherwise the same (learning rates,
  BatchNorm statistics kept frozen, augmentation), so the comparison isolates freezing and partial
  exchange. (With BatchNorm statistics updated and averaged, Lite0's TensorFlow momentum of 0.01
  left the statistics far from the weights in 8 short rounds: pooled AUROC 0.61 in a first run.)

Data: real Kermany chest X-rays from ../shared/data, split by patient into sites, plus a held-out
test set of other patients.

    .venv/bin/python benchmarks/fed_bytes.py [--sites 3] [--per-site 150] [--rounds 8] [--size 160] [--threads 1]

Figures: ``benchmarks/results/fed-bytes/`` (``results.json``: per arm uplink in bytes and MB, its
ratio to the full arm's, seconds per round, pooled validation and held-out test AUROC; ``run.json``:
command, commit, machine, wall time).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARMS = {
    "blocks": """
[federation]
unfreeze = { layer4 = 0.0 }
method = "unfreeze"
""",
    "adapters": """
[train]
adapter-rank = 8
[federation]
unfreeze = { layer4 = 0.0, layer3 = 0.0 }
method = "adapters"
""",
    "top": """
[model]
top-group = true
[train]
lr = { top = 1e-4 }
[federation]
unfreeze = { top = 0.0 }
method = "unfreeze"
""",
    "full": """
[train]
lr = { layer1 = 2e-5, stem = 2e-5 }
[federation]
probe-rounds = 0
unfreeze = { stem = 0.0, layer1 = 0.0, layer2 = 0.0, layer3 = 0.0, layer4 = 0.0 }
method = "unfreeze"
""",
}

COMMON = """
[model]
input-size = {size}
[train]
batch-size = 32
lr = {{ head = 2e-4, layer4 = 1e-4, layer3 = 5e-5, layer2 = 2e-5 }}
[federation]
rounds = {rounds}
probe-rounds = {probe}
probe-local-epochs = 10
local-epochs = 1
min-sites = {sites}
"""


def merge_toml(common: str, arm: str) -> str:
    import tomllib

    from fedfreeze.federation.config import merge

    data = merge(tomllib.loads(common), tomllib.loads(arm))
    lines = []
    for table, values in data.items():
        lines.append(f"[{table}]")
        for key, value in values.items():
            lines.append(f"{key} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def toml_value(value: object) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def make_sites(root: Path, sites: int, per_site: int, test: int, seed: int) -> tuple[list[Path], Path]:
    """Patient-disjoint site manifests and a test manifest from the shared Kermany set."""
    from common import KERMANY

    rows = list(csv.DictReader((KERMANY / "manifest.csv").open()))
    rng = np.random.default_rng(seed)
    patients = sorted({r["patient_id"] for r in rows})
    rng.shuffle(patients)
    by_patient: dict[str, list[dict]] = {}
    for r in rows:
        by_patient.setdefault(r["patient_id"], []).append(r)
    chosen: list[list[dict]] = [[] for _ in range(sites + 1)]
    quota = [per_site] * sites + [test]
    target = 0
    for pid in patients:
        while target < len(quota) and len(chosen[target]) >= quota[target]:
            target += 1
        if target == len(quota):
            break
        chosen[target] += by_patient[pid][: quota[target] - len(chosen[target])]
    paths = []
    for i, picked in enumerate(chosen):
        folder = root / (f"site-{i}" if i < sites else "test")
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "manifest.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label", "patient_id"])
            for r in picked:
                writer.writerow([str(KERMANY / r["path"]), r["label"], r["patient_id"]])
        paths.append(folder)
    return paths[:-1], paths[-1]


def run_arm(name: str, config: Path, sites: list[Path], out: Path) -> dict:
    from flwr.app import Context, RecordDict

    from client.app import app as client_app
    from fedfreeze.flower.federate import run_federation
    from fedfreeze.flower.local_grid import LocalGrid

    nodes = {
        i + 1: {"data-path": str(folder), "site-name": folder.name, "state-dir": str(out / "state" / folder.name)}
        for i, folder in enumerate(sites)
    }
    run_config = {"config": str(config), "out-dir": str(out)}
    started = time.perf_counter()
    run_federation(
        LocalGrid(client_app, nodes, run_config),
        Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config),
    )
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["wall_seconds"] = time.perf_counter() - started
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--per-site", type=int, default=150)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--probe-rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--arms", default="blocks,adapters,full")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a new temporary one)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--results", default=None, help="results folder (default benchmarks/results/fed-bytes; '' : not written)"
    )
    args = parser.parse_args()

    import torch
    from common import RESULTS, write_run

    from fedfreeze.evaluate import evaluate_model

    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)

    root = args.out or Path(tempfile.mkdtemp(prefix="fed-bytes-"))
    sites, test = make_sites(root / "data", args.sites, args.per_site, args.test, seed=0)
    common = COMMON.format(size=args.size, rounds=args.rounds, probe=args.probe_rounds, sites=args.sites)
    results = {}
    for name in args.arms.split(","):
        config = root / f"{name}.toml"
        config.write_text(merge_toml(common, ARMS[name]))
        print(f"running {name} ...", flush=True)
        metrics = run_arm(name, config, sites, root / name)
        held_out = evaluate_model(metrics["model"], test / "manifest.csv")
        rounds = metrics["rounds"]
        results[name] = {
            "uplink_bytes": sum(r["bytes_up"] for r in rounds),
            "uplink_mb": sum(r["bytes_up"] for r in rounds) / 1e6,
            "uplink_per_round": [r["bytes_up"] for r in rounds],
            "seconds_per_round": float(np.mean([r["round_seconds"] for r in rounds])),
            "pooled_val_auroc": metrics["final"]["pooled"]["at_threshold_used"]["auroc"],
            "test_auroc": held_out["auroc"],
            "test_balanced_accuracy": held_out["balanced_accuracy"],
            "wall_seconds": metrics["wall_seconds"],
        }
        print(json.dumps(results[name]), flush=True)

    full = results.get("full")
    print(
        f"\n{args.sites} sites x {args.per_site} Kermany images, {args.rounds} rounds "
        f"({args.probe_rounds} probe for the fedfreeze arms), {args.size} px, EfficientNet-Lite0; "
        f"held-out test: {args.test} images of other patients"
    )
    print(
        f"{'arm':<10} {'uplink MB':>10} {'vs full':>8} {'probe round B':>14} {'vs full':>9} {'s/round':>8} "
        f"{'pooled AUROC':>13} {'test AUROC':>11}"
    )
    for name, r in results.items():
        probe_bytes = r["uplink_per_round"][0]
        ratio = f"{full['uplink_bytes'] / r['uplink_bytes']:.1f}x" if full else "-"
        probe_ratio = f"{full['uplink_per_round'][0] / probe_bytes:.0f}x" if full else "-"
        print(
            f"{name:<10} {r['uplink_bytes'] / 1e6:>10.2f} {ratio:>8} {probe_bytes:>14,} {probe_ratio:>9} "
            f"{r['seconds_per_round']:>8.1f} {r['pooled_val_auroc']:>13.4f} {r['test_auroc']:>11.4f}"
        )
    if full:
        for r in results.values():
            r["uplink_ratio_vs_full"] = full["uplink_bytes"] / r["uplink_bytes"]
            r["probe_round_ratio_vs_full"] = full["uplink_per_round"][0] / r["uplink_per_round"][0]
    (root / "results.json").write_text(json.dumps(results, indent=2))
    print(f"(outputs in {root})")
    if args.results != "":
        setup = {k: getattr(args, k) for k in ("sites", "per_site", "test", "rounds", "probe_rounds", "size", "arms")}
        setup["threads"] = torch.get_num_threads()
        out = write_run(
            Path(args.results) if args.results else RESULTS / "fed-bytes", {"setup": setup, "arms": results}, started
        )
        print(f"results: {out}/results.json, run.json")


if __name__ == "__main__":
    main()

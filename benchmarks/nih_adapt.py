"""A new hospital adapts the federated Kermany model: the NIH adult chest X-rays before and after.

NIH (another country, hospital and age group; /work/shared/data/nih_cxr14_pneumonia) is split by
patient, stratified by class, into an adaptation pool (what the new site uses to adapt) and an
evaluation set of other patients that nothing is fitted or chosen on. Every arm is a model folder
scored on the evaluation set by ``fedfreeze evaluate`` (patient-level bootstrap CIs):

- the federated model as it is;
- ``fedfreeze adapt`` with the pool's images only (no labels): BatchNorm re-estimation (AdaBN),
  and EM prevalence;
- ``fedfreeze adapt`` on AdaBN's model with a few labelled patients: temperature + Youden;
- ``fedfreeze site-train --init MODEL`` on the labelled pool (its own CV compares the adapted
  models with the un-adapted one on the same folds, paired DeLong), the refit scored;
- the same site-train from ImageNet weights (no ``--init``), to see what the federated start gave.

Every step runs the real command line. Results: benchmarks/results/nih-adaptation/.

    .venv/bin/python benchmarks/nih_adapt.py --model runs/fed/model
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, write_run  # noqa: E402

NIH = SHARED / "nih_cxr14_pneumonia"
ROOT = Path(__file__).resolve().parents[1]
FEDFREEZE = [sys.executable, "-m", "fedfreeze"]
SITE_TOML = """# site-level fine-tuning of a model trained elsewhere: probe, then layer4 and layer3, learning rates / 5
[model]
input-size = {size}
[train]
probe-epochs = 10
epochs = 6
unfreeze = {{ layer4 = 0.0, layer3 = 0.5 }}
lr = {{ head = 2e-4, layer4 = 1e-4, layer3 = 5e-5 }}
batch-size = 32
[cv]
folds = 3
"""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def split_nih(work: Path, seed: int, labelled: int) -> dict[str, Any]:
    """Patients (label = their largest) stratified into a pool and an evaluation half; the first
    ``labelled`` pool patients (stratified) are the few labelled cases."""
    rows = list(csv.DictReader((NIH / "manifest.csv").open()))
    label_of: dict[str, int] = {}
    for r in rows:
        label_of[r["patient_id"]] = max(label_of.get(r["patient_id"], 0), int(r["label"]))
    rng = np.random.default_rng(seed)
    pool, held = set(), set()
    few: list[str] = []
    for cls in (0, 1):
        members = sorted(p for p, v in label_of.items() if v == cls)
        members = [members[i] for i in rng.permutation(len(members))]
        half = len(members) // 2
        pool |= set(members[:half])
        held |= set(members[half:])
        few += members[: labelled // 2]

    def write(name: str, keep: set[str], with_labels: bool = True) -> Path:
        path = work / name
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label", "patient_id"] if with_labels else ["path", "patient_id"])
            for r in rows:
                if r["patient_id"] in keep:
                    cells = [str((NIH / r["path"]).resolve()), r["label"], r["patient_id"]]
                    writer.writerow(cells if with_labels else [cells[0], cells[2]])
        return path

    work.mkdir(parents=True, exist_ok=True)
    files = {
        "pool": write("pool.csv", pool),
        "pool_unlabelled": write("pool-unlabelled.csv", pool, False),
        "few": write("few.csv", set(few)),
        "evaluation": write("evaluation.csv", held),
    }
    counts = {name: sum(1 for _ in csv.DictReader(path.open())) for name, path in files.items()}
    return {
        "files": {k: str(v) for k, v in files.items()},
        "images": counts,
        "patients": {"pool": len(pool), "evaluation": len(held), "few": len(few)},
    }


def run(args: list[str], log_file: Path) -> subprocess.CompletedProcess[str]:
    """One fedfreeze command, its output kept; a refusal (exit 2) is a result, not a crash."""
    started = time.perf_counter()
    done = subprocess.run(
        [*FEDFREEZE, *args], capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    with log_file.open("a") as handle:
        handle.write(
            f"$ fedfreeze {' '.join(args)}\n(exit {done.returncode}, {time.perf_counter() - started:.0f} s)\n"
            f"{done.stdout}\n{done.stderr}\n"
        )
    return done


def evaluate(model: Path, data: str, log_file: Path) -> dict[str, Any]:
    done = run(
        ["evaluate", "--model", str(model), "--data", data, "--json", "--bootstrap", "1000", "--allow-outside-paths"],
        log_file,
    )
    if done.returncode != 0:
        raise SystemExit(f"evaluate {model} failed: {done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="the federated Kermany model folder")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "nih-adaptation")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fedfreeze-nih-work"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--labelled", type=int, default=50, help="labelled patients for the few-label recalibration")
    parser.add_argument("--skip-imagenet", action="store_true", help="leave out the from-ImageNet site-train arm")
    parser.add_argument("--quick", action="store_true", help="a smoke run: a short schedule, 2 folds (not for figures)")
    args = parser.parse_args(argv)
    if not (NIH / "manifest.csv").is_file():
        raise SystemExit(f"benchmark data not found: {NIH} (set FEDFREEZE_SHARED_DATA)")
    started = time.perf_counter()
    work, out = args.work, args.out
    out.mkdir(parents=True, exist_ok=True)
    split = split_nih(work, args.seed, args.labelled)
    log(f"NIH split by patient: {split['patients']} patients, {split['images']} images")
    files = split["files"]
    card = json.loads((args.model / "model.json").read_text())
    size = int(card["model"]["input-size"])
    commands = work / "commands.log"
    commands.write_text("")
    arms: dict[str, dict[str, Any]] = {}

    def arm(name: str, folder: Path | None, uses: str, note: str = "") -> None:
        if folder is None:
            arms[name] = {"uses": uses, "refused": note}
            log(f"{name}: refused: {note}")
            return
        result = evaluate(folder, files["evaluation"], commands)
        arms[name] = {
            "uses": uses,
            "model": str(folder),
            "note": note,
            "auroc": result["auroc"],
            "balanced_accuracy": result["balanced_accuracy"],
            "sensitivity": result["sensitivity"],
            "specificity": result["specificity"],
            "threshold": result["threshold"],
            "n": result["n"],
            "ci": {k: result["ci"][k] for k in ("auroc", "balanced_accuracy")},
            "brier": result["calibration"]["brier"],
            "ece": result["calibration"]["ece"],
        }
        log(
            f"{name}: AUROC {result['auroc']:.3f} {result['ci']['auroc']}, balanced accuracy "
            f"{result['balanced_accuracy']:.3f} {result['ci']['balanced_accuracy']}"
        )

    def adapt(name: str, source: Path, data: str, extra: list[str], uses: str) -> Path | None:
        target = work / name
        adapt = [
            "adapt",
            "--model",
            str(source),
            "--data",
            data,
            "--out",
            str(target),
            "--quiet",
            "--allow-outside-paths",
        ]
        done = run([*adapt, *extra], commands)
        if done.returncode != 0:
            arm(
                name,
                None,
                uses,
                done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}",
            )
            return None
        arm(name, target, uses)
        return target

    arm("as is", args.model, "nothing")
    adabn = adapt(
        "adapt: AdaBN",
        args.model,
        files["pool_unlabelled"],
        ["--bn", "reestimate", "--prevalence", "none"],
        "pool images, no labels",
    )
    adapt(
        "adapt: EM prevalence", args.model, files["pool_unlabelled"], ["--prevalence", "em"], "pool images, no labels"
    )
    adapt(
        "adapt: AdaBN, then temperature + Youden",
        adabn or args.model,
        files["few"],
        ["--labels", "use", "--calibrate", "temperature", "--threshold-rule", "youden"],
        f"AdaBN on the pool, then {split['patients']['few']} labelled patients",
    )
    config = work / "site.toml"
    site_toml = SITE_TOML.format(size=size)
    if args.quick:
        site_toml = (
            site_toml.replace("probe-epochs = 10", "probe-epochs = 2")
            .replace("epochs = 6", "epochs = 1")
            .replace("folds = 3", "folds = 2")
        )
    config.write_text(site_toml)
    cv: dict[str, Any] = {}
    for name, init in (("site-train --init (federated start)", args.model), ("site-train from ImageNet", None)):
        if init is None and args.skip_imagenet:
            continue
        target = work / ("site-train" + ("-init" if init else "-imagenet"))
        extra = ["--init", str(init)] if init else []
        log(f"{name}: cross-validating on the labelled pool ...")
        done = run(
            ["site-train", "--config", str(config), "--data", files["pool"], "--out", str(target), "--quiet"]
            + ["--allow-outside-paths", *extra],
            commands,
        )
        if done.returncode != 0:
            raise SystemExit(f"{name} failed: {done.stderr.strip()}")
        report = json.loads((target / "metrics.json").read_text())
        cv[name] = {
            "summary": report["summary"],
            "comparison": report.get("comparison"),
            "baseline": (report.get("baseline") or {}).get("summary"),
        }
        arm(name, target, f"the labelled pool ({split['patients']['pool']} patients)")
    results = {
        "split": split,
        "model": str(args.model),
        "model_card": card,
        "site_config": site_toml,
        "quick": args.quick,
        "arms": arms,
        "cross_validation": cv,
    }
    (out / "table.md").write_text(markdown(results))
    write_run(out, results, started)
    print((out / "table.md").read_text())
    return 0


def markdown(results: dict[str, Any]) -> str:
    split = results["split"]
    lines = [
        "# A new hospital adapts the federated Kermany model: NIH adult chest X-rays",
        "",
        f"Evaluation set: {split['patients']['evaluation']} NIH patients ({split['images']['evaluation']} images) that "
        f"nothing was fitted or chosen on; adaptation pool: {split['patients']['pool']} other patients "
        f"({split['images']['pool']} images). 95 % patient-level bootstrap intervals.",
        "",
        "| model | what the site used | AUROC [95 % CI] | balanced accuracy [95 % CI] | sens / spec | Brier | ECE |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, a in results["arms"].items():
        if "refused" in a:
            lines.append(f"| {name} | {a['uses']} | refused: {a['refused']} | | | | |")
            continue
        ci_a, ci_b = a["ci"]["auroc"], a["ci"]["balanced_accuracy"]
        lines.append(
            f"| {name} | {a['uses']} | {a['auroc']:.3f} [{ci_a[0]:.3f}, {ci_a[1]:.3f}] | "
            f"{a['balanced_accuracy']:.3f} [{ci_b[0]:.3f}, {ci_b[1]:.3f}] | "
            f"{a['sensitivity']:.2f} / {a['specificity']:.2f} | {a['brier']:.3f} | {a['ece']:.3f} |"
        )
    init = results["cross_validation"].get("site-train --init (federated start)", {})
    comparison = (init.get("comparison") or {}).get("delong")
    if comparison:
        lines += [
            "",
            "Inside the pool, on the same cross-validation folds: site-train --init against the model "
            f"as it is: AUROC {comparison.get('auc_a', float('nan')):.3f} vs {comparison.get('auc_b', float('nan')):.3f}, "
            f"difference {comparison.get('difference', float('nan')):+.3f}, DeLong p = {comparison.get('p_value', float('nan')):.3g}.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

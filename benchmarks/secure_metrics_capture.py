"""The scores behind the secure-metrics benchmark: every site's validation scores of every round's
global model, in the federations users meet (``benchmarks/secure_metrics.py`` reads them).

Two cases, each a real federation run in process (``fedfreeze.flower.inprocess``: the real ServerApp
loop and ClientApp):

- ``demo``: the README demo (``fedfreeze/configs/fed-demo.toml``: Lite0 at 160 px, 3 probe rounds
  then layer4) on the shipped sites site-a, site-b, site-c, plus the shipped held-out patients as
  the evaluation-only site ``held-out``;
- ``kermany128``: the same recipe at 128 px on 3 Kermany sites of 60 patients per class (at most 3
  images each: ``benchmarks/experiment_kermany.py``'s ``make_manifest``, seed 0), dealt by patient.

In round r each site scores the global model after round r - 1 on its validation split before it
trains (an evaluation-only site: on all its images); the final evaluation scores the last model.
``validation_release`` (what a site releases of those scores) is wrapped to keep the labels and
scores, per site and round, in ``WORK/<case>/scores.json``; nothing else of the run changes.

    .venv/bin/python benchmarks/secure_metrics_capture.py --case demo [--work /tmp/fedfreeze-secure-metrics]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import ROOT  # noqa: E402

DEMO_DATA = ROOT / "fedfreeze" / "sample_data" / "kermany_mini"
SCORES_FILE = "scores.json"
CASES = ("demo", "kermany128")


def manifest_folder(rows: list[dict[str, str]], folder: Path, base: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient_id"])
        for r in rows:
            writer.writerow([str((base / r["path"]).resolve()), r["label"], r["patient_id"]])
    return folder


def case_sites(case: str, work: Path) -> tuple[dict[str, Path], list[str]]:
    """Site name -> data folder, and the evaluation-only sites among them."""
    if case == "demo":
        rows = list(csv.DictReader((DEMO_DATA / "train.csv").open()))
        sites = {
            name: manifest_folder([r for r in rows if r["site"] == name], work / "data" / name, DEMO_DATA)
            for name in sorted({r["site"] for r in rows})
        }
        held = list(csv.DictReader((DEMO_DATA / "test.csv").open()))
        sites["held-out"] = manifest_folder(held, work / "data" / "held-out", DEMO_DATA)
        return sites, ["held-out"]
    from experiment_kermany import make_manifest

    manifest = make_manifest(work / "data" / "manifest.csv", sites=3, per_class=60, max_images=3, seed=0)
    rows = list(csv.DictReader(manifest.open()))
    return {
        name: manifest_folder([r for r in rows if r["site"] == name], work / "data" / name, Path("/"))
        for name in sorted({r["site"] for r in rows})
    }, []


def case_config(case: str, evaluation_sites: list[str], out: Path, *, secure: bool = False, rounds: int | None = None):
    from fedfreeze.federation.config import load_fed_config

    overrides: dict[str, Any] = {"federation.evaluation-sites": evaluation_sites, "federation.out-dir": str(out)}
    if case == "kermany128":
        overrides["model.input-size"] = 128
    if secure:
        overrides["federation.secure-aggregation"] = True
    if rounds is not None:
        overrides["federation.rounds"] = rounds
    return load_fed_config(ROOT / "fedfreeze" / "configs" / "fed-demo.toml", overrides)


def capture(case: str, work: Path, threads: int) -> dict[str, Any]:
    """Run the case's federation once, keeping every site's validation labels and scores per round."""
    import torch

    from fedfreeze.federation import site_runtime
    from fedfreeze.flower.inprocess import run_in_process

    torch.set_num_threads(threads)
    sites, evaluators = case_sites(case, work)
    kept: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    release = site_runtime.validation_release
    train, evaluate = site_runtime.SiteRuntime.train, site_runtime.SiteRuntime.evaluate

    def keep(labels: np.ndarray, scores: np.ndarray, orders: Any) -> dict[str, Any]:
        kept.append(
            {
                "site": current["site"],
                "round": orders.round,
                "final": current["final"],
                "role": orders.role_of(current["site"]),
                "labels": labels.astype(int).tolist(),
                "scores": [round(float(s), 7) for s in scores],
            }
        )
        return release(labels, scores, orders)

    def on_train(self: Any, orders: Any, *args: Any, **kwargs: Any) -> Any:
        current.update(site=self.site, final=False)
        return train(self, orders, *args, **kwargs)

    def on_evaluate(self: Any, orders: Any, *args: Any, final: bool = False, **kwargs: Any) -> Any:
        current.update(site=self.site, final=final)
        return evaluate(self, orders, *args, final=final, **kwargs)

    site_runtime.validation_release = keep  # type: ignore[assignment]
    site_runtime.SiteRuntime.train = on_train  # type: ignore[method-assign]
    site_runtime.SiteRuntime.evaluate = on_evaluate  # type: ignore[method-assign]
    out = work / "run"
    cfg = case_config(case, evaluators, out)
    started = time.time()
    try:
        metrics = run_in_process(cfg, out, sites, work / "state", resume=False, device="cpu")
    finally:
        site_runtime.validation_release = release  # type: ignore[assignment]
        site_runtime.SiteRuntime.train = train  # type: ignore[method-assign]
        site_runtime.SiteRuntime.evaluate = evaluate  # type: ignore[method-assign]
    result = {
        "case": case,
        "sites": {name: str(folder) for name, folder in sites.items()},
        "evaluation_sites": evaluators,
        "config": cfg.model_dump(mode="json", by_alias=True),
        "seconds": round(time.time() - started, 1),
        "status": metrics["status"],
        "scores": kept,
    }
    (work / SCORES_FILE).write_text(json.dumps(result) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=CASES, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/fedfreeze-secure-metrics"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    result = capture(args.case, args.work / args.case, args.threads)
    print(f"{args.case}: {result['status']} in {result['seconds']} s, {len(result['scores'])} score sets")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

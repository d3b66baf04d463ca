"""Seconds per epoch and peak memory: full fine-tuning vs linear probing (cached features) vs layer4 only.

Each mode runs in its own fresh process (so one mode's memory cannot hide another's), on the same
256 real Kermany chest X-rays from ../shared/data, and the ratios are printed side by side.

    .venv/bin/python benchmarks/site_speed.py [--backbone efficientnet_lite0|resnet50] [--epochs 2] [--threads 1]

Figures: ``benchmarks/results/site-speed/`` (``site-speed-<backbone>`` for another backbone):
``results.json`` (each mode, and its speed-up and memory ratio against full fine-tuning) and
``run.json`` (command, commit, machine, wall time).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODES = {
    "full fine-tuning": frozenset({"stem", "layer1", "layer2", "layer3", "layer4", "head"}),
    "layer4 only": frozenset({"layer4", "head"}),
    "linear probe (cached features)": frozenset({"head"}),
}


def run_mode(mode: str, manifest: str, backbone: str, epochs: int, size: int, threads: int, queue: mp.Queue) -> None:
    import numpy as np
    import torch
    from common import PeakRSS

    from fedfreeze.config import ModelConfig, TrainConfig
    from fedfreeze.data import load_image_set
    from fedfreeze.models.registry import build_model
    from fedfreeze.training.engine import train_phase
    from fedfreeze.training.features import FeatureCache

    if threads:
        torch.set_num_threads(threads)
    data = load_image_set(manifest, image_size=size, channels=3, progress=False, outside_paths=True)
    weights = "package" if backbone == "efficientnet_lite0" else "none"
    model, _ = build_model(ModelConfig(backbone=backbone, weights=weights, input_size=size))
    lr = {"head": 1e-3, "layer4": 5e-4, "layer3": 2.5e-4, "layer2": 1e-4, "layer1": 1e-4, "stem": 1e-4}
    cfg = TrainConfig(batch_size=32, lr=lr)
    device = torch.device("cpu")
    parts = MODES[mode]
    features = None
    extract_s = 0.0
    with PeakRSS() as mem:
        if parts == {"head"}:
            start = time.perf_counter()
            features = FeatureCache().features(model, data.images, device)
            extract_s = time.perf_counter() - start
        logs = train_phase(
            model,
            data.images,
            data.labels,
            parts,
            cfg,
            epochs=epochs,
            rng=np.random.default_rng(0),
            device=device,
            features=features,
        )
    queue.put(
        {
            "mode": mode,
            "epoch_s": float(np.mean([log.seconds for log in logs])),
            "extract_s": extract_s,
            "peak_mb": mem.added_mb,
            "n": len(data),
            "threads": torch.get_num_threads(),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per mode (0: torch's default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--results",
        default=None,
        help="results folder (default benchmarks/results/site-speed[-BACKBONE]; '' : not written)",
    )
    args = parser.parse_args()

    from common import RESULTS, kermany_subset, write_run

    started = time.perf_counter()
    manifest = kermany_subset(args.images, Path(tempfile.mkdtemp()) / "bench.csv")
    ctx = mp.get_context("spawn")
    results = {}
    for mode in MODES:
        queue = ctx.Queue()
        proc = ctx.Process(
            target=run_mode, args=(mode, str(manifest), args.backbone, args.epochs, args.size, args.threads, queue)
        )
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"{mode}: the benchmark process failed (exit {proc.exitcode})")
        results[mode] = queue.get(timeout=10)
        print(f"  measured {mode}: {results[mode]['epoch_s']:.2f} s/epoch", flush=True)

    full = results["full fine-tuning"]
    print(
        f"\n{args.backbone}, {full['n']} Kermany images at {args.size} px, batch 32, {args.epochs} epochs per mode, CPU"
    )
    print(f"{'mode':<32} {'s/epoch':>9} {'speed-up':>9} {'peak MB':>9} {'memory ratio':>13}")
    for mode, r in results.items():
        print(
            f"{mode:<32} {r['epoch_s']:>9.3f} {full['epoch_s'] / r['epoch_s']:>8.1f}x {r['peak_mb']:>9.0f} "
            f"{full['peak_mb'] / max(r['peak_mb'], 1e-9):>12.1f}x"
        )
    probe = results["linear probe (cached features)"]
    print(
        f"(the probe's one-time feature extraction took {probe['extract_s']:.1f} s, "
        f"{probe['extract_s'] / full['epoch_s']:.2f} full fine-tuning epochs)"
    )
    for r in results.values():
        r["speedup_vs_full"] = full["epoch_s"] / r["epoch_s"]
        r["memory_ratio_vs_full"] = full["peak_mb"] / max(r["peak_mb"], 1e-9)
    probe["extract_in_full_epochs"] = probe["extract_s"] / full["epoch_s"]
    figures = {
        "backbone": args.backbone,
        "size": args.size,
        "images": full["n"],
        "epochs": args.epochs,
        "batch_size": 32,
        "threads": full["threads"],
        "results": results,
    }
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    if args.results != "":
        default = "site-speed" if args.backbone == "efficientnet_lite0" else f"site-speed-{args.backbone}"
        out = write_run(Path(args.results) if args.results else RESULTS / default, figures, started)
        print(f"results: {out}/results.json, run.json")


if __name__ == "__main__":
    main()

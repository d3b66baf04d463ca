"""Peak training memory and accuracy: full fine-tuning vs SlimFit-style dynamic freezing (r = 0.9, 0.95).

Every arm trains the same model (same seed, same head initialisation) on the same real Kermany chest
X-rays from ../shared/data for the same epochs and batch size, with every group of the backbone
trainable, and is scored on the same held-out images of other patients. Each arm runs in its own
fresh process, so one arm's memory cannot hide another's. Per arm:

* ``peak MB``: the peak resident memory training added (sampled every 5 ms), on top of the loaded
  model and data; ``saved MB``: the peak bytes autograd held for backward (``SavedTensorMeter``);
  ``estimate MB``: the memory planner's estimate of the same configuration, weights left out
  (they were loaded before the measurement started);
* accuracy at threshold 0.5 with its 95 % Wilson interval, the paired difference from the first arm
  with its bootstrap interval, balanced accuracy and AUROC on the held-out images (one per patient).

Arms: ``full`` (the current engine: PyTorch's autograd, every layer trains), ``r0.9`` and ``r0.95``
(dynamic freezing, lean autograd, fp32 storage); optional: ``r0.9-int8`` (8-bit storage per
channel), ``r0.9-drop`` (AdamW moments of frozen layers dropped), ``full-int8`` (every layer trains,
lean autograd, 8-bit storage: the accuracy cost of 8-bit storage alone), ``full-lean`` (every layer
trains, lean autograd, fp32).

    .venv/bin/python benchmarks/slimfit_memory.py --backbone resnet50 [--arms full,r0.9,r0.95]
    .venv/bin/python benchmarks/slimfit_memory.py --backbone efficientnet_lite0 --train-images 512 --epochs 3

Figures: ``benchmarks/results/slimfit-memory-<backbone>/`` (``results.json``: per arm peak, saved
and estimated MB, the peak and saved ratios against ``full`` and against ``full-lean`` when those
arms ran, accuracy, AUROC, seconds per step; ``run.json``: command, commit, machine, wall time).

No pretrained ResNet-50 weights exist on these machines: ResNet-50 runs from random weights
(``weights = "none"``), which measures memory faithfully but makes its accuracy meaningless;
EfficientNet-Lite0 runs from its shipped ImageNet weights, where the accuracy comparison means
something.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARMS: dict[str, dict] = {
    "full": {},
    "r0.9": {"freezing": "dynamic", "dynamic_freeze": {"rate": 0.9}},
    "r0.95": {"freezing": "dynamic", "dynamic_freeze": {"rate": 0.95}},
    "r0.9-int8": {"freezing": "dynamic", "dynamic_freeze": {"rate": 0.9}, "activation_storage": "int8-channel"},
    "r0.9-drop": {"freezing": "dynamic", "dynamic_freeze": {"rate": 0.9, "optimizer_state": "drop"}},
    "full-lean": {"activation_storage": "fp32"},
    "full-int8": {"activation_storage": "int8-channel"},
}
MMAP_THRESHOLD = 1 << 20
LR = {"head": 1e-3, "layer4": 5e-4, "layer3": 2.5e-4, "layer2": 1e-4, "layer1": 1e-4, "stem": 1e-4}


def kermany_split(n_train: int, n_test: int, folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """Two manifests of Kermany images, half per class, with no patient in both; the test set holds
    one image per patient, so its images are independent cases (a patient's images agree with each other)."""
    import numpy as np
    from common import KERMANY

    rows = list(csv.DictReader((KERMANY / "manifest.csv").open()))
    rng = np.random.default_rng(seed)
    picked: dict[str, list[dict]] = {"train": [], "test": []}
    used: set[str] = set()
    for split, n in (("train", n_train), ("test", n_test)):
        for label in ("0", "1"):
            pool = [r for r in rows if r["label"] == label and r["patient_id"] not in used]
            if split == "test":
                first: dict[str, dict] = {}
                for i in rng.permutation(len(pool)):
                    first.setdefault(pool[i]["patient_id"], pool[i])
                pool = sorted(first.values(), key=lambda r: r["path"])
            if len(pool) < n // 2:
                raise SystemExit(f"--{split}-images {n}: only {len(pool)} of class {label} left to draw from")
            chosen = [pool[i] for i in rng.choice(len(pool), size=n // 2, replace=False)]
            picked[split] += chosen
        used |= {r["patient_id"] for r in picked[split]}
    out = []
    for split in ("train", "test"):
        path = folder / f"{split}.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label", "patient_id"])
            for r in picked[split]:
                writer.writerow([str(KERMANY / r["path"]), r["label"], r["patient_id"]])
        out.append(path)
    return out[0], out[1]


def paired_difference(right_a: list[bool], right_b: list[bool], replicates: int = 10_000) -> dict[str, float]:
    """Accuracy of a minus b on the same test patients: the difference and its 95 % paired bootstrap
    interval (patients resampled), in points."""
    import numpy as np

    a, b = np.asarray(right_a, dtype=float), np.asarray(right_b, dtype=float)
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(a), size=(replicates, len(a)))
    diffs = (a[draws] - b[draws]).mean(axis=1)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"points": 100 * float(a.mean() - b.mean()), "ci_low": 100 * float(lo), "ci_high": 100 * float(hi)}


def run_arm(arm: str, train_csv: str, test_csv: str, args: argparse.Namespace, queue: mp.Queue) -> None:
    import numpy as np
    import torch
    from common import PeakRSS

    from fedfreeze.config import ModelConfig, TrainConfig
    from fedfreeze.data import load_image_set
    from fedfreeze.metrics import binary_metrics
    from fedfreeze.models.registry import build_model
    from fedfreeze.training.engine import predict_scores, to_unit, train_phase
    from fedfreeze.training.memory_budget import candidate_choices, profile_phase
    from fedfreeze.training.saved_activations import SavedTensorMeter

    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    train = load_image_set(train_csv, image_size=args.size, channels=3, progress=False, outside_paths=True)
    test = load_image_set(test_csv, image_size=args.size, channels=3, progress=False, outside_paths=True)
    weights = "package" if args.backbone == "efficientnet_lite0" else "none"
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(backbone=args.backbone, weights=weights, input_size=args.size))
    bn = {} if getattr(args, "bn_stats", "auto") == "auto" else {"bn_stats": args.bn_stats}
    cfg = TrainConfig(batch_size=args.batch, lr=LR, seed=0, **bn, **ARMS[arm])
    parts = frozenset(model.parts)
    device = torch.device("cpu")
    with PeakRSS() as mem, SavedTensorMeter(model.parameters()) as saved:
        logs = train_phase(
            model,
            train.images,
            train.labels,
            parts,
            cfg,
            epochs=args.epochs,
            rng=np.random.default_rng(0),
            device=device,
        )
    steps = sum(len(train) // args.batch for _ in logs)
    seconds = sum(log.seconds for log in logs)
    scores = predict_scores(model, test.images, device)
    labels = test.labels.numpy()
    metrics = binary_metrics(labels, scores, 0.5)
    # the planner's estimate of this configuration (measured after training: it allocates too)
    choice = candidate_choices(cfg, len(train))[0]
    profile = profile_phase(
        model, parts, cfg, to_unit(train.images[:2], device), [choice.storage] if choice.rate is None else []
    )
    estimate = profile.estimate(choice, drop_optimizer_state=cfg.dynamic_freeze.optimizer_state == "drop")
    queue.put(
        {
            "arm": arm,
            "config": ARMS[arm],
            "peak_mb": mem.added_mb,
            "saved_mb": saved.peak / 1e6,
            "estimate_mb": estimate["total"] - estimate["weights"],
            "estimate": estimate,
            "s_per_step": seconds / max(steps, 1),
            "accuracy": (metrics["tp"] + metrics["tn"]) / metrics["n"],
            "balanced_accuracy": metrics["balanced_accuracy"],
            "auroc": metrics["auroc"],
            "n_test": metrics["n"],
            "right": [bool((sc >= 0.5) == bool(y)) for sc, y in zip(scores.tolist(), labels.tolist(), strict=True)],
            "n_train": len(train),
            "losses": [log.loss for log in logs],
            "trained_tensors": [len(log.trained) for log in logs],
            "freezing": logs[-1].freezing,
            "threads": torch.get_num_threads(),
        }
    )


def main() -> None:
    from fedfreeze.model_card import wilson

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--arms", default="full,r0.9,r0.95", help=f"comma-separated, from {list(ARMS)}")
    parser.add_argument("--train-images", type=int, default=128)
    parser.add_argument("--test-images", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument(
        "--bn-stats",
        default="frozen",
        choices=["frozen", "update", "auto"],
        help="BatchNorm statistics while training: frozen (fine-tuning a pretrained backbone, "
        "what bn-stats = auto does with pretrained weights), update (batch statistics, what auto "
        "does from random weights), auto",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per arm (0: torch's default); 1 avoids OpenMP spinning on a shared CPU",
    )
    parser.add_argument(
        "--malloc",
        choices=["mmap-1m", "default"],
        default="mmap-1m",
        help="mmap-1m: glibc serves every allocation of 1 MiB or more with its own mapping and "
        "returns it when freed, so resident memory follows what is allocated; default: glibc as is "
        "(freed activation memory may stay in its heap)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--results",
        default=None,
        help="results folder (default benchmarks/results/slimfit-memory-BACKBONE; '' : not written)",
    )
    args = parser.parse_args()
    from common import RESULTS, write_run

    run_started = time.perf_counter()
    if args.malloc == "mmap-1m":
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)  # read by glibc when each arm's process starts
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; known: {list(ARMS)}")

    train_csv, test_csv = kermany_split(args.train_images, args.test_images, Path(tempfile.mkdtemp()))
    ctx = mp.get_context("spawn")
    results = {}
    for arm in arms:
        queue = ctx.Queue()
        proc = ctx.Process(target=run_arm, args=(arm, str(train_csv), str(test_csv), args, queue))
        started = time.perf_counter()
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"{arm}: the benchmark process failed (exit {proc.exitcode})")
        results[arm] = queue.get(timeout=10)
        r = results[arm]
        r["wall_seconds"] = time.perf_counter() - started
        print(
            f"  {arm}: peak {r['peak_mb']:.0f} MB, saved {r['saved_mb']:.0f} MB, accuracy {r['accuracy']:.4f}, "
            f"{r['s_per_step']:.2f} s/step, {time.perf_counter() - started:.0f} s, load {os.getloadavg()[0]:.2f}",
            flush=True,
        )

    base = results.get("full", next(iter(results.values())))
    lean = results.get("full-lean")
    weights = "ImageNet (package)" if args.backbone == "efficientnet_lite0" else "random (no pretrained ResNet-50 here)"
    print(
        f"\n{args.backbone} at {args.size} px, weights {weights}; {base['n_train']} training images, batch "
        f"{args.batch}, {args.epochs} epochs, every group trainable; {base['n_test']} held-out images of other "
        f"patients; BatchNorm statistics {args.bn_stats}; CPU, {base['threads']} threads, malloc {args.malloc}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{'arm':<11} {'peak MB':>8} {'ratio':>6} {'saved MB':>9} {'ratio':>6} {'estimate':>9} {'s/step':>7} "
        f"{'accuracy':>9} {'bal.acc':>8} {'AUROC':>7}" + (f" {'vs lean':>8}" if "full-lean" in results else "")
    )
    for arm, r in results.items():
        print(
            f"{arm:<11} {r['peak_mb']:>8.0f} {base['peak_mb'] / max(r['peak_mb'], 1e-9):>5.2f}x "
            f"{r['saved_mb']:>9.0f} {base['saved_mb'] / max(r['saved_mb'], 1e-9):>5.1f}x {r['estimate_mb']:>9.0f} "
            f"{r['s_per_step']:>7.2f} {100 * r['accuracy']:>8.2f}% {r['balanced_accuracy']:>8.4f} {r['auroc']:>7.4f}"
            + (f" {lean['peak_mb'] / max(r['peak_mb'], 1e-9):>7.2f}x" if lean else "")
        )
    for reference in ("full", "full-lean"):
        if reference in results:
            ref = results[reference]
            for r in results.values():
                r[f"peak_ratio_vs_{reference}"] = ref["peak_mb"] / max(r["peak_mb"], 1e-9)
                r[f"saved_ratio_vs_{reference}"] = ref["saved_mb"] / max(r["saved_mb"], 1e-9)
    for r in results.values():
        r["accuracy_percent"] = 100 * r["accuracy"]
        low, high = wilson(sum(r["right"]), len(r["right"]))  # one image per patient: independent cases
        r["accuracy_ci_percent"] = [100 * low, 100 * high]
        r["accuracy_vs_full"] = paired_difference(r["right"], base["right"])
    print("accuracy, 95 % interval (Wilson), and the paired difference from the first arm with its bootstrap interval:")
    for arm, r in results.items():
        ci, d = r["accuracy_ci_percent"], r["accuracy_vs_full"]
        print(
            f"  {arm:<11} {r['accuracy_percent']:.1f} % [{ci[0]:.1f}, {ci[1]:.1f}]  "
            f"{d['points']:+.1f} points [{d['ci_low']:+.1f}, {d['ci_high']:+.1f}]"
        )
    setup = {k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in vars(args).items()}
    setup.update(weights=weights, threads_used=base["threads"], load_average_after=list(os.getloadavg()))
    if args.json:
        args.json.write_text(json.dumps({"args": setup, "results": results}, indent=2))
    if args.results != "":
        out = write_run(
            Path(args.results) if args.results else RESULTS / f"slimfit-memory-{args.backbone}",
            {"setup": setup, "arms": results},
            run_started,
        )
        print(f"results: {out}/results.json, run.json")


if __name__ == "__main__":
    main()

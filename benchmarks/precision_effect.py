"""What bf16 does to a site's model: train.precision = "bf16" against "fp32", paired on the same patients.

One Kermany site (patients split from a held-out set of other patients), Lite0 at 224 px from the
ImageNet weights, the site schedule in short (probe on cached features, then layer4), trained twice
with the same seed: in fp32, and in bf16 (the engine's frozen layers and torch's trainable groups).
Both models score the held-out patients, and the fp32 model scores them once more in bf16 (the effect
of bf16 inference alone). Differences in AUROC and balanced accuracy at 0.5 come with a paired
patient-level bootstrap (the same patients' weights for both arms; ``fedfreeze.evaluation.bootstrap``).
Needs a CPU with native bf16.

    .venv/bin/python benchmarks/precision_effect.py [--train 300] [--test 300]

Figures: ``benchmarks/results/precision-effect/`` (``results.json``, ``run.json``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

METRIC_KEYS = ("auroc", "balanced_accuracy")


def paired(labels: np.ndarray, patients: list[str], a: np.ndarray, b: np.ndarray, replicates: int) -> dict[str, Any]:
    """b minus a, with its paired patient-level bootstrap interval and p-value."""
    from fedfreeze.evaluation.bootstrap import (
        FoldCases,
        bootstrap_weights,
        paired_p_value,
        percentile_interval,
        weighted_metrics,
    )

    names = sorted(set(patients))
    unit = np.array([names.index(p) for p in patients])
    strata = [f"class-{int(labels[unit == i].max())}" for i in range(len(names))]
    weights = bootstrap_weights(strata, replicates, seed=0)
    ones = np.ones((1, len(names)))
    out = {}
    for key in METRIC_KEYS:
        point_a = float(weighted_metrics(FoldCases(unit, labels, a), ones, 0.5)[key][0])
        point_b = float(weighted_metrics(FoldCases(unit, labels, b), ones, 0.5)[key][0])
        diff = weighted_metrics(FoldCases(unit, labels, b), weights, 0.5)[key]
        diff = diff - weighted_metrics(FoldCases(unit, labels, a), weights, 0.5)[key]
        low, high = percentile_interval(diff, 0.95)
        out[key] = {
            "a": point_a,
            "b": point_b,
            "difference": point_b - point_a,
            "ci95": [low, high],
            "p_value": paired_p_value(point_b - point_a, diff),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=300, help="training images (whole patients)")
    parser.add_argument("--test", type=int, default=300, help="held-out images of other patients")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--probe-epochs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2, help="layer4 epochs after the probe")
    parser.add_argument("--replicates", type=int, default=2000)
    parser.add_argument("--results", default=None, help="results folder ('' : not written)")
    args = parser.parse_args()

    import torch
    from common import RESULTS, write_run
    from fed_bytes import make_sites

    from fedfreeze.config import ModelConfig, TrainConfig
    from fedfreeze.data import load_image_set
    from fedfreeze.inference.engine import InferenceSettings
    from fedfreeze.inference.precision import cpu_has_bf16
    from fedfreeze.models.registry import build_model
    from fedfreeze.training.engine import extract_features, fit, predict_scores

    if not cpu_has_bf16():
        raise SystemExit("this CPU has no native bf16: nothing to measure")
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="precision-"))
    [site], held_out = make_sites(work / "data", 1, args.train, args.test, seed=0)
    train = load_image_set(site / "manifest.csv", image_size=args.size, channels=3, progress=False)
    test = load_image_set(held_out / "manifest.csv", image_size=args.size, channels=3, progress=False)
    cpu = torch.device("cpu")
    scores: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    models = {}
    for precision in ("fp32", "bf16"):
        cfg = TrainConfig(
            probe_epochs=args.probe_epochs, epochs=args.epochs, unfreeze={"layer4": 0.0}, precision=precision
        )
        settings = InferenceSettings.of(cfg, work / "engine")
        torch.manual_seed(0)
        model, _ = build_model(ModelConfig(input_size=args.size))
        start = time.perf_counter()
        features = extract_features(model, train.images, cpu, inference=settings)
        fit(model, train.images, train.labels, cfg, rng=np.random.default_rng(0), device=cpu, probe_features=features)
        seconds[f"train {precision}"] = time.perf_counter() - start
        scores[f"trained {precision}, scored {precision}"] = predict_scores(model, test.images, cpu, inference=settings)
        models[precision] = model
        print(f"  trained in {precision}: {seconds[f'train {precision}']:.0f} s", flush=True)
    scores["trained fp32, scored bf16"] = predict_scores(
        models["fp32"], test.images, cpu, inference=InferenceSettings("auto", "bf16", work / "engine")
    )
    labels = test.labels.numpy()
    base = scores["trained fp32, scored fp32"]
    comparisons = {
        "bf16 training and inference vs fp32": paired(
            labels, test.patient_ids, base, scores["trained bf16, scored bf16"], args.replicates
        ),
        "bf16 inference only (the fp32 model) vs fp32": paired(
            labels, test.patient_ids, base, scores["trained fp32, scored bf16"], args.replicates
        ),
    }
    score_shift = float(np.abs(scores["trained fp32, scored bf16"] - base).max())
    print(f"\n{len(train)} training images, {len(test)} held-out images of {len(set(test.patient_ids))} patients")
    for name, result in comparisons.items():
        for key, r in result.items():
            print(
                f"{name:<46} {key:<18} {r['a']:.4f} -> {r['b']:.4f}  difference {r['difference']:+.4f} "
                f"[{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]  p {r['p_value']:.3f}"
            )
    print(f"largest change of one image's score from bf16 inference alone: {score_shift:.4f}")
    figures = {
        "train_images": len(train),
        "test_images": len(test),
        "test_patients": len(set(test.patient_ids)),
        "size": args.size,
        "probe_epochs": args.probe_epochs,
        "layer4_epochs": args.epochs,
        "replicates": args.replicates,
        "seconds": seconds,
        "comparisons": comparisons,
        "max_score_change_bf16_inference": score_shift,
    }
    if args.results != "":
        out = write_run(Path(args.results) if args.results else RESULTS / "precision-effect", figures, started)
        print(f"results: {out}/results.json, run.json")


if __name__ == "__main__":
    main()

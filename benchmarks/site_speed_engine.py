"""Torch today against the inference engine, side by side in one process (``site_speed.py --engine``).

Each task runs on the same real Kermany images with each path in turn, the order alternating from one
repeat to the next, and the median of the repeats is kept: other work on a shared machine slows
whichever path it meets, and alternating spreads that over all of them. Each path's first call (export
of its graph, compilation, warm-up) is timed apart. The machine's own limit is measured too: the best
GEMM throughput torch reaches here in fp32 and bf16, and the fraction of it each path reaches
(FLOPs counted by ``torch.utils.flop_counter`` on the real forward and backward).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

# path -> (train.engine, train.precision)
PATHS = {
    "torch fp32 (before)": ("torch", "fp32"),
    "torch bf16": ("torch", "bf16"),
    "openvino fp32": ("openvino", "fp32"),
    "openvino bf16": ("openvino", "bf16"),
}
TASKS = ("extraction", "evaluate", "epoch layer4", "epoch top")


def gemm_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """The best FLOP/s of a square matrix product over ``repeats`` tries (the machine's arithmetic limit)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def flops_per_image(model: torch.nn.Module, task: str, size: int, parts: frozenset[str]) -> float:
    """FLOPs of one image, counted by ``torch.utils.flop_counter`` on the real modules at batch 2: the whole
    forward, and for an epoch twice the trainable groups' forward again (their backward: gradients of the
    inputs and of the weights; the counter's own backward figures for depthwise convolutions are not usable)."""
    from torch.utils.flop_counter import FlopCounterMode

    from fedfreeze.training.freezing import apply_parts

    x = torch.rand(2, 3, size, size)
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    total = counter.get_total_flops()
    if task.startswith("epoch"):
        apply_parts(model, parts)
        prefix = model.frozen_prefix()
        with torch.no_grad():
            h = model.forward_groups(model.normalize(x), prefix)
            trainable = FlopCounterMode(display=False)
            with trainable:
                model.head(model.pooled_after(h, prefix))
        total += 2 * trainable.get_total_flops()
    return total / 2


def compare(manifest: Path, size: int, repeats: int, epochs: int) -> dict[str, Any]:
    from fedfreeze.config import ModelConfig, TrainConfig
    from fedfreeze.data import load_image_set
    from fedfreeze.inference.engine import InferenceSettings
    from fedfreeze.inference.precision import cpu_has_bf16
    from fedfreeze.models.registry import build_model
    from fedfreeze.training.engine import extract_features, predict_scores, train_phase

    data = load_image_set(manifest, image_size=size, channels=3, progress=False)
    n = len(data)
    cache = Path(tempfile.mkdtemp(prefix="engine-cache-"))
    paths = {k: v for k, v in PATHS.items() if v[1] == "fp32" or cpu_has_bf16()}
    lr = {"head": 1e-3, "layer4": 5e-4, "top": 5e-4}
    cpu = torch.device("cpu")

    def model_for(top: bool) -> torch.nn.Module:
        model, _ = build_model(ModelConfig(input_size=size, top_group=top))
        return model

    scored = model_for(False)  # a saved model scored as it is: nothing marked frozen, the whole backbone

    def task_fn(task: str, engine: str, precision: str) -> Callable[[], float]:
        """One run of ``task`` on this path; returns its seconds (an epoch's as the engine logs it)."""
        settings = InferenceSettings(engine, precision, cache)  # type: ignore[arg-type]
        if task in ("extraction", "evaluate"):
            fn = extract_features if task == "extraction" else predict_scores

            def run() -> float:
                start = time.perf_counter()
                fn(scored, data.images, cpu, inference=settings)
                return time.perf_counter() - start

            return run
        top = task == "epoch top"
        parts = frozenset({"top" if top else "layer4", "head"})
        cfg = TrainConfig(batch_size=32, lr=lr, engine=engine, precision=precision)  # type: ignore[arg-type]

        def epoch() -> float:
            model = model_for(top)
            logs = train_phase(
                model, data.images, data.labels, parts, cfg,
                epochs=epochs, rng=np.random.default_rng(0), device=cpu, engine_cache=cache,
            )  # fmt: skip
            return float(np.median([log.seconds for log in logs]))

        return epoch

    first: dict[str, dict[str, float]] = {task: {} for task in TASKS}
    seconds: dict[str, dict[str, list[float]]] = {task: {p: [] for p in paths} for task in TASKS}
    loads = [os.getloadavg()[0]]
    for task in TASKS:
        runs = {p: task_fn(task, *paths[p]) for p in paths}
        for p, run in runs.items():  # first calls: export, compile, warm-up
            start = time.perf_counter()
            run()
            first[task][p] = time.perf_counter() - start
        for r in range(repeats):
            order = list(runs) if r % 2 == 0 else list(reversed(runs))
            for p in order:
                seconds[task][p].append(runs[p]())
            loads.append(os.getloadavg()[0])
        print(f"  {task}: " + ", ".join(f"{p} {n / statistics.median(s):.1f} img/s" for p, s in seconds[task].items()))

    fp32_peak, bf16_peak = gemm_peak(torch.float32), gemm_peak(torch.bfloat16) if cpu_has_bf16() else None
    flops = {
        "extraction": flops_per_image(model_for(False), "extraction", size, frozenset()),
        "evaluate": flops_per_image(model_for(False), "evaluate", size, frozenset()),
        "epoch layer4": flops_per_image(model_for(False), "epoch", size, frozenset({"layer4", "head"})),
        "epoch top": flops_per_image(model_for(True), "epoch", size, frozenset({"top", "head"})),
    }
    table: dict[str, dict[str, Any]] = {}
    for task in TASKS:
        before = n / statistics.median(seconds[task]["torch fp32 (before)"])
        table[task] = {}
        for p in paths:
            rate = n / statistics.median(seconds[task][p])
            peak = bf16_peak if paths[p][1] == "bf16" and bf16_peak else fp32_peak
            pairs = [b / t for b, t in zip(seconds[task]["torch fp32 (before)"], seconds[task][p], strict=True)]
            table[task][p] = {
                "images_per_s": rate,
                "vs_before": rate / before,
                # each repeat's ratio (the two paths ran one after the other, under nearly the same load)
                "vs_before_paired_median": statistics.median(pairs),
                "seconds": seconds[task][p],
                "first_call_s": first[task][p],
                "gflops_per_image": flops[task] / 1e9,
                "fraction_of_gemm_peak": rate * flops[task] / peak,
            }
    return {
        "images": n,
        "size": size,
        "repeats": repeats,
        "epochs_per_run": epochs,
        "threads": torch.get_num_threads(),
        "gemm_peak_gflops": {"fp32": fp32_peak / 1e9, "bf16": bf16_peak / 1e9 if bf16_peak else None},
        "load_average_during": loads,
        "tasks": table,
    }


def print_table(figures: dict[str, Any]) -> None:
    peak = figures["gemm_peak_gflops"]
    print(
        f"\nLite0, {figures['images']} Kermany images at {figures['size']} px, {figures['threads']} threads, "
        f"median of {figures['repeats']} alternating repeats; measured GEMM peak fp32 {peak['fp32']:.0f} GFLOP/s"
        + (f", bf16 {peak['bf16']:.0f} GFLOP/s" if peak["bf16"] else "")
    )
    print(
        f"{'task':<14} {'path':<22} {'img/s':>8} {'vs before':>10} {'paired':>8} {'% of peak':>10} {'first call s':>13}"
    )
    for task, paths in figures["tasks"].items():
        for p, r in paths.items():
            print(
                f"{task:<14} {p:<22} {r['images_per_s']:>8.1f} {r['vs_before']:>9.2f}x "
                f"{r['vs_before_paired_median']:>7.2f}x {100 * r['fraction_of_gemm_peak']:>9.1f}% "
                f"{r['first_call_s']:>13.1f}"
            )


FEDERATION = """
[model]
backbone = "efficientnet_lite0"
weights = "package"
input-size = {size}

[train]
batch-size = 32
engine = "{engine}"
precision = "{precision}"

[federation]
rounds = {rounds}
probe-rounds = {probe}
probe-local-epochs = 10
local-epochs = 1
unfreeze = {{ layer4 = 0.0 }}
min-sites = {sites}
"""


def federation(root: Path, sites: int, per_site: int, test: int, size: int, rounds: int, probe: int) -> dict[str, Any]:
    """The same federation (sites, rounds, seeds) with forward-only work in torch, then through the engine:
    wall time, where the sites' time went, and the held-out AUROC with its interval."""
    from fed_bytes import make_sites, run_arm

    from fedfreeze.evaluate import evaluate_model
    from fedfreeze.inference.precision import cpu_has_bf16

    folders, held_out = make_sites(root / "data", sites, per_site, test, seed=0)
    arms = {"torch fp32 (before)": ("torch", "fp32"), "openvino fp32": ("auto", "fp32")}
    if cpu_has_bf16():
        arms["openvino bf16"] = ("auto", "bf16")
    out: dict[str, Any] = {}
    for name, (engine, precision) in arms.items():
        slug = name.split(" (")[0].replace(" ", "-")
        config = root / f"{slug}.toml"
        text = FEDERATION.format(size=size, engine=engine, precision=precision, rounds=rounds, probe=probe, sites=sites)
        config.write_text(text)
        print(f"  federation, {name} ...", flush=True)
        metrics = run_arm(name, config, folders, root / slug)
        scored = evaluate_model(metrics["model"], held_out / "manifest.csv")
        rounds_log = metrics["rounds"]
        out[name] = {
            "wall_seconds": metrics["wall_seconds"],
            "round_seconds": [r["round_seconds"] for r in rounds_log],
            "site_seconds": {  # summed over sites and rounds: where the sites' time went
                key: float(sum(s.get(key, 0.0) for r in rounds_log for s in r.get("sites", [])))
                for key in ("train_seconds", "eval_seconds", "process_seconds")
            },
            "held_out": {
                "auroc": scored["auroc"],
                "auroc_ci": (scored.get("ci") or {}).get("auroc"),
                "balanced_accuracy": scored["balanced_accuracy"],
            },
            "load_average_after": os.getloadavg()[0],
        }
        print(f"    {out[name]['wall_seconds']:.0f} s, held-out AUROC {scored.get('auroc')}", flush=True)
    before = out["torch fp32 (before)"]["wall_seconds"]
    for r in out.values():
        r["faster_than_before"] = before / r["wall_seconds"]
    return {
        "sites": sites,
        "per_site": per_site,
        "held_out_images": test,
        "size": size,
        "rounds": rounds,
        "probe_rounds": probe,
        "arms": out,
    }


def step_profile(manifest: Path, size: int, repeats: int, batch: int = 32) -> dict[str, Any]:
    """Where a layer4 fine-tuning step's time goes once the frozen prefix runs in the engine: seconds per
    batch of each piece (median of ``repeats`` steps), the prefix in torch measured beside it."""
    from fedfreeze.config import ModelConfig, TrainConfig
    from fedfreeze.data import load_image_set
    from fedfreeze.inference.engine import InferenceSettings, compile_frozen
    from fedfreeze.models.registry import build_model
    from fedfreeze.training.augment import augment_batch
    from fedfreeze.training.engine import loss_fn, targets_for, to_unit
    from fedfreeze.training.freezing import apply_parts
    from fedfreeze.training.optim import make_optimizer

    data = load_image_set(manifest, image_size=size, channels=3, progress=False)
    model, _ = build_model(ModelConfig(input_size=size))
    parts = frozenset({"layer4", "head"})
    apply_parts(model, parts)
    model.train()
    cpu = torch.device("cpu")
    cfg = TrainConfig(batch_size=batch, lr={"head": 1e-3, "layer4": 5e-4})
    optimizer, _ = make_optimizer(model, parts, cfg, 100)
    cache = Path(tempfile.mkdtemp(prefix="engine-cache-"))
    runner = compile_frozen(
        model, model.frozen_prefix(), to_unit(data.images[:2], cpu), InferenceSettings("openvino", cache_dir=cache)
    )
    if runner is None:
        raise SystemExit("the engine failed: nothing to profile")
    rng = np.random.default_rng(0)
    pieces: dict[str, list[float]] = {
        k: [] for k in ("decode to float + augment", "frozen prefix, engine", "frozen prefix, torch (before)",
                        "trainable forward (layer4 + head)", "backward", "optimizer step")
    }  # fmt: skip

    @contextmanager
    def timed(key: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        pieces[key].append(time.perf_counter() - start)

    targets = targets_for(data.labels, model.num_classes)
    for step in range(repeats + 1):
        idx = torch.from_numpy(rng.choice(len(data), batch, replace=False))
        with timed("decode to float + augment"):
            x = augment_batch(to_unit(data.images[idx], cpu), rng)
        with timed("frozen prefix, engine"):
            h = runner(x)
        with torch.no_grad(), timed("frozen prefix, torch (before)"):
            model.forward_groups(model.normalize(x), runner.groups)
        with timed("trainable forward (layer4 + head)"):
            logits = model.head(model.pooled_after(h, runner.groups))
        loss = loss_fn(logits, targets[idx])
        optimizer.zero_grad(set_to_none=True)
        with timed("backward"):
            loss.backward()
        with timed("optimizer step"):
            optimizer.step()
        if step == 0:  # the first step warms every kernel up: not counted
            for values in pieces.values():
                values.clear()
    medians = {k: statistics.median(v) for k, v in pieces.items()}
    engine_step = sum(v for k, v in medians.items() if k != "frozen prefix, torch (before)")
    return {
        "size": size,
        "batch": batch,
        "steps": repeats,
        "threads": torch.get_num_threads(),
        "seconds_per_step": medians,
        "share_of_engine_step": {
            k: v / engine_step for k, v in medians.items() if k != "frozen prefix, torch (before)"
        },
        "load_average_after": os.getloadavg()[0],
    }

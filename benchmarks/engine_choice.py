"""Which inference engine: ONNX Runtime against OpenVINO against torch, on Lite0's pooled features.

The figures the engine of ``fedfreeze/inference/`` was chosen on. One process, the same weights and the
same real Kermany images; every path runs the whole batch in turn, the order alternating from one repeat
to the next, medians kept (a shared machine slows whichever path it meets). Outputs are compared with
torch's fp32 features. ONNX Runtime needs ``onnxruntime`` and ``onnx`` (for ``torch.onnx.export``),
which fedfreeze does not install: ``pip install onnxruntime onnx`` first.

    .venv/bin/python benchmarks/engine_choice.py [--images 64] [--repeats 7]

Figures: ``benchmarks/results/engine-choice/`` (``results.json``, ``run.json``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--results", default=None, help="results folder ('' : not written)")
    args = parser.parse_args()

    import onnxruntime as ort
    import torch
    from common import RESULTS, kermany_subset, write_run

    from fedfreeze.config import ModelConfig
    from fedfreeze.data import load_image_set
    from fedfreeze.inference.engine import _Leading
    from fedfreeze.inference.openvino_graph import CompiledGraph, export_graph
    from fedfreeze.models.registry import build_model
    from fedfreeze.training.engine import to_unit

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="engine-choice-"))
    data = load_image_set(kermany_subset(args.images, work / "m.csv"), image_size=args.size, channels=3, progress=False)
    model, _ = build_model(ModelConfig(input_size=args.size))
    model.eval()
    backbone = _Leading(model, list(model.groups), pooled=True).eval()
    with torch.no_grad():
        x = model.normalize(to_unit(data.images, torch.device("cpu")))
        reference = backbone(x).numpy()
    flat = x.contiguous()
    xn = flat.numpy()
    threads = torch.get_num_threads()

    seconds_to_ready: dict[str, float] = {}
    start = time.perf_counter()
    torch.onnx.export(
        backbone, (flat[:2],), work / "f.onnx", dynamo=False, input_names=["x"], output_names=["f"],
        dynamic_axes={"x": {0: "batch"}, "f": {0: "batch"}}, opset_version=17,
    )  # fmt: skip
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(work / "f.onnx"), options, providers=["CPUExecutionProvider"])
    seconds_to_ready["onnxruntime fp32"] = time.perf_counter() - start
    start = time.perf_counter()
    (work / "ov").mkdir()
    export_graph(backbone, flat[:2], work / "ov")
    ov_fp32 = CompiledGraph(work / "ov", "fp32")
    seconds_to_ready["openvino fp32"] = time.perf_counter() - start
    ov_bf16 = CompiledGraph(work / "ov", "bf16")

    def torch_fp32() -> np.ndarray:
        with torch.no_grad():
            return backbone(x).numpy()

    def torch_bf16() -> np.ndarray:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return backbone(x).float().numpy()

    paths = {
        "torch fp32 (fedfreeze before)": torch_fp32,
        "torch bf16 autocast": torch_bf16,
        "onnxruntime fp32": lambda: session.run(None, {"x": xn})[0],
        "openvino fp32": lambda: ov_fp32(xn),
        "openvino bf16": lambda: ov_bf16(xn),
    }
    scale = float(np.abs(reference).max())
    differences = {name: float(np.abs(run() - reference).max()) for name, run in paths.items()}  # also warms up
    times: dict[str, list[float]] = {name: [] for name in paths}
    loads = [os.getloadavg()[0]]
    for r in range(args.repeats):
        for name in list(paths) if r % 2 == 0 else list(reversed(paths)):
            start = time.perf_counter()
            paths[name]()
            times[name].append(time.perf_counter() - start)
        loads.append(os.getloadavg()[0])
    before = args.images / statistics.median(times["torch fp32 (fedfreeze before)"])
    results = {}
    print(f"Lite0 features, {args.images} Kermany images at {args.size} px, {threads} threads, batch {args.images}")
    print(f"{'path':<30} {'img/s':>7} {'vs torch':>9} {'max |diff|':>11}")
    for name in paths:
        rate = args.images / statistics.median(times[name])
        results[name] = {
            "images_per_s": rate,
            "vs_torch_fp32": rate / before,
            "max_abs_difference": differences[name],
            "relative_difference": differences[name] / scale,
            "seconds": times[name],
        }
        print(f"{name:<30} {rate:>7.1f} {rate / before:>8.2f}x {differences[name]:>11.2e}")
    versions: dict[str, str | None] = {}
    installed_mb: dict[str, float] = {}
    for package in ("onnxruntime", "onnx", "openvino", "openvino-telemetry", "torch"):
        try:
            dist = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
            continue
        versions[package] = dist.version
        files = [dist.locate_file(f) for f in dist.files or []]
        installed_mb[package] = sum(Path(f).stat().st_size for f in files if Path(f).is_file()) / 1e6
    figures = {
        "images": args.images,
        "size": args.size,
        "repeats": args.repeats,
        "threads": threads,
        "feature_scale": scale,
        "seconds_to_ready": seconds_to_ready,
        "versions": versions,
        "installed_mb": installed_mb,
        "load_average_during": loads,
        "results": results,
    }
    if args.results != "":
        out = write_run(Path(args.results) if args.results else RESULTS / "engine-choice", figures, started)
        print(f"results: {out}/results.json, run.json")


if __name__ == "__main__":
    main()

"""OpenVINO, the engine behind ``engine.py``: a torch module to an OpenVINO graph file, and that file
compiled for this CPU.

Chosen on figures measured on the project's 2-core AVX-512 machine (``docs/benchmarks.md``, site
speed): Lite0 features at 224 px ran 6-7x faster than torch in fp32 (ONNX Runtime 3.5x) with
outputs equal to 1.4e-5, and a PyTorch module converts without the ``onnx`` package. The graph is
stored as OpenVINO IR (``model.xml`` + ``model.bin``): a description of operations and raw weights,
read without running any code.
"""

from __future__ import annotations

import importlib.metadata
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from fedfreeze.inference.precision import Precision

GRAPH_FILE = "model.xml"  # its weights are model.bin beside it
COMPILED_DIR = "compiled"


def engine_version() -> str:
    """The installed OpenVINO's version, without importing it ("" when it is not installed)."""
    try:
        return importlib.metadata.version("openvino")
    except importlib.metadata.PackageNotFoundError:
        return ""


def load_openvino() -> ModuleType:
    """Import OpenVINO with its usage telemetry off.

    Why: importing OpenVINO's converter sends usage events to Google Analytics unless the user opted
    out; a hospital site must not call out. With ``openvino_telemetry`` marked absent in
    ``sys.modules`` its import fails, and OpenVINO falls back to its own no-op stub.
    """
    sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
    import openvino

    return openvino


def export_graph(module: nn.Module, example: torch.Tensor, folder: Path) -> None:
    """Trace ``module`` (in eval mode, on ``example``) and write its OpenVINO graph into ``folder``.

    The graph keeps the batch size free and fixes channels, height and width to the example's:
    TensorFlow-style "SAME" padding is computed from the input size when traced.
    """
    ov = load_openvino()
    from openvino.frontend import FrontEndManager
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes about Python integers made from shapes
        with torch.no_grad():
            traced = torch.jit.trace(module, example, check_trace=False)
    decoder = TorchScriptPythonDecoder(traced)  # held until converted: the frontend does not keep it alive
    frontend = FrontEndManager().load_by_framework("pytorch")
    graph = frontend.convert(frontend.load(decoder))
    graph.reshape([-1, *example.shape[1:]])
    ov.save_model(graph, folder / GRAPH_FILE, compress_to_fp16=False)  # fp16 weights would change outputs


class CompiledGraph:
    """A graph file compiled for the CPU at a precision, with this process's torch thread count."""

    def __init__(self, folder: Path, precision: Precision) -> None:
        ov = load_openvino()
        core = ov.Core()
        config = {
            # said either way: on a CPU with bf16, OpenVINO would pick bf16 by itself
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
            "PERFORMANCE_HINT": "LATENCY",  # one stream: every thread on the batch at hand
            # the compiled form is kept beside the graph (OpenVINO's own binary format, no pickle): a later
            # process compiles in a fraction of the time
            "CACHE_DIR": str(folder / COMPILED_DIR),
        }
        self._compiled: Any = core.compile_model(str(folder / GRAPH_FILE), "CPU", config)
        self._request = self._compiled.create_infer_request()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self._request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})
        return np.array(self._request.get_output_tensor(0).data, copy=True)  # the request reuses its buffer

"""Forward-only work through an inference engine: the frozen leading groups of a model compiled once
per weights and input shape, kept on disk under the weights' hash, checked against torch before use,
and torch itself wherever the engine is missing, fails, or would not pay for its export.

Every forward-only pass asks here: the probe's feature cache (``extract_features``), scoring
(``predict_scores``: evaluate, adapt, suggest, a federation's validation and its evaluation-only sites)
and the frozen prefix in front of the trainable groups during fine-tuning (``train_phase``). The
normalisation (histogram equalisation included) runs in torch before the engine, so the graph holds
convolutions only.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedfreeze.config import EngineSetting, PrecisionSetting, TrainConfig
from fedfreeze.inference.openvino_graph import GRAPH_FILE, CompiledGraph, engine_version, export_graph
from fedfreeze.inference.precision import Precision, resolve_precision
from fedfreeze.models.grouped import GroupedNet
from fedfreeze.tensor_hash import tensors_hash

log = logging.getLogger("fedfreeze.engine")

# auto: the engine only for a pass over at least this many pixels (128 images at 224 px, counting epochs):
# an export costs 3-6 s on the 2-core machine, a 224 px Lite0 image ~0.06 s less in the engine than in torch
MIN_WORK_PIXELS = 128 * 224 * 224
# outputs on the check images: max |engine - torch| <= tolerance * max(1, max |torch|); fp32 measured ~3e-6
# (Lite0 features at 224 px); bf16 rounds every product to 8 bits of mantissa (measured ~0.1 on features)
TOLERANCE: dict[Precision, float] = {"fp32": 1e-4, "bf16": 0.25}
GRAPH_FORMAT = 2  # part of every cache key: raise it when what is exported changes
REFERENCE_FILE = "reference.npy"  # torch's output on the probe input, saved at export (no pickle)
PROBE_SEED = 0
CACHE_ENV = "FEDFREEZE_CACHE_DIR"


@dataclass(frozen=True)
class InferenceSettings:
    """How forward-only work runs: the engine (``train.engine``), the precision (``train.precision``) and
    where exported graphs are kept (``None``: ``default_cache_dir()``; a federated site: its state folder)."""

    engine: EngineSetting = "auto"
    precision: PrecisionSetting = "fp32"
    cache_dir: Path | None = None

    @classmethod
    def of(cls, train: TrainConfig, cache_dir: Path | None = None) -> InferenceSettings:
        return cls(train.engine, train.precision, cache_dir)

    def folder(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else default_cache_dir()


def default_cache_dir() -> Path:
    """``$FEDFREEZE_CACHE_DIR/engine``, else ``$XDG_CACHE_HOME/fedfreeze/engine``, else ``~/.cache/fedfreeze/engine``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "engine"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "fedfreeze" / "engine"


def engine_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def engine_capable(model: nn.Module) -> bool:
    """A plain ``GroupedNet`` (a model that computes its features its own way, the dual model, runs in torch)."""
    return (
        isinstance(model, GroupedNet)
        and type(model).features is GroupedNet.features
        and type(model).forward is GroupedNet.forward
    )


def wants_engine(
    settings: InferenceSettings, model: nn.Module, device: torch.device, images: torch.Tensor, passes: int = 1
) -> bool:
    """The one rule for using the engine: on the CPU, for a model it can run, and under ``auto`` only when
    OpenVINO is installed and the pass is large enough to repay an export."""
    if settings.engine == "torch" or device.type != "cpu" or not engine_capable(model) or len(images) == 0:
        return False
    if settings.engine == "openvino":
        return True
    pixels = len(images) * passes * images.shape[-1] * images.shape[-2]
    return pixels >= MIN_WORK_PIXELS and engine_installed()


class _Leading(nn.Module):
    """The leading ``groups`` of a model (pooled when they are all of its groups): what is exported."""

    def __init__(self, model: GroupedNet, groups: Sequence[str], pooled: bool) -> None:
        super().__init__()
        self.model = model
        self.groups = list(groups)
        self.pooled = pooled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.model.forward_groups(x, self.groups)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1) if self.pooled else x


@dataclass
class FrozenRunner:
    """The compiled leading groups of ``model``: inputs in [0, 1] in, their output (or pooled features) out."""

    model: GroupedNet
    groups: tuple[str, ...]
    pooled: bool
    graph: Callable[[np.ndarray], np.ndarray]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            normalised = self.model.normalize(x.float()).contiguous()
        out = torch.from_numpy(self.graph(normalised.numpy()))
        return out if self.pooled else out.contiguous(memory_format=torch.channels_last)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features: the engine's groups, then the rest of the backbone in torch (with autograd)."""
        out = self(x)
        return out if self.pooled else self.model.pooled_after(out, self.groups)


def graph_key(model: GroupedNet, groups: Sequence[str], pooled: bool, shape: Sequence[int]) -> str:
    """Changes with the groups' weights and buffers (adapters included), the input shape and what is exported."""
    names = set(groups) | {f"{g}.adapters" for g in groups}
    items = [(k, v) for k, v in model.state_dict().items() if model.part_of_key(k) in names]
    tag = f"{GRAPH_FORMAT}|{engine_version()}|{','.join(groups)}|{pooled}|{tuple(shape)}"
    return tensors_hash([*items, (tag, torch.zeros(0))])[:32]


def compile_frozen(
    model: GroupedNet, groups: Sequence[str], example: torch.Tensor, settings: InferenceSettings
) -> FrozenRunner | None:
    """The leading ``groups`` of ``model`` (eval mode, weights as they are) through the engine, exported on
    first use and cached under ``graph_key``.

    Checked before use: a new graph on ``example`` (inputs in [0, 1], the real images at hand) against
    torch; a cached one on a fixed probe input against torch's output kept beside it at export (no torch
    pass: its first run at a batch shape costs seconds on a CPU). None, with one line in the log, when
    anything fails: the caller runs torch instead.
    """
    precision = resolve_precision(settings.precision)
    groups = tuple(groups)
    pooled = list(groups) == list(model.groups)
    example = example[:2].float().contiguous()
    was_training = model.training
    model.eval()
    folder = None
    try:
        module = _Leading(model, groups, pooled)
        with torch.no_grad():
            normalised = model.normalize(example).contiguous()
        folder = settings.folder() / graph_key(model, groups, pooled, example.shape[1:])
        probe = probe_input(normalised.shape[1:])
        if (folder / GRAPH_FILE).is_file():
            expected = torch.from_numpy(np.load(folder / REFERENCE_FILE, allow_pickle=False))
            runner = FrozenRunner(model, groups, pooled, CompiledGraph(folder, precision))
            got = torch.from_numpy(runner.graph(probe.numpy()))
        else:
            with torch.no_grad():
                expected = module(normalised)
                reference = module(probe).numpy()

            def write(tmp: Path) -> None:
                export_graph(module, normalised, tmp)
                np.save(tmp / REFERENCE_FILE, reference, allow_pickle=False)

            _write_atomically(folder, write)
            runner = FrozenRunner(model, groups, pooled, CompiledGraph(folder, precision))
            got = runner(example)
        error = float((got - expected).abs().max()) / max(1.0, float(expected.abs().max()))
        if not error <= TOLERANCE[precision]:
            raise RuntimeError(f"its outputs differ from torch's by {error:.2g} (tolerance {TOLERANCE[precision]})")
        return runner
    except Exception as err:  # noqa: BLE001 - whatever the third-party converter raises: torch runs instead
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)  # a damaged or foreign graph is not kept: exported anew
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        log.warning("inference engine not used for %s (%s); running them in torch", "+".join(groups), reason)
        return None
    finally:
        model.train(was_training)


def probe_input(shape: Sequence[int]) -> torch.Tensor:
    """Two fixed pseudo-random inputs of ``shape`` (normalised scale): what a cached graph is checked on."""
    return torch.randn((2, *shape), generator=torch.Generator().manual_seed(PROBE_SEED))


def _write_atomically(folder: Path, write: Callable[[Path], None]) -> None:
    """Write into a folder beside ``folder`` and rename it into place: a reader never sees half a graph."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        os.replace(tmp, folder)
    except OSError:
        if not folder.is_dir():  # another process renamed its own copy into place first: keep that one
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def engine_features(
    model: GroupedNet, images: torch.Tensor, device: torch.device, settings: InferenceSettings
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The engine's pooled features (of a batch of inputs in [0, 1]) for a forward-only pass over ``images``,
    or None where ``wants_engine`` says no or the engine fails: the caller runs torch.

    The engine runs the model's frozen prefix, the groups whose weights stay put (so one graph serves every
    fold of a cross-validation and every round of a federation), or the whole backbone when nothing is
    marked frozen (a saved model scored as it is); the remaining groups run in torch."""
    if not wants_engine(settings, model, device, images):
        return None
    groups = model.frozen_prefix() or list(model.groups)
    runner = compile_frozen(model, groups, images[:2].float().div(255.0), settings)
    return None if runner is None else runner.features

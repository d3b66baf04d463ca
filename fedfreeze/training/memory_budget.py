"""Fit a training phase into a stated memory budget: choose batch size, freezing rate and activation storage.

A site states what it has (``train.max-train-memory-mb``). For each phase the engine measures the
model once (one forward and backward pass on two of the phase's images, with RNG and BatchNorm
statistics restored afterwards) and estimates the peak memory of a training step as::

    weights + gradients + optimizer state + score snapshot + saved activations + transient buffers

* weights: every parameter and buffer of the model;
* gradients: the parameters that can train at once (under dynamic freezing: the largest
  ``trained-per-step`` candidate layers plus the parameters that always train); the score
  snapshot is one more copy of the candidate weights that train (dynamic freezing only);
* optimizer state: AdamW's two moments for every parameter of the phase (with
  ``dynamic-freeze.optimizer-state = "drop"``: only for those that can train at once);
* saved activations, per image, measured with ``SavedTensorMeter``. Under dynamic freezing this is
  an upper bound for any selection of layers: what the deepest possible backward pass keeps (only
  the first candidate layer to run trains), plus the inputs of the ``trained-per-step`` candidates
  with the largest inputs, in the chosen storage;
* transient buffers: three copies of the largest activation and two of the input batch.

MB are 10^6 bytes. Not counted: the interpreter and libraries, the decoded data set, allocator
slack. Configurations are tried in this order and the first that fits is used (the least change
first): for each batch size (the configured one, then halved down to 1), for each freezing rate
(the configured one, then 0.95 and 0.98 when higher; dynamic freezing only), for each storage (the
configured one, then lean fp32 if it was PyTorch's own, then 8 bits per channel).

On a CPU with glibc, a budget also makes allocations of 1 MiB or more map and unmap their own
memory (``mallopt(M_MMAP_THRESHOLD)``): by default glibc raises that threshold as large blocks are
freed and keeps later activations in its heap, where freed memory mostly stays in the process
(measured on ResNet-50 with dynamic freezing: 1.36 GB resident instead of 0.53 GB). It costs
system time for fresh pages (about 15 % of a training step in that measurement).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from fedfreeze.config import TrainConfig
from fedfreeze.errors import ConfigError
from fedfreeze.models.grouped import GroupedNet
from fedfreeze.training.dynamic_freeze import freeze_units, trained_per_step
from fedfreeze.training.saved_activations import LeanActivations, SavedTensorMeter, layer_inputs, untouched
from fedfreeze.training.schedule import is_probe

log = logging.getLogger("fedfreeze.memory")

MB = 1e6
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20
TORCH = "torch"
EXTRA_RATES = (0.95, 0.98)
TRACE_IMAGES = 2
TRANSIENT_ACTIVATIONS = 3
TRANSIENT_INPUTS = 2


def resolve_storage(cfg: TrainConfig) -> str:
    """``activation-storage = "auto"``: PyTorch's own autograd under the schedule, lean fp32 under dynamic freezing."""
    if cfg.activation_storage != "auto":
        return cfg.activation_storage
    return "fp32" if cfg.freezing == "dynamic" else TORCH


def activation_context(storage: str) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """A factory of the context the forward pass runs in for this storage."""
    if storage == TORCH:
        return contextlib.nullcontext
    return lambda: LeanActivations(storage)


@dataclass(frozen=True)
class MemoryChoice:
    """What a phase trains with: batch size, dynamic freezing rate (``None``: the schedule) and storage."""

    batch_size: int
    rate: float | None
    storage: str


@dataclass
class MemoryPlan:
    """The choice for a phase and, under a budget, its estimate and the budget."""

    choice: MemoryChoice
    budget_mb: float | None = None
    estimate_mb: dict[str, float] | None = None
    rejected: int = 0  # configurations tried before this one that did not fit

    def record(self) -> dict[str, Any]:
        return {
            **asdict(self.choice),
            "budget_mb": self.budget_mb,
            "estimate_mb": self.estimate_mb,
            "rejected_configurations": self.rejected,
        }

    def describe(self) -> str:
        c = self.choice
        freezing = "schedule" if c.rate is None else f"dynamic freezing rate {c.rate:g}"
        text = f"batch {c.batch_size}, {freezing}, activation storage {c.storage}"
        if self.estimate_mb is not None:
            text += f"; estimate {format_estimate(self.estimate_mb)} of {self.budget_mb:g} MB"
        return text


def _mb(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def format_estimate(estimate: dict[str, float]) -> str:
    """``123 MB (weights 98, optimizer 20, ...)``."""
    parts = ", ".join(f"{k} {_mb(v)}" for k, v in estimate.items() if k != "total")
    return f"{_mb(estimate['total'])} MB ({parts})"


@dataclass
class UnitCost:
    key: str
    param_bytes: int
    input_elems: float  # per image
    input_elem_size: int


@dataclass
class PhaseProfile:
    """What one phase costs, measured once: fixed bytes and bytes per image."""

    weights: int
    phase_params: int
    always_params: int
    units: list[UnitCost]
    largest_activation: float  # bytes per image
    input_image: float  # bytes per image
    saved: dict[str, float] = field(default_factory=dict)  # storage -> bytes per image, whole phase trainable
    base: float = 0.0  # bytes per image of the deepest backward pass with every candidate frozen

    def estimate(self, choice: MemoryChoice, *, drop_optimizer_state: bool = False) -> dict[str, float]:
        """Peak training memory of ``choice`` in MB, by component."""
        b = choice.batch_size
        if choice.rate is None:
            grads, snapshot, optimizer = self.phase_params, 0, 2 * self.phase_params
            activations = b * self.saved[choice.storage]
        else:
            k = trained_per_step(len(self.units), choice.rate)
            top_params = sum(sorted((u.param_bytes for u in self.units), reverse=True)[:k])
            per_byte = (lambda u: u.input_elem_size) if choice.storage == "fp32" else (lambda u: 1)
            top_inputs = sum(sorted((u.input_elems * per_byte(u) for u in self.units), reverse=True)[:k])
            grads, snapshot = self.always_params + top_params, top_params
            optimizer = 2 * (grads if drop_optimizer_state else self.phase_params)
            activations = b * (self.base + top_inputs)
        transient = b * (TRANSIENT_ACTIVATIONS * self.largest_activation + TRANSIENT_INPUTS * self.input_image)
        parts = {
            "weights": self.weights,
            "optimizer": optimizer,
            "gradients": grads + snapshot,
            "activations": activations,
            "transient": transient,
        }
        out = {k: v / MB for k, v in parts.items()}
        out["total"] = sum(out.values())
        return out


def candidate_choices(cfg: TrainConfig, n: int) -> list[MemoryChoice]:
    """Every configuration the budget search may take, in order of preference."""
    batches = []
    b = min(cfg.batch_size, max(n, 1))
    while b >= 1:
        batches.append(b)
        b //= 2
    dynamic = cfg.freezing == "dynamic"
    rates: list[float | None] = [cfg.dynamic_freeze.rate] if dynamic else [None]
    if dynamic:
        rates += [r for r in EXTRA_RATES if r > cfg.dynamic_freeze.rate]
    first = resolve_storage(cfg)
    if dynamic and first == TORCH:
        first = "fp32"  # under dynamic freezing only the lean storages can be estimated (PyTorch's keeps far more)
    storages = [first] + (["fp32"] if first == TORCH else []) + (["int8-channel"] if "int8" not in first else [])
    return [MemoryChoice(b, r, s) for b in batches for r in rates for s in storages]


def choose(profile: PhaseProfile, cfg: TrainConfig, n: int, budget_mb: float) -> MemoryPlan:
    """The first configuration whose estimate fits ``budget_mb``; a ``ConfigError`` when none does."""
    drop = cfg.dynamic_freeze.optimizer_state == "drop"
    choices = candidate_choices(cfg, n)
    for i, choice in enumerate(choices):
        estimate = profile.estimate(choice, drop_optimizer_state=drop)
        if estimate["total"] <= budget_mb:
            return MemoryPlan(choice, budget_mb, estimate, rejected=i)
    last = choices[-1]
    smallest = profile.estimate(last, drop_optimizer_state=drop)
    raise ConfigError(
        f"train.max-train-memory-mb = {budget_mb:g} is too small: the leanest configuration "
        f"({MemoryPlan(last).describe()}) needs about {format_estimate(smallest)}"
    )


def _trace(model: GroupedNet, example: torch.Tensor, storage: str) -> float:
    """Peak bytes saved for backward by one forward and backward pass on ``example``, per image."""
    with SavedTensorMeter(model.parameters()) as meter:
        if storage == TORCH:
            out = model(example)
        else:
            with LeanActivations(storage):
                out = model(example)
    if out.requires_grad:
        out.float().sum().backward()
    return meter.peak / len(example)


def profile_phase(
    model: GroupedNet, parts: frozenset[str], cfg: TrainConfig, example: torch.Tensor, storages: list[str]
) -> PhaseProfile:
    """Measure a phase: fixed bytes, the inputs of every candidate layer and the saved bytes per image."""
    units, always = freeze_units(model, parts)
    phase = [p for part in parts for p in model.part_modules(part).parameters()]
    profile = PhaseProfile(
        weights=sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]),
        phase_params=sum(p.numel() * p.element_size() for p in phase),
        always_params=sum(p.numel() * p.element_size() for _, p in always),
        units=[],
        largest_activation=0.0,
        input_image=example[0].numel() * example.element_size(),
    )
    inputs, largest = layer_inputs(model, example)  # id(weight) -> input elements per image, in call order
    order = list(inputs)
    with untouched(model):
        if cfg.freezing == "dynamic" and units:
            # the deepest backward pass: only the first candidate layer to run trains (its own input is
            # counted with the trained layers' inputs, so it is taken out here)
            first = min(units, key=lambda u: order.index(id(u.weight)) if id(u.weight) in inputs else len(order))
            for unit in units:
                for _, param in unit.params:
                    param.requires_grad_(unit is first)
            own = inputs.get(id(first.weight), 0.0) * example.element_size()
            profile.base = max(_trace(model, example, "fp32") - own, 0.0)
        elif cfg.freezing != "dynamic":
            for storage in storages:
                profile.saved[storage] = _trace(model, example, storage)
    profile.largest_activation = largest
    profile.units = [
        UnitCost(u.key, u.numel * u.weight.element_size(), inputs.get(id(u.weight), 0.0), example.element_size())
        for u in units
    ]
    return profile


def plan_phase(
    model: GroupedNet, parts: frozenset[str], cfg: TrainConfig, *, n: int, example: torch.Tensor | None
) -> MemoryPlan:
    """The phase's batch size, freezing rate and storage: as configured, or fitted to the budget.

    ``example`` is a batch of the phase's images as the model receives them; ``None`` (the head
    trains on cached features: nothing to fit) keeps the configuration.
    """
    if is_probe(parts):  # nothing to freeze dynamically: the head always trains
        cfg = cfg.model_copy(update={"freezing": "schedule"})
    rate = cfg.dynamic_freeze.rate if cfg.freezing == "dynamic" else None
    configured = MemoryPlan(MemoryChoice(min(cfg.batch_size, max(n, 1)), rate, resolve_storage(cfg)))
    if cfg.max_train_memory_mb is None or example is None:
        return configured
    storages = sorted({c.storage for c in candidate_choices(cfg, n)})
    profile = profile_phase(model, parts, cfg, example[:TRACE_IMAGES], storages)
    plan = choose(profile, cfg, n, cfg.max_train_memory_mb)
    log.info("memory budget, phase %s: %s", "+".join(sorted(parts)), plan.describe())
    if example.device.type == "cpu":
        return_freed_memory()
    return plan


def return_freed_memory() -> bool:
    """glibc: serve allocations of 1 MiB or more from their own mappings, released when freed.

    Returns whether the setting took (``False`` off Linux or without glibc). Process-wide and
    idempotent; a budget on a CPU turns it on, because otherwise freed activation memory tends to
    stay in glibc's heap and the process grows far beyond what training holds.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False

"""The freezing schedule as a pure function: (step, config) -> the parts that train.

A *step* is an epoch at a site, or a round in a federation: the same language serves both. Steps
``0 .. probe_steps-1`` train only the head (linear probing). Fine-tuning step ``t`` (counted from
the end of the probe) also trains every group whose unfreeze fraction ``f`` has ``t >= floor(f *
finetune_steps)``: with the defaults layer4 joins at 10 %, layer3 at 30 %, layer2 at 60 %; the stem
and layer1 never train. ``method`` says whether an unfrozen group trains its own weights, its
adapters, or both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from fedfreeze.config import TrainConfig
from fedfreeze.errors import ConfigError
from fedfreeze.models.grouped import HEAD, adapter_part

Method = Literal["unfreeze", "adapters", "both"]


def is_probe(parts: frozenset[str] | set[str]) -> bool:
    """Only the head trains (linear probing, on cached features where possible): the one definition of
    "head only" for the engine, the optimiser, the memory budget and the federation's orders."""
    return set(parts) == {HEAD}


@dataclass(frozen=True)
class Phase:
    """A run of steps ``[start, end)`` with one set of trainable parts."""

    start: int
    end: int
    parts: frozenset[str]

    @property
    def probe(self) -> bool:
        """Only the head trains."""
        return is_probe(self.parts)

    @property
    def steps(self) -> int:
        return self.end - self.start


def check_groups(unfreeze: Mapping[str, float], groups: Sequence[str]) -> None:
    """Every group the schedule names must exist in the backbone."""
    unknown = sorted(set(unfreeze) - set(groups))
    if unknown:
        raise ConfigError(f"train.unfreeze names unknown group(s) {unknown}; this backbone's groups are {list(groups)}")


def check_rate_groups(train: TrainConfig, groups: Sequence[str]) -> None:
    """Every group ``train.lr`` (and a per-group ``train.weight-decay``) names must exist, when the
    config sets it: a misspelt group would be ignored silently while its group trains at no rate."""
    known = [*groups, HEAD]
    tables: list[tuple[str, Mapping[str, float], list[str]]] = []
    if "lr" in train.model_fields_set:
        tables.append(("lr", train.lr, known))
    if "weight_decay" in train.model_fields_set and isinstance(train.weight_decay, dict):
        tables.append(("weight-decay", train.weight_decay, [*known, "default"]))
    for name, table, allowed in tables:
        unknown = sorted(set(table) - set(allowed))
        if unknown:
            raise ConfigError(f"train.{name} names unknown group(s) {unknown}; this backbone's groups are {allowed}")


def unfreeze_step(fraction: float, finetune_steps: int) -> int:
    """First fine-tuning step at which a group with this unfreeze fraction trains."""
    return math.floor(fraction * finetune_steps + 1e-9)


def parts_for(group: str, method: Method) -> set[str]:
    if method == "unfreeze":
        return {group}
    if method == "adapters":
        return {adapter_part(group)}
    return {group, adapter_part(group)}


def trainable_parts(
    step: int,
    *,
    probe_steps: int,
    finetune_steps: int,
    unfreeze: Mapping[str, float],
    method: Method = "unfreeze",
) -> frozenset[str]:
    """The parts that train at ``step`` (0-based, counting the probe)."""
    total = probe_steps + finetune_steps
    if not 0 <= step < total:
        raise ValueError(f"step should be in [0, {total}), got {step}")
    parts = {HEAD}
    if step >= probe_steps:
        t = step - probe_steps
        for group, fraction in unfreeze.items():
            if t >= unfreeze_step(fraction, finetune_steps):
                parts |= parts_for(group, method)
    return frozenset(parts)


def phases(
    *, probe_steps: int, finetune_steps: int, unfreeze: Mapping[str, float], method: Method = "unfreeze"
) -> list[Phase]:
    """The schedule as runs of equal trainable parts; a new phase restarts the one-cycle LR."""
    out: list[Phase] = []
    for step in range(probe_steps + finetune_steps):
        parts = trainable_parts(
            step, probe_steps=probe_steps, finetune_steps=finetune_steps, unfreeze=unfreeze, method=method
        )
        # the probe's end always starts a new phase, even if nothing else unfreezes yet
        boundary = step == probe_steps
        if out and out[-1].parts == parts and not boundary:
            out[-1] = Phase(out[-1].start, step + 1, parts)
        else:
            out.append(Phase(step, step + 1, parts))
    return out


def adapter_groups(unfreeze: Mapping[str, float], method: Method) -> list[str]:
    """Groups that carry adapters: every scheduled group, unless whole blocks alone are unfrozen."""
    return [] if method == "unfreeze" else list(unfreeze)

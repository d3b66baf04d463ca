"""SlimFit-style dynamic freezing for CNNs: at every step, freeze the layers whose weights change least.

*Candidates* are the conv, linear and normalisation layers (those with a weight) inside the
phase's trainable parts, except the head, which always trains. A layer freezes and trains as a
whole: its bias (a BatchNorm shift) follows its weight. A bias alone needs no stored activation,
but training it would pull the backward pass down to its layer, and the backward pass is what
costs memory. Parameters of the trainable parts that belong to no candidate layer always train.

*Score.* After an optimizer step in which a layer trained, its score is
``mean(|w_new - w_prev| / |w_prev|)`` over the elements of its weight, leaving out elements
whose previous value is exactly zero (a weight that was all zeros scores ``+inf`` if it moved,
else 0).

*Selection.* Before every step the ``floor(rate * N)`` candidates with the lowest scores freeze
(``requires_grad`` off); the others train. A frozen layer keeps the score of the last step it
trained, so it rotates back in once the trained layers' scores fall below it (they do as the
learning rate anneals and as they converge).

*First steps.* A layer that has never trained has no score and ranks above every scored one: the
first ``ceil(N / trained-per-step)`` steps (the *sweep*) train every candidate once, then the
scores decide. (SlimFit trains every layer in its first iteration; that one step would need full
fine-tuning's memory, and the peak would not drop at all.) In a CNN the layers' inputs differ a
hundredfold in size (a ResNet-50 layer1 conv's input is 16 times a layer4 conv's), so the sweep
is dealt for memory: the unscored layers, largest input first, are dealt to the sweep steps in
snake order (1, 2, .., S, S, .., 2, 1, ...), so that no step trains several of the largest at
once; the order of the steps is drawn from the seed. Without input sizes the deal is random.

*Ties* (unscored layers, equal scores) are broken by a permutation drawn from a seeded generator
at every step, so a run is deterministic for a given seed. Scores live in a plain dict keyed by
the weight's ``state_dict`` key: the site engine carries it from one phase of the schedule to the
next, and a federated site can keep it between rounds.

With ``optimizer_state = "drop"``, a layer's AdamW moments are discarded when it freezes and start
again from zero when it rotates back in (as for a freshly unfrozen group): the optimizer then holds
state only for the layers that train, instead of for every candidate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedfreeze.models.grouped import HEAD, GroupedNet
from fedfreeze.training.saved_activations import layer_inputs

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear, *NORM_TYPES)
ZERO = 1e-12  # |w_prev| at or below this counts as zero


@dataclass(frozen=True)
class FreezeUnit:
    """One candidate layer: the scored weight's ``state_dict`` key and all its parameters."""

    key: str
    weight: nn.Parameter
    params: tuple[tuple[str, nn.Parameter], ...]

    @property
    def numel(self) -> int:
        return sum(p.numel() for _, p in self.params)


def freeze_units(model: GroupedNet, parts: Iterable[str]) -> tuple[list[FreezeUnit], list[tuple[str, nn.Parameter]]]:
    """Candidate layers of ``parts`` (input to head order) and the parameters of ``parts`` that always train."""
    parts = frozenset(parts)
    units: list[FreezeUnit] = []
    in_units: set[int] = set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, LAYER_TYPES) or not isinstance(weight, nn.Parameter):
            continue
        key = f"{name}.weight"
        part = model.part_of_key(key)
        if part == HEAD or part not in parts:
            continue
        params = tuple((f"{name}.{p_name}", p) for p_name, p in module.named_parameters(recurse=False))
        units.append(FreezeUnit(key, weight, params))
        in_units |= {id(p) for _, p in params}
    always = [
        (key, p) for key, p in model.named_parameters() if model.part_of_key(key) in parts and id(p) not in in_units
    ]
    return units, always


def unit_input_sizes(model: GroupedNet, parts: Iterable[str], example: torch.Tensor) -> dict[str, float]:
    """Input elements per image of every candidate layer (one forward pass without autograd)."""
    inputs, _ = layer_inputs(model, example)
    return {u.key: inputs.get(id(u.weight), 0.0) for u in freeze_units(model, parts)[0]}


def updated_keys(logs: Iterable[Any]) -> frozenset[str]:
    """``state_dict`` keys of the parameters updated at least once over some epochs (``EpochLog.trained``).

    A parameter of the trainable parts that is not among them is bit-identical to what the phase
    started from: a federated site need not send it.
    """
    return frozenset(key for log in logs for key in log.trained)


def change_score(prev: torch.Tensor, new: torch.Tensor) -> float:
    """``mean(|new - prev| / |prev|)`` over the elements whose previous value is not zero."""
    prev = prev.detach().float()
    delta = (new.detach().float() - prev).abs()
    nonzero = prev.abs() > ZERO
    if not bool(nonzero.any()):
        return math.inf if bool((delta > 0).any()) else 0.0
    return float((delta[nonzero] / prev.abs()[nonzero]).mean())


def trained_per_step(n_candidates: int, rate: float) -> int:
    """Candidates that train at each step: ``N - floor(rate * N)``."""
    return n_candidates - math.floor(rate * n_candidates + 1e-9)


class DynamicFreezer:
    """Chooses the trainable candidate layers before each step and scores them after it.

    Use: ``choose()`` before the forward pass; ``step(optimizer)`` instead of ``optimizer.step()``.
    """

    def __init__(
        self,
        model: GroupedNet,
        parts: Iterable[str],
        rate: float,
        *,
        seed: int | list[int],
        scores: dict[str, float] | None = None,
        drop_optimizer_state: bool = False,
        input_sizes: Mapping[str, float] | None = None,
    ) -> None:
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"freezing rate should be in [0, 1), got {rate}")
        self.units, self.always = freeze_units(model, parts)
        self.rate = rate
        self.n_train = trained_per_step(len(self.units), rate)
        self.scores: dict[str, float] = {} if scores is None else scores
        self.rng = np.random.default_rng(seed)
        self.drop_optimizer_state = drop_optimizer_state
        self.input_sizes = dict(input_sizes or {})
        self.trainable: list[FreezeUnit] = []
        self._sweep: dict[str, int] | None = None
        self.steps = 0

    def sweep_steps(self) -> dict[str, int]:
        """The sweep step of every layer unscored when the phase began (see the module docstring)."""
        if self._sweep is None:
            unscored = [u.key for u in self.units if u.key not in self.scores]
            steps = max(math.ceil(len(unscored) / max(self.n_train, 1)), 1)
            jitter = self.rng.permutation(len(unscored))
            by_size = sorted(range(len(unscored)), key=lambda i: (-self.input_sizes.get(unscored[i], 0.0), jitter[i]))
            order = self.rng.permutation(steps)
            self._sweep = {}
            for rank, i in enumerate(by_size):
                lap, pos = divmod(rank, steps)
                self._sweep[unscored[i]] = int(order[pos if lap % 2 == 0 else steps - 1 - pos])
        return self._sweep

    def ranking(self) -> list[FreezeUnit]:
        """Candidates from most to least deserving of training: unscored ones first, by sweep step,
        then by score; remaining ties broken by a permutation drawn from the seed."""
        sweep = self.sweep_steps()
        tiebreak = self.rng.permutation(len(self.units))
        keyed = [
            (-self.scores.get(u.key, math.inf), sweep.get(u.key, 0), int(t), i)
            for i, (u, t) in enumerate(zip(self.units, tiebreak, strict=False))
        ]
        return [self.units[k[-1]] for k in sorted(keyed)]

    def choose(self, optimizer: torch.optim.Optimizer | None = None) -> list[FreezeUnit]:
        """Freeze all but the ``n_train`` best-ranked candidates for the next step."""
        self.trainable = self.ranking()[: self.n_train]
        chosen = {u.key for u in self.trainable}
        for unit in self.units:
            train = unit.key in chosen
            for _, param in unit.params:
                param.requires_grad_(train)
                param.grad = None  # the last step used it; freed now, it does not sit through the forward pass
                if not train and self.drop_optimizer_state and optimizer is not None:
                    optimizer.state.pop(param, None)
        for _, param in self.always:
            param.requires_grad_(True)
        return self.trainable

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()``, then score every candidate that had a gradient."""
        prev = {u.key: u.weight.detach().clone() for u in self.trainable if u.weight.grad is not None}
        optimizer.step()
        for unit in self.trainable:
            if unit.key in prev:
                self.scores[unit.key] = change_score(prev[unit.key], unit.weight)
        self.steps += 1

    def release(self) -> None:
        """Make every candidate trainable again (the phase is over)."""
        for unit in self.units:
            for _, param in unit.params:
                param.requires_grad_(True)

    def summary(self) -> dict[str, object]:
        return {
            "rate": self.rate,
            "candidates": len(self.units),
            "trained_per_step": self.n_train,
            "always_trained": len(self.always),
            "scored": sum(u.key in self.scores for u in self.units),
        }

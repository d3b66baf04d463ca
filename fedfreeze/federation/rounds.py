"""The federation's schedule as one pure function: (round, configuration) -> what the round does.

Rounds ``1 .. dual-rounds`` (``train.recipe = "dual"`` only) train the whole dual model with a
learning rate that decays across them; then ``probe-rounds`` train only the head; then groups join
top-down at their ``unfreeze`` fractions of the remaining rounds (``training/schedule.py``, the same
rule a site applies to its epochs). The coordinator turns a ``RoundPlan`` into the round's orders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedfreeze.federation.config import FederationConfig
from fedfreeze.federation.protocol import DUAL, SINGLE
from fedfreeze.training.schedule import trainable_parts

MIN_LR_SCALE = 0.05  # the cosine decay of the dual rounds' learning rate ends near this fraction


@dataclass(frozen=True)
class RoundPlan:
    """What one round trains, for how long, and at which learning-rate scale."""

    round: int
    stage: str  # protocol.DUAL or protocol.SINGLE
    parts: frozenset[str]
    local_epochs: int
    lr_scale: float


def plan_round(rnd: int, fed: FederationConfig, dual_parts: frozenset[str] = frozenset()) -> RoundPlan:
    """Round ``rnd`` (1-based) of the federation ``fed``.

    ``dual_parts``: every part of the dual model, which a dual-stage round trains (it learns from scratch).
    """
    if not 1 <= rnd <= fed.rounds:
        raise ValueError(f"round should be in [1, {fed.rounds}], got {rnd}")
    if rnd <= fed.dual_rounds:
        return RoundPlan(rnd, DUAL, dual_parts, fed.dual_local_epochs, dual_lr_scale(rnd, fed))
    step = rnd - fed.dual_rounds  # counted in the probe/unfreezing schedule
    parts = trainable_parts(
        step - 1,
        probe_steps=fed.probe_rounds,
        finetune_steps=fed.finetune_rounds,
        unfreeze=fed.unfreeze,
        method=fed.method,
    )
    epochs = fed.probe_local_epochs if step <= fed.probe_rounds else fed.local_epochs
    return RoundPlan(rnd, SINGLE, parts, epochs, 1.0)


def dual_lr_scale(rnd: int, fed: FederationConfig) -> float:
    """The factor on ``train.dual.lr`` in dual round ``rnd``: 1 throughout, or (``cosine``) from 1 in the
    first round down to about ``MIN_LR_SCALE`` in the last. Each round's local training still runs its own
    one-cycle schedule; the decay across rounds lets the last rounds refine instead of moving every site's
    model as far as the first ones (label-skewed sites drift apart)."""
    if fed.dual_lr_decay == "none" or fed.dual_rounds <= 1:
        return 1.0
    progress = (min(rnd, fed.dual_rounds) - 1) / fed.dual_rounds
    return MIN_LR_SCALE + (1 - MIN_LR_SCALE) * 0.5 * (1 + math.cos(math.pi * progress))

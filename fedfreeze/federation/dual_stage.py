"""``train.recipe = "dual"`` in a federation: the dual-input-output stage as the first rounds, then the merge.

Design (no Flower types here):

* **Rounds 1 .. dual-rounds** train the dual model (``fedfreeze.models.dual.DualNet``): both
  sub-models, every group and both heads. Each sampled site runs ``dual-local-epochs`` epochs of
  the dual stage on its own data (sub-model A on its images, B on augmented copies) and returns
  the arrays, which the strategy averages as usual. Nothing is frozen yet (the model trains from
  scratch), so the round's trainable parts are the whole model, and they travel both ways; the
  BatchNorm running statistics travel too (they are learnt in this stage).
* **After the last dual round** the coordinator merges the aggregated dual model into the
  single-input model (``merge_state``: the group arrays stay as they are, the two heads become one
  over the concatenated features). The merge is exact, so the first merged round starts from the
  dual model's joined output.
* **The remaining rounds** are the usual schedule counted from there: ``probe-rounds`` with only
  the head, then groups joining from the last one back at their ``unfreeze`` fractions of the
  fine-tuning rounds.

What travels in the merged rounds: the round's trainable arrays, both ways, as in every
federation. The one addition: the frozen groups now hold weights the federation trained (in the
dual stage), which a site cannot rebuild by itself the way it rebuilds a pretrained backbone from
its local checkpoint. So the coordinator also sends them *down*, in a separate ``base`` record;
they never travel up (a reply holds only the trainable arrays, as the checks demand), and the
site proves it used them with the usual frozen-weight hash. This keeps sites stateless (in a
deployment every message starts a fresh process; a site sampled for the first time, or one that
lost its disk, needs nothing from earlier rounds) for about 57 KB per message with ``lwcnn``. The
alternative, sending the merged backbone once and keeping it on each site's disk, saves those
bytes but breaks with client sampling, failed rounds or a new site.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from fedfreeze.config import ModelConfig
from fedfreeze.federation.exchange import ExchangePlan, subset
from fedfreeze.federation.protocol import DUAL
from fedfreeze.models.dual import HEAD_WEIGHT, DualNet, build_dual, merge_state
from fedfreeze.models.grouped import GroupedNet

log = logging.getLogger("fedfreeze.coordinator")


class StandardRecipe:
    """The coordinator's view of the standard recipe: one pretrained single-input model from round 1."""

    def __init__(self, model: GroupedNet) -> None:
        self.model = model
        self.parts: frozenset[str] = frozenset()  # no dual rounds

    def initial_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def model_for(self, stage: str) -> GroupedNet:
        return self.model

    def begin_round(self, state: dict[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        return state

    def base_for(self, state: Mapping[str, torch.Tensor], plan: ExchangePlan) -> dict[str, torch.Tensor]:
        """Nothing frozen travels: every site rebuilds the frozen backbone from its pretrained checkpoint."""
        return {}

    def state_keys(self, state: Mapping[str, torch.Tensor]) -> set[str]:
        """The keys a checkpointed global state must hold."""
        return set(self.model.state_dict())


class DualRecipe(StandardRecipe):
    """The coordinator's view of the dual recipe: the dual model until the merge, then the merged
    single-input model whose frozen groups travel down (its rounds: ``rounds.plan_round``)."""

    def __init__(self, merged: GroupedNet, model_cfg: ModelConfig, dual_rounds: int, seed: int) -> None:
        super().__init__(merged)
        with torch.random.fork_rng():  # seeded, without resetting the process's global generator
            torch.manual_seed(seed)
            self.dual: DualNet = build_dual(model_cfg)
        self.rounds = dual_rounds
        self.parts = frozenset(self.dual.parts)  # a dual round trains everything: both sub-models and heads

    def initial_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.dual.state_dict().items()}

    def model_for(self, stage: str) -> GroupedNet:
        return self.dual if stage == DUAL else self.model

    def begin_round(self, state: dict[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        """The first round after the dual stage merges the global dual model (exactly) into one model."""
        if stage != DUAL and self.is_dual_state(state):
            log.info("the dual model of %d rounds merged into one single-input model", self.rounds)
            return merge_state(state)
        return state

    def base_for(self, state: Mapping[str, torch.Tensor], plan: ExchangePlan) -> dict[str, torch.Tensor]:
        """After the merge the frozen groups hold federated weights a site cannot rebuild: they go down."""
        return {} if self.is_dual_state(state) else base_arrays(state, plan)

    def state_keys(self, state: Mapping[str, torch.Tensor]) -> set[str]:
        return set(self.dual.state_dict()) if self.is_dual_state(state) else set(self.model.state_dict())

    @staticmethod
    def is_dual_state(state: Mapping[str, torch.Tensor]) -> bool:
        return HEAD_WEIGHT in state


def recipe_for(model: GroupedNet, model_cfg: ModelConfig, recipe: str, dual_rounds: int, seed: int) -> StandardRecipe:
    """The coordinator's recipe object for ``train.recipe``."""
    return DualRecipe(model, model_cfg, dual_rounds, seed) if recipe == "dual" else StandardRecipe(model)


def base_arrays(state: Mapping[str, torch.Tensor], plan: ExchangePlan) -> dict[str, torch.Tensor]:
    """The frozen arrays of a merged round (sent down with the trainable ones, never back)."""
    return subset(state, plan.frozen)

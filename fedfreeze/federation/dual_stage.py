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

from collections.abc import Mapping

import torch

from fedfreeze.config import ModelConfig
from fedfreeze.federation.exchange import ExchangePlan, subset
from fedfreeze.models.dual import HEAD_WEIGHT, DualNet, build_dual, merge_state



class DualStage:
    """The coordinator's view of the dual recipe: the dual model and the merge (its rounds: ``rounds.plan_round``)."""

    def __init__(self, model_cfg: ModelConfig, dual_rounds: int, seed: int) -> None:
        with torch.random.fork_rng():  # seeded, without resetting the process's global generator
            torch.manual_seed(seed)
            self.model: DualNet = build_dual(model_cfg)
        self.rounds = dual_rounds

    def initial_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    @property
    def parts(self) -> frozenset[str]:
        """A dual round trains everything: both sub-models' groups and heads."""
        return frozenset(self.model.parts)

    @staticmethod
    def is_dual_state(state: Mapping[str, torch.Tensor]) -> bool:
        return HEAD_WEIGHT in state

    @staticmethod
    def merge(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The merged model's global state from the aggregated dual model's."""
        return merge_state(state)


def base_arrays(state: Mapping[str, torch.Tensor], plan: ExchangePlan) -> dict[str, torch.Tensor]:
    """The frozen arrays of a merged round (sent down with the trainable ones, never back)."""
    return subset(state, plan.frozen)

"""What a site does differently in each stage of a round: the model it builds, the model it scores,
and how it trains. The standard stage is the probe / progressive unfreezing of a pretrained model;
the dual stage (``train.recipe = "dual"``, its first rounds) trains the dual-input-output model
from scratch and scores its merge. ``stage_for(orders)`` picks one; ``SiteRuntime`` never branches."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import torch

from fedfreeze.config import ModelConfig, TrainConfig
from fedfreeze.data.imageset import ImageSet
from fedfreeze.federation.protocol import DUAL, RoundOrders
from fedfreeze.models.dual import DualNet, build_dual, merge_dual
from fedfreeze.models.grouped import GroupedNet
from fedfreeze.models.registry import build_model
from fedfreeze.training.dual import train_dual
from fedfreeze.training.engine import EpochLog, train_phase

Regularizer = Callable[[], torch.Tensor] | None


class StandardStage:
    """A pretrained single-input model: the round's parts train (the head alone on cached features).

    Every stage obeys the orders' ``bn_stats`` and ``lr_scale`` as sent (the coordinator decided them)."""

    def build(self, cfg: ModelConfig, orders: RoundOrders) -> GroupedNet:
        model, _ = build_model(cfg, list(orders.adapter_groups), orders.train.adapter_rank)
        return model

    def scored(self, model: GroupedNet) -> GroupedNet:
        return model

    def train(
        self,
        model: GroupedNet,
        data: ImageSet,
        orders: RoundOrders,
        train_cfg: TrainConfig,
        *,
        rng: np.random.Generator,
        device: torch.device,
        features: torch.Tensor | None,
        regularizer: Regularizer,
        engine_cache: Path | None = None,
    ) -> list[EpochLog]:
        return train_phase(
            model,
            data.images,
            data.labels,
            orders.parts,
            train_cfg,
            epochs=orders.local_epochs,
            rng=rng,
            device=device,
            features=features,
            regularizer=regularizer,
            engine_cache=engine_cache,
            bn_stats=orders.bn_stats,  # the coordinator's decision, never re-derived here
            lr_scale=orders.lr_scale,
        )


class DualStage(StandardStage):
    """The dual model (both sub-models, every layer), scored by its merge, trained at the round's
    learning-rate scale of ``train.dual.lr``."""

    def build(self, cfg: ModelConfig, orders: RoundOrders) -> GroupedNet:
        return build_dual(cfg)

    def scored(self, model: GroupedNet) -> GroupedNet:
        return merge_dual(cast(DualNet, model))  # the joined output, exactly

    def train(
        self,
        model: GroupedNet,
        data: ImageSet,
        orders: RoundOrders,
        train_cfg: TrainConfig,
        *,
        rng: np.random.Generator,
        device: torch.device,
        features: torch.Tensor | None,
        regularizer: Regularizer,
        engine_cache: Path | None = None,  # the dual model trains every layer: no frozen prefix to run elsewhere
    ) -> list[EpochLog]:
        return list(
            train_dual(
                cast(DualNet, model),
                data.images,
                data.labels,
                train_cfg,
                epochs=orders.local_epochs,
                rng=rng,
                device=device,
                regularizer=regularizer,
                bn_stats=orders.bn_stats,
                lr_scale=orders.lr_scale,
            )
        )


def stage_for(orders: RoundOrders) -> StandardStage:
    return DualStage() if orders.stage == DUAL else StandardStage()

"""Discriminative learning rates as optimizer param groups, and the one-cycle schedule of a phase."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from fedfreeze.config import TrainConfig
from fedfreeze.errors import ConfigError
from fedfreeze.models.grouped import ADAPTER_SUFFIX, HEAD, GroupedNet
from fedfreeze.training.schedule import is_probe


def part_lr(part: str, cfg: TrainConfig, *, probe: bool = False) -> float:
    """A part's peak learning rate: ``train.lr[group]``, ``train.adapter-lr`` for adapters, and
    ``train.probe-lr`` for the head while it trains alone."""
    if probe and part == HEAD:
        return cfg.probe_lr
    if part.endswith(ADAPTER_SUFFIX):
        return cfg.adapter_lr
    if part not in cfg.lr:
        raise ConfigError(f"train.lr has no entry for {part!r}, which the schedule trains; set lr.{part}")
    return cfg.lr[part]


def check_lr_scale(lr_scale: float) -> None:
    """A learning-rate scale is an order from the coordinator: a value no optimizer can use is refused."""
    if not (math.isfinite(lr_scale) and lr_scale > 0):
        raise ValueError(f"lr-scale should be a positive number, got {lr_scale}")


def param_groups(
    model: GroupedNet, parts: Iterable[str], cfg: TrainConfig, lr_scale: float = 1.0
) -> list[dict[str, Any]]:
    """One optimizer group per trainable part and decay kind; only ``requires_grad`` parameters enter.

    Biases and normalisation weights (1-D tensors) get no weight decay, as is usual for AdamW.
    ``lr_scale`` multiplies every group's learning rate (a federation round's order, ``RoundOrders.lr_scale``).
    """
    check_lr_scale(lr_scale)
    parts = set(parts)
    probe = is_probe(parts)
    groups: list[dict[str, Any]] = []
    for part in model.parts:
        if part not in parts:
            continue
        decay: list[torch.nn.Parameter] = []
        no_decay: list[torch.nn.Parameter] = []
        for param in model.part_modules(part).parameters():
            if param.requires_grad:
                (no_decay if param.ndim <= 1 else decay).append(param)
        lr = part_lr(part, cfg, probe=probe) * lr_scale
        wd = cfg.group_weight_decay(part.removesuffix(ADAPTER_SUFFIX))
        if decay:
            groups.append({"params": decay, "lr": lr, "weight_decay": wd, "part": part})
        if no_decay:
            groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "part": part})
    return groups


def make_optimizer(
    model: GroupedNet, parts: Iterable[str], cfg: TrainConfig, total_steps: int, lr_scale: float = 1.0
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.OneCycleLR]:
    """AdamW over the trainable parts and a one-cycle schedule over the phase's optimizer steps.

    A new phase (a group unfreezes) gets a new optimizer and a restarted cycle, so the newly
    unfrozen weights warm up gently instead of meeting the tail of an old cycle.
    """
    groups = param_groups(model, parts, cfg, lr_scale)
    optimizer = torch.optim.AdamW(groups)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[g["lr"] for g in groups],
        total_steps=max(total_steps, 1),
        pct_start=0.3,
        anneal_strategy="cos",
        cycle_momentum=False,
    )
    return optimizer, scheduler

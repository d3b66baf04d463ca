"""The dual recipe at a site: the dual-input-output stage, the merge, then progressive unfreezing.

1. **Dual stage** (``train_dual``, ``train.dual.epochs`` epochs): the dual model
   (``fedfreeze.models.dual.DualNet``) trains from scratch, every layer of both sub-models. Each
   batch goes to sub-model A as it is and to sub-model B as an augmented copy (rotation, zoom,
   translation, brightness: ``training/dual_augment.py``); each sub-model has its own output and
   its own loss, and the step minimises their sum. BatchNorm learns its running statistics (the
   model starts from random weights).
2. **Merge** (``merge_dual``): one single-input model whose output equals the dual model's
   joined output on two equal inputs.
3. **Progressive unfreezing** of the merged model with the usual schedule (``training/engine.fit``:
   ``probe-epochs`` with only the head, then ``epochs`` with groups joining from the last one back
   at their ``unfreeze`` fractions), with the usual learning rates per group and BatchNorm policy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from fedfreeze.config import DualConfig, TrainConfig
from fedfreeze.models.dual import DualNet, merge_dual
from fedfreeze.models.grouped import GroupedNet
from fedfreeze.training.dual_augment import DualAugmentSettings, augment_dual
from fedfreeze.training.engine import EpochLog, extract_features, fit, loss_fn, run_epochs, targets_for, to_unit
from fedfreeze.training.freezing import apply_parts
from fedfreeze.training.optim import check_lr_scale

DUAL_STAGE = "dual"
MERGED_STAGE = "merged"


@dataclass
class StageEpochLog(EpochLog):
    """An epoch of the dual recipe, with the stage it belongs to (``dual`` or ``merged``)."""

    stage: str = DUAL_STAGE


def augment_settings(cfg: DualConfig) -> DualAugmentSettings:
    return DualAugmentSettings(
        rotation=cfg.rotation, zoom=cfg.zoom, translation=cfg.translation, brightness=cfg.brightness
    )


def dual_optimizer(
    model: DualNet, cfg: TrainConfig, total_steps: int, lr_scale: float = 1.0
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.OneCycleLR]:
    """AdamW over every trainable parameter at ``train.dual.lr`` times ``lr_scale`` (no decay on biases
    and norm weights) and a one-cycle schedule over the stage's steps."""
    check_lr_scale(lr_scale)
    lr = cfg.dual.lr * lr_scale
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.dual.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=lr,
        total_steps=max(total_steps, 1),
        pct_start=0.3,
        anneal_strategy="cos",
        cycle_momentum=False,
    )
    return optimizer, scheduler


@contextlib.contextmanager
def flushed_denormals() -> Iterator[None]:
    """Flush denormal floats to zero while the dual stage trains, then restore PyTorch's default.

    On x86 CPUs denormals made the first epochs from scratch about 50x slower (0.5 s -> 25 s an
    epoch on 2,000 digits); flushing them to zero changed no loss. The flag is process-wide, so it
    is switched off again (its default) for whatever runs next in the process.
    """
    global _flush_depth
    if _flush_depth == 0:
        torch.set_flush_denormal(True)
    _flush_depth += 1
    try:
        yield
    finally:
        _flush_depth -= 1
        if _flush_depth == 0:
            torch.set_flush_denormal(False)


_flush_depth = 0  # nesting of flushed_denormals (fit_dual holds it around train_dual and the merged phases)


def train_dual(
    model: DualNet,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    *,
    epochs: int,
    rng: np.random.Generator,
    device: torch.device,
    first_epoch: int = 0,
    on_epoch: Callable[[EpochLog], None] | None = None,
    regularizer: Callable[[], torch.Tensor] | None = None,
    bn_stats: Literal["frozen", "update"] = "update",
    lr_scale: float = 1.0,
) -> list[StageEpochLog]:
    """Train both sub-models of ``model`` for ``epochs`` epochs: A on ``images``, B on augmented copies.

    ``regularizer`` adds a term to every step's loss (FedProx's proximal term in a federation).
    The logged loss is the mean of the sub-models' losses. ``bn_stats`` (by default ``"update"``: from
    scratch, BatchNorm learns its statistics) and ``lr_scale`` (on ``train.dual.lr``) are a federation
    round's orders (``RoundOrders``), obeyed as sent.
    """
    with flushed_denormals():
        model.update_bn_stats = bn_stats == "update"
        apply_parts(model, model.parts)
        model.to(device).train()
        settings = augment_settings(cfg.dual)
        n = len(labels)
        batch = min(cfg.batch_size, n)
        steps_per_epoch = max(n // batch, 1)
        optimizer, scheduler = dual_optimizer(model, cfg, steps_per_epoch * epochs, lr_scale)
        all_targets = targets_for(labels, model.num_classes, cfg.label_smoothing)

        def batch_loss(idx: torch.Tensor) -> tuple[torch.Tensor, float]:
            targets = all_targets[idx].to(device)
            original = to_unit(images[idx], device)
            logits = model(DualNet.pair(original, augment_dual(original, rng, settings)))
            branch_losses = torch.stack([loss_fn(logits[:, i], targets) for i in range(model.branches)])
            return branch_losses.sum(), float(branch_losses.detach().mean())

        logs = []
        epochs_run = run_epochs(
            model, labels, cfg, optimizer, scheduler, batch_loss,
            epochs=epochs, batch=batch, rng=rng, regularizer=regularizer,
        )  # fmt: skip
        for epoch, done in enumerate(epochs_run):
            log = StageEpochLog(
                epoch=first_epoch + epoch,
                parts=sorted(model.parts),
                loss=done.loss,
                seconds=done.seconds,
                cached_features=False,
                stage=DUAL_STAGE,
            )
            logs.append(log)
            if on_epoch is not None:
                on_epoch(log)
        return logs


def fit_dual(
    model: DualNet,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    *,
    rng: np.random.Generator,
    device: torch.device,
    features: Callable[[GroupedNet], torch.Tensor] | None = None,
    on_epoch: Callable[[EpochLog], None] | None = None,
) -> tuple[GroupedNet, list[StageEpochLog]]:
    """The whole recipe: the dual stage, the merge, then the merged model's probe and progressive
    unfreezing. Returns the merged model and every epoch's log (merged epochs numbered after the
    dual ones). ``features`` computes the probe's backbone features of ``images`` under the merged
    model (a site passes its feature cache); by default they are computed directly.
    """
    logs = train_dual(model, images, labels, cfg, epochs=cfg.dual.epochs, rng=rng, device=device, on_epoch=on_epoch)
    merged = merge_dual(model)
    probe_features = None
    if cfg.probe_epochs > 0 and not cfg.probe_augment:
        probe_features = features(merged) if features is not None else extract_features(merged, images, device)
    offset = cfg.dual.epochs

    def staged(log: EpochLog) -> StageEpochLog:
        return StageEpochLog(**{**vars(log), "epoch": log.epoch + offset}, stage=MERGED_STAGE)

    with flushed_denormals():  # the merged model's fine-tuning too (the weights trained from scratch)
        merged_logs = fit(
            merged,
            images,
            labels,
            cfg,
            rng=rng,
            device=device,
            probe_features=probe_features,
            on_epoch=None if on_epoch is None else lambda log: on_epoch(staged(log)),
        )
    logs += [staged(log) for log in merged_logs]
    return merged, logs

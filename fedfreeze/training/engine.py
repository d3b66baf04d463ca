"""The local training loop: phases of the freezing schedule over in-memory images.

One function, ``train_phase``, trains a model for some epochs with a fixed set of trainable parts;
a site runs the whole schedule with ``fit``, a federated client runs one round's phase. Two
shortcuts follow from freezing:

* the frozen prefix of the backbone runs without autograd (see ``GroupedNet.features``), and through
  an inference engine where the pass is large enough to repay its export (``fedfreeze.inference.engine``);
* during linear probing with deterministic inputs, backbone features are computed once
  (``extract_features``) and the head trains on them, so a probe epoch costs almost nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from fedfreeze.config import TrainConfig, resolve_bn_stats
from fedfreeze.errors import ConfigError
from fedfreeze.inference.engine import InferenceSettings, compile_frozen, engine_features, wants_engine
from fedfreeze.inference.precision import autocast, resolve_precision
from fedfreeze.models.grouped import GroupedNet
from fedfreeze.training.augment import augment_batch
from fedfreeze.training.cutmix import apply_cutmix, sample_box, sample_lambda
from fedfreeze.training.dynamic_freeze import DynamicFreezer, unit_input_sizes
from fedfreeze.training.freezing import apply_parts
from fedfreeze.training.memory_budget import TRACE_IMAGES, activation_context, plan_phase
from fedfreeze.training.optim import make_optimizer
from fedfreeze.training.sampling import epoch_order
from fedfreeze.training.schedule import Phase, adapter_groups, is_probe, phases

EVAL_BATCH = 64
DEFAULT_INFERENCE = InferenceSettings()


@dataclass
class EpochLog:
    """What one epoch did, for progress bars and metrics files."""

    epoch: int
    parts: list[str]
    loss: float
    seconds: float
    cached_features: bool
    batch_size: int = 0
    # state_dict keys of the parameters that got at least one optimizer update in this epoch
    trained: tuple[str, ...] = ()
    freezing: dict[str, Any] | None = None  # dynamic freezing: rate, candidates, layers trained per step
    memory_plan: dict[str, Any] | None = None  # first epoch of a phase: batch size, rate, storage, estimate

    def record(self) -> dict[str, Any]:
        """This epoch for a metrics file (the trained parameters as a count)."""
        out = asdict(self)
        out["trained_tensors"] = len(out.pop("trained"))
        return out


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (a CUDA GPU when torch sees one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; a
    device this machine lacks is refused here, before any data is read, not at the first tensor."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name!r}: unknown device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: fedfreeze runs on cpu or cuda only; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name!r}: torch sees no CUDA GPU on this machine; use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0"
        )
    return device


def to_unit(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images to float in [0, 1], channels-last (faster convolutions on CPU)."""
    x = images.to(device, non_blocking=True).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last)


def targets_for(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """Float targets: the positive-class probability (binary) or one-hot rows (multi-class), moved
    ``smoothing`` of the way toward uniform (label smoothing)."""
    hard = labels.float() if num_classes == 2 else F.one_hot(labels, num_classes).float()
    uniform = 0.5 if num_classes == 2 else 1.0 / num_classes
    return hard * (1.0 - smoothing) + smoothing * uniform


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits on one logit for binary tasks; cross-entropy with soft targets otherwise."""
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0], targets)
    return F.cross_entropy(logits, targets)


@torch.no_grad()
def extract_features(
    model: GroupedNet,
    images: torch.Tensor,
    device: torch.device,
    batch_size: int = EVAL_BATCH,
    *,
    inference: InferenceSettings = DEFAULT_INFERENCE,
) -> torch.Tensor:
    """Pooled backbone features of every image, computed in eval mode without autograd (through the
    inference engine where ``inference`` and the size of the pass call for it)."""
    was_training = model.training
    model.eval()
    features = engine_features(model, images, device, inference) or model.features
    with autocast(resolve_precision(inference.precision, device), device):
        feats = [
            features(to_unit(images[i : i + batch_size], device)).float().cpu()
            for i in range(0, len(images), batch_size)
        ]
    model.train(was_training)
    return torch.cat(feats) if feats else torch.empty(0, model.feature_dim)


@torch.no_grad()
def predict_scores(
    model: GroupedNet,
    images: torch.Tensor,
    device: torch.device,
    batch_size: int = EVAL_BATCH,
    *,
    inference: InferenceSettings = DEFAULT_INFERENCE,
) -> np.ndarray:
    """Positive-class probabilities ``[N]`` (binary) or class probabilities ``[N, K]``."""
    was_training = model.training
    model.eval()
    features = engine_features(model, images, device, inference)
    out = []
    with autocast(resolve_precision(inference.precision, device), device):
        for i in range(0, len(images), batch_size):
            x = to_unit(images[i : i + batch_size], device)
            logits = (model(x) if features is None else model.head(features(x))).float().cpu()
            out.append(torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else torch.softmax(logits, 1))
    model.train(was_training)
    if not out:
        return np.empty(0)
    return torch.cat(out).numpy()


@dataclass
class EpochDone:
    """What ``run_epochs`` measured in one epoch; the caller turns it into its log."""

    loss: float  # mean over the epoch's steps of the logged loss
    seconds: float
    trained: set[str]  # parameters that got a gradient in at least one step


def run_epochs(
    model: torch.nn.Module,
    labels: torch.Tensor,
    cfg: TrainConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch_loss: Callable[[torch.Tensor], tuple[torch.Tensor, float | None]],
    *,
    epochs: int,
    batch: int,
    rng: np.random.Generator,
    regularizer: Callable[[], torch.Tensor] | None = None,
    freezer: DynamicFreezer | None = None,
) -> Iterator[EpochDone]:
    """The one training loop: epochs of shuffled (or class-balanced) batches, each step
    ``batch_loss(indices)`` (+ ``regularizer()``), backward, optimizer and scheduler steps.

    ``batch_loss`` returns the loss to minimise and, optionally, the value to log instead of it (the
    dual recipe logs its sub-models' mean loss). A dynamic ``freezer`` chooses the step's layers
    before it and takes the optimizer step. Yields after every epoch, so callers log as it runs.
    """
    labels_np = labels.numpy()
    steps_per_epoch = max(len(labels) // batch, 1)
    for _ in range(epochs):
        start = time.perf_counter()
        order = epoch_order(labels_np, cfg.balanced_sampling, rng)
        losses = []
        trained: set[str] = set()
        for step in range(steps_per_epoch):
            if freezer is not None:
                freezer.choose(optimizer)
            loss, logged = batch_loss(torch.from_numpy(order[step * batch : (step + 1) * batch]))
            if regularizer is not None:
                loss = loss + regularizer()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            trained.update(key for key, param in model.named_parameters() if param.grad is not None)
            if freezer is not None:
                freezer.step(optimizer)  # optimizer.step(), then the trained layers' scores
            else:
                optimizer.step()
            scheduler.step()
            losses.append(loss.item() if logged is None else logged)
        yield EpochDone(float(np.mean(losses)), time.perf_counter() - start, trained)


def train_phase(
    model: GroupedNet,
    images: torch.Tensor,
    labels: torch.Tensor,
    parts: frozenset[str],
    cfg: TrainConfig,
    *,
    epochs: int,
    rng: np.random.Generator,
    device: torch.device,
    features: torch.Tensor | None = None,
    first_epoch: int = 0,
    on_epoch: Callable[[EpochLog], None] | None = None,
    regularizer: Callable[[], torch.Tensor] | None = None,
    freeze_scores: dict[str, float] | None = None,
    engine_cache: Path | None = None,
    bn_stats: Literal["frozen", "update"] | None = None,
    lr_scale: float = 1.0,
) -> list[EpochLog]:
    """Train ``parts`` for ``epochs`` epochs with one AdamW + one-cycle schedule.

    ``features`` (precomputed backbone features of ``images``) are used when only the head trains;
    CutMix and augmentation apply only when training on images. ``regularizer`` adds a term to
    every step's loss (FedProx's proximal term, for example). Under ``freezing = "dynamic"`` the
    candidate layers of ``parts`` are frozen and unfrozen step by step (``freeze_scores``, updated
    in place, carries their scores from one phase to the next); with ``max-train-memory-mb`` the
    batch size, freezing rate and activation storage are fitted to the budget. Every ``EpochLog``
    names the parameters that were updated. When BatchNorm learns its statistics (``bn-stats =
    "update"``, or ``"auto"`` from random weights) they are re-estimated over ``images`` at the end.
    ``bn_stats`` and ``lr_scale`` are a federation round's orders (``RoundOrders``), obeyed as sent: the
    coordinator resolved the BatchNorm mode, so only a caller outside a federation leaves it to
    ``resolve_bn_stats``; ``lr_scale`` multiplies every learning rate.
    The frozen prefix runs through the inference engine where ``wants_engine`` says so (its graphs kept
    in ``engine_cache``, default ``default_cache_dir()``), the trainable groups in torch at ``cfg.precision``.
    """
    model.update_bn_stats = (bn_stats or resolve_bn_stats(cfg, model.pretrained)) == "update"
    apply_parts(model, parts)
    model.to(device).train()
    head_only = is_probe(parts)
    use_features = head_only and features is not None
    n = len(labels)
    trace = to_unit(images[:TRACE_IMAGES], device)  # two images: what the planner and the freezer measure
    example = trace if cfg.max_train_memory_mb and not use_features else None
    plan = plan_phase(model, parts, cfg, n=n, example=example)
    batch = min(plan.choice.batch_size, n)
    steps_per_epoch = max(n // batch, 1)
    optimizer, scheduler = make_optimizer(model, parts, cfg, steps_per_epoch * epochs, lr_scale)
    freezer = None
    if plan.choice.rate is not None and not head_only:
        dyn = cfg.dynamic_freeze
        freezer = DynamicFreezer(
            model,
            parts,
            plan.choice.rate,
            seed=[cfg.seed if dyn.seed is None else dyn.seed, first_epoch],
            scores=freeze_scores,
            drop_optimizer_state=dyn.optimizer_state == "drop",
            input_sizes=unit_input_sizes(model, parts, trace),
        )
    lean = activation_context(plan.choice.storage)
    all_targets = targets_for(labels, model.num_classes, cfg.label_smoothing)
    inference = InferenceSettings.of(cfg, engine_cache)
    precision = resolve_precision(cfg.precision, device)
    prefix = model.frozen_prefix()
    runner = None
    if prefix and not use_features and wants_engine(inference, model, device, images, passes=epochs):
        runner = compile_frozen(model, prefix, trace, inference)

    def batch_loss(idx: torch.Tensor) -> tuple[torch.Tensor, float | None]:
        targets = all_targets[idx].to(device)
        if use_features and features is not None:
            return loss_fn(model.head(features[idx].to(device)), targets), None
        x = to_unit(images[idx], device)
        if cfg.augment and (not head_only or cfg.probe_augment):
            x = augment_batch(x, rng)
        if not head_only and cfg.cutmix_prob > 0 and rng.random() < cfg.cutmix_prob:
            box = sample_box(x.shape[-2], x.shape[-1], sample_lambda(cfg.cutmix_alpha, rng), rng)
            perm = torch.from_numpy(rng.permutation(len(idx))).to(device)
            x, targets, _ = apply_cutmix(x, targets, box, perm)
        with lean(), autocast(precision, device):
            logits = model(x) if runner is None else model.head(runner.features(x))
        return loss_fn(logits.float(), targets), None

    logs = []
    epochs_run = run_epochs(
        model, labels, cfg, optimizer, scheduler, batch_loss,
        epochs=epochs, batch=batch, rng=rng, regularizer=regularizer, freezer=freezer,
    )  # fmt: skip
    for epoch, done in enumerate(epochs_run):
        log = EpochLog(
            first_epoch + epoch,
            sorted(parts),
            done.loss,
            done.seconds,
            use_features,
            batch,
            tuple(sorted(done.trained)),
            None if freezer is None else freezer.summary(),
            plan.record() if epoch == 0 else None,
        )
        logs.append(log)
        if on_epoch is not None:
            on_epoch(log)
    if freezer is not None:
        freezer.release()
    if model.update_bn_stats and not use_features:
        reestimate_bn_stats(model, images, device, batch)
    return logs


@torch.no_grad()
def reestimate_bn_stats(model: GroupedNet, images: torch.Tensor, device: torch.device, batch: int) -> None:
    """Set the running statistics of the BatchNorm layers that learnt them (those in training mode)
    to their average over ``images`` under the final weights, as ``torch.optim.swa_utils.update_bn``.

    Why: an exponential average over a few dozen steps still holds much of its start, and from random
    weights that start (mean 0, variance 1) collapses every prediction at evaluation to one constant
    (Lite0's momentum 0.01 keeps 89 % of it after 12 steps; even 0.1 keeps 28 %).
    """
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training]
    if layers:
        average_bn_stats(model, layers, images, device, batch)


@torch.no_grad()
def average_bn_stats(
    model: torch.nn.Module,
    layers: list[torch.nn.modules.batchnorm._BatchNorm],
    images: torch.Tensor,
    device: torch.device,
    batch: int,
) -> None:
    """Reset ``layers`` (in training mode) and set their running statistics to the cumulative average over
    the batches of ``images``; a failed pass leaves the statistics as they were. The one implementation
    behind the engine's re-estimation and AdaBN (``fedfreeze.adaptation.batchnorm``)."""
    momenta = [m.momentum for m in layers]
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in layers]
    starts = list(range(0, len(images), batch))
    if len(starts) > 1 and len(images) - starts[-1] == 1:
        starts.pop()  # a last batch of one image joins the one before (BatchNorm needs two values)
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
        for i, start in enumerate(starts):
            end = starts[i + 1] if i + 1 < len(starts) else len(images)
            model(to_unit(images[start:end], device))
    except BaseException:
        for m, state in zip(layers, saved, strict=True):
            m.load_state_dict(state)  # a failed pass leaves the statistics as they were
        raise
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum


def fit(
    model: GroupedNet,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    *,
    rng: np.random.Generator,
    device: torch.device,
    probe_features: torch.Tensor | None = None,
    on_epoch: Callable[[EpochLog], None] | None = None,
) -> list[EpochLog]:
    """Run the whole schedule: linear probe, then progressive top-down unfreezing.

    ``probe_features`` are the backbone features of ``images`` under the pretrained (frozen)
    backbone; when given and the probe does not augment, the probe trains on them.
    """
    logs: list[EpochLog] = []
    scores: dict[str, float] = {}  # dynamic freezing: scores carry over from phase to phase
    for phase in schedule_of(cfg):
        feats = probe_features if phase.probe and not cfg.probe_augment else None
        logs += train_phase(
            model,
            images,
            labels,
            phase.parts,
            cfg,
            epochs=phase.steps,
            rng=rng,
            device=device,
            features=feats,
            first_epoch=phase.start,
            on_epoch=on_epoch,
            freeze_scores=scores,
        )
    return logs


def schedule_of(cfg: TrainConfig) -> list[Phase]:
    """The site schedule in epochs."""
    return phases(probe_steps=cfg.probe_epochs, finetune_steps=cfg.epochs, unfreeze=cfg.unfreeze, method=cfg.method)


def model_adapter_groups(cfg: TrainConfig) -> list[str]:
    """Groups that need adapters under this training configuration."""
    return adapter_groups(cfg.unfreeze, cfg.method)

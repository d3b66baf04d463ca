"""What travels between coordinator and sites in a round, and how a reply is checked.

Only the arrays of the parts that train this round travel, both ways. Everything else (the frozen
backbone) stays where it is; a site proves it holds the same frozen weights by returning a hash of
them. Under FedBN the BatchNorm layers of trainable groups never travel: each site keeps its own.
BatchNorm ``num_batches_tracked`` counters never travel, nor do running statistics that training
does not change (``bn-stats = "frozen"``). Under dynamic freezing (``train.freezing = "dynamic"``)
a site returns only the arrays it updated, and each key is averaged over the sites that returned it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from fedfreeze.errors import ProtocolError
from fedfreeze.models.grouped import GroupedNet
from fedfreeze.tensor_hash import tensors_hash

if TYPE_CHECKING:
    from fedfreeze.federation.protocol import RoundOrders

BN_STAT_SUFFIXES = ("running_mean", "running_var")


@dataclass(frozen=True)
class ExchangePlan:
    """The keys of one round: sent and returned, kept at the site, and covered by the frozen hash."""

    parts: frozenset[str]
    sent: tuple[str, ...]
    local: tuple[str, ...]
    frozen: tuple[str, ...]


def batchnorm_keys(model: nn.Module) -> set[str]:
    """``state_dict`` keys that belong to BatchNorm layers."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            keys |= {f"{name}.{k}" for k in module.state_dict()}
    return keys


def plan_exchange(
    model: GroupedNet, parts: Iterable[str], *, bn_policy: str = "average", bn_stats: str = "frozen"
) -> ExchangePlan:
    """Partition the model's state for a round that trains ``parts``."""
    parts = frozenset(parts)
    bn = batchnorm_keys(model)
    sent, local, frozen = [], [], []
    for key in model.state_dict():
        if key.endswith("num_batches_tracked"):
            continue
        trains = model.part_of_key(key) in parts
        if trains and key in bn and bn_policy == "local":
            local.append(key)
        elif trains and not (bn_stats == "frozen" and key.endswith(BN_STAT_SUFFIXES)):
            sent.append(key)
        else:
            frozen.append(key)
    return ExchangePlan(parts, tuple(sent), tuple(local), tuple(frozen))


def plan_for(model: GroupedNet, orders: RoundOrders) -> ExchangePlan:
    """The exchange plan of a round: the one function coordinator and site both call, on the model of
    the round's stage and the orders as sent."""
    return plan_exchange(model, orders.parts, bn_policy=orders.bn_policy, bn_stats=orders.bn_stats)


def frozen_hash(state: Mapping[str, torch.Tensor], plan: ExchangePlan) -> str:
    """Hash of every array the round leaves frozen (the same on every honest site)."""
    return tensors_hash((k, state[k]) for k in plan.frozen)


def subset(state: Mapping[str, torch.Tensor], keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """The named arrays, in the given order, detached on the CPU and contiguous."""
    return {k: state[k].detach().cpu().contiguous() for k in keys}


def get_trainable_state(state: Mapping[str, torch.Tensor], plan: ExchangePlan) -> dict[str, torch.Tensor]:
    """The arrays a round exchanges (``plan.sent``), in the plan's order: what the coordinator sends down."""
    return subset(state, plan.sent)


def set_trainable_state(
    state: dict[str, torch.Tensor],
    arrays: Mapping[str, np.ndarray | torch.Tensor],
    plan: ExchangePlan,
    *,
    partial: bool = False,
    who: str = "",
) -> None:
    """Write a round's arrays into ``state`` after the strict checks of ``check_arrays`` against the plan
    (keys and their order, shapes, dtypes, finite values); anything wrong raises ``ProtocolError`` naming
    it and leaves ``state`` untouched. ``partial``: keys may be missing (dynamic freezing's replies)."""
    received = {k: v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in arrays.items()}
    problems = check_arrays(received, {k: state[k].numpy() for k in plan.sent}, partial=partial)
    if problems:
        raise ProtocolError(f"{who}the round's arrays do not match its plan: " + "; ".join(problems))
    for key in plan.sent:
        if key in received:
            state[key] = torch.from_numpy(np.array(received[key], copy=True))


def changed_keys(sent: Iterable[str], parameters: Iterable[str], trained: Iterable[str]) -> list[str]:
    """The keys of ``sent`` a site returns after dynamic freezing: every parameter that got at least
    one update this round, and every buffer (BatchNorm statistics move without an update). A tensor
    frozen for the whole round equals what the coordinator sent, so it does not travel back."""
    parameters, trained = set(parameters), set(trained)
    return [k for k in sent if k not in parameters or k in trained]


def key_groups(replies: Sequence[Iterable[str]], order: Sequence[str]) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """Group the keys of ``order`` by which replies hold them: ``(keys, reply indices)`` per group.

    Aggregating each group over its own replies averages every key over exactly the sites that
    trained it (a key no reply holds is in no group: the global value stays). One group when all
    replies are complete, so the usual path is one aggregation call.
    """
    holders: dict[tuple[int, ...], list[str]] = {}
    held = [set(keys) for keys in replies]
    for key in order:
        who = tuple(i for i, keys in enumerate(held) if key in keys)
        if who:
            holders.setdefault(who, []).append(key)
    return [(tuple(keys), who) for who, keys in holders.items()]


def check_arrays(
    received: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], *, partial: bool = False
) -> list[str]:
    """Problems with a set of arrays against the expected keys (in order), shapes and dtypes.

    ``partial``: keys may be missing (a site under dynamic freezing returns only what it trained),
    but not all of them, and those present must keep the expected order.
    Returns an empty list when the arrays can be used; otherwise one line per problem (the first
    few of each kind), so a rejected reply is logged with its reasons.
    """
    problems = []
    if partial:
        expected = {k: v for k, v in expected.items() if k in received}
        if not received:
            problems.append("no arrays: a training reply returns at least the arrays it trained")
    missing = [k for k in expected if k not in received]
    extra = [k for k in received if k not in expected]
    if missing:
        problems.append(f"missing keys {_short(missing)}")
    if extra:
        problems.append(f"unexpected keys {_short(extra)}")
    if not missing and not extra and list(received) != list(expected):
        problems.append("keys in a different order than sent")
    for key in expected:
        if key not in received:
            continue
        got, want = received[key], expected[key]
        if got.shape != want.shape:
            problems.append(f"{key}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        elif got.dtype != want.dtype:
            problems.append(f"{key}: dtype {got.dtype}, expected {want.dtype}")
        elif np.issubdtype(got.dtype, np.floating) and not np.isfinite(got).all():
            problems.append(f"{key}: holds NaN or Inf")
    return problems


def _short(items: list[str], limit: int = 4) -> str:
    return ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")

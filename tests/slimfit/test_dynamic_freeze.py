"""Dynamic freezing: the score, the selection and its rotation, determinism, and what the engine reports."""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from fedfreeze.config import DynamicFreezeConfig, SiteConfig, TrainConfig, parse_config
from fedfreeze.errors import ConfigError
from fedfreeze.models.grouped import GroupedNet
from fedfreeze.training.dynamic_freeze import (
    DynamicFreezer,
    change_score,
    freeze_units,
    trained_per_step,
    updated_keys,
)
from fedfreeze.training.engine import train_phase
from fedfreeze.training.freezing import apply_parts

CPU = torch.device("cpu")


def toy_net() -> GroupedNet:
    """stem: conv; layer1: conv, BatchNorm, conv (with a bias): four candidate layers."""
    torch.manual_seed(0)
    groups = OrderedDict(
        stem=nn.Sequential(nn.Conv2d(1, 2, 1, bias=False)),
        layer1=nn.Sequential(nn.Conv2d(2, 2, 1, bias=False), nn.BatchNorm2d(2), nn.Conv2d(2, 2, 1)),
    )
    return GroupedNet(groups, feature_dim=2, num_classes=2, dropout=0.0)


def sgd_step(freezer: DynamicFreezer, grads: dict[str, torch.Tensor], lr: float = 0.1) -> None:
    """One plain SGD step of the trainable candidates with the given weight gradients."""
    params = [p for u in freezer.units for _, p in u.params]
    optimizer = torch.optim.SGD(params, lr=lr)
    for unit in freezer.trainable:
        unit.weight.grad = grads[unit.key].clone()
    freezer.step(optimizer)


def test_change_score_by_hand():
    prev = torch.tensor([1.0, -2.0, 0.0, 4.0])
    new = torch.tensor([1.1, -2.5, 0.3, 4.0])
    # |dW| / |W_prev| = 0.1, 0.25, (zero weight left out), 0.0
    assert change_score(prev, new) == pytest.approx((0.1 + 0.25 + 0.0) / 3, rel=1e-6)
    assert change_score(torch.zeros(3), torch.tensor([0.0, 1e-3, 0.0])) == math.inf
    assert change_score(torch.zeros(3), torch.zeros(3)) == 0.0


def test_candidates_are_conv_linear_norm_layers_of_the_parts_but_never_the_head():
    model = toy_net()
    units, always = freeze_units(model, {"stem", "layer1", "head"})
    assert [u.key for u in units] == [
        "groups.stem.0.weight",
        "groups.layer1.0.weight",
        "groups.layer1.1.weight",
        "groups.layer1.2.weight",
    ]
    # a layer's bias follows its weight; the head always trains
    assert [k for k, _ in units[3].params] == ["groups.layer1.2.weight", "groups.layer1.2.bias"]
    assert [k for k, _ in always] == ["head.fc.weight", "head.fc.bias"]
    assert [u.key for u in freeze_units(model, {"layer1"})[0]] == [u.key for u in units[1:]]
    assert trained_per_step(106, 0.9) == 11 and trained_per_step(4, 0.5) == 2 and trained_per_step(4, 0.0) == 4


def test_scores_of_a_sgd_step_by_hand():
    model = toy_net()
    apply_parts(model, {"stem", "layer1", "head"})
    freezer = DynamicFreezer(model, {"stem", "layer1", "head"}, rate=0.5, seed=0)
    freezer.scores.update(
        {
            "groups.stem.0.weight": 0.9,
            "groups.layer1.0.weight": 0.8,
            "groups.layer1.1.weight": 0.1,
            "groups.layer1.2.weight": 0.2,
        }
    )
    chosen = [u.key for u in freezer.choose()]
    assert chosen == ["groups.stem.0.weight", "groups.layer1.0.weight"]  # the two highest scores train
    with torch.no_grad():
        model.groups["stem"][0].weight.copy_(torch.tensor([2.0, -4.0]).view(2, 1, 1, 1))
        model.groups["layer1"][0].weight.copy_(torch.tensor([[1.0, 0.0], [-0.5, 2.0]]).view(2, 2, 1, 1))
    grads = {
        "groups.stem.0.weight": torch.tensor([1.0, 2.0]).view(2, 1, 1, 1),
        "groups.layer1.0.weight": torch.tensor([[1.0, 5.0], [0.5, -2.0]]).view(2, 2, 1, 1),
    }
    sgd_step(freezer, grads, lr=0.1)
    # stem: dW = 0.1 * [1, 2] on W = [2, -4]: ratios 0.05, 0.05
    assert freezer.scores["groups.stem.0.weight"] == pytest.approx(0.05, rel=1e-5)
    # layer1.0: dW = 0.1 * [1, 5, .5, -2] on W = [1, 0, -.5, 2]: 0.1, (zero left out), 0.1, 0.1
    assert freezer.scores["groups.layer1.0.weight"] == pytest.approx(0.1, rel=1e-5)
    # frozen layers keep their old scores
    assert freezer.scores["groups.layer1.1.weight"] == 0.1 and freezer.scores["groups.layer1.2.weight"] == 0.2


def test_frozen_layers_rotate_back_in_when_trained_scores_fall_below_theirs():
    model = toy_net()
    parts = {"stem", "layer1", "head"}
    apply_parts(model, parts)
    freezer = DynamicFreezer(model, parts, rate=0.5, seed=0)
    freezer.scores.update(
        {
            "groups.stem.0.weight": 0.9,
            "groups.layer1.0.weight": 0.8,
            "groups.layer1.1.weight": 0.1,
            "groups.layer1.2.weight": 0.2,
        }
    )
    first = {u.key for u in freezer.choose()}
    assert first == {"groups.stem.0.weight", "groups.layer1.0.weight"}
    for unit in freezer.units:
        for _, param in unit.params:
            assert param.requires_grad == (unit.key in first)
    # tiny updates: the trained layers now score far below the frozen ones' old scores
    sgd_step(freezer, {u.key: torch.full_like(u.weight, 1e-4) for u in freezer.units}, lr=0.1)
    assert max(freezer.scores[k] for k in first) < 0.1
    second = {u.key for u in freezer.choose()}
    assert second == {"groups.layer1.1.weight", "groups.layer1.2.weight"}
    assert model.groups["layer1"][2].bias.requires_grad and not model.groups["stem"][0].weight.requires_grad


def test_first_steps_train_every_unscored_candidate_once_in_a_seeded_order():
    model = toy_net()
    parts = {"stem", "layer1", "head"}
    apply_parts(model, parts)
    orders = []
    for seed in (0, 0, 1, 2, 3):
        freezer = DynamicFreezer(model, parts, rate=0.5, seed=seed)
        seen = []
        for _ in range(2):
            seen.append([u.key for u in freezer.choose()])
            sgd_step(freezer, {u.key: torch.ones_like(u.weight) for u in freezer.units})
        assert sorted(seen[0] + seen[1]) == sorted(u.key for u in freezer.units)  # a full sweep, no repeats
        orders.append(seen)
    assert orders[0] == orders[1]  # same seed, same order
    assert any(o != orders[0] for o in orders[2:])  # the seed decides the order


def test_the_sweep_never_trains_the_largest_inputs_together():
    model = toy_net()
    parts = {"stem", "layer1", "head"}
    apply_parts(model, parts)
    big = {"groups.stem.0.weight", "groups.layer1.0.weight"}
    sizes = {
        "groups.stem.0.weight": 100.0,
        "groups.layer1.0.weight": 90.0,
        "groups.layer1.1.weight": 2.0,
        "groups.layer1.2.weight": 1.0,
    }
    together = {True: [], False: []}
    for balanced in (True, False):
        for seed in range(10):
            freezer = DynamicFreezer(model, parts, rate=0.5, seed=seed, input_sizes=sizes if balanced else None)
            first = {u.key for u in freezer.choose()}
            together[balanced].append(first == big)
    assert not any(together[True])
    assert any(together[False])  # dealt at random, the two largest inputs do meet


def test_rate_is_validated():
    with pytest.raises(ValueError, match="rate"):
        DynamicFreezer(toy_net(), {"stem"}, rate=1.0, seed=0)
    with pytest.raises(ConfigError, match=r"train\.dynamic-freeze\.rate"):
        parse_config({"train": {"dynamic-freeze": {"rate": 1.0}}}, SiteConfig, "site.toml")
    with pytest.raises(ConfigError, match=r"train\.dynamic-freeze\.speed: unknown key"):
        parse_config({"train": {"dynamic-freeze": {"speed": 1}}}, SiteConfig, "site.toml")
    with pytest.raises(ConfigError, match=r"train\.freezing"):
        parse_config({"train": {"freezing": "slimfit"}}, SiteConfig, "site.toml")


def test_config_keys_and_defaults_keep_the_schedule():
    default = TrainConfig()
    assert default.freezing == "schedule" and default.max_train_memory_mb is None
    assert default.activation_storage == "auto" and default.dynamic_freeze.rate == 0.9
    cfg = parse_config(
        {
            "train": {
                "freezing": "dynamic",
                "dynamic-freeze": {"rate": 0.95, "optimizer-state": "drop"},
                "activation-storage": "int8-channel",
                "max-train-memory-mb": 1500,
            }
        },
        SiteConfig,
        "site.toml",
    ).train
    assert (cfg.freezing, cfg.dynamic_freeze.rate, cfg.dynamic_freeze.optimizer_state) == ("dynamic", 0.95, "drop")
    assert cfg.activation_storage == "int8-channel" and cfg.max_train_memory_mb == 1500


# ---------------------------------------------------------------------- through the engine
def tiny_data(n: int = 16, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen), torch.tensor([0, 1] * (n // 2))


def dynamic_cfg(fast_train: TrainConfig, **extra) -> TrainConfig:
    lr = {"head": 1e-3, "layer4": 1e-3, "layer3": 1e-3, "layer2": 1e-3, "layer1": 1e-3, "stem": 1e-3}
    return fast_train.model_copy(update={"freezing": "dynamic", "lr": lr, **extra})


def run(model: GroupedNet, cfg: TrainConfig, parts: frozenset[str], epochs: int = 1):
    images, labels = tiny_data()
    return train_phase(model, images, labels, parts, cfg, epochs=epochs, rng=np.random.default_rng(0), device=CPU)


def test_engine_reports_exactly_the_parameters_it_changed(lite0_random, fast_train):
    model = lite0_random
    parts = frozenset({"layer3", "layer4", "head"})
    before = copy.deepcopy(model.state_dict())
    logs = run(model, dynamic_cfg(fast_train), parts)
    after = model.state_dict()
    changed = {k for k in dict(model.named_parameters()) if not torch.equal(before[k], after[k])}
    trained = set(logs[0].trained)
    assert updated_keys(logs) == trained
    units, _ = freeze_units(model, parts)
    # two steps at rate 0.9: far from every candidate trained, and whatever is not reported is bit-identical
    # (a reported tensor may still be unchanged: a BatchNorm scale whose gradient was exactly zero)
    assert 0 < len(trained) < len(dict(model.named_parameters()))
    assert changed <= trained and len(changed) > len(trained) / 2
    assert {"head.fc.weight", "head.fc.bias"} <= trained
    n_train = trained_per_step(len(units), 0.9)
    assert len({k for k in trained if k in {u.key for u in units}}) == 2 * n_train  # two sweeping steps
    assert logs[0].freezing["trained_per_step"] == n_train and logs[0].record()["trained_tensors"] == len(trained)
    # after the phase every candidate is trainable again, as apply_parts left it
    assert all(p.requires_grad for part in parts for p in model.part_modules(part).parameters())


def test_schedule_mode_reports_every_parameter_of_its_parts(lite0_random, fast_train):
    logs = run(lite0_random, fast_train, frozenset({"layer4", "head"}))
    expected = {k for k, _ in lite0_random.named_parameters() if k.startswith(("groups.layer4.", "head."))}
    assert set(logs[0].trained) == expected
    assert logs[0].freezing is None and logs[0].memory_plan["storage"] == "torch"


def test_dynamic_training_is_deterministic_with_a_seed(fast_train):
    from fedfreeze.config import ModelConfig
    from fedfreeze.models.registry import build_model

    def train(seed: int):
        torch.manual_seed(0)
        model, _ = build_model(ModelConfig(weights="none", input_size=32))
        cfg = dynamic_cfg(fast_train, dynamic_freeze=DynamicFreezeConfig(rate=0.9, seed=seed))
        logs = run(model, cfg, frozenset(model.parts))
        return model.state_dict(), logs[0].trained

    (a, trained_a), (b, trained_b) = train(0), train(0)
    assert trained_a == trained_b and all(torch.equal(a[k], b[k]) for k in a)
    # (that another seed gives another order is tested on the freezer itself, above)

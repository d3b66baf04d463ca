import pytest

from fedfreeze.config import TrainConfig
from fedfreeze.errors import ConfigError
from fedfreeze.training.freezing import apply_parts
from fedfreeze.training.optim import make_optimizer, param_groups


def test_discriminative_learning_rates_per_part(lite0_random):
    cfg = TrainConfig()
    apply_parts(lite0_random, {"head", "layer4", "layer3", "layer2"})
    groups = param_groups(lite0_random, {"head", "layer4", "layer3", "layer2"}, cfg)
    lrs = {g["part"]: g["lr"] for g in groups}
    assert lrs == {"head": 2e-4, "layer4": 1e-4, "layer3": 5e-5, "layer2": 2e-5}


def test_only_trainable_parameters_enter_and_1d_has_no_decay(lite0_random):
    cfg = TrainConfig(weight_decay={"head": 0.05, "layer4": 0.01})
    apply_parts(lite0_random, {"head", "layer4"})
    groups = param_groups(lite0_random, {"head", "layer4"}, cfg)
    in_optimizer = {id(p) for g in groups for p in g["params"]}
    trainable = {id(p) for p in lite0_random.parameters() if p.requires_grad}
    assert in_optimizer == trainable
    for g in groups:
        if all(p.ndim <= 1 for p in g["params"]):
            assert g["weight_decay"] == 0.0
        else:
            assert g["weight_decay"] == {"head": 0.05, "layer4": 0.01}[g["part"]]


def test_adapters_use_adapter_lr(lite0_random):
    lite0_random.add_adapters("layer4", rank=4)
    cfg = TrainConfig(adapter_lr=3e-3)
    apply_parts(lite0_random, {"head", "layer4.adapters"})
    lrs = {g["part"]: g["lr"] for g in param_groups(lite0_random, {"head", "layer4.adapters"}, cfg)}
    assert lrs == {"head": 2e-4, "layer4.adapters": 3e-3}


def test_missing_group_lr_is_named(lite0_random):
    apply_parts(lite0_random, {"head", "layer1"})
    with pytest.raises(ConfigError, match="train.lr has no entry for 'layer1'"):
        param_groups(lite0_random, {"head", "layer1"}, TrainConfig())


def test_one_cycle_peaks_at_each_groups_lr_and_ends_low(lite0_random):
    apply_parts(lite0_random, {"head", "layer4"})
    opt, sched = make_optimizer(lite0_random, {"head", "layer4"}, TrainConfig(), total_steps=20)
    seen = {g["part"]: [] for g in opt.param_groups}
    for _ in range(20):
        for g in opt.param_groups:
            seen[g["part"]].append(g["lr"])
        opt.step()
        sched.step()
    assert max(seen["head"]) == pytest.approx(2e-4)
    assert max(seen["layer4"]) == pytest.approx(1e-4)
    assert seen["head"][0] < 2e-5 and seen["head"][-1] < 2e-6


def test_probe_uses_probe_lr_and_fine_tuning_the_head_lr(lite0_random):
    cfg = TrainConfig(probe_lr=3e-3)
    apply_parts(lite0_random, {"head"})
    assert [g["lr"] for g in param_groups(lite0_random, {"head"}, cfg)] == [3e-3, 3e-3]
    apply_parts(lite0_random, {"head", "layer4"})
    lrs = {g["part"]: g["lr"] for g in param_groups(lite0_random, {"head", "layer4"}, cfg)}
    assert lrs == {"head": 2e-4, "layer4": 1e-4}

import numpy as np
import pytest
import torch

from fedfreeze.config import ModelConfig
from fedfreeze.federation.exchange import batchnorm_keys, check_arrays, frozen_hash, plan_exchange
from fedfreeze.models.registry import build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net, _ = build_model(ModelConfig(weights="none", input_size=64), ["layer4"], 4)
    return net


def test_probe_round_sends_only_the_head(model):
    plan = plan_exchange(model, {"head"})
    assert plan.sent == ("head.fc.weight", "head.fc.bias")
    assert not plan.local
    # everything else is covered by the frozen hash, except the BatchNorm counters
    state = model.state_dict()
    assert set(plan.frozen) == {k for k in state if not k.endswith("num_batches_tracked")} - set(plan.sent)


def test_trainable_group_sends_weights_not_frozen_statistics(model):
    plan = plan_exchange(model, {"head", "layer4"}, bn_stats="frozen")
    assert "groups.layer4.0._expand_conv.weight" in plan.sent
    assert "groups.layer4.0._bn0.weight" in plan.sent  # BatchNorm scale trains and travels
    assert "groups.layer4.0._bn0.running_mean" not in plan.sent  # statistics do not change
    assert "groups.layer4.0._bn0.running_mean" in plan.frozen
    assert not any(k.startswith("groups.layer3") for k in plan.sent)
    updated = plan_exchange(model, {"head", "layer4"}, bn_stats="update")
    assert "groups.layer4.0._bn0.running_mean" in updated.sent


def test_fedbn_keeps_batchnorm_of_trainable_groups_local(model):
    plan = plan_exchange(model, {"head", "layer4"}, bn_policy="local", bn_stats="update")
    bn = batchnorm_keys(model)
    assert plan.local and set(plan.local) <= bn
    assert not set(plan.sent) & bn
    assert all(k.startswith("groups.layer4") for k in plan.local)
    assert not set(plan.local) & set(plan.frozen)


def test_adapter_round_sends_only_adapters_and_head(model):
    plan = plan_exchange(model, {"head", "layer4.adapters"})
    assert plan.sent and all(k.startswith(("adapters.layer4", "head.")) for k in plan.sent)
    sent_numbers = sum(model.state_dict()[k].numel() for k in plan.sent)
    layer4_numbers = sum(p.numel() for p in model.groups["layer4"].parameters())
    assert sent_numbers * 20 < layer4_numbers


def test_frozen_hash_changes_with_any_frozen_weight(model):
    plan = plan_exchange(model, {"head"})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = frozen_hash(state, plan)
    state["head.fc.weight"] += 1.0  # a trainable array does not matter
    assert frozen_hash(state, plan) == before
    state["groups.stem.0._conv_stem.weight"][0, 0, 0, 0] += 1e-6
    assert frozen_hash(state, plan) != before
    # memory layout does not matter
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["groups.layer1.0._expand_conv.weight"] = state["groups.layer1.0._expand_conv.weight"].to(
        memory_format=torch.channels_last
    )
    assert frozen_hash(state, plan) == before


def test_check_arrays_names_every_problem():
    expected = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float32)}
    assert check_arrays({"a": np.ones((2, 3), np.float32), "b": np.ones(4, np.float32)}, expected) == []
    assert check_arrays({"a": np.zeros((2, 3), np.float32)}, expected) == ["missing keys b"]
    got = check_arrays({**expected, "c": np.zeros(1)}, expected)
    assert got == ["unexpected keys c"]
    assert check_arrays({"b": expected["b"], "a": expected["a"]}, expected) == ["keys in a different order than sent"]
    assert check_arrays({"a": np.zeros((3, 2), np.float32), "b": expected["b"]}, expected) == [
        "a: shape (3, 2), expected (2, 3)"
    ]
    assert check_arrays({"a": np.zeros((2, 3), np.float64), "b": expected["b"]}, expected) == [
        "a: dtype float64, expected float32"
    ]
    bad = np.zeros(4, np.float32)
    bad[1] = np.nan
    assert check_arrays({"a": expected["a"], "b": bad}, expected) == ["b: holds NaN or Inf"]
    bad[1] = np.inf
    assert check_arrays({"a": expected["a"], "b": bad}, expected) == ["b: holds NaN or Inf"]

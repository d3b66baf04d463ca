"""The memory budget: the order of the search, estimates by hand, and the engine keeping to its choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedfreeze.config import DynamicFreezeConfig, ModelConfig, TrainConfig
from fedfreeze.errors import ConfigError
from fedfreeze.models.registry import build_model
from fedfreeze.training.engine import to_unit, train_phase
from fedfreeze.training.freezing import apply_parts
from fedfreeze.training.memory_budget import (
    MemoryChoice,
    PhaseProfile,
    UnitCost,
    candidate_choices,
    choose,
    profile_phase,
)
from fedfreeze.training.saved_activations import SavedTensorMeter

CPU = torch.device("cpu")
LR = {"head": 1e-3, "layer4": 1e-3, "layer3": 1e-3, "layer2": 1e-3, "layer1": 1e-3, "stem": 1e-3}


def test_search_order_changes_the_least_first():
    dynamic = TrainConfig(batch_size=16, freezing="dynamic")
    choices = candidate_choices(dynamic, n=100)
    assert choices[:7] == [
        MemoryChoice(16, 0.9, "fp32"),
        MemoryChoice(16, 0.9, "int8-channel"),
        MemoryChoice(16, 0.95, "fp32"),
        MemoryChoice(16, 0.95, "int8-channel"),
        MemoryChoice(16, 0.98, "fp32"),
        MemoryChoice(16, 0.98, "int8-channel"),
        MemoryChoice(8, 0.9, "fp32"),
    ]
    assert [c.batch_size for c in choices[::6]] == [16, 8, 4, 2, 1]
    schedule = candidate_choices(TrainConfig(batch_size=32), n=12)  # never more than the data
    assert choices and schedule[:4] == [
        MemoryChoice(12, None, "torch"),
        MemoryChoice(12, None, "fp32"),
        MemoryChoice(12, None, "int8-channel"),
        MemoryChoice(6, None, "torch"),
    ]


def schedule_profile() -> PhaseProfile:
    # 1 MB weights, 1 MB of trainable parameters; saved bytes per image by storage
    return PhaseProfile(
        weights=10**6,
        phase_params=10**6,
        always_params=0,
        units=[],
        largest_activation=0.0,
        input_image=0.0,
        saved={"torch": 4e6, "fp32": 2e6, "int8-channel": 0.5e6},
    )


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        (100, MemoryChoice(16, None, "torch")),  # 1 + 2 + 1 + 16 * 4 = 68 MB
        (40, MemoryChoice(16, None, "fp32")),  # 4 + 16 * 2 = 36
        (30, MemoryChoice(16, None, "int8-channel")),  # 4 + 16 * 0.5 = 12
        (11, MemoryChoice(8, None, "int8-channel")),  # batch 8: 36, 20, 8
        (5, MemoryChoice(2, None, "int8-channel")),  # batch 2: 12, 8, 5
        (4.9, MemoryChoice(1, None, "int8-channel")),  # batch 1: 8, 6, 4.5
    ],
)
def test_the_first_configuration_that_fits_is_chosen(budget, expected):
    cfg = TrainConfig(batch_size=16)
    plan = choose(schedule_profile(), cfg, n=100, budget_mb=budget)
    assert plan.choice == expected
    assert plan.estimate_mb["total"] <= budget
    tried = candidate_choices(cfg, 100)[: plan.rejected]
    assert all(schedule_profile().estimate(c)["total"] > budget for c in tried)


def test_no_configuration_fits_is_an_error_naming_the_field():
    with pytest.raises(ConfigError, match=r"train\.max-train-memory-mb = 4 is too small.*needs about 4\.5 MB"):
        choose(schedule_profile(), TrainConfig(batch_size=16), n=100, budget_mb=4)


def test_dynamic_estimate_by_hand():
    units = [
        UnitCost("a", 10**6, 1e6, 4),
        UnitCost("b", 2 * 10**6, 0.5e6, 4),
        UnitCost("c", 5 * 10**5, 0.25e6, 4),
        UnitCost("d", 5 * 10**5, 0.25e6, 4),
    ]
    profile = PhaseProfile(
        weights=4 * 10**6,
        phase_params=4 * 10**6,
        always_params=0,
        units=units,
        largest_activation=0.0,
        input_image=0.0,
        base=1e6,
    )
    # rate 0.5: 2 of 4 layers train; the worst case takes the 2 largest weights (b, a: 3 MB) and the
    # 2 largest inputs (a, b: 1.5e6 elements per image), whichever layers they are
    est = profile.estimate(MemoryChoice(2, 0.5, "fp32"))
    assert est == pytest.approx(
        {"weights": 4, "optimizer": 8, "gradients": 6, "activations": 2 * (1 + 6), "transient": 0, "total": 32}
    )
    assert profile.estimate(MemoryChoice(2, 0.5, "int8-channel"))["activations"] == pytest.approx(2 * (1 + 1.5))
    assert profile.estimate(MemoryChoice(2, 0.5, "fp32"), drop_optimizer_state=True)["optimizer"] == pytest.approx(6)


# ---------------------------------------------------------------------- through the engine
def data(n: int = 16):
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen), torch.tensor([0, 1] * (n // 2))


def lite0():
    torch.manual_seed(0)
    return build_model(ModelConfig(weights="none", input_size=32))[0]


def test_engine_fits_the_budget_and_keeps_to_its_choice():
    images, labels = data()
    cfg = TrainConfig(batch_size=8, cutmix_prob=0.0, augment=False, lr=LR, freezing="dynamic", bn_stats="frozen")
    model = lite0()
    parts = frozenset(model.parts)
    model.update_bn_stats = False  # as the engine sets it for bn-stats = "frozen"
    apply_parts(model, parts)
    model.train()
    profile = profile_phase(model, parts, cfg, to_unit(images[:2], CPU), [])
    fp32 = profile.estimate(MemoryChoice(8, 0.9, "fp32"))["total"]
    int8 = profile.estimate(MemoryChoice(8, 0.9, "int8-channel"))["total"]
    assert int8 < fp32
    budget = (fp32 + int8) / 2  # the configured choice does not fit; 8 bits at the same batch and rate do
    with SavedTensorMeter(model.parameters()) as meter:
        logs = train_phase(
            model,
            images,
            labels,
            parts,
            cfg.model_copy(update={"max_train_memory_mb": budget}),
            epochs=1,
            rng=np.random.default_rng(0),
            device=CPU,
        )
    plan = logs[0].memory_plan
    assert (plan["batch_size"], plan["rate"], plan["storage"]) == (8, 0.9, "int8-channel")
    assert (
        plan["estimate_mb"]["total"] <= budget and plan["budget_mb"] == budget and plan["rejected_configurations"] == 1
    )
    assert logs[0].batch_size == 8
    # what autograd really held stayed within the planned activations
    assert 0 < meter.peak <= plan["estimate_mb"]["activations"] * 1e6

    # a budget below every batch-8 configuration halves the batch
    leanest_8 = profile.estimate(MemoryChoice(8, 0.98, "int8-channel"))["total"]
    logs = train_phase(
        lite0(),
        images,
        labels,
        parts,
        cfg.model_copy(update={"max_train_memory_mb": leanest_8 - 0.01}),
        epochs=1,
        rng=np.random.default_rng(0),
        device=CPU,
    )
    assert logs[0].memory_plan["batch_size"] == 4 and logs[0].batch_size == 4
    assert logs[0].freezing["rate"] == logs[0].memory_plan["rate"]


def test_planning_leaves_training_as_it_would_have_been():
    """Measuring the model (RNG, BatchNorm statistics, gradients) must not change what training does."""
    images, labels = data()
    cfg = TrainConfig(
        batch_size=8,
        cutmix_prob=0.5,
        augment=True,
        lr=LR,
        freezing="dynamic",
        bn_stats="update",
        dynamic_freeze=DynamicFreezeConfig(rate=0.8),
    )
    states = []
    for budget in (None, 1e6):
        model = lite0()
        train_phase(
            model,
            images,
            labels,
            frozenset(model.parts),
            cfg.model_copy(update={"max_train_memory_mb": budget}),
            epochs=1,
            rng=np.random.default_rng(0),
            device=CPU,
        )
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_site_train_writes_what_the_engine_chose(tmp_path, capsys):
    import json

    from fedfreeze.cli import main
    from fedfreeze.sample_data import kermany_mini
    from tests.shipped import beside

    config = tmp_path / "site.toml"
    config.write_text("""
[model]
weights = "none"
input-size = 32
[train]
probe-epochs = 0
epochs = 1
unfreeze = { layer4 = 0.0, layer3 = 0.0 }
batch-size = 16
freezing = "dynamic"
dynamic-freeze = { rate = 0.9 }
max-train-memory-mb = 50
[cv]
folds = 2
refit = false
""")
    # 48 of the shipped real images (decoding all 300 takes most of the time)
    manifest = kermany_mini("train")
    rows = manifest.read_text().splitlines()
    header, body = rows[0], rows[1:]
    picked = [r for r in body if ",0," in r][:24] + [r for r in body if ",1," in r][:24]
    data = tmp_path / "data.csv"
    data.write_text(
        "\n".join([header] + [beside(tmp_path, r.split(",", 1)[0]) + "," + r.split(",", 1)[1] for r in picked]) + "\n"
    )
    out = tmp_path / "run"
    assert main(["site-train", "--config", str(config), "--data", str(data), "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    memory = report["memory"]
    assert memory["freezing"] == "dynamic" and memory["max_train_memory_mb"] == 50
    (phase,) = memory["phases"]
    assert phase["parts"] == ["head", "layer3", "layer4"] and phase["estimate_mb"]["total"] <= 50
    assert phase["rejected_configurations"] > 0  # the configured batch 16, rate 0.9, fp32 did not fit
    epoch = report["folds"][0]["epochs"][0]
    assert epoch["batch_size"] == phase["batch_size"] and 0 < epoch["trained_tensors"]
    assert epoch["freezing"]["rate"] == phase["rate"]
    assert f"memory budget 50 MB, phase head+layer3+layer4: batch {phase['batch_size']}" in capsys.readouterr().out

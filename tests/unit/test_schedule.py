import pytest

from fedfreeze.errors import ConfigError
from fedfreeze.training.schedule import check_groups, phases, trainable_parts

DEFAULT = {"layer4": 0.1, "layer3": 0.3, "layer2": 0.6}


def parts_at(step: int, method: str = "unfreeze") -> set[str]:
    return set(trainable_parts(step, probe_steps=10, finetune_steps=20, unfreeze=DEFAULT, method=method))


def test_probe_trains_only_the_head():
    for step in range(10):
        assert parts_at(step) == {"head"}


def test_groups_unfreeze_top_down_at_their_fractions():
    # fine-tuning step t = step - 10; layer4 at t >= 2, layer3 at t >= 6, layer2 at t >= 12
    assert parts_at(10) == {"head"}
    assert parts_at(11) == {"head"}
    assert parts_at(12) == {"head", "layer4"}
    assert parts_at(15) == {"head", "layer4"}
    assert parts_at(16) == {"head", "layer4", "layer3"}
    assert parts_at(21) == {"head", "layer4", "layer3"}
    assert parts_at(22) == {"head", "layer4", "layer3", "layer2"}
    assert parts_at(29) == {"head", "layer4", "layer3", "layer2"}


def test_stem_and_layer1_never_train():
    for step in range(30):
        assert not parts_at(step) & {"stem", "layer1"}


def test_adapter_methods_name_adapter_parts():
    assert parts_at(16, "adapters") == {"head", "layer4.adapters", "layer3.adapters"}
    assert parts_at(12, "both") == {"head", "layer4", "layer4.adapters"}


def test_phases_restart_at_each_change_and_at_probe_end():
    got = [(p.start, p.end, sorted(p.parts)) for p in phases(probe_steps=10, finetune_steps=20, unfreeze=DEFAULT)]
    assert got == [
        (0, 10, ["head"]),
        (10, 12, ["head"]),
        (12, 16, ["head", "layer4"]),
        (16, 22, ["head", "layer3", "layer4"]),
        (22, 30, ["head", "layer2", "layer3", "layer4"]),
    ]


def test_no_probe_and_no_finetune():
    assert [p.parts for p in phases(probe_steps=0, finetune_steps=1, unfreeze={"layer4": 0.0})] == [
        frozenset({"head", "layer4"})
    ]
    assert phases(probe_steps=0, finetune_steps=0, unfreeze=DEFAULT) == []


def test_step_out_of_range():
    with pytest.raises(ValueError, match=r"step should be in \[0, 30\), got 30"):
        trainable_parts(30, probe_steps=10, finetune_steps=20, unfreeze=DEFAULT)


def test_unknown_group_is_named():
    with pytest.raises(ConfigError, match=r"unknown group\(s\) \['layer9'\]"):
        check_groups({"layer9": 0.5}, ["stem", "layer1", "layer2", "layer3", "layer4"])

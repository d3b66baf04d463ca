"""Dynamic freezing in the federation: a site returns only the arrays it updated, and the server
averages each key over the sites that returned it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from fedfreeze.errors import ConfigError
from fedfreeze.federation.config import load_fed_config
from fedfreeze.federation.exchange import changed_keys, check_arrays, key_groups
from fedfreeze.flower.client import runtime_for
from fedfreeze.model_io import load_model
from tests.federation.test_federation_inprocess import node_configs, run

DYNAMIC_FED = """
[model]
input-size = 64
[train]
batch-size = 16
freezing = "dynamic"
dynamic-freeze = { rate = 0.9 }
[federation]
rounds = 2
probe-rounds = 1
probe-local-epochs = 3
local-epochs = 1
unfreeze = { layer4 = 0.0 }
score-bins = 100
min-sites = 3
"""


def test_changed_keys_keep_buffers_and_updated_parameters_in_order():
    sent = ["a.weight", "a.running_mean", "b.weight", "c.weight"]
    assert changed_keys(sent, ["a.weight", "b.weight", "c.weight"], {"c.weight", "a.weight"}) == [
        "a.weight",
        "a.running_mean",
        "c.weight",
    ]


def test_key_groups_pair_each_key_with_exactly_the_replies_that_hold_it():
    order = ["w1", "w2", "w3", "w4", "w5"]
    replies = [["w1", "w2", "w3"], ["w1", "w3"], ["w1", "w2"]]
    groups = key_groups(replies, order)
    assert sorted(groups) == sorted([(("w1",), (0, 1, 2)), (("w2",), (0, 2)), (("w3",), (0, 1))])
    # complete replies: one group, the usual single aggregation
    assert key_groups([order, order], order) == [(tuple(order), (0, 1))]


def test_partial_replies_are_checked_like_complete_ones():
    expected = {"a": np.zeros(2, np.float32), "b": np.zeros(3, np.float32)}
    assert check_arrays({"b": np.zeros(3, np.float32)}, expected, partial=True) == []
    assert check_arrays({"b": np.zeros(3, np.float32)}, expected) == ["missing keys a"]
    assert check_arrays({}, expected, partial=True)  # nothing at all is not a reply
    assert any("shape" in p for p in check_arrays({"b": np.zeros(4, np.float32)}, expected, partial=True))
    assert any("unexpected" in p for p in check_arrays({"z": np.zeros(1, np.float32)}, expected, partial=True))


def test_dynamic_freezing_with_differential_privacy_is_refused(tmp_path):
    config = tmp_path / "fed.toml"
    config.write_text(DYNAMIC_FED.replace("min-sites = 3", 'min-sites = 3\ndp = "server"'))
    with pytest.raises(ConfigError, match="federation.dp"):
        load_fed_config(config)


@pytest.mark.parametrize("strategy", ["median", "trimmed-mean"])
def test_dynamic_freezing_with_a_robust_strategy_is_refused(tmp_path, strategy):
    config = tmp_path / "fed.toml"
    config.write_text(DYNAMIC_FED.replace("min-sites = 3", f'min-sites = 3\nstrategy = "{strategy}"'))
    with pytest.raises(ConfigError, match="federation.strategy"):
        load_fed_config(config)


def test_a_site_memory_budget_must_be_a_positive_number(tmp_path):
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"data-path": str(tmp_path), "max-train-memory-mb": "lots"},
        state=RecordDict(),
        run_config={},
    )
    with pytest.raises(ConfigError, match="max-train-memory-mb"):
        runtime_for(context)
    context.node_config["max-train-memory-mb"] = 512
    assert runtime_for(context).max_train_memory_mb == 512.0


@pytest.mark.slow
def test_sites_return_only_what_they_trained_and_each_key_averages_over_its_senders(tmp_path: Path, site_folders):
    config = tmp_path / "fed.toml"
    config.write_text(DYNAMIC_FED)
    audit: list = []
    metrics = run(tmp_path / "out", config, node_configs(site_folders, tmp_path / "state"), audit=audit)
    assert metrics["status"] == "completed", metrics.get("reason")
    final, _ = load_model(metrics["model"])
    final_state = final.state_dict()

    layer4 = [
        (sent, reply)
        for sent, reply in audit
        if sent.metadata.message_type == "train" and int(sent.content["config"]["round"]) == 2
    ]
    assert len(layer4) == 3
    sent_arrays = layer4[0][0].content["arrays"]
    sent_keys = list(sent_arrays.keys())
    returned = [list(reply.content["arrays"].keys()) for _, reply in layer4]
    for keys in returned:  # a subset, in the order sent, always with the head
        assert keys == [k for k in sent_keys if k in keys] and {"head.fc.weight", "head.fc.bias"} <= set(keys)
    assert any(len(keys) < len(sent_keys) for keys in returned), "dynamic freezing at 0.9 left every tensor trained"
    # fewer bytes up than a complete reply, as the round record shows
    sites = metrics["rounds"][1]["sites"]
    assert sorted(s["arrays_up"] for s in sites) == sorted(len(k) for k in returned)

    n = [int(reply.content["metrics"]["num-examples"]) for _, reply in layer4]
    for key in sent_keys:
        holders = [i for i, keys in enumerate(returned) if key in keys]
        got = final_state[key].numpy()
        if not holders:  # nobody trained it: the global value stays as sent
            np.testing.assert_array_equal(got, sent_arrays[key].numpy())
            continue
        arrays = [layer4[i][1].content["arrays"][key].numpy() for i in holders]
        weights = np.array([n[i] for i in holders], dtype=np.float64)
        want = sum(w * a for w, a in zip(weights / weights.sum(), arrays, strict=True))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # the averaging above is not vacuous: some key was returned by only some of the sites
    assert any(0 < sum(key in keys for keys in returned) < 3 for key in sent_keys)

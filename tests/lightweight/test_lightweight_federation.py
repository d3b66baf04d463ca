"""The dual recipe in a federation: the real ServerApp loop and ClientApp with real serialised messages
(``LocalGrid`` stands in for the SuperLink), three sites holding real digits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from client.app import app as client_app
from fedfreeze.data.partition import assign_sites, write_sites
from fedfreeze.errors import ConfigError
from fedfreeze.evaluate import evaluate_model
from fedfreeze.federation.config import load_fed_config
from fedfreeze.flower.federate import run_federation
from fedfreeze.flower.local_grid import LocalGrid
from fedfreeze.models.dual import merge_state
from fedfreeze.models.registry import build_model
from tests.lightweight.conftest import LWCNN_MODEL_TOML, MNIST_FIXTURE, lwcnn_config

DUAL_FED = (
    LWCNN_MODEL_TOML
    + """[train]
recipe = "dual"
batch-size = 25
cutmix-prob = 0.0
augment = false
balanced-sampling = false
lr = { head = 2e-3, layer4 = 1e-3 }
probe-lr = 2e-3
[train.dual]
lr = 5e-3
[federation]
rounds = 4
dual-rounds = 2
dual-local-epochs = 4
probe-rounds = 1
probe-local-epochs = 3
unfreeze = { layer4 = 0.0 }
min-sites = 3
val-fraction = 0.2
"""
)
EVERY_PART = ["head", "layer1", "layer2", "layer3", "layer4", "stem"]


@pytest.fixture(scope="module")
def federation(tmp_path_factory, mnist_train):
    root = tmp_path_factory.mktemp("dual-fed")
    config = root / "fed.toml"
    config.write_text(DUAL_FED)
    index = assign_sites(mnist_train.labels.numpy(), mnist_train.patient_ids, 3, alpha=None, seed=0)
    write_sites(mnist_train, index, root / "sites", as_manifest=False)
    nodes = {
        i + 1: {
            "data-path": str(root / "sites" / f"site-{i}" / "data"),
            "site-name": f"site-{i}",
            "state-dir": str(root / "state" / f"site-{i}"),
        }
        for i in range(3)
    }
    run_config = {"config": str(config), "out-dir": str(root / "out")}
    audit: list = []
    grid = LocalGrid(client_app, nodes, run_config, on_reply=lambda sent, reply: audit.append((sent, reply)))
    run_federation(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    return json.loads((root / "out" / "metrics.json").read_text()), audit


def train_messages(audit: list, rnd: int) -> list:
    return [(s, r) for s, r in audit if s.metadata.message_type == "train" and int(s.content["config"]["round"]) == rnd]


def test_dual_rounds_come_first_then_the_merged_model_unfreezes_from_the_head(federation):
    metrics, audit = federation
    assert metrics["status"] == "completed", metrics.get("reason")
    assert [r["parts"] for r in metrics["rounds"]] == [EVERY_PART, EVERY_PART, ["head"], ["head", "layer4"]]
    stages = [str(train_messages(audit, rnd)[0][0].content["config"]["stage"]) for rnd in (1, 2, 3, 4)]
    assert stages == ["dual", "dual", "single", "single"]
    # the dual stage's learning rate decays across its rounds (cosine, from 1 towards 0.05)
    scales = [float(train_messages(audit, rnd)[0][0].content["config"]["lr-scale"]) for rnd in (1, 2)]
    assert scales == pytest.approx([1.0, 0.525])
    assert float(train_messages(audit, 3)[0][0].content["config"]["lr-scale"]) == 1.0  # merged rounds: unscaled
    assert all(len(r["sites"]) == 3 and not r["rejected"] and not r["failures"] for r in metrics["rounds"])


def test_only_trainable_arrays_travel_up_and_the_frozen_base_only_down(federation):
    _, audit = federation
    merged_keys = {k for k in build_model(lwcnn_config())[0].state_dict() if not k.endswith("num_batches_tracked")}
    for rnd in (1, 2, 3, 4):
        for sent, reply in train_messages(audit, rnd):
            sent_keys = list(sent.content["arrays"].keys())
            reply_keys = list(reply.content["arrays"].keys())
            assert reply_keys == sent_keys
            assert set(reply.content.array_records) == {"arrays"}  # nothing else goes up
            if rnd <= 2:  # the dual model, all of it (BatchNorm statistics included)
                assert "base" not in sent.content.array_records
                assert tuple(reply.content["arrays"]["head.weight"].shape) == (2, 10, 24)
                assert len(sent_keys) == len(merged_keys)  # two heads in place of one: as many arrays
            else:
                trained = {"head"} if rnd == 3 else {"head", "layer4"}
                assert {k.split(".")[1] if k.startswith("groups.") else "head" for k in sent_keys} == trained
                base = set(sent.content["base"].keys())
                assert not base & set(sent_keys)
                # what did not train came down once more (running statistics of trained groups too)
                assert base | set(sent_keys) == merged_keys


def test_the_first_merged_round_starts_from_the_merge_of_the_aggregated_dual_model(federation):
    _, audit = federation
    replies = [reply for _, reply in train_messages(audit, 2)]
    weights = np.array([int(r.content["metrics"]["num-examples"]) for r in replies], dtype=np.float64)
    keys = list(replies[0].content["arrays"].keys())
    fedavg = {
        k: np.sum([w * r.content["arrays"][k].numpy() for w, r in zip(weights, replies, strict=False)], axis=0)
        / weights.sum()
        for k in keys
    }
    import torch

    expected = merge_state({k: torch.from_numpy(v.astype(np.float32)) for k, v in fedavg.items()})
    sent, _ = train_messages(audit, 3)[0]
    received = {**sent.content["base"].to_torch_state_dict(), **sent.content["arrays"].to_torch_state_dict()}
    assert set(received) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(received[key].numpy(), value.numpy(), atol=1e-6, err_msg=key)


def test_the_federated_model_beats_chance_on_unseen_digits(federation):
    metrics, _ = federation
    result = evaluate_model(metrics["model"], MNIST_FIXTURE, split="test")
    assert result["n"] == 200
    assert result["accuracy"] > 0.3, result  # chance is 0.1


@pytest.mark.parametrize(
    ("edits", "message"),
    [
        (
            [("dual-rounds = 2", "dual-rounds = 0")],
            "federation.dual-rounds: train.recipe = 'dual' needs at least one dual-stage round, got 0",
        ),
        (
            [('recipe = "dual"', 'recipe = "standard"')],
            "federation.dual-rounds: 2 dual-stage rounds need train.recipe = 'dual', got 'standard'",
        ),
        (
            [("rounds = 4\n", "rounds = 2\n"), ("probe-rounds = 1", "probe-rounds = 0")],
            r"federation: dual-rounds \(2\) should be fewer than rounds \(2\)",
        ),
        (
            [("min-sites = 3", 'min-sites = 3\nbn-policy = "local"')],
            r"federation.bn-policy: 'local' \(FedBN\) is not supported with train.recipe = 'dual'",
        ),
    ],
)
def test_inconsistent_recipe_settings_name_the_field(tmp_path, edits, message):
    text = DUAL_FED
    for old, new in edits:
        assert old in text
        text = text.replace(old, new)
    path = Path(tmp_path) / "fed.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_fed_config(path)


def test_a_stopped_federation_resumes_before_and_after_the_merge(tmp_path):
    from fedfreeze.federation.coordinator import Coordinator

    config = Path(tmp_path) / "fed.toml"
    config.write_text(DUAL_FED)
    cfg = load_fed_config(config)
    first = Coordinator(cfg, tmp_path / "out")
    assert first.base_for(first.plan(first.orders(1))) == {}  # nothing frozen in the dual stage
    first.completed = 2
    first.checkpoint()  # stopped after the last dual round: the checkpoint holds the dual model
    again = Coordinator(cfg, tmp_path / "out")
    assert again.resume() and "head.weight" in again.state
    again.begin_round(3)  # the merge
    assert "head.fc.weight" in again.state and again.plan(again.orders(3)).sent == ("head.fc.weight", "head.fc.bias")
    assert set(again.base_for(again.plan(again.orders(3)))) == set(again.plan(again.orders(3)).frozen)
    again.completed = 3
    again.checkpoint()
    last = Coordinator(cfg, tmp_path / "out")
    assert last.resume() and "head.fc.weight" in last.state  # the merged checkpoint is accepted too
    last.begin_round(4)  # and not merged twice
    assert {k: v.shape for k, v in last.state.items()} == {k: v.shape for k, v in again.state.items()}

"""End to end: ``fedfreeze site-train`` with ``train.recipe = "dual"`` on 500 real digits, then ``evaluate``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedfreeze.cli import main
from fedfreeze.evaluate import evaluate_model
from fedfreeze.model_io import load_model
from tests.lightweight.conftest import LWCNN_MODEL_TOML, MNIST_FIXTURE

DUAL_SITE = (
    LWCNN_MODEL_TOML
    + """[train]
recipe = "dual"
probe-epochs = 1
epochs = 2
unfreeze = { layer4 = 0.0, layer3 = 0.5 }
lr = { head = 2e-3, layer4 = 1e-3, layer3 = 1e-3 }
probe-lr = 2e-3
batch-size = 25
cutmix-prob = 0.0
augment = false
balanced-sampling = false
[train.dual]
epochs = 5
lr = 5e-3
[cv]
folds = 2
"""
)
CHANCE = 0.1


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dual-site")
    config = root / "site.toml"
    config.write_text(DUAL_SITE)
    out = root / "run"
    assert (
        main(["site-train", "--config", str(config), "--data", str(MNIST_FIXTURE), "--out", str(out), "--quiet"]) == 0
    )
    return out


def test_each_fold_runs_the_dual_stage_then_unfreezes_from_the_head_back(trained):
    report = json.loads((trained / "metrics.json").read_text())
    assert report["config"]["train"]["recipe"] == "dual"
    every_part = ["head", "layer1", "layer2", "layer3", "layer4", "stem"]
    for fold in report["folds"]:
        epochs = fold["epochs"]
        assert [e["stage"] for e in epochs] == ["dual"] * 5 + ["merged"] * 3
        assert [e["epoch"] for e in epochs] == list(range(8))
        assert [e["parts"] for e in epochs] == [every_part] * 5 + [
            ["head"],
            ["head", "layer4"],
            ["head", "layer3", "layer4"],
        ]
        assert epochs[5]["cached_features"] is True  # the probe trains on the merged backbone's features
        assert epochs[4]["loss"] < epochs[0]["loss"]
        assert fold["balanced_accuracy"] > 5 * CHANCE, fold  # 250 held-out digits of 10 classes


def test_the_refit_model_is_a_plain_lwcnn_that_beats_chance_on_unseen_digits(trained):
    model, card = load_model(trained)
    assert card.model.backbone == "lwcnn"
    assert sum(p.numel() for p in model.parameters()) == 14_154
    result = evaluate_model(trained, MNIST_FIXTURE, split="test")  # 200 digits of the official test set
    assert result["n"] == 200
    assert result["accuracy"] > 6 * CHANCE, result


def test_the_recipe_refuses_a_backbone_without_two_sub_models(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text(DUAL_SITE.replace('backbone = "lwcnn"', 'backbone = "lwcnn-branch"'))
    code = main(
        ["site-train", "--config", str(config), "--data", str(MNIST_FIXTURE), "--out", str(tmp_path / "x"), "--quiet"]
    )
    assert code == 2
    assert "model.backbone: the dual recipe needs a backbone of two sub-models" in capsys.readouterr().err

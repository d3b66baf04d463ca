"""The lightweight CNN family: parameter budget, declared groups, registry listing and clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from fedfreeze.cli import main
from fedfreeze.errors import ConfigError
from fedfreeze.models.lightweight import RoutedConv
from fedfreeze.models.registry import build_model
from tests.lightweight.conftest import lwcnn_config

PAPER_BUDGET = 15_000  # the paper's model has 14,862 parameters


def test_lwcnn_stays_under_the_parameter_budget():
    model, _ = build_model(lwcnn_config())
    params = sum(p.numel() for p in model.parameters())
    assert params < PAPER_BUDGET
    assert params == 14_154  # two sub-models of 7,082 less one head bias (10), as documented
    branch, _ = build_model(lwcnn_config(backbone="lwcnn-branch"))
    assert sum(p.numel() for p in branch.parameters()) == 7_082
    # fp32 weights, BatchNorm statistics and counters: what weights.pt holds
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert size < 0.17e6  # the paper's 0.17 MB


def test_lwcnn_declares_its_groups_and_maps_28px_digits_to_10_logits(digits):
    model, fmt = build_model(lwcnn_config())
    assert fmt is None
    assert model.group_names == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    model.eval()
    x = model.normalize(digits)
    sizes = []
    for name in model.groups:
        x = model.groups[name](x)
        sizes.append(tuple(x.shape[1:]))
    # two sub-models side by side: channels double; 28 -> 14 after the stem, 14 -> 7 after layer2
    assert sizes == [(16, 14, 14), (16, 14, 14), (24, 7, 7), (32, 7, 7), (48, 7, 7)]
    assert model(digits).shape == (32, 10)


def test_models_command_lists_the_family_with_its_own_input_and_classes(capsys, monkeypatch):
    from fedfreeze.models import listing

    # the family and one ImageNet backbone (building ResNet-50 as well would only cost time)
    kept = {k: v for k, v in listing.BACKBONES.items() if k in ("lwcnn", "lwcnn-branch", "efficientnet_lite0")}
    monkeypatch.setattr(listing, "BACKBONES", kept)
    assert main(["models", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    lw = rows["lwcnn"]
    assert (lw["in_channels"], lw["input_size"], lw["num_classes"]) == (1, 28, 10)
    assert lw["parameters"] == 14_154 and lw["size_bytes"] < 0.17e6
    assert lw["groups"] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert rows["lwcnn-branch"]["parameters"] == 7_082
    lite0 = rows["efficientnet_lite0"]  # the others keep their own input and binary head
    assert (lite0["in_channels"], lite0["input_size"], lite0["num_classes"]) == (3, 224, 2)
    assert main(["models"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("lwcnn "))
    assert "14,154" in line and "1x28x28" in line and " 10 " in line


def test_pretrained_weights_are_refused_with_the_field_named():
    with pytest.raises(ConfigError, match=r"model.weights: lwcnn has no pretrained weights.*weights = \"none\""):
        build_model(lwcnn_config(weights="package"))


def test_the_stem_takes_one_image_or_one_per_sub_model_and_nothing_else():
    conv = RoutedConv(1, 16, branches=2)
    assert conv(torch.zeros(2, 1, 28, 28)).shape == (2, 16, 28, 28)
    assert conv(torch.zeros(2, 2, 28, 28)).shape == (2, 16, 28, 28)
    with pytest.raises(ValueError, match="the stem takes 1 channels .* or 2 .* got 3"):
        conv(torch.zeros(2, 3, 28, 28))

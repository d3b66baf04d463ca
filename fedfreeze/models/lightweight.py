"""The lightweight CNN family: small plain CNNs for 28x28 single-channel images, trained from scratch.

A lightweight model is ``branches`` identical sub-models side by side, cut into the usual groups
``stem, layer1 .. layer4`` (then global average pooling and the head, as for every ``GroupedNet``):

* ``stem``    3x3 conv -> BN -> ReLU -> 2x2 max-pool     (28 -> 14)
* ``layer1``  3x3 conv -> BN -> ReLU                     (14 x 14)
* ``layer2``  3x3 conv -> BN -> ReLU -> 2x2 max-pool     (14 -> 7)
* ``layer3``  3x3 conv -> BN -> ReLU                     (7 x 7)
* ``layer4``  3x3 conv -> BN -> ReLU                     (7 x 7)

(pooling right after the stem halves the multiply-adds of pooling after layer1, 1.2 M per image
for ``lwcnn``: training on a shared 2-core CPU is what these models are for.)

With two branches every convolution after the stem is a grouped convolution (``groups=2``):
channels ``[0, c)`` belong to sub-model A and ``[c, 2c)`` to sub-model B, with no weight between
them, so the network *is* two independent sub-models stored block-diagonally. BatchNorm, ReLU,
pooling and the global average are per channel and keep them apart too. Only the stem decides
what each sub-model sees (``RoutedConv``): one image shared by both (the merged model), or one
image per sub-model stacked on the channel axis (the dual-input-output model of
``fedfreeze.models.dual``). The dual model and the merged model therefore hold the very same
group weights; the merge only changes the input routing and joins the two heads into one.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedfreeze.models.spec import BackboneSpec

# channels per sub-model of stem, layer1, layer2, layer3, layer4
LWCNN_WIDTHS = (8, 8, 12, 16, 24)
POOL_AFTER = ("stem", "layer2")
GROUP_NAMES = ("stem", "layer1", "layer2", "layer3", "layer4")
MNIST_INPUT = 28


class RoutedConv(nn.Conv2d):
    """The stem convolution of a ``branches``-wide model: filters ``[i*c, (i+1)*c)`` belong to sub-model ``i``.

    Its input is either ``in_channels`` channels, which every sub-model sees (a plain dense
    convolution), or ``branches * in_channels`` channels, one image per sub-model in branch order
    (a grouped convolution with the same weight tensor). Any other channel count is an error.
    """

    def __init__(self, in_channels: int, out_channels: int, branches: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        if out_channels % branches:
            raise ValueError(f"out_channels ({out_channels}) should be a multiple of branches ({branches})")
        self.branches = branches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        if channels == self.in_channels:
            groups = 1
        elif channels == self.in_channels * self.branches:
            groups = self.branches
        else:
            raise ValueError(
                f"the stem takes {self.in_channels} channels (one image for every sub-model) or "
                f"{self.in_channels * self.branches} (one image per sub-model), got {channels}"
            )
        return F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation, groups)


def conv_block(in_ch: int, out_ch: int, groups: int, pool: bool) -> nn.Sequential:
    """3x3 grouped conv (no bias: BN follows) -> BN -> ReLU [-> 2x2 max-pool]."""
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv=nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, groups=groups, bias=False),
        bn=nn.BatchNorm2d(out_ch),
        relu=nn.ReLU(inplace=True),
    )
    if pool:
        layers["pool"] = nn.MaxPool2d(2)
    return nn.Sequential(layers)


def lightweight_groups(
    in_channels: int, widths: tuple[int, ...] = LWCNN_WIDTHS, branches: int = 2
) -> tuple[OrderedDict[str, nn.Module], int]:
    """The groups of a ``branches``-wide lightweight CNN and its feature width (``branches * widths[-1]``)."""
    if len(widths) != len(GROUP_NAMES):
        raise ValueError(f"widths should give {len(GROUP_NAMES)} channel counts ({GROUP_NAMES}), got {widths}")
    if branches < 1:
        raise ValueError(f"branches should be at least 1, got {branches}")
    stem_out = widths[0] * branches
    stem_layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv=RoutedConv(in_channels, stem_out, branches),
        bn=nn.BatchNorm2d(stem_out),
        relu=nn.ReLU(inplace=True),
    )
    if "stem" in POOL_AFTER:
        stem_layers["pool"] = nn.MaxPool2d(2)
    stem = nn.Sequential(stem_layers)
    groups: OrderedDict[str, nn.Module] = OrderedDict(stem=stem)
    for name, c_in, c_out in zip(GROUP_NAMES[1:], widths[:-1], widths[1:], strict=True):
        groups[name] = conv_block(c_in * branches, c_out * branches, branches, pool=name in POOL_AFTER)
    return groups, widths[-1] * branches


def lightweight_specs() -> list[BackboneSpec]:
    """The family's registry entries (``fedfreeze.models.registry`` registers them at import)."""
    common: dict[str, Any] = {
        "key_maps": {},  # no pretrained weights exist: these models train from scratch (weights = "none")
        "stem_key": "groups.stem.conv.weight",
        "input_size": MNIST_INPUT,
        "mean": (0.5,),
        "std": (0.5,),
        "in_channels": 1,
        "num_classes": 10,
    }
    return [
        BackboneSpec(
            name="lwcnn",
            build_groups=lambda c: lightweight_groups(c, LWCNN_WIDTHS, branches=2),
            description="lightweight CNN, two 8-8-12-16-24 sub-models side by side (grouped convs); "
            "the merged model of train.recipe = 'dual'; 28x28 grey, from scratch",
            **common,
        ),
        BackboneSpec(
            name="lwcnn-branch",
            build_groups=lambda c: lightweight_groups(c, LWCNN_WIDTHS, branches=1),
            description="one sub-model of lwcnn on its own (8-8-12-16-24); 28x28 grey, from scratch",
            **common,
        ),
    ]

"""The dual-input-output model of ``train.recipe = "dual"`` and its merge into one single-input model.

The recipe (Isong, "Building Efficient Lightweight CNN Models", 2025): two identical sub-models
train side by side, A on the original images and B on augmented copies of them, each with its own
output (its own head and loss); then both are merged into one model that sees one image, which
fine-tunes with progressive unfreezing from the head back.

Here the two sub-models are the two branches of a two-branch lightweight backbone
(``fedfreeze.models.lightweight``): block-diagonal grouped convolutions, so that

* ``DualNet`` is the backbone's groups fed one image per sub-model (stacked on the channel axis),
  with one head per sub-model: ``forward`` returns both sub-models' logits, ``[B, 2, K]``;
* ``merge_dual`` keeps every group weight as it is, feeds both sub-models the same image, and
  replaces the two heads by one head over the concatenated features whose weights are the two
  heads side by side, halved, and whose bias is their mean. So, exactly (up to float rounding),

      merged(x) == (logits_A(x) + logits_B(x)) / 2 == dual.joined(x, x)

  the dual model's joined output when both inputs get the same (un-augmented) image; with an
  augmented second input, branch A's output is still the same and only B's changes.

``branch_of`` takes one sub-model out as a standalone one-branch model (``lwcnn-branch``), which
reproduces that sub-model's output: the dual model really is two independent sub-models.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn

from fedfreeze.config import ModelConfig
from fedfreeze.errors import ConfigError
from fedfreeze.models.grouped import HEAD, GroupedNet
from fedfreeze.models.lightweight import RoutedConv

HEAD_WEIGHT = "head.weight"  # DualNet: [branches, K, F]
HEAD_BIAS = "head.bias"  # DualNet: [branches, K]
MERGED_WEIGHT = "head.fc.weight"  # GroupedNet: [K, branches * F]
MERGED_BIAS = "head.fc.bias"  # GroupedNet: [K]


class BranchHeads(nn.Module):
    """One dropout + linear head per sub-model, on that sub-model's slice of the pooled features."""

    def __init__(self, branch_features: int, num_classes: int, dropout: float, branches: int) -> None:
        super().__init__()
        outputs = 1 if num_classes == 2 else num_classes
        self.dropout = nn.Dropout(dropout)
        self.weight = nn.Parameter(torch.empty(branches, outputs, branch_features))
        self.bias = nn.Parameter(torch.empty(branches, outputs))
        for i in range(branches):  # each head initialised like an nn.Linear of its own
            init = nn.Linear(branch_features, outputs)
            with torch.no_grad():
                self.weight[i].copy_(init.weight)
                self.bias[i].copy_(init.bias)

    @property
    def branches(self) -> int:
        return self.weight.shape[0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, branches * F]`` -> ``[B, branches, outputs]``."""
        per_branch = self.dropout(features).view(features.shape[0], self.branches, -1)
        return torch.einsum("bnf,nkf->bnk", per_branch, self.weight) + self.bias


class DualNet(GroupedNet):
    """The dual-input-output model: one input image per sub-model, one output per sub-model.

    The groups are those of a multi-branch backbone (their state keys and shapes equal the merged
    model's); only the head differs. Parts, freezing and the federated exchange work as for any
    ``GroupedNet``. Its input is ``[B, branches * C, H, W]``: sub-model ``i`` sees channels
    ``[i*C, (i+1)*C)``; ``pair`` builds it from the original and the augmented batch.
    """

    def __init__(
        self, groups: OrderedDict[str, nn.Module], feature_dim: int, num_classes: int, dropout: float, branches: int
    ) -> None:
        super().__init__(groups, feature_dim, num_classes, dropout)
        stem_conv = _stem_conv(self)
        if stem_conv.branches != branches or feature_dim % branches:
            raise ValueError(f"a DualNet needs a backbone of {branches} branches, its stem has {stem_conv.branches}")
        self.branches = branches
        self.head = BranchHeads(feature_dim // branches, num_classes, dropout, branches)

    @staticmethod
    def pair(original: torch.Tensor, augmented: torch.Tensor) -> torch.Tensor:
        """Sub-model A's input and sub-model B's, stacked on the channel axis."""
        if original.shape != augmented.shape:
            raise ValueError(
                f"both inputs should have one shape, got {tuple(original.shape)} and {tuple(augmented.shape)}"
            )
        return torch.cat([original, augmented], dim=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[B, branches * F]`` of a stacked input in [0, 1] (sub-model order).

        As ``GroupedNet.features``, except that each sub-model's input is normalised on its own.
        """
        return self.pooled_features(torch.cat([self.normalize(p) for p in x.chunk(self.branches, dim=1)], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Both sub-models' logits, ``[B, branches, outputs]``."""
        return self.head(self.features(x))

    def joined(self, x: torch.Tensor) -> torch.Tensor:
        """The dual model's joined output: the mean of the sub-models' logits, ``[B, outputs]``."""
        return self(x).mean(dim=1)


def _stem_conv(model: GroupedNet) -> RoutedConv:
    for module in model.groups["stem"].modules() if "stem" in model.groups else []:
        if isinstance(module, RoutedConv):
            return module
    raise ConfigError(
        "the dual recipe needs a lightweight backbone whose stem routes one input per sub-model "
        '(model.backbone = "lwcnn")'
    )


def branch_count(model: GroupedNet) -> int:
    """How many sub-models sit side by side in ``model`` (1 for a plain network)."""
    try:
        return _stem_conv(model).branches
    except ConfigError:
        return 1


def build_dual(cfg: ModelConfig) -> DualNet:
    """The dual model of ``cfg.backbone`` (a multi-branch lightweight backbone), randomly initialised."""
    from fedfreeze.models.registry import build_model

    if cfg.weights != "none":
        raise ConfigError(
            f'model.weights: the dual recipe trains from scratch; set weights = "none", got {cfg.weights!r}'
        )
    single, _ = build_model(cfg)  # builds the groups, checks the backbone, sets the normalisation
    branches = branch_count(single)
    if branches < 2:
        raise ConfigError(
            f"model.backbone: the dual recipe needs a backbone of two sub-models side by side "
            f"(lwcnn); {cfg.backbone!r} has {branches}"
        )
    dual = DualNet(
        OrderedDict(single.groups.items()),
        single.feature_dim,
        single.num_classes,
        float(single.head.dropout.p),
        branches,
    )  # type: ignore[union-attr]
    dual.normalize = single.normalize
    return dual


def merge_state(dual_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The merged model's state from the dual model's: group arrays as they are, the heads joined.

    Head ``i`` has weight ``W_i`` ``[K, F]`` and bias ``b_i``; the merged head has weight
    ``[W_1 | ... | W_n] / n`` over the concatenated features and bias ``mean_i b_i``, so its logits
    are the mean of the sub-models' logits.
    """
    if HEAD_WEIGHT not in dual_state or HEAD_BIAS not in dual_state:
        raise ValueError(f"not a dual model's state: {HEAD_WEIGHT} and {HEAD_BIAS} are missing")
    weight, bias = dual_state[HEAD_WEIGHT], dual_state[HEAD_BIAS]
    branches, outputs, features = weight.shape
    merged = {k: v.clone() for k, v in dual_state.items() if not k.startswith(HEAD + ".")}
    merged[MERGED_WEIGHT] = weight.permute(1, 0, 2).reshape(outputs, branches * features) / branches
    merged[MERGED_BIAS] = bias.mean(dim=0)
    return merged


def merge_dual(dual: DualNet) -> GroupedNet:
    """One single-input model whose output is the dual model's joined output on two equal inputs."""
    merged = GroupedNet(copy.deepcopy(dual.groups), dual.feature_dim, dual.num_classes, float(dual.head.dropout.p))
    merged.normalize = copy.deepcopy(dual.normalize)
    merged.load_state_dict(merge_state(dual.state_dict()))
    merged.update_bn_stats = dual.update_bn_stats
    return merged.to(next(dual.parameters()).device).train(dual.training)


def branch_of(model: GroupedNet, index: int) -> GroupedNet:
    """Sub-model ``index`` of a dual or merged multi-branch model, as a one-branch model of its own.

    Every convolution and BatchNorm keeps its slice of channels. The head is that sub-model's own
    (dual model), or its slice of the merged head times the branch count with the merged bias
    (merged model: the merged logits are then the mean of its sub-models' logits).
    """
    from fedfreeze.models.lightweight import LWCNN_WIDTHS, lightweight_groups

    branches = branch_count(model)
    if not 0 <= index < branches:
        raise ValueError(f"sub-model index should be in [0, {branches}), got {index}")
    stem = _stem_conv(model)
    widths = tuple(m.out_channels // branches for m in model.groups.modules() if isinstance(m, nn.Conv2d))
    if len(widths) != len(LWCNN_WIDTHS):
        raise ValueError(f"cannot take a sub-model out of a backbone with {len(widths)} convolutions")
    groups, feature_dim = lightweight_groups(stem.in_channels, widths, branches=1)
    single = GroupedNet(groups, feature_dim, model.num_classes, 0.0)
    single.normalize = copy.deepcopy(model.normalize)
    source = dict(model.named_modules())
    with torch.no_grad():
        for name, module in single.groups.named_modules():
            full = source[f"groups.{name}"] if name else None
            if isinstance(module, nn.Conv2d):
                c = module.out_channels
                module.weight.copy_(full.weight[index * c : (index + 1) * c])  # type: ignore[index,union-attr]
            elif isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(module, key).copy_(getattr(full, key)[index * c : (index + 1) * c])
                module.num_batches_tracked.copy_(full.num_batches_tracked)  # type: ignore[union-attr]
        f = feature_dim
        if isinstance(model, DualNet):
            single.head.fc.weight.copy_(model.head.weight[index])
            single.head.fc.bias.copy_(model.head.bias[index])
        else:
            single.head.fc.weight.copy_(model.head.fc.weight[:, index * f : (index + 1) * f] * branches)
            single.head.fc.bias.copy_(model.head.fc.bias)
    return single.train(model.training)

"""A backbone cut into named layer groups, run input to head, with a frozen prefix that skips autograd.

Every architecture in the registry is expressed as a ``GroupedNet``: an ordered list of groups
(``stem``, ``layer1`` .. ``layer4`` for the ImageNet-style CNNs), global average pooling and a
dropout + linear head. Freezing, learning rates, adapters and the federated exchange all speak in
these group names, so one schedule language serves every backbone.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from fedfreeze.errors import ConfigError
from fedfreeze.models.adapters import StageAdapters

HEAD = "head"
TOP = "top"  # the last block, cut out of the last group by ``split_top``


class Head(nn.Module):
    """Dropout + linear classifier; one logit for a binary task, one per class otherwise."""

    def __init__(self, in_features: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, 1 if num_classes == 2 else num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(features))


class GroupedNet(nn.Module):
    """Groups run in order, then pooling and the head.

    ``frozen`` records which parts are frozen. A part is a group's own weights (``"layer4"``),
    a group's adapters (``"layer4.adapters"``) or the head. The leading groups whose parts are all
    frozen form the *frozen prefix*: it runs under ``torch.no_grad`` and in eval mode, so it stores
    no activations, gets no backward pass, and its BatchNorm statistics never move.
    """

    def __init__(
        self,
        groups: OrderedDict[str, nn.Module],
        feature_dim: int,
        num_classes: int,
        dropout: float,
    ) -> None:
        super().__init__()
        if HEAD in groups:
            raise ValueError(f"group name {HEAD!r} is reserved for the classifier head")
        self.normalize: nn.Module = nn.Identity()  # set by the registry; holds no weights
        self.groups = nn.ModuleDict(groups)
        self.adapters = nn.ModuleDict()
        self.head = Head(feature_dim, num_classes, dropout)
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.frozen: frozenset[str] = frozenset()
        # False: BatchNorm of trainable groups also uses (and keeps) its running statistics
        self.update_bn_stats = True
        self.pretrained = False  # set by the registry when a checkpoint was loaded

    # ----------------------------------------------------------------- structure
    @property
    def group_names(self) -> list[str]:
        """Backbone groups from input to output, then ``head``."""
        return [*self.groups.keys(), HEAD]

    @property
    def parts(self) -> list[str]:
        """Every independently trainable part, input to head."""
        out: list[str] = []
        for name in self.groups:
            out.append(name)
            if name in self.adapters:
                out.append(adapter_part(name))
        out.append(HEAD)
        return out

    def part_modules(self, part: str) -> nn.Module:
        """The module holding a part's parameters."""
        if part == HEAD:
            return self.head
        if part.endswith(ADAPTER_SUFFIX):
            return self.adapters[part[: -len(ADAPTER_SUFFIX)]]
        return self.groups[part]

    def add_adapters(self, group: str, rank: int) -> None:
        """Attach zero-initialised low-rank residual adapters beside each block of ``group``."""
        if group not in self.groups:
            raise ValueError(f"adapters: unknown group {group!r}; groups are {list(self.groups)}")
        stage = self.groups[group]
        if not isinstance(stage, nn.Sequential):
            raise ValueError(f"adapters need group {group!r} to be a sequence of blocks")
        self.adapters[group] = StageAdapters.for_stage(stage, self._input_of(group), rank)

    def split_top(self) -> None:
        """Move the last block of the last group into a group of its own, ``top``.

        Why: in some backbones one group holds most of the weights (Lite0's ``layer4`` holds about 83 %,
        most of it the final 1x1 ``conv_head``), so unfreezing it sends almost the whole model each round.
        With ``top`` (Lite0's ``conv_head``; ResNet's last bottleneck) a schedule can unfreeze a small top
        part first. Call it before adapters are attached; the moved block's weights are kept.
        """
        if TOP in self.groups or self.adapters:
            raise ValueError("split_top: the model already has a top group or adapters")
        last = list(self.groups)[-1]
        stage = self.groups[last]
        if not isinstance(stage, nn.Sequential) or len(stage) < 2:
            raise ConfigError(
                f"model.top-group: the last group {last!r} of this backbone is not a sequence of two or more"
                " blocks, so it has no last block to cut out"
            )
        blocks = list(stage)
        self.groups[last] = nn.Sequential(*blocks[:-1])
        self.groups[TOP] = nn.Sequential(blocks[-1])

    @torch.no_grad()
    def _input_of(self, group: str) -> torch.Tensor:
        """A small dummy input of the right shape for ``group`` (used to size adapters)."""
        x = torch.zeros(1, self._in_channels(), 64, 64)
        was_training = self.training
        self.eval()
        for name, module in self.groups.items():
            if name == group:
                break
            x = module(x)
        self.train(was_training)
        return x

    def _in_channels(self) -> int:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                return module.in_channels
        raise ValueError("no convolution found: cannot tell the input channels")

    # ----------------------------------------------------------------- freezing
    def frozen_prefix(self) -> list[str]:
        """Leading groups whose weights and adapters are all frozen."""
        prefix = []
        for name in self.groups:
            adapters_frozen = name not in self.adapters or adapter_part(name) in self.frozen
            if name in self.frozen and adapters_frozen:
                prefix.append(name)
            else:
                break
        return prefix

    def train(self, mode: bool = True) -> GroupedNet:
        """Switch modes, but keep every group whose own weights are frozen in eval mode.

        A frozen group's BatchNorm layers must not update their running statistics (the seed
        code let them drift during training even though their weights were frozen). With
        ``update_bn_stats`` off, trainable groups' BatchNorm layers also normalise with their
        running statistics (their scale and shift still train): small batches then cannot
        skew the statistics, and training and inference see the same normalisation.
        """
        super().train(mode)
        for name, module in self.groups.items():
            if name in self.frozen:
                module.eval()
            elif not self.update_bn_stats:
                for sub in module.modules():
                    if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                        sub.eval()
        return self

    # ----------------------------------------------------------------- forward
    def forward_groups(self, x: torch.Tensor, names: Iterable[str]) -> torch.Tensor:
        for name in names:
            stage = self.groups[name]
            if name in self.adapters:
                x = self.adapters[name].run(stage, x)
            else:
                x = stage(x)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features of inputs in [0, 1]; the frozen prefix runs without autograd."""
        return self.pooled_features(self.normalize(x))

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features of an already normalised input."""
        return self.pooled_after(x, ())

    def pooled_after(self, x: torch.Tensor, done: Sequence[str]) -> torch.Tensor:
        """Pooled features from ``x``, the output of the leading groups ``done`` (run elsewhere, e.g. by an
        inference engine; ``()``: ``x`` is the normalised input)."""
        names = list(self.groups)
        if list(done) != names[: len(done)]:
            raise ValueError(f"pooled_after: {list(done)} are not the leading groups of {names}")
        prefix = [name for name in self.frozen_prefix() if name not in done]
        rest = [name for name in names[len(done) :] if name not in prefix]
        if prefix:
            with torch.no_grad():
                x = self.forward_groups(x, prefix)
        x = self.forward_groups(x, rest)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def named_part_parameters(self) -> Iterator[tuple[str, str, nn.Parameter]]:
        """(part, parameter name, parameter) for every parameter, input to head."""
        for part in self.parts:
            for name, param in self.part_modules(part).named_parameters():
                yield part, name, param

    def part_of_key(self, key: str) -> str:
        """The part a ``state_dict`` key belongs to (buffers such as BatchNorm statistics included)."""
        top, _, rest = key.partition(".")
        if top == HEAD:
            return HEAD
        group = rest.partition(".")[0]
        if top == "groups" and group in self.groups:
            return group
        if top == "adapters" and group in self.adapters:
            return adapter_part(group)
        raise KeyError(f"state_dict key {key!r} belongs to no part of this model")


ADAPTER_SUFFIX = ".adapters"


def adapter_part(group: str) -> str:
    """The part name of a group's adapters."""
    return group + ADAPTER_SUFFIX

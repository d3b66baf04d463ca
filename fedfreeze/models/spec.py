"""What the registry knows of one backbone (its own module, so the model families and the registry
import it without importing each other)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

GroupBuilder = Callable[[int], tuple["OrderedDict[str, nn.Module]", int]]


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and read its checkpoints."""

    name: str
    build_groups: GroupBuilder
    key_maps: dict[str, Callable[[], dict[str, str]]]  # checkpoint format -> key prefix map
    stem_key: str
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    description: str
    format_norms: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = field(default_factory=dict)
    # the input and task the backbone is meant for (what `fedfreeze models` builds and measures)
    in_channels: int = 3
    num_classes: int = 2

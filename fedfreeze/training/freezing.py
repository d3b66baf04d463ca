"""Apply a set of trainable parts to a model: ``requires_grad`` and BatchNorm mode together."""

from __future__ import annotations

from collections.abc import Iterable

from fedfreeze.models.grouped import GroupedNet


def apply_parts(model: GroupedNet, parts: Iterable[str]) -> None:
    """Make exactly ``parts`` trainable; every other part is frozen with its BatchNorm in eval mode.

    Trainability is decided by structure (the part a parameter belongs to), never by a substring
    of its name.
    """
    parts = frozenset(parts)
    unknown = parts - set(model.parts)
    if unknown:
        raise ValueError(f"unknown part(s) {sorted(unknown)}; this model has {model.parts}")
    for part, _, param in model.named_part_parameters():
        param.requires_grad_(part in parts)
    model.frozen = frozenset(model.parts) - parts
    model.train(model.training)  # re-applies eval mode to frozen groups


def trainable_parameter_count(model: GroupedNet) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

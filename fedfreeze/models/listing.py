"""``fedfreeze models``: every registered backbone with its size, groups and input size."""

from __future__ import annotations

from typing import Any

from fedfreeze.config import ModelConfig
from fedfreeze.models.registry import BACKBONES, build_model


def describe_backbones() -> list[dict[str, Any]]:
    """One row per backbone, measured on a freshly built (untrained) model with the input channels and
    head (class count) the backbone is meant for."""
    rows = []
    for name, spec in sorted(BACKBONES.items()):
        model, _ = build_model(
            ModelConfig(
                backbone=name,
                weights="none",
                input_size=spec.input_size,
                in_channels=spec.in_channels,
                num_classes=spec.num_classes,
            )
        )
        params = sum(p.numel() for p in model.parameters())
        size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        rows.append(
            {
                "name": name,
                "parameters": params,
                "size_mb": size / 1e6,
                "size_bytes": size,
                "input_size": spec.input_size,
                "in_channels": spec.in_channels,
                "num_classes": spec.num_classes,
                "groups": model.group_names,
                "description": spec.description,
            }
        )
    return rows

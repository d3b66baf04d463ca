"""``fedfreeze models``: every registered backbone with its size, groups and input size."""

from __future__ import annotations

from typing import Any

from fedfreeze.config import ModelConfig
from fedfreeze.models.registry import BACKBONES, build_model


def describe_backbones() -> list[dict[str, Any]]:
    """One row per backbone, measured on a freshly built (untrained) model with a binary head."""
    rows = []
    for name, spec in sorted(BACKBONES.items()):
        model, _ = build_model(ModelConfig(backbone=name, weights="none", input_size=spec.input_size))
        params = sum(p.numel() for p in model.parameters())
        size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        rows.append({
            "name": name,
            "parameters": params,
            "size_mb": size / 1e6,
            "input_size": spec.input_size,
            "groups": model.group_names,
            "description": spec.description,
        })
    return rows

"""What one round leaves behind: a site's unpacked reply and the round's record, and how both become JSON.

Kept apart from the coordinator so the report writer and the Flower adapter read them without
importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Reply:
    """One site's reply, unpacked from whatever transport carried it."""

    node: int
    site: str
    arrays: dict[str, np.ndarray]
    metrics: dict[str, Any]
    frozen_hash: str
    bytes_down: int = 0
    bytes_up: int = 0
    role: str = "train"  # protocol.TRAIN_ROLE, or EVALUATE_ROLE for a site that only scores the global model
    operating_point: str | None = None  # final evaluation: the site's own operating point (JSON), if it shares it
    own_figures: dict[str, float] = field(default_factory=dict)  # protocol.SITE_FIGURES: only from a site sharing them
    release: str = "cells"  # secure_stats.CELLS, or SECURE: the coordinator put its statistics into a secure sum


@dataclass
class RoundRecord:
    """Everything measured in one round, as written to metrics.json."""

    round: int
    parts: list[str]
    sites: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    pooled: dict[str, Any] | None = None
    weighted_mean: dict[str, Any] | None = None  # the sites' own figures, weighted; 'from' says whose
    threshold_used: float | None = None
    threshold_next: float | None = None
    threshold_interval: list[float] | None = None  # bootstrap interval of threshold_next under the rule
    evaluation_sites: dict[str, Any] | None = None  # pooled figures of the sites that never train, kept apart
    round_seconds: float = 0.0
    bytes_down: int = 0
    bytes_up: int = 0
    evaluated_model: str = ""
    privacy: dict[str, Any] | None = None
    secure_sum: dict[str, Any] | None = None  # secure aggregation of the statistics: groups, dropouts, seconds, bytes


def json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")

"""How sure a pooled figure is, and what that allows: the digits it is shown with (the round line),
and whether the federation may choose on it (``export = "best"``, ``patience``).

From cells of at least ``min-cell-count`` cases a pooled figure is an estimate, and ``ranges`` holds
the lowest and highest value any cases consistent with the cells would give. An estimate is printed
beside its range, to the decimals the range supports (two when the range is wider than 0.05), never
four decimals the cells cannot back; exact figures (a secure sum, or ``min-cell-count = 1``) keep four.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fedfreeze.federation.records import RoundRecord

EXACT_DECIMALS = 4
FEWEST_DECIMALS = 2


def decimals_for(width: float | None) -> int:
    """Decimals a figure whose range is ``width`` wide supports: one more than the range's first
    significant digit, between 2 and 4 (None or 0: an exact figure, 4)."""
    if width is None or width <= 0:
        return EXACT_DECIMALS
    return max(FEWEST_DECIMALS, min(EXACT_DECIMALS, math.floor(-math.log10(width)) + 1))


def figure_text(figures: Mapping[str, Any], key: str, *, exact: bool = False) -> str:
    """``key``'s value in ``figures`` (one of ``released_metrics``' results) as the round line shows it:
    ``0.9864`` when ``exact`` (from exact counts: what ranges remain are bin ties), else ``0.99
    (0.48-1.00)``, beside the range its cells allow."""
    value = figures.get(key)
    if value is None:
        return "n/a"
    span = None if exact else (figures.get("ranges") or {}).get(key)
    if span is None or float(span[1]) <= float(span[0]):
        return f"{float(value):.{EXACT_DECIMALS}f}"
    d = decimals_for(float(span[1]) - float(span[0]))
    return f"{float(value):.{d}f} ({float(span[0]):.{d}f}-{float(span[1]):.{d}f})"


def is_exact(pooled: Mapping[str, Any] | None) -> bool:
    """Whether a round's pooled figures come from exact counts: a secure sum, or ``min-cell-count = 1``."""
    return bool(pooled) and (pooled.get("cells") or {}).get("min_cell_count") == 1  # type: ignore[union-attr]


def auroc_width(pooled: Mapping[str, Any] | None) -> float | None:
    """The width of the pooled validation AUROC's range at the threshold used (None: no range)."""
    span = (((pooled or {}).get("at_threshold_used") or {}).get("ranges") or {}).get("auroc")
    return None if span is None else float(span[1]) - float(span[0])


def decisive(pooled: Mapping[str, Any] | None, max_width: float) -> bool:
    """Whether ``export = "best"`` and ``patience`` may choose on a round's pooled figures: exact ones,
    or an AUROC whose range is at most ``max_width`` wide. (A multi-class federation's pooled accuracy
    from cells carries no range: it qualifies, as it always did.)"""
    if not pooled:
        return False
    if is_exact(pooled):
        return True
    width = auroc_width(pooled)
    return width is None or width <= max_width + 1e-12


def source_text(pooled: Mapping[str, Any]) -> str:
    """Where a group's pooled figures come from, for the round line."""
    about = pooled.get("cells") or {}
    if "secure_sum" in about:
        summed = about["secure_sum"]
        dropped = f", {len(summed['dropped'])} dropped" if summed.get("dropped") else ""
        return f"exact: secure sum of {len(summed['sites'])} sites{dropped}"
    if about.get("min_cell_count") == 1:
        return "exact histograms"
    return f"estimates from cells of >= {about.get('min_cell_count')} cases, (range the cells allow)"


def round_line(record: RoundRecord, *, final: bool = False) -> str:
    """The round's line in the coordinator's log: what was scored, at which threshold, by the training
    sites' validation and, apart, by the evaluation-only sites, each figure as sure as its source
    makes it (``figure_text``); the weighted mean of the sites' own figures only when they shared exact ones."""
    pooled_all = record.pooled or {}
    pooled = pooled_all.get("at_threshold_used", {})
    exact = is_exact(pooled_all)
    binary = "auroc" in pooled
    label = "final evaluation" if final else f"round {record.round} [{'+'.join(record.parts)}]"
    if binary:
        figures = ", ".join(
            f"{name} {figure_text(pooled, key, exact=exact)}"
            for name, key in (("AUROC", "auroc"), ("balanced acc", "balanced_accuracy"), ("F1", "f1"))
        )
        at = f" at the global threshold {record.threshold_used:.3f} (no site's own)" if record.threshold_used else ""
    else:
        figures = ", ".join(
            f"{name} {figure_text(pooled, key, exact=exact)}"
            for name, key in (("accuracy", "accuracy"), ("balanced acc", "balanced_accuracy"), ("F1", "f1"))
        )
        at = ""
    source = f" [{source_text(pooled_all)}]" if pooled_all else ""
    mean = record.weighted_mean or {}
    shared = (
        f" (weighted mean of the {mean['from']}: AUROC {mean['auroc']:.4f})"
        if "auroc" in mean and str(mean.get("from", "")).startswith("exact")
        else ""
    )
    external = ""
    if record.evaluation_sites:
        ext = record.evaluation_sites["at_threshold_used"]
        ext_exact = is_exact(record.evaluation_sites)
        first = ("AUROC", "auroc") if binary else ("accuracy", "accuracy")
        external = (
            f" | evaluation-only sites ({', '.join(record.evaluation_sites['sites'])}): {first[0]} "
            f"{figure_text(ext, first[1], exact=ext_exact)}, balanced acc "
            f"{figure_text(ext, 'balanced_accuracy', exact=ext_exact)}"
        )
    return (
        f"{label}, {record.evaluated_model}: validation {figures}{at}{source}{shared}{external} "
        f"| {len(record.sites)} sites, {len(record.rejected)} rejected, {len(record.failures)} failed, "
        f"up {record.bytes_up} B, {record.round_seconds:.1f} s"
    )

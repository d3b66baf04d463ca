"""Secure aggregation of the validation statistics: the rules both sides follow, free of Flower.

With ``federation.secure-aggregation``, a site's exact validation statistics (binary: its per-class
counts on the round's score bins; multi-class: its confusion matrix) leave it only masked, and the
coordinator learns only their sum over a group of sites (``fedfreeze/flower/secagg.py`` runs SecAgg+
for that). The groups are the training sites, and apart from them the evaluation-only sites: what
the coordinator pools for each is exactly what it pooled before, without any site's own histogram.

What the sum still reveals: the pooled counts themselves (a pooled bin holding one case tells that
some site holds a case of that class with a score in that bin, not which site); to a site that
reads the pooled figures, the sum of the others' counts (with two sites in a group: the other's
histogram); each site's number of validation cases (``val-n``, a site-level total that travels in
clear so the coordinator can check the sum). A group of one has no sum to hide in: its site releases
cells of at least ``min-cell-count`` cases instead, as without secure aggregation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from fedfreeze.errors import ProtocolError
from fedfreeze.evaluation.cells import ReleasedCells, release_cells
from fedfreeze.evaluation.pooled import class_histograms, multiclass_confusion, score_bin_edges
from fedfreeze.federation.protocol import RoundOrders

MODULUS = 2**32  # masks and sums are taken modulo this (SecAgg+'s mod range in Flower); counts stay far below
SECURE = "secure"  # a site's release: its exact statistics, masked, for the group's sum
CELLS = "cells"  # a site's release: cells of >= min-cell-count cases (no sum: a group of one, or no secure aggregation)


def statistics_vector(labels: np.ndarray, scores: np.ndarray, orders: RoundOrders) -> NDArray[np.int64]:
    """A site's exact validation statistics as the fixed-length integer vector it masks.

    Binary: the negatives' counts on the ``orders.score_bins`` bins, then the positives'; multi-class:
    the confusion matrix (rows the true class), row by row. It never leaves the site unmasked."""
    if scores.ndim == 1:
        table = class_histograms(labels, scores, score_bin_edges(orders.score_bins))
    else:
        table = multiclass_confusion(labels, scores.argmax(1), scores.shape[1])
    return table.reshape(-1).astype(np.int64)


def vector_length(orders: RoundOrders) -> int:
    """How many counts a site's statistics vector holds under ``orders``."""
    k = orders.model.num_classes
    return 2 * orders.score_bins if k == 2 else k * k


@dataclass(frozen=True)
class SecureSum:
    """What the coordinator learnt of one group: the sum of its sites' statistics, and over whom."""

    group: str
    sites: tuple[str, ...]  # the sites whose statistics the sum holds
    vector: NDArray[np.int64]
    dropped: tuple[str, ...] = ()  # sites that took part in the key exchange but whose statistics are not summed

    def table(self, orders: RoundOrders) -> NDArray[np.int64]:
        """The sum as ``[classes, units]`` counts: per-class histograms, or the pooled confusion matrix."""
        k = orders.model.num_classes
        return self.vector.reshape(k, -1)

    def release(self, orders: RoundOrders) -> ReleasedCells:
        """The pooled counts as one release of exact cells (every unit a cell, ``min-cell-count = 1``):
        the pooled figures computed from it are exact, and their ranges collapse to what the bins fix."""
        return release_cells(self.table(orders), 1)


def check_sum(vector: np.ndarray, orders: RoundOrders, expected_n: int, group: str) -> NDArray[np.int64]:
    """The unmasked sum as counts, checked against the round's layout and the sites' own totals.

    A sum that does not add up (a site masked something other than its statistics, or misstated
    ``val-n``) is a ``ProtocolError``: secure aggregation hides who sent what, so nothing of it can be
    pooled."""
    values = np.asarray(vector, dtype=np.int64)
    length = vector_length(orders)
    if values.shape != (length,):
        raise ProtocolError(f"secure sum of the {group} sites: {values.shape[0]} counts, expected {length}")
    if (values < 0).any() or (values >= MODULUS // 2).any():
        raise ProtocolError(f"secure sum of the {group} sites: counts outside [0, 2^31): the sum is corrupt")
    if int(values.sum()) != expected_n:
        raise ProtocolError(
            f"secure sum of the {group} sites holds {int(values.sum())} cases, but their val-n add up to "
            f"{expected_n}: a site masked something other than its validation statistics"
        )
    return values


def group_of(site: str, orders: RoundOrders) -> str:
    """Which sum a site's statistics join: the training sites', or the evaluation-only sites'."""
    return orders.role_of(site)


def plan_groups(sites: Mapping[int, str], orders: RoundOrders) -> dict[str, list[int]]:
    """Nodes per group (node ids in increasing order); a group of one is left out (its site releases
    cells: a sum over one site is that site's histogram)."""
    groups: dict[str, list[int]] = {}
    for node in sorted(sites):
        groups.setdefault(group_of(sites[node], orders), []).append(node)
    return {g: nodes for g, nodes in groups.items() if len(nodes) >= 2}


def reconstruction_threshold(sites: int) -> int:
    """Shares needed to rebuild a site's secrets: a strict majority of the group (at least 2).

    Below it no coalition of the coordinator and fewer sites can rebuild a site's mask; above it the
    sum still completes when sites drop out, up to ``sites - threshold`` of them (SecAgg+'s trade-off,
    Bell et al. 2020). With 2 sites no site may drop; with 3, one may."""
    if sites < 2:
        raise ValueError(f"secure aggregation needs at least 2 sites in a group, got {sites}")
    return max(2, sites // 2 + 1)

"""A round's rules that need no Flower: how many sites a round samples, whether enough valid replies
came back (``min-sites``), and how a site and the round's failures are named in the log and errors.

The Flower adapter (``fedfreeze.flower.grid_round``) applies them; tests check them without a Grid.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from fedfreeze.federation.config import FederationConfig
from fedfreeze.federation.coordinator import FederationFailed
from fedfreeze.federation.protocol import EVALUATE_ROLE
from fedfreeze.federation.records import Reply, RoundRecord


def sampled_sites(connected: int, fed: FederationConfig) -> int:
    """Sites a round samples (all connected, times fraction-train, at least min-sites), for the DP
    wrapper's noise."""
    return max(int(connected * fed.fraction_train), fed.min_sites)


def check_min_sites(record: RoundRecord, valid: Sequence[Reply], min_sites: int, names: Mapping[int, str]) -> None:
    """``min-sites`` counts valid replies of training sites; evaluation-only sites come on top. Fewer
    fail the round (``FederationFailed``), naming its first failures."""
    training = sum(r.role != EVALUATE_ROLE for r in valid)
    if training < min_sites:
        raise FederationFailed(
            f"round {record.round}: {training} valid replies of training sites, fewer than min-sites = "
            f"{min_sites} ({len(record.failures)} failed, {len(record.rejected)} rejected)"
            + failure_summary(record, names)
        )


def site_label(node: int, names: Mapping[int, str]) -> str:
    """A site's name when a reply has told us, else its node id."""
    return names.get(node, f"node {node}")


def listing(nodes: Iterable[int], names: Mapping[int, str]) -> str:
    return ", ".join(sorted(site_label(n, names) for n in nodes)) or "none"


def failure_summary(record: RoundRecord, names: Mapping[int, str], most: int = 3) -> str:
    """``: SITE: REASON; ...`` for the round's first ``most`` failures (all of them are in ``metrics.json``)."""
    if not record.failures:
        return ""
    shown = []
    for failure in record.failures[:most]:
        label, reason = site_label(failure["node"], names), str(failure["reason"])
        shown.append(reason if reason.startswith(f"{label} ") else f"{label}: {reason}")  # a refusal names its site
    more = len(record.failures) - most
    return ": " + "; ".join(shown) + (f"; and {more} more" if more > 0 else "")

"""Differential privacy on Flower: its DP wrappers around a strategy, with Flower's RDP accountant,
and the (epsilon, delta) spent so far.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedfreeze.federation.config import FederationConfig


def with_dp(strategy: Strategy, fed: FederationConfig, sites: int | None) -> Strategy:
    """``strategy`` as it is when ``federation.dp`` is off, else inside Flower's client- or server-side
    fixed-clipping DP wrapper with Flower's RDP accountant; ``sites``: how many sites each round samples
    (the noise scale and the accounting need it; ``min-sites`` when not given)."""
    if fed.dp == "off":
        return strategy
    sampled = sites or fed.min_sites
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=fed.dp_delta,
            population_size=sampled,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    wrapper = (
        DifferentialPrivacyClientSideFixedClipping if fed.dp == "client" else DifferentialPrivacyServerSideFixedClipping
    )
    return wrapper(strategy, fed.dp_noise_multiplier, fed.dp_clipping_norm, sampled, accountant=accountant)


def privacy_spent(strategy: Strategy) -> dict[str, Any] | None:
    """Cumulative (epsilon, delta) from Flower's accountant, when the strategy is a DP wrapper."""
    spent_fn = getattr(strategy, "privacy_spent", None)
    spent = spent_fn() if spent_fn is not None else None
    if spent is None:
        return None
    return {
        "epsilon": spent.epsilon,
        "delta": spent.delta,
        "releases": spent.num_releases,
        "method": spent.accounting_method,
    }

"""Flower's own strategies for fedfreeze's aggregation rules (FedAvg, FedProx, FedAvgM, FedTrimmedAvg,
FedMedian), wrapped for differential privacy when ``federation.dp`` is on (``privacy.py``).
"""

from __future__ import annotations

from typing import Any

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Strategy

from fedfreeze.federation.config import FedConfig
from fedfreeze.flower.fedavgm import KeyedFedAvgM
from fedfreeze.flower.fedprox import OrderedFedProx
from fedfreeze.flower.privacy import with_dp


def make_strategy(cfg: FedConfig, sites: int | None = None) -> Strategy:
    """Flower's own strategy for the configured aggregation rule, wrapped by Flower's DP wrapper
    (with Flower's RDP accountant) when ``federation.dp`` is on.

    ``sites``: how many sites each round samples (DP's noise scale and accounting need it).
    """
    fed = cfg.federation
    common: dict[str, Any] = {
        "fraction_train": fed.fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": fed.min_sites,
        "min_evaluate_nodes": fed.min_sites,
        "min_available_nodes": fed.min_sites,
        "train_metrics_aggr_fn": no_metric_average,
        "evaluate_metrics_aggr_fn": no_metric_average,
    }
    if fed.dp != "off":
        common["weighted_by_key"] = "dp-weight"  # accounted DP needs every site weighted equally
    strategy: Strategy
    if fed.strategy == "fedprox":
        strategy = OrderedFedProx(proximal_mu=fed.proximal_mu, **common)
    elif fed.strategy == "fedavgm":
        strategy = KeyedFedAvgM(server_learning_rate=fed.server_lr, server_momentum=fed.server_momentum, **common)
    elif fed.strategy == "trimmed-mean":
        strategy = FedTrimmedAvg(beta=fed.trim_beta, **common)
    elif fed.strategy == "median":
        strategy = FedMedian(**common)
    else:
        strategy = FedAvg(**common)
    return with_dp(strategy, fed, sites)


def no_metric_average(records: list[RecordDict], weighting_metric_name: str) -> MetricRecord:
    """In place of Flower's element-wise average of the replies' metrics: fedfreeze pools the sites'
    statistics itself (``Coordinator.pool``), and their released cells differ in number from site to
    site, which Flower's average cannot take."""
    return MetricRecord()

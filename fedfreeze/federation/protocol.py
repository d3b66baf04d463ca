"""The round contract between coordinator and sites: record names and the orders of a round.

Every decision about a round is made once, by the coordinator, and travels in ``RoundOrders``:
which parts train, the stage, the BatchNorm mode, whether a site may return only what it changed,
the learning-rate scale, which sites only evaluate, and what a site may release about its validation
cases (the score bins, the threshold and common edges its cells are anchored at, the minimum count of
a cell, whether its exact statistics go masked into a secure sum instead). A site applies the orders as given and never
re-derives them from its own copy of the configuration; both sides compute the exchange plan from
(model, orders) with ``exchange.plan_for``. This module alone encodes and decodes the orders (to
the plain dict a Flower ``ConfigRecord`` holds); it imports nothing of Flower.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from fedfreeze.config import ModelConfig, TrainConfig
from fedfreeze.errors import ProtocolError
from fedfreeze.federation.config import site_payload, site_sections
from fedfreeze.training.schedule import is_probe

ARRAYS = "arrays"  # ArrayRecord: the round's trainable arrays (down and up)
METRICS = "metrics"  # MetricRecord: example counts, timings, validation figures and statistics
CONFIG = "config"  # ConfigRecord: the coordinator's orders for the round
PROOF = "proof"  # ConfigRecord: the site's name, its role and the hash of its frozen weights
OPERATING_POINT = "operating-point"  # in PROOF, final evaluation only: a site's own operating point (JSON), if shared
BASE = "base"  # ArrayRecord, down only: frozen arrays a site cannot rebuild (merged rounds of train.recipe = "dual")
# ConfigRecord, only from a site that shares them (node config share-site-figures): its own exact validation
# figures, under these keys (not in METRICS: Flower's strategies need the same metric keys in every reply)
SITE_FIGURES = "site-figures"
OWN_FIGURES = {"auroc": "own-auroc", "balanced_accuracy": "own-balanced-accuracy", "f1": "own-f1"}
SECURE_SUM = "secure-sum"  # ConfigRecord: secure aggregation's part of a message (fedfreeze/flower/secagg.py)

DUAL = "dual"  # the stage of a round that trains the dual model (train.recipe = "dual")
SINGLE = "single"  # the stage of a round that trains a single-input model (the merged one, or any standard one)

TRAIN_ROLE = "train"  # a site that trains and returns arrays
EVALUATE_ROLE = "evaluate"  # a site named in federation.evaluation-sites: scores the global model, returns no arrays


@dataclass(frozen=True)
class RoundOrders:
    """What the coordinator asks of every site for one round (sent with every message)."""

    round: int
    stage: Literal["single", "dual"]
    parts: frozenset[str]
    local_epochs: int
    model: ModelConfig
    train: TrainConfig
    adapter_groups: tuple[str, ...]
    bn_policy: Literal["average", "local"]
    bn_stats: Literal["frozen", "update"]  # resolved: whether trainable BatchNorm statistics train and travel
    partial_replies: bool  # dynamic freezing: a site returns only the arrays it updated
    proximal_mu: float  # FedProx's weight, sent here only (flower/fedprox.py: Flower's FedProx writes it no more)
    lr_scale: float  # a factor on the round's learning rates (the dual stage's decay)
    val_fraction: float
    threshold: float
    score_bins: int
    min_cell_count: int  # every released cell of validation statistics holds 0 or at least this many cases
    cell_edges: tuple[int, ...]  # common edges (bin indices, in the order tried) a site cuts its cells at first
    secure_aggregation: bool  # exact statistics go masked into a secure sum (a group of one: cells instead)
    seed: int
    dp_weight: bool  # DP accounting: every site weighs the same
    evaluation_sites: tuple[str, ...]  # sites that only score the global model

    @property
    def is_probe(self) -> bool:
        """Only the head trains (on cached backbone features)."""
        return is_probe(self.parts)

    def role_of(self, site: str) -> str:
        return EVALUATE_ROLE if site in self.evaluation_sites else TRAIN_ROLE

    def to_config(self) -> dict[str, Any]:
        """The orders as the scalars and strings a Flower ``ConfigRecord`` holds."""
        return {
            "round": self.round,
            "stage": self.stage,
            "parts": json.dumps(sorted(self.parts)),
            "local-epochs": self.local_epochs,
            "site-config": site_payload(self.model, self.train),
            "adapter-groups": json.dumps(list(self.adapter_groups)),
            "bn-policy": self.bn_policy,
            "bn-stats": self.bn_stats,
            "partial-replies": self.partial_replies,
            "proximal-mu": self.proximal_mu,
            "lr-scale": self.lr_scale,
            "val-fraction": self.val_fraction,
            "threshold": self.threshold,
            "score-bins": self.score_bins,
            "min-cell-count": self.min_cell_count,
            "cell-edges": json.dumps(list(self.cell_edges)),
            "secure-aggregation": self.secure_aggregation,
            "seed": self.seed,
            "dp-weight": self.dp_weight,
            "evaluation-sites": json.dumps(list(self.evaluation_sites)),
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RoundOrders:
        """Decode what ``to_config`` wrote; a missing or malformed key is a ``ProtocolError`` naming it
        (a coordinator and a site of different fedfreeze versions fail here, before any training)."""

        def get(key: str) -> Any:
            if key not in config:
                raise ProtocolError(
                    f"the round's orders lack {key!r}: is the coordinator running another "
                    "fedfreeze version than this site?"
                )
            return config[key]

        def strings(key: str) -> tuple[str, ...]:
            try:
                value = json.loads(str(get(key)))
            except json.JSONDecodeError as err:
                raise ProtocolError(f"the round's orders: {key!r} is not a JSON list ({err})") from None
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ProtocolError(f"the round's orders: {key!r} should be a list of names, got {value!r}")
            return tuple(value)

        def choice(key: str, allowed: tuple[str, ...]) -> Any:
            value = str(get(key))
            if value not in allowed:
                raise ProtocolError(f"the round's orders: {key} {value!r} is not one of {', '.join(allowed)}")
            return value

        def count(key: str) -> int:
            value = get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ProtocolError(f"the round's orders: {key} should be an integer >= 1, got {value!r}")
            return value

        def edges(key: str) -> tuple[int, ...]:
            try:
                value = json.loads(str(get(key)))
            except json.JSONDecodeError as err:
                raise ProtocolError(f"the round's orders: {key!r} is not a JSON list ({err})") from None
            if not isinstance(value, list) or not all(type(v) is int and v > 0 for v in value):
                raise ProtocolError(f"the round's orders: {key!r} should be a list of bin edges >= 1, got {value!r}")
            return tuple(value)

        model, train = site_sections(str(get("site-config")))
        bins, cell_edges = int(get("score-bins")), edges("cell-edges")
        if any(e >= bins for e in cell_edges):
            raise ProtocolError(
                f"the round's orders: 'cell-edges' should lie inside the {bins} score bins, got {cell_edges}"
            )
        return cls(
            round=int(get("round")),
            stage=choice("stage", (SINGLE, DUAL)),
            parts=frozenset(strings("parts")),
            local_epochs=int(get("local-epochs")),
            model=model,
            train=train,
            adapter_groups=strings("adapter-groups"),
            bn_policy=choice("bn-policy", ("average", "local")),
            bn_stats=choice("bn-stats", ("frozen", "update")),
            partial_replies=bool(get("partial-replies")),
            proximal_mu=float(get("proximal-mu")),
            lr_scale=float(get("lr-scale")),
            val_fraction=float(get("val-fraction")),
            threshold=float(get("threshold")),
            score_bins=bins,
            min_cell_count=count("min-cell-count"),
            cell_edges=cell_edges,
            secure_aggregation=bool(get("secure-aggregation")),
            seed=int(get("seed")),
            dp_weight=bool(get("dp-weight")),
            evaluation_sites=strings("evaluation-sites"),
        )

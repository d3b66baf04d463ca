"""Flower's FedAvgM (server learning rate and momentum) for rounds whose arrays change.

Flower's ``FedAvgM`` remembers the arrays of its first round and pairs them with later aggregates
by position, so it breaks as soon as a round sends other keys: fedfreeze's rounds do (the head
alone, then more groups; the dual model, then the merged one). This subclass keeps Flower's update
rule, ``new = old - lr * m`` with ``m = momentum * m + (old - average)``, but takes ``old`` from
the arrays each round actually sent and keeps ``m`` per array name: an array that joins starts
with no momentum, one that leaves drops its momentum.

BatchNorm buffers (running statistics, batch counters) and integer arrays are averaged as FedAvg
does: they are statistics, not weights a step can overshoot (a running variance must stay
positive). Momentum lives in memory only: a resumed federation starts it again from zero.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedAvgM

from fedfreeze.federation.exchange import BN_STAT_SUFFIXES


def takes_a_step(name: str, value: np.ndarray) -> bool:
    """Weights move by the server's step; running statistics and integer counters are plainly averaged."""
    return np.issubdtype(value.dtype, np.floating) and not name.endswith(BN_STAT_SUFFIXES)


class KeyedFedAvgM(FedAvgM):
    """``FedAvgM`` with the previous global arrays and the momentum held per array name."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.sent: dict[str, np.ndarray] = {}
        self.momentum: dict[str, np.ndarray] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.sent = {name: array.numpy() for name, array in arrays.items()}
        self.momentum = {
            name: m for name, m in self.momentum.items() if name in self.sent and m.shape == self.sent[name].shape
        }
        return FedAvg.configure_train(self, server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        averaged, metrics = FedAvg.aggregate_train(self, server_round, replies)
        if averaged is None or not self.server_opt:
            return averaged, metrics
        stepped: dict[str, Array] = {}
        for name, array in averaged.items():
            new = array.numpy()
            old = self.sent.get(name)
            if old is None or old.shape != new.shape or not takes_a_step(name, new):
                stepped[name] = Array(np.asarray(new))
                continue
            step = old - new
            if self.server_momentum > 0.0:
                previous = self.momentum.get(name)
                step = step if previous is None else self.server_momentum * previous + step
                self.momentum[name] = step
            stepped[name] = Array(np.asarray(old - self.server_learning_rate * step, dtype=new.dtype))
        return ArrayRecord(stepped), metrics

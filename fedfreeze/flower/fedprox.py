"""Flower's FedProx, with the proximal weight sent once: as the coordinator's order.

Flower's ``FedProx`` aggregates as FedAvg does and adds one thing, ``config["proximal-mu"] =
self.proximal_mu`` in ``configure_train``. fedfreeze's ``RoundOrders`` already carries
``proximal-mu`` (the coordinator decides every round's orders, and a site obeys them as sent), so
two writers of one key would let the strategy silently replace an order. This subclass keeps
FedProx's name, settings and summary, and leaves the message's config as the orders wrote it.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx


class OrderedFedProx(FedProx):
    """``FedProx`` whose ``proximal-mu`` reaches sites only through ``RoundOrders``."""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return FedAvg.configure_train(self, server_round, arrays, config, grid)

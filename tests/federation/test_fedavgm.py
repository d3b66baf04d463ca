"""``federation.strategy = "fedavgm"``: Flower's server momentum on rounds whose arrays change.

Real Flower messages through Flower's own sampling and averaging; two sites reply with chosen
arrays, so every aggregate can be worked out by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvgM

from fedfreeze.flower.fedavgm import KeyedFedAvgM
from fedfreeze.flower.local_grid import LocalGrid


def one_round(
    strategy: FedAvgM, rnd: int, sent: dict[str, np.ndarray], replies: list[dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    def record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
        return ArrayRecord({k: Array(v) for k, v in arrays.items()})

    grid = LocalGrid(ClientApp(), {1: {}, 2: {}})
    messages = list(strategy.configure_train(rnd, record(sent), ConfigRecord({}), grid))
    answers = [
        Message(RecordDict({"arrays": record(r), "metrics": MetricRecord({"num-examples": 10})}), reply_to=m)
        for m, r in zip(messages, replies, strict=True)
    ]
    arrays, _ = strategy.aggregate_train(rnd, answers)
    assert arrays is not None
    return {k: v.numpy() for k, v in arrays.items()}


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def test_momentum_is_kept_per_array_and_statistics_are_averaged() -> None:
    strategy = KeyedFedAvgM(server_learning_rate=1.0, server_momentum=0.5, min_train_nodes=2, min_available_nodes=2)
    sent = {"w": f32(1.0, 1.0), "bn.running_var": f32(1.0)}
    out = one_round(strategy, 1, sent, [{"w": f32(0.0, 1.0), "bn.running_var": f32(0.2)}] * 2)
    # first round: no momentum yet, step = old - average
    np.testing.assert_allclose(out["w"], [0.0, 1.0])
    np.testing.assert_allclose(out["bn.running_var"], [0.2])

    # the next round sends a new array ("head") beside "w": it starts without momentum
    sent = {"w": out["w"], "head": f32(2.0), "bn.running_var": f32(0.2)}
    out = one_round(strategy, 2, sent, [{"w": f32(-1.0, 1.0), "head": f32(1.0), "bn.running_var": f32(0.1)}] * 2)
    # a running variance is averaged, never stepped (with momentum it would be 0.2 - 0.5 = -0.3)
    np.testing.assert_allclose(out["bn.running_var"], [0.1])
    # w: m = 0.5 * [1, 0] + ([0, 1] - [-1, 1]) = [1.5, 0]; new = old - m = [-1.5, 1]
    np.testing.assert_allclose(out["w"], [-1.5, 1.0])
    np.testing.assert_allclose(out["head"], [1.0])


def test_an_array_that_leaves_loses_its_momentum() -> None:
    strategy = KeyedFedAvgM(server_learning_rate=1.0, server_momentum=0.9, min_train_nodes=2, min_available_nodes=2)
    one_round(strategy, 1, {"w": f32(1.0)}, [{"w": f32(0.0)}] * 2)
    one_round(strategy, 2, {"h": f32(1.0)}, [{"h": f32(1.0)}] * 2)  # the dual model merged: other arrays
    out = one_round(strategy, 3, {"w": f32(0.0)}, [{"w": f32(-1.0)}] * 2)
    np.testing.assert_allclose(out["w"], [-1.0])  # a plain step: the momentum of round 1 was dropped


def test_without_server_optimisation_it_is_fedavg() -> None:
    strategy = KeyedFedAvgM(server_learning_rate=1.0, server_momentum=0.0, min_train_nodes=2, min_available_nodes=2)
    out = one_round(strategy, 1, {"w": f32(5.0)}, [{"w": f32(1.0)}, {"w": f32(3.0)}])
    np.testing.assert_allclose(out["w"], [2.0])


def test_flowers_own_fedavgm_breaks_when_the_arrays_change() -> None:
    """Why the subclass exists: Flower's FedAvgM pairs later aggregates with its first round's arrays."""
    strategy = FedAvgM(server_learning_rate=1.0, server_momentum=0.9, min_train_nodes=2, min_available_nodes=2)
    one_round(strategy, 1, {"w": f32(1.0)}, [{"w": f32(0.0)}] * 2)
    with pytest.raises(ValueError):
        one_round(strategy, 2, {"w": f32(0.0), "h": f32(1.0)}, [{"w": f32(0.0), "h": f32(1.0)}] * 2)

"""A site obeys the round's orders as sent, never re-deriving them from its own copy of the config.

Each test sends an order that differs from what the site would have decided itself (or from what a
second writer of the same key would write) and checks what the site did: the BatchNorm statistics
it trained or kept, the learning rate it stepped with, the proximal weight it received.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedProx

from fedfreeze.config import ModelConfig, TrainConfig
from fedfreeze.data.imageset import ImageSet
from fedfreeze.federation.config import load_fed_config
from fedfreeze.federation.protocol import CONFIG, RoundOrders
from fedfreeze.federation.site_stages import DualStage, StandardStage
from fedfreeze.flower.local_grid import LocalGrid
from fedfreeze.flower.strategies import make_strategy
from fedfreeze.models.dual import build_dual
from fedfreeze.models.grouped import GroupedNet
from tests.federation.conftest import plain_orders
from tests.lightweight.conftest import lwcnn_config

CPU = torch.device("cpu")


def running_stats(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))}


def image_set(n: int, channels: int, size: int) -> ImageSet:
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, channels, size, size), dtype=np.uint8))
    labels = torch.arange(n) % 2
    return ImageSet(images, labels, [str(i) for i in range(n)], None, [str(i) for i in range(n)], ["a", "b"])


def train(stage: StandardStage, model: GroupedNet, data: ImageSet, orders: RoundOrders, **kw: Any) -> None:
    torch.manual_seed(0)
    stage.train(model, data, orders, orders.train, rng=np.random.default_rng(0), device=CPU, regularizer=None, **kw)


@pytest.mark.parametrize(
    "own, ordered",
    [("auto", "frozen"), ("frozen", "update")],  # random weights: "auto" would have resolved to "update"
)
def test_standard_stage_takes_bn_stats_from_the_orders(lite0_random, fast_train, own, ordered):
    cfg = fast_train.model_copy(update={"bn_stats": own})
    orders = plain_orders(parts=frozenset({"head", "layer4"}), train=cfg, bn_stats=ordered)
    before = running_stats(lite0_random.groups["layer4"])
    train(StandardStage(), lite0_random, image_set(16, 3, 64), orders, features=None)
    after = running_stats(lite0_random.groups["layer4"])
    moved = any(not torch.equal(before[k], after[k]) for k in after)
    assert moved == (ordered == "update")


def test_dual_stage_takes_bn_stats_from_the_orders():
    torch.manual_seed(0)
    dual = build_dual(lwcnn_config())
    parts = frozenset(dual.parts)
    cfg = TrainConfig(recipe="dual", batch_size=8, balanced_sampling=False)
    data = image_set(16, 1, 28)
    frozen_before = running_stats(dual)
    train(DualStage(), dual, data, plain_orders(stage="dual", parts=parts, train=cfg, bn_stats="frozen"), features=None)
    assert running_stats(dual).keys() == frozen_before.keys() and frozen_before
    assert all(torch.equal(frozen_before[k], v) for k, v in running_stats(dual).items())
    # the same round under "update" does move them: the check above can fail
    train(DualStage(), dual, data, plain_orders(stage="dual", parts=parts, train=cfg, bn_stats="update"), features=None)
    assert any(not torch.equal(frozen_before[k], v) for k, v in running_stats(dual).items())


def test_standard_stage_scales_its_learning_rates_by_the_orders(lite0_random, fast_train):
    """Two AdamW steps (16 cases, batch 8) from the same start on the same batches: Adam's update,
    weight decay included, is proportional to the learning rate, so half the scale moves the head half as far."""
    features = torch.randn(16, lite0_random.feature_dim)
    data = image_set(16, 3, 64)
    start = copy.deepcopy(lite0_random.state_dict())
    moves = {}
    for scale in (1.0, 0.5):
        model = copy.deepcopy(lite0_random)
        train(StandardStage(), model, data, plain_orders(train=fast_train, lr_scale=scale), features=features)
        moves[scale] = model.state_dict()["head.fc.weight"] - start["head.fc.weight"]
    assert moves[1.0].abs().max() > 1e-4
    torch.testing.assert_close(moves[0.5], 0.5 * moves[1.0], rtol=0.02, atol=1e-6)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan")])
def test_an_unusable_lr_scale_is_refused(lite0_random, fast_train, scale):
    with pytest.raises(ValueError, match="lr-scale should be a positive number"):
        train(
            StandardStage(),
            lite0_random,
            image_set(8, 3, 64),
            plain_orders(train=fast_train, lr_scale=scale),
            features=None,
        )


def test_proximal_mu_reaches_sites_as_the_orders_wrote_it():
    """FedProx's weight is written once, by the orders; Flower's FedProx no longer overwrites it."""
    cfg = load_fed_config(None, {"federation.strategy": "fedprox", "federation.proximal-mu": 0.01})
    strategy = make_strategy(cfg)
    assert isinstance(strategy, FedProx)
    grid = LocalGrid(ClientApp(), {1: {}, 2: {}})
    orders = plain_orders(proximal_mu=0.5, model=ModelConfig(input_size=64))
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(orders.to_config()), grid))
    assert messages
    for message in messages:
        assert RoundOrders.from_config(dict(message.content[CONFIG])).proximal_mu == 0.5

"""The round contract: orders decoded exactly as encoded, mismatches named before any training,
threshold rules, WiSE-FT and the settings that do not go together."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from fedfreeze.errors import ConfigError, ProtocolError
from fedfreeze.evaluation.cells import ReleasedCells
from fedfreeze.evaluation.pooled import (
    choose_threshold,
    score_bin_edges,
    threshold_interval,
    youden_mid_threshold_from_histograms,
    youden_threshold_from_histograms,
)
from fedfreeze.federation.config import load_fed_config
from fedfreeze.federation.coordinator import Coordinator
from fedfreeze.federation.protocol import RoundOrders
from fedfreeze.federation.site_runtime import SiteRuntime, validation_release


@pytest.fixture()
def coordinator(tmp_path) -> Coordinator:
    cfg = load_fed_config(
        None,
        {
            "model.input-size": 64,
            "federation.rounds": 3,
            "federation.probe-rounds": 1,
            "federation.unfreeze": {"layer4": 0.0},
            "federation.evaluation-sites": ["x"],
        },
    )
    return Coordinator(cfg, tmp_path)


def test_orders_round_trip_exactly(coordinator):
    for rnd in (1, 2, 3):
        orders = coordinator.orders(rnd)
        assert RoundOrders.from_config(orders.to_config()) == orders
    assert coordinator.orders(1).is_probe and not coordinator.orders(2).is_probe
    assert coordinator.orders(2).parts == {"head", "layer4"}
    assert coordinator.orders(1).role_of("x") == "evaluate" and coordinator.orders(1).role_of("y") == "train"


def test_orders_missing_a_key_name_it(coordinator):
    config = coordinator.orders(1).to_config()
    del config["bn-stats"]
    with pytest.raises(ProtocolError, match="lack 'bn-stats'"):
        RoundOrders.from_config(config)
    config = coordinator.orders(1).to_config() | {"stage": "triple"}
    with pytest.raises(ProtocolError, match="stage 'triple'"):
        RoundOrders.from_config(config)


def test_site_refuses_arrays_that_do_not_match_its_orders_before_training(coordinator, tmp_path):
    orders = coordinator.orders(2)
    arrays = coordinator.arrays_for(coordinator.plan(orders))
    runtime = SiteRuntime(tmp_path, "y", tmp_path / "state")
    model, plan = runtime.model(orders, arrays)  # as sent: accepted
    assert set(plan.sent) == set(arrays)
    key = next(iter(arrays))
    bad = dict(arrays) | {key: torch.zeros(3)}
    with pytest.raises(ProtocolError, match=f"{key}: shape"):
        runtime.model(orders, bad)
    missing = {k: v for k, v in arrays.items() if k != key}
    with pytest.raises(ProtocolError, match="missing keys"):
        runtime.model(orders, missing)
    nan = dict(arrays) | {key: torch.full_like(arrays[key], float("nan"))}
    with pytest.raises(ProtocolError, match="NaN"):
        runtime.model(orders, nan)


def test_youden_mid_takes_the_middle_of_a_flat_plateau():
    edges = score_bin_edges(100)
    neg, pos = np.zeros(100, dtype=int), np.zeros(100, dtype=int)
    neg[20], pos[70] = 30, 40  # perfectly separated: J = 1 for every edge from 21 to 70
    assert youden_threshold_from_histograms(neg, pos, edges) == pytest.approx(0.5)  # ties: nearest 0.5
    mid = youden_mid_threshold_from_histograms(neg, pos, edges, tolerance=0.0)
    assert mid == pytest.approx(edges[(21 + 70) // 2 + 0]) or mid == pytest.approx(edges[(21 + 70 + 1) // 2])
    # one stray case moves plain Youden to the plateau's edge, the middle stays
    neg[60], pos[25] = 1, 1
    assert youden_threshold_from_histograms(neg, pos, edges) in (pytest.approx(edges[26]), pytest.approx(edges[61]))
    mid2 = youden_mid_threshold_from_histograms(neg, pos, edges, tolerance=0.05)
    assert abs(np.log(mid2 / (1 - mid2)) - np.log(mid / (1 - mid))) < 0.6
    assert choose_threshold("youden-mid", neg, pos, edges, tolerance=0.05) == mid2
    assert choose_threshold(0.31, neg, pos, edges) == pytest.approx(edges[np.argmin(abs(edges[1:-1] - 0.31)) + 1])
    with pytest.raises(ValueError, match="threshold rule"):
        choose_threshold("median", neg, pos, edges)


def test_the_cell_rule_travels_in_the_orders_and_the_site_applies_it_as_sent(coordinator):
    """min-cell-count is decided once, by the coordinator, and sent with every round; the site's
    release obeys the number it received (not a copy of the configuration)."""
    orders = coordinator.orders(1)
    assert orders.min_cell_count == coordinator.fed.min_cell_count == 5
    assert orders.to_config()["min-cell-count"] == 5
    for bad in (0, 2.5, True, "5"):
        with pytest.raises(ProtocolError, match="min-cell-count should be an integer >= 1"):
            RoundOrders.from_config(orders.to_config() | {"min-cell-count": bad})
    rng = np.random.default_rng(3)
    labels = np.array([0] * 12 + [1] * 18)
    scores = 1 / (1 + np.exp(-rng.normal(np.where(labels == 1, 2.0, -2.0), 1.5)))
    for k in (1, 3, 7):
        sent = replace(orders, min_cell_count=k)
        release = validation_release(labels, scores, sent)
        assert set(release) == {"val-n", "val-cell-class", "val-cell-start", "val-cell-count"}
        cells = ReleasedCells.from_metrics(release, "val-", classes=2, units=sent.score_bins, min_count=k)
        assert cells.totals().tolist() == [12, 18] and release["val-n"] == 30
        if k == 1:  # every bin a cell: the exact histogram
            assert len(cells.count) == 2 * sent.score_bins
    # a multi-class site: per true class, cells of the predicted classes
    probs = rng.dirichlet(np.ones(4), size=40)
    truth = probs.argmax(1)
    truth[:6] = (truth[:6] + 1) % 4  # a few wrong predictions
    release = validation_release(truth, probs, replace(orders, min_cell_count=3))
    cells = ReleasedCells.from_metrics(release, "val-", classes=4, units=4, min_count=3)
    assert cells.n == 40


def test_threshold_interval_is_wider_on_fewer_cases():
    edges = score_bin_edges(100)
    rng = np.random.default_rng(0)

    def hists(n: int) -> tuple[np.ndarray, np.ndarray]:
        neg = np.histogram(rng.beta(2, 8, n), bins=edges)[0]
        pos = np.histogram(rng.beta(4, 4, n), bins=edges)[0]
        return neg, pos

    small = threshold_interval("youden", *hists(20), edges, replicates=200)
    large = threshold_interval("youden", *hists(2000), edges, replicates=200)
    assert small[0] <= small[1] and large[0] <= large[1]
    assert small[1] - small[0] > large[1] - large[0]


def test_wise_ft_interpolates_every_floating_array(coordinator):
    coordinator.fed.__dict__["wise_alpha"] = 0.25  # frozen-looking config objects: set the field for the test
    coordinator.end_probe(coordinator.fed.probe_rounds)
    start = {k: v.clone() for k, v in coordinator.state.items()}
    tuned = {k: (v + 1.0 if v.is_floating_point() else v + 1) for k, v in start.items()}
    coordinator.state = dict(tuned)
    coordinator.apply_wise()
    for key, value in coordinator.state.items():
        if value.is_floating_point():
            assert torch.allclose(value, start[key] + 0.25 * (tuned[key] - start[key])), key
        else:
            assert torch.equal(value, tuned[key]), key


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"federation.evaluation-sites": ["a"], "federation.dp": "client"}, "evaluation-sites"),
        ({"federation.patience": 2}, "patience"),
        ({"federation.wise-alpha": 0.5, "federation.probe-rounds": 0}, "wise-alpha"),
        ({"federation.evaluation-sites": ["a", "a"]}, "twice"),
        ({"federation.threshold": "median"}, "threshold"),
        # one schedule: a federation's runs in rounds from [federation]; [train]'s epoch schedule is refused
        ({"train.unfreeze": {"layer4": 0.5}}, "train.unfreeze: not used in a federation.*federation.unfreeze"),
        ({"train.method": "adapters"}, "train.method: .*set federation.method"),
        ({"train.probe-epochs": 3}, "set federation.probe-rounds"),
        (
            {
                "train.recipe": "dual",
                "federation.dual-rounds": 1,
                "federation.method": "adapters",
                "model.backbone": "lwcnn",
                "model.weights": "none",
            },
            "federation.method: train.recipe = 'dual' needs",
        ),
    ],
)
def test_settings_that_do_not_go_together_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_fed_config(None, overrides)

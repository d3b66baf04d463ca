"""``Coordinator.pool``: evaluation-only sites are pooled apart, by the same rule as the training sites,
for binary and multi-class tasks alike."""

from __future__ import annotations

import numpy as np
import pytest

from fedfreeze.federation.config import load_fed_config
from fedfreeze.federation.coordinator import Coordinator
from fedfreeze.federation.protocol import EVALUATE_ROLE, TRAIN_ROLE
from fedfreeze.federation.records import Reply, RoundRecord
from fedfreeze.federation.site_runtime import validation_release


def coordinator(tmp_path, classes: int) -> Coordinator:
    overrides = {
        "model.input-size": 32,
        "model.weights": "none",
        "model.num-classes": classes,
        "federation.rounds": 2,
        "federation.probe-rounds": 1,
        "federation.evaluation-sites": ["x"],
    }
    return Coordinator(load_fed_config(None, overrides), tmp_path)


def site_reply(node: int, role: str, classes: int, coord: Coordinator, seed: int) -> Reply:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, 60)
    if classes == 2:
        scores = np.clip(0.5 + 0.3 * (labels - 0.5) + rng.normal(0, 0.2, 60), 0, 1)
    else:
        scores = rng.dirichlet(np.ones(classes), 60) + np.eye(classes)[labels] * 0.3
    metrics = validation_release(labels, scores, coord.orders(1))
    return Reply(node=node, site=f"s{node}", arrays={}, metrics=metrics, frozen_hash="", role=role)


@pytest.mark.parametrize("classes", [2, 3])
def test_evaluation_sites_are_pooled_apart_like_a_training_group(tmp_path, classes: int) -> None:
    coord = coordinator(tmp_path / "a", classes)
    train = [site_reply(n, TRAIN_ROLE, classes, coord, n) for n in (1, 2)]
    evaluator = site_reply(3, EVALUATE_ROLE, classes, coord, 3)
    record = RoundRecord(round=1, parts=["head"])
    coord.pool([*train, evaluator], record, coord.orders(1))
    assert record.evaluation_sites is not None and record.evaluation_sites["sites"] == ["s3"]
    expected = ["sites", "at_threshold_used", *(["at_threshold_next"] if classes == 2 else []), "cells"]
    assert list(record.evaluation_sites) == expected
    assert 3 in coord.site_figures  # the evaluator's own row

    alone = coordinator(tmp_path / "b", classes)  # the same site pooled as the only training site
    as_training = RoundRecord(round=1, parts=["head"])
    alone.pool([site_reply(3, TRAIN_ROLE, classes, alone, 3)], as_training, alone.orders(1))
    assert as_training.pooled is not None
    assert record.evaluation_sites["at_threshold_used"] == as_training.pooled["at_threshold_used"]
    assert record.evaluation_sites["cells"] == as_training.pooled["cells"]

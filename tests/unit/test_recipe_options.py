"""The candidates of the recipe benchmark, each checked against what it claims: label smoothing moves
the targets, histogram equalisation lives in the model (so every scorer applies it), SWA averages the
last rounds' global models, and temperature scaling on the pooled histograms keeps decisions at 0.5."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedfreeze.config import ModelConfig
from fedfreeze.errors import ConfigError
from fedfreeze.evaluation.pooled import class_histograms, score_bin_edges
from fedfreeze.federation.config import load_fed_config
from fedfreeze.federation.coordinator import Coordinator
from fedfreeze.federation.export import pooled_temperature
from fedfreeze.model_io import load_model, make_card, save_model
from fedfreeze.models.registry import build_model, equalize_histograms
from fedfreeze.training.engine import extract_features, predict_scores, targets_for
from fedfreeze.training.features import backbone_hash


def test_label_smoothing_moves_targets_toward_uniform() -> None:
    labels = torch.tensor([0, 1, 1])
    assert targets_for(labels, 2, 0.1).tolist() == pytest.approx([0.05, 0.95, 0.95])
    three = targets_for(torch.tensor([2]), 3, 0.3)
    assert three.tolist() == [pytest.approx([0.1, 0.1, 0.8])]
    assert targets_for(labels, 2).tolist() == [0.0, 1.0, 1.0]


def test_equalisation_flattens_each_images_histogram_and_is_monotone() -> None:
    rng = np.random.default_rng(0)
    dark = torch.tensor(rng.beta(2, 8, size=(1, 1, 64, 64)), dtype=torch.float32).expand(-1, 3, -1, -1)
    out = equalize_histograms(dark)
    grey, eq = dark[0, 0].flatten(), out[0, 0].flatten()
    order = grey.argsort()
    assert torch.all(eq[order].diff() >= -1e-6)  # the order of intensities is kept
    assert eq.min() == 0.0 and eq.max() == 1.0 and abs(float(eq.mean()) - 0.5) < 0.02  # spread over [0, 1]
    assert torch.equal(out[:, 0], out[:, 2])


def test_equalisation_is_part_of_the_saved_model(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(weights="package", input_size=32, intensity="equalize")
    model, _ = build_model(cfg)
    folder = save_model(tmp_path / "m", model, make_card(model, cfg))
    loaded, card = load_model(folder)
    assert card.model.intensity == "equalize" and loaded.normalize.equalize
    images = torch.randint(0, 120, (4, 3, 32, 32), dtype=torch.uint8)  # dark images
    plain, _ = build_model(cfg.model_copy(update={"intensity": "as-is"}))
    plain.load_state_dict(model.state_dict())
    cpu = torch.device("cpu")
    assert np.allclose(predict_scores(loaded, images, cpu), predict_scores(model, images, cpu), atol=1e-6)
    # (an untrained head scores everything alike: compare the features the head sees)
    assert torch.allclose(extract_features(loaded, images, cpu), extract_features(model, images, cpu), atol=1e-6)
    assert not torch.allclose(extract_features(plain, images, cpu), extract_features(model, images, cpu), atol=1e-4)
    assert backbone_hash(plain) != backbone_hash(model)  # cached probe features never mix the two


def coordinator(tmp_path, **federation) -> Coordinator:
    overrides = {
        "model.input-size": 32,
        "model.weights": "none",
        "federation.rounds": 4,
        "federation.probe-rounds": 1,
        "federation.unfreeze": {"layer4": 0.0},
    }
    overrides.update({f"federation.{k}": v for k, v in federation.items()})
    return Coordinator(load_fed_config(None, overrides), tmp_path)


def test_swa_averages_the_last_rounds_global_models(tmp_path) -> None:
    coord = coordinator(tmp_path, **{"swa-rounds": 2})
    key = next(k for k, v in coord.state.items() if v.is_floating_point() and k.startswith("head"))
    seen = {}
    for rnd in range(1, 5):
        coord.state = {k: v.clone() for k, v in coord.state.items()}
        coord.state[key] = torch.full_like(coord.state[key], float(rnd))
        seen[rnd] = coord.state[key].clone()
        coord.accumulate_swa(rnd)
    coord.apply_swa()
    assert torch.allclose(coord.state[key], (seen[3] + seen[4]) / 2)  # rounds 3 and 4 only
    with pytest.raises(ConfigError, match="swa-rounds .* needs export = 'last'"):
        load_fed_config(None, {"federation.swa-rounds": 2, "federation.export": "best"})


def test_temperature_on_pooled_histograms_keeps_one_half_and_calibrates(tmp_path) -> None:
    coord = coordinator(tmp_path, calibrate="temperature")
    rng = np.random.default_rng(1)
    y = rng.random(4000) < 0.5
    z = np.where(y, 1.0, -1.0) + rng.normal(0.0, 1.0, 4000)  # true posterior logit 2z; the model says 6z
    scores = 1.0 / (1.0 + np.exp(-6.0 * z))
    hist = class_histograms(y.astype(int), scores, score_bin_edges(coord.fed.score_bins))
    pooled = {"histograms": {"neg": hist[0].tolist(), "pos": hist[1].tolist()}}
    calibration = pooled_temperature(coord, {"pooled": pooled, "round": 4})
    assert calibration is not None and calibration.a == pytest.approx(1 / 3, rel=0.15)  # over-confident by 3
    assert calibration.apply(np.array([0.5]))[0] == pytest.approx(0.5)

"""Shared fixtures: tiny real models and the shipped real image subset."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from fedfreeze.config import ModelConfig, TrainConfig
from fedfreeze.models.registry import build_model

torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def engine_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Graphs the inference engine exports go to a folder of the test session, never the user's cache
    (processes the tests start inherit it)."""
    from fedfreeze.inference.engine import CACHE_ENV

    saved = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("fedfreeze-cache"))
    yield
    if saved is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = saved


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def lite0_random():
    """EfficientNet-Lite0 with random weights (fast to build; structure is what the test needs)."""
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(weights="none", input_size=64))
    return model


@pytest.fixture
def fast_train() -> TrainConfig:
    return TrainConfig(probe_epochs=1, epochs=2, batch_size=8, cutmix_prob=0.0, augment=False)

"""Fixtures for the lightweight-CNN tests: 700 real MNIST digits (tests/fixtures/mnist_subset) and tiny configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedfreeze.config import ModelConfig
from fedfreeze.data.dataset import ImageSet, load_image_set

MNIST_FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "mnist_subset" / "mnist_subset.npz"

# the [model] table of the TOML configs (lwcnn_config below in Python)
LWCNN_MODEL_TOML = """
[model]
backbone = "lwcnn"
weights = "none"
in-channels = 1
input-size = 28
num-classes = 10
dropout = 0.0
"""


def lwcnn_config(**updates: object) -> ModelConfig:
    """The lightweight backbone on 28 x 28 grey digits, 10 classes, no dropout (outputs compare exactly)."""
    values: dict[str, object] = {
        "backbone": "lwcnn",
        "weights": "none",
        "in_channels": 1,
        "input_size": 28,
        "num_classes": 10,
        "dropout": 0.0,
    }
    values.update(updates)
    return ModelConfig(**values)


@pytest.fixture(scope="session")
def mnist_train() -> ImageSet:
    return load_image_set(MNIST_FIXTURE, split="train", image_size=28, channels=1, num_classes=10, progress=False)


@pytest.fixture(scope="session")
def mnist_test() -> ImageSet:
    return load_image_set(MNIST_FIXTURE, split="test", image_size=28, channels=1, num_classes=10, progress=False)


@pytest.fixture
def digits(mnist_test: ImageSet) -> torch.Tensor:
    """32 real test digits as floats in [0, 1], ``[32, 1, 28, 28]``."""
    return mnist_test.images[::6][:32].float() / 255.0


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread while these tests train: on 2 cores shared with other work, a second OpenMP
    thread that waits for a descheduled partner made the dual epochs up to 30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

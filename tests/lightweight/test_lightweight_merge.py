"""The dual-input-output model and its merge.

What the recipe says, made precise (``fedfreeze/models/dual.py``): the dual model is two
independent sub-models, A fed the original image and B an augmented one, each with its own output;
the merged model feeds both the same image and joins their outputs, so that for every image x

    merged(x) == (A(x) + B(x)) / 2 == dual.joined(pair(x, x))

and with an augmented second input only B's output changes.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedfreeze.config import TrainConfig
from fedfreeze.errors import ConfigError
from fedfreeze.models.dual import DualNet, branch_of, build_dual, merge_dual, merge_state
from fedfreeze.models.registry import build_model
from fedfreeze.training.dual import train_dual
from fedfreeze.training.dual_augment import augment_dual
from tests.lightweight.conftest import lwcnn_config

ATOL = 1e-5


@pytest.fixture(scope="module")
def trained_dual(mnist_train) -> DualNet:
    """A dual model after two epochs of the dual stage on 500 real digits: trained weights, and BatchNorm
    statistics of its own (sub-model B's from augmented digits)."""
    torch.manual_seed(0)
    dual = build_dual(lwcnn_config())
    cfg = TrainConfig(recipe="dual", batch_size=50, balanced_sampling=False, dual={"epochs": 2, "lr": 5e-3})
    train_dual(
        dual,
        mnist_train.images,
        mnist_train.labels,
        cfg,
        epochs=2,
        rng=np.random.default_rng(0),
        device=torch.device("cpu"),
    )
    return dual.eval()


def test_merged_model_reproduces_the_joined_output_of_equal_inputs(trained_dual, digits):
    merged = merge_dual(trained_dual).eval()
    with torch.no_grad():
        dual_out = trained_dual(DualNet.pair(digits, digits))
        expected = dual_out.mean(dim=1)
        got = merged(digits)
    assert dual_out.shape == (32, 2, 10) and got.shape == (32, 10)
    assert torch.allclose(got, expected, atol=ATOL), (got - expected).abs().max()
    assert torch.equal(got.argmax(1), expected.argmax(1))
    # the two sub-models are not the same function (else the test above would prove little)
    assert (dual_out[:, 0] - dual_out[:, 1]).abs().max() > 0.1


def test_merge_holds_in_training_mode_too(trained_dual, digits):
    """BatchNorm normalises each channel with its own batch statistics, so the merge stays exact in
    training mode (the merged model's first fine-tuning steps start from the dual model's function)."""
    dual = copy.deepcopy(trained_dual).train()  # (training mode moves the running statistics)
    merged = merge_dual(dual).train()
    with torch.no_grad():
        assert torch.allclose(merged(digits), dual(DualNet.pair(digits, digits)).mean(1), atol=ATOL)


def test_sub_model_a_ignores_b_input_and_only_b_sees_the_augmented_image(trained_dual, digits):
    augmented = augment_dual(digits, np.random.default_rng(3))
    with torch.no_grad():
        same = trained_dual(DualNet.pair(digits, digits))
        mixed = trained_dual(DualNet.pair(digits, augmented))
        merged = merge_dual(trained_dual).eval()(digits)
    assert torch.allclose(mixed[:, 0], same[:, 0], atol=ATOL)  # A: same image, same output
    assert (mixed[:, 1] - same[:, 1]).abs().max() > 0.1  # B: augmented image, other output
    # so the merged model reproduces the joined output for equal inputs only
    assert (merged - mixed.mean(1)).abs().max() > 0.05


def test_each_sub_model_taken_out_alone_gives_its_own_output(trained_dual, digits):
    augmented = augment_dual(digits, np.random.default_rng(4))
    with torch.no_grad():
        dual_out = trained_dual(DualNet.pair(digits, augmented))
        a, b = branch_of(trained_dual, 0).eval(), branch_of(trained_dual, 1).eval()
        assert sum(p.numel() for p in a.parameters()) == 7_082
        assert torch.allclose(a(digits), dual_out[:, 0], atol=ATOL)
        assert torch.allclose(b(augmented), dual_out[:, 1], atol=ATOL)
        merged = merge_dual(trained_dual).eval()
        mean_of_parts = (branch_of(merged, 0).eval()(digits) + branch_of(merged, 1).eval()(digits)) / 2
        assert torch.allclose(merged(digits), mean_of_parts, atol=ATOL)


def test_merged_state_is_a_plain_lwcnn_with_the_heads_side_by_side_halved(trained_dual):
    dual_state = trained_dual.state_dict()
    merged = merge_state(dual_state)
    reference, _ = build_model(lwcnn_config())
    assert {k: tuple(v.shape) for k, v in merged.items()} == {
        k: tuple(v.shape) for k, v in reference.state_dict().items()
    }
    w = dual_state["head.weight"].numpy()  # [2, 10, 24]
    np.testing.assert_allclose(merged["head.fc.weight"].numpy(), np.concatenate([w[0], w[1]], axis=1) / 2)
    np.testing.assert_allclose(merged["head.fc.bias"].numpy(), dual_state["head.bias"].numpy().mean(0))
    for key in reference.state_dict():
        if not key.startswith("head."):
            assert torch.equal(merged[key], dual_state[key]), key  # group arrays untouched


def test_dual_recipe_needs_a_two_branch_backbone_trained_from_scratch():
    with pytest.raises(ConfigError, match="model.backbone: the dual recipe needs a backbone of two sub-models"):
        build_dual(lwcnn_config(backbone="lwcnn-branch"))
    with pytest.raises(ConfigError, match="model.weights: the dual recipe trains from scratch"):
        build_dual(lwcnn_config(weights="package"))
    with pytest.raises(ValueError, match="both inputs should have one shape"):
        DualNet.pair(torch.zeros(2, 1, 28, 28), torch.zeros(2, 1, 14, 14))

import numpy as np
import pytest
import torch

from fedfreeze.training.cutmix import Box, apply_cutmix, sample_box, sample_lambda


def test_lambda_beta_1_1_is_uniform(rng):
    draws = np.array([sample_lambda(1.0, rng) for _ in range(4000)])
    assert 0.0 <= draws.min() and draws.max() <= 1.0
    assert abs(draws.mean() - 0.5) < 0.02
    assert abs((draws < 0.25).mean() - 0.25) < 0.03


def test_box_area_follows_lambda_when_not_clipped(rng):
    # a box centred in the middle is never clipped for lam >= 0.5 ... find such draws
    areas = []
    for _ in range(200):
        box = sample_box(100, 100, 0.75, rng)
        if box.top > 0 and box.left > 0 and box.bottom < 100 and box.right < 100:
            areas.append(box.area)
    assert areas and all(area == 50 * 50 for area in areas)


def test_box_is_clipped_to_the_image(rng):
    for _ in range(200):
        box = sample_box(40, 60, float(rng.random()), rng)
        assert 0 <= box.top <= box.bottom <= 40 and 0 <= box.left <= box.right <= 60


def test_labels_mixed_by_real_pasted_area():
    images = torch.zeros(2, 1, 10, 10)
    images[1] = 1.0
    targets = torch.tensor([0.0, 1.0])
    box = Box(top=0, bottom=5, left=0, right=4)  # 20 of 100 pixels, as if clipped at a corner
    mixed, mixed_targets, kept = apply_cutmix(images, targets, box, torch.tensor([1, 0]))
    assert kept == pytest.approx(0.8)
    assert mixed[0].sum() == 20 and mixed[1].sum() == 80
    assert torch.allclose(mixed_targets, torch.tensor([0.2, 0.8]))
    # the input is untouched
    assert images[0].sum() == 0


def test_one_hot_targets_mix_too():
    images = torch.rand(2, 3, 8, 8)
    targets = torch.eye(3)[[0, 2]]
    _, mixed, kept = apply_cutmix(images, targets, Box(0, 8, 0, 4), torch.tensor([1, 0]))
    assert kept == pytest.approx(0.5)
    assert torch.allclose(mixed, torch.tensor([[0.5, 0.0, 0.5], [0.5, 0.0, 0.5]]))


def test_bad_shapes_rejected():
    with pytest.raises(ValueError, match=r"images should be \[B, C, H, W\]"):
        apply_cutmix(torch.rand(3, 8, 8), torch.zeros(3), Box(0, 1, 0, 1), torch.arange(3))
    with pytest.raises(ValueError, match="batch sizes differ"):
        apply_cutmix(torch.rand(3, 1, 8, 8), torch.zeros(2), Box(0, 1, 0, 1), torch.arange(3))
    with pytest.raises(ValueError, match="alpha should be positive"):
        sample_lambda(0.0, np.random.default_rng(0))

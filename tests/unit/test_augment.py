import numpy as np
import torch

from fedfreeze.training.augment import AugmentSettings, affine_matrices, augment_batch


def test_gaussian_blur_matches_torchvision():
    from torchvision.transforms.v2 import functional as TF

    from fedfreeze.training.augment import gaussian_blur

    image = torch.rand(3, 20, 24)
    for sigma in (0.3, 0.8):
        size = 2 * int(np.ceil(2 * sigma)) + 1
        expected = TF.gaussian_blur(image, kernel_size=[size, size], sigma=[sigma, sigma])
        assert torch.allclose(gaussian_blur(image, sigma), expected, atol=1e-5)


def test_affine_matrices_stay_within_the_configured_ranges():
    theta = affine_matrices(500, AugmentSettings(), np.random.default_rng(0)).numpy()
    a = theta[:, :, :2]
    flips = np.sign(np.linalg.det(a))
    scale = 1 / np.sqrt(np.abs(np.linalg.det(a)))
    angle = np.degrees(np.arctan2(a[:, 1, 0] * flips, a[:, 0, 0] * flips))
    assert np.all(np.abs(angle) <= 5.0 + 1e-6)
    assert np.all((scale >= 0.95 - 1e-6) & (scale <= 1.05 + 1e-6))
    assert 0.4 < np.mean(flips < 0) < 0.6  # about half flipped
    assert np.allclose(theta[:, :, 2], 0.0)  # no translation


def test_augment_keeps_shape_range_and_changes_images():
    images = torch.rand(8, 1, 32, 32)
    out = augment_batch(images.clone(), np.random.default_rng(1))
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, images)
    # no-op settings reproduce the input exactly (up to interpolation at identity)
    identity = AugmentSettings(degrees=0.0, scale=(1.0, 1.0), flip_prob=0.0, blur_prob=0.0)
    assert torch.allclose(augment_batch(images.clone(), np.random.default_rng(1), identity), images, atol=1e-5)

"""The augmented input of the dual recipe: random rotation, zoom, translation and brightness.

The paper's pipeline (random rotation, random zoom, random brightness, random translation, as in
Keras' preprocessing layers), on whole batches in memory: the three geometric changes are one
affine warp per image (a single ``grid_sample`` call for the batch, uncovered pixels black, as the
background of MNIST-like images), then the brightness shift. Sampling the parameters is separate
from applying them, and every draw comes from the caller's ``numpy.random.Generator`` in a fixed
order (the same seed gives the same batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DualAugmentSettings:
    """Ranges of the augmented input (``[train.dual]`` in the configuration)."""

    rotation: float = 10.0  # degrees: the angle is uniform in [-rotation, rotation]
    zoom: float = 0.1  # the image scale is uniform in [1 - zoom, 1 + zoom] (> 1 enlarges the content)
    translation: float = 0.1  # shift along each axis, uniform in [-t, t] times the image side
    brightness: float = 0.1  # added to every pixel (pixels in [0, 1]), uniform in [-b, b], then clipped

    def __post_init__(self) -> None:
        checks = {
            "rotation": (self.rotation, 0.0, 180.0),
            "zoom": (self.zoom, 0.0, 0.99),
            "translation": (self.translation, 0.0, 0.5),
            "brightness": (self.brightness, 0.0, 1.0),
        }
        for name, (value, low, high) in checks.items():
            if not low <= value <= high:
                raise ValueError(f"dual.{name} should be in [{low}, {high}], got {value}")


@dataclass(frozen=True)
class AugmentParams:
    """One batch's draws, per image."""

    angle: np.ndarray  # degrees
    scale: np.ndarray
    shift: np.ndarray  # [B, 2]: (x, y) as fractions of the image side
    brightness: np.ndarray


def sample_params(batch: int, settings: DualAugmentSettings, rng: np.random.Generator) -> AugmentParams:
    """Draw every image's rotation, zoom, shift and brightness (always the same number of draws)."""
    angle = rng.uniform(-settings.rotation, settings.rotation, batch)
    scale = rng.uniform(1.0 - settings.zoom, 1.0 + settings.zoom, batch)
    shift = rng.uniform(-settings.translation, settings.translation, (batch, 2))
    brightness = rng.uniform(-settings.brightness, settings.brightness, batch)
    return AugmentParams(angle, scale, shift, brightness)


def affine_theta(params: AugmentParams) -> torch.Tensor:
    """``affine_grid`` matrices that rotate by ``angle``, scale by ``scale`` and shift by ``shift``.

    The content moves by ``p_out = scale * R(angle) p_in + d``; ``affine_grid`` wants the inverse
    map from output to input coordinates (normalised: the image side spans 2, so ``d = 2 * shift``).
    """
    rad = np.deg2rad(params.angle)
    cos, sin = np.cos(rad) / params.scale, np.sin(rad) / params.scale
    d = 2.0 * params.shift
    theta = np.zeros((len(rad), 2, 3), dtype=np.float32)
    # inverse rotation R(-angle) / scale, then the shift taken back through it
    theta[:, 0, 0], theta[:, 0, 1] = cos, sin
    theta[:, 1, 0], theta[:, 1, 1] = -sin, cos
    theta[:, 0, 2] = -(cos * d[:, 0] + sin * d[:, 1])
    theta[:, 1, 2] = -(-sin * d[:, 0] + cos * d[:, 1])
    return torch.from_numpy(theta)


def apply_params(images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Warp and brighten float images ``[B, C, H, W]`` in [0, 1]; the result stays in [0, 1]."""
    if images.ndim != 4 or images.shape[0] != len(params.angle):
        raise ValueError(f"images should be [B, C, H, W] with B = {len(params.angle)}, got {tuple(images.shape)}")
    theta = affine_theta(params).to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    delta = torch.from_numpy(params.brightness).to(images.device, images.dtype).view(-1, 1, 1, 1)
    return (out + delta).clamp_(0.0, 1.0)


def augment_dual(
    images: torch.Tensor, rng: np.random.Generator, settings: DualAugmentSettings = DualAugmentSettings()
) -> torch.Tensor:
    """The augmented copy of a batch for sub-model B (the batch itself is left unchanged)."""
    return apply_params(images, sample_params(images.shape[0], settings, rng))

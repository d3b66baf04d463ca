"""Light augmentation for chest X-rays, done on whole batches in memory.

Rotation within +/-5 degrees, scale 0.95-1.05 and a horizontal flip are one affine warp per image
(a single ``grid_sample`` call for the batch); a mild Gaussian blur is applied to a random subset.
Plain torch, no torchvision: a federated site pays every import again in each message's process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentSettings:
    degrees: float = 5.0
    scale: tuple[float, float] = (0.95, 1.05)
    flip_prob: float = 0.5
    blur_prob: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 1.0)


def affine_matrices(batch: int, settings: AugmentSettings, rng: np.random.Generator) -> torch.Tensor:
    """Per-image 2x3 matrices (rotation, scale, optional flip) in ``affine_grid``'s normalised frame."""
    angle = np.deg2rad(rng.uniform(-settings.degrees, settings.degrees, batch))
    scale = rng.uniform(*settings.scale, batch)
    flip = np.where(rng.random(batch) < settings.flip_prob, -1.0, 1.0)
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    theta = np.zeros((batch, 2, 3), dtype=np.float32)
    theta[:, 0, 0] = cos * flip
    theta[:, 0, 1] = -sin
    theta[:, 1, 0] = sin * flip
    theta[:, 1, 1] = cos
    return torch.from_numpy(theta)


def augment_batch(
    images: torch.Tensor, rng: np.random.Generator, settings: AugmentSettings = AugmentSettings()
) -> torch.Tensor:
    """Augment float images ``[B, C, H, W]`` in [0, 1]; the output stays in [0, 1]."""
    theta = affine_matrices(images.shape[0], settings, rng).to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    blur = np.flatnonzero(rng.random(images.shape[0]) < settings.blur_prob)
    for i in blur:
        out[i] = gaussian_blur(out[i], float(rng.uniform(*settings.blur_sigma)))
    return out.clamp_(0.0, 1.0)


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of one ``[C, H, W]`` image, edges reflected (as torchvision does)."""
    radius = math.ceil(2 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = image.shape[0]
    padded = F.pad(image.unsqueeze(0), [radius, radius, radius, radius], mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)[0]

"""CutMix: paste a box from a shuffled copy of the batch; mix labels by the box's real area.

Sampling (lambda and the box) is separate from applying it, as in torchvision, so each can be
tested on its own. The box is clipped at the image border, so the label weight uses the area that
was actually pasted, not the area lambda asked for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Box:
    """Rows ``[top, bottom)`` and columns ``[left, right)`` of the pasted patch."""

    top: int
    bottom: int
    left: int
    right: int

    @property
    def area(self) -> int:
        return (self.bottom - self.top) * (self.right - self.left)


def sample_lambda(alpha: float, rng: np.random.Generator) -> float:
    """lambda ~ Beta(alpha, alpha); alpha = 1 is uniform on [0, 1]."""
    if alpha <= 0:
        raise ValueError(f"cutmix alpha should be positive, got {alpha}")
    return float(rng.beta(alpha, alpha))


def sample_box(height: int, width: int, lam: float, rng: np.random.Generator) -> Box:
    """A box covering about ``1 - lam`` of the image, centred uniformly at random, clipped to it."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam should be in [0, 1], got {lam}")
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    return Box(
        top=max(cy - cut_h // 2, 0),
        bottom=min(cy + cut_h // 2, height),
        left=max(cx - cut_w // 2, 0),
        right=min(cx + cut_w // 2, width),
    )


def apply_cutmix(
    images: torch.Tensor, targets: torch.Tensor, box: Box, permutation: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Paste ``box`` from ``images[permutation]``; targets mixed by the kept area fraction.

    ``targets`` are float: probabilities of the positive class ``[B]`` or one-hot rows ``[B, K]``.
    Returns the new images, the mixed targets and the weight of the original images.
    """
    if images.ndim != 4:
        raise ValueError(f"images should be [B, C, H, W], got shape {tuple(images.shape)}")
    if targets.shape[0] != images.shape[0] or permutation.shape != (images.shape[0],):
        raise ValueError(
            f"batch sizes differ: images {images.shape[0]}, targets {targets.shape[0]}, "
            f"permutation {tuple(permutation.shape)}"
        )
    height, width = images.shape[-2:]
    kept = 1.0 - box.area / float(height * width)
    mixed = images.clone()
    mixed[:, :, box.top : box.bottom, box.left : box.right] = images[
        permutation, :, box.top : box.bottom, box.left : box.right
    ]
    return mixed, kept * targets + (1.0 - kept) * targets[permutation], kept

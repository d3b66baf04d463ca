"""Sub-model B's augmentation: rotation, zoom, translation and brightness within their ranges, seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedfreeze.config import SiteConfig, parse_config
from fedfreeze.errors import ConfigError
from fedfreeze.training.dual import augment_settings
from fedfreeze.training.dual_augment import (
    AugmentParams,
    DualAugmentSettings,
    apply_params,
    augment_dual,
    sample_params,
)

SIDE = 28


def blob(cx: float = 13.5, cy: float = 13.5, sx: float = 2.0, sy: float = 2.0) -> torch.Tensor:
    """A Gaussian spot ``[1, 1, 28, 28]`` centred at pixel (cx, cy), well inside the image."""
    y, x = torch.meshgrid(
        torch.arange(SIDE, dtype=torch.float64), torch.arange(SIDE, dtype=torch.float64), indexing="ij"
    )
    return torch.exp(-0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2)).float()[None, None]


def moments(image: torch.Tensor) -> tuple[float, float, np.ndarray]:
    """Centre of mass (x, y) and the 2x2 covariance of an image's intensity."""
    w = image[0, 0].double().numpy()
    y, x = np.mgrid[:SIDE, :SIDE]
    total = w.sum()
    cx, cy = (w * x).sum() / total, (w * y).sum() / total
    cov = (
        np.array(
            [
                [(w * (x - cx) ** 2).sum(), (w * (x - cx) * (y - cy)).sum()],
                [(w * (x - cx) * (y - cy)).sum(), (w * (y - cy) ** 2).sum()],
            ]
        )
        / total
    )
    return cx, cy, cov


def only(**values: float) -> AugmentParams:
    """Parameters of one image: the identity except for the values given."""
    return AugmentParams(
        angle=np.array([values.get("angle", 0.0)]),
        scale=np.array([values.get("scale", 1.0)]),
        shift=np.array([[values.get("dx", 0.0), values.get("dy", 0.0)]]),
        brightness=np.array([values.get("brightness", 0.0)]),
    )


def test_draws_cover_exactly_the_configured_ranges():
    settings = DualAugmentSettings(rotation=15.0, zoom=0.2, translation=0.1, brightness=0.3)
    p = sample_params(5000, settings, np.random.default_rng(0))
    for values, low, high in (
        (p.angle, -15.0, 15.0),
        (p.scale, 0.8, 1.2),
        (p.shift, -0.1, 0.1),
        (p.brightness, -0.3, 0.3),
    ):
        assert values.min() >= low and values.max() <= high
        span = high - low
        assert values.min() < low + 0.01 * span and values.max() > high - 0.01 * span  # the whole range is used
    assert p.shift.shape == (5000, 2)


def test_translation_moves_the_content_by_the_drawn_fraction_of_the_side():
    image = blob()
    cx, cy, _ = moments(image)
    out = apply_params(image, only(dx=0.1, dy=-0.05))
    nx, ny, _ = moments(out)
    assert nx - cx == pytest.approx(0.1 * SIDE, abs=0.1)  # right
    assert ny - cy == pytest.approx(-0.05 * SIDE, abs=0.1)  # up


def test_zoom_scales_the_content_about_the_centre():
    image = blob(sx=2.5, sy=2.5)
    _, _, cov = moments(image)
    for scale in (0.8, 1.2):
        nx, ny, new_cov = moments(apply_params(image, only(scale=scale)))
        assert (nx, ny) == pytest.approx((13.5, 13.5), abs=0.05)
        # spread grows by scale^2 (bilinear resampling adds about 1/6 px^2 of blur)
        assert new_cov[0, 0] == pytest.approx(scale**2 * cov[0, 0], rel=0.06)


def test_rotation_turns_the_content_by_the_drawn_angle():
    image = blob(sx=4.0, sy=1.2)  # elongated along x
    for angle in (-20.0, 10.0):
        _, _, cov = moments(apply_params(image, only(angle=angle)))
        principal = np.degrees(0.5 * np.arctan2(2 * cov[0, 1], cov[0, 0] - cov[1, 1]))
        assert abs(principal) == pytest.approx(abs(angle), abs=1.0)
    # opposite angles turn opposite ways
    _, _, plus = moments(apply_params(image, only(angle=10.0)))
    _, _, minus = moments(apply_params(image, only(angle=-10.0)))
    assert np.sign(plus[0, 1]) == -np.sign(minus[0, 1]) != 0


def test_brightness_adds_the_drawn_shift_and_clips(digits):
    x = digits[:1]
    assert torch.allclose(apply_params(x, only(brightness=0.2)), (x + 0.2).clamp(0, 1), atol=1e-6)
    assert torch.allclose(apply_params(x, only(brightness=-0.2)), (x - 0.2).clamp(0, 1), atol=1e-6)


def test_identity_settings_change_nothing(digits):
    settings = DualAugmentSettings(rotation=0.0, zoom=0.0, translation=0.0, brightness=0.0)
    assert torch.allclose(augment_dual(digits, np.random.default_rng(0), settings), digits, atol=1e-5)


def test_same_seed_same_batch_other_seed_other_batch_input_untouched(digits):
    before = digits.clone()
    first = augment_dual(digits, np.random.default_rng(7))
    again = augment_dual(digits, np.random.default_rng(7))
    other = augment_dual(digits, np.random.default_rng(8))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert torch.equal(digits, before)
    assert first.shape == digits.shape and first.min() >= 0 and first.max() <= 1


def test_configured_ranges_reach_the_pipeline_and_bad_ones_name_the_field():
    cfg = parse_config(
        {"train": {"recipe": "dual", "dual": {"rotation": 20, "zoom": 0.15, "translation": 0.05, "brightness": 0.25}}},
        SiteConfig,
        "site.toml",
    )
    assert augment_settings(cfg.train.dual) == DualAugmentSettings(20.0, 0.15, 0.05, 0.25)
    with pytest.raises(ConfigError, match=r"site.toml: train.dual.translation: .*less than or equal to 0.5"):
        parse_config({"train": {"dual": {"translation": 0.7}}}, SiteConfig, "site.toml")
    with pytest.raises(ConfigError, match=r"train.dual.rotation: .*greater than or equal to 0"):
        parse_config({"train": {"dual": {"rotation": -5}}}, SiteConfig, "site.toml")
    with pytest.raises(ValueError, match=r"dual.zoom should be in \[0.0, 0.99\], got 1.5"):
        DualAugmentSettings(zoom=1.5)

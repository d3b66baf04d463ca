"""Acquisition shifts of an 8-bit grey chest X-ray: deterministic, seeded, shape and dtype kept.

Each shift stands for something that differs between hospitals' scanners and pipelines: the
display/exposure curve (gamma), a flatter window (contrast), detector noise, a lower-resolution
acquisition (down-then-up resampling), lossy archiving (JPEG at low quality), and patient
positioning (a small rotation, then a crop). A shift is applied to the image at its stored
resolution, before the model's resize, like a different acquisition would be.

Randomness (noise, the rotation angle) comes from ``numpy.random.default_rng([seed, shift, index])``,
so image ``index`` of a set gets the same shifted version however the set is processed.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _check(image: np.ndarray) -> None:
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"a shift takes a 2-D uint8 grey image, got {image.dtype} {image.shape}")


def gamma(value: float) -> Transform:
    """``255 * (x / 255) ** value``: < 1 brightens the mid-tones, > 1 darkens them."""
    lut = np.clip(np.round(255.0 * (np.arange(256) / 255.0) ** value), 0, 255).astype(np.uint8)

    def apply(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        _check(image)
        return lut[image]

    return apply


def contrast(factor: float) -> Transform:
    """Pixel values pulled toward the image's mean by ``factor`` (a flatter window)."""

    def apply(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        _check(image)
        x = image.astype(np.float64)
        mean = x.mean()
        return np.clip(np.round(mean + factor * (x - mean)), 0, 255).astype(np.uint8)

    return apply


def gaussian_noise(sigma: float) -> Transform:
    """Additive Gaussian noise with standard deviation ``sigma`` grey levels."""

    def apply(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        _check(image)
        noisy = image.astype(np.float64) + rng.normal(0.0, sigma, size=image.shape)
        return np.clip(np.round(noisy), 0, 255).astype(np.uint8)

    return apply


def resample(factor: float) -> Transform:
    """Down to ``factor`` of the side (bilinear, antialiased), then back up: detail is lost."""

    def apply(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        _check(image)
        h, w = image.shape
        small = Image.fromarray(image, mode="L").resize(
            (max(1, round(w * factor)), max(1, round(h * factor))), Image.Resampling.BILINEAR
        )
        return np.asarray(small.resize((w, h), Image.Resampling.BILINEAR), dtype=np.uint8).copy()

    return apply


def jpeg(quality: int) -> Transform:
    """Re-compressed as JPEG at ``quality`` (blocking, lost fine texture)."""

    def apply(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        _check(image)
        buffer = io.BytesIO()
        Image.fromarray(image, mode="L").save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            return np.asarray(decoded.convert("L"), dtype=np.uint8).copy()

    return apply


def rotate_crop(min_degrees: float, max_degrees: float, keep: float) -> Transform:
    """Rotated by a seeded angle of ``min..max`` degrees either way (black fill), then the central
    ``keep`` of each side is cropped and resized back: positioning and field of view differ."""

    def apply(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        _check(image)
        angle = float(rng.uniform(min_degrees, max_degrees)) * (1.0 if rng.random() < 0.5 else -1.0)
        h, w = image.shape
        rotated = Image.fromarray(image, mode="L").rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=0)
        cw, ch = round(w * keep), round(h * keep)
        left, top = (w - cw) // 2, (h - ch) // 2
        cropped = rotated.crop((left, top, left + cw, top + ch))
        return np.asarray(cropped.resize((w, h), Image.Resampling.BILINEAR), dtype=np.uint8).copy()

    return apply


@dataclass(frozen=True)
class Shift:
    """A named shift and what it does, for tables."""

    name: str
    description: str
    transform: Transform


SHIFTS: tuple[Shift, ...] = (
    Shift("gamma-0.6", "gamma 0.6 (brighter mid-tones)", gamma(0.6)),
    Shift("gamma-1.6", "gamma 1.6 (darker mid-tones)", gamma(1.6)),
    Shift("contrast-0.5", "contrast halved around the image mean", contrast(0.5)),
    Shift("noise-12", "Gaussian noise, sigma 12 grey levels", gaussian_noise(12.0)),
    Shift("resample-0.33", "down to 1/3 of the side and back up (bilinear)", resample(1 / 3)),
    Shift("jpeg-10", "JPEG re-compression at quality 10", jpeg(10)),
    Shift("rotate-crop", "rotation 3-8 degrees either way, central 90 % crop", rotate_crop(3.0, 8.0, 0.9)),
)
SHIFT_NAMES = tuple(s.name for s in SHIFTS)


def get_shift(name: str) -> Shift:
    for shift in SHIFTS:
        if shift.name == name:
            return shift
    raise ValueError(f"unknown shift {name!r}; known: {', '.join(SHIFT_NAMES)}")


def image_rng(seed: int, shift: str, index: int) -> np.random.Generator:
    """The generator of image ``index`` under ``shift``: independent of processing order."""
    return np.random.default_rng([seed, zlib.crc32(shift.encode()), index])


def apply_shift(images: np.ndarray, name: str, seed: int) -> np.ndarray:
    """``images`` uint8 ``[N, H, W]`` (grey) under the named shift; a new array of the same shape."""
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"apply_shift takes uint8 [N, H, W], got {images.dtype} {images.shape}")
    transform = get_shift(name).transform
    return (
        np.stack([transform(image, image_rng(seed, name, i)) for i, image in enumerate(images)])
        if len(images)
        else images.copy()
    )

"""The shift benchmark's acquisition shifts (benchmarks/shifts.py) on real chest X-rays: each is
deterministic, keeps shape and dtype, changes the image, and does what its name says."""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
MINI = ROOT / "fedfreeze" / "sample_data" / "kermany_mini"


def _load_shifts():
    spec = importlib.util.spec_from_file_location("benchmark_shifts", ROOT / "benchmarks" / "shifts.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark_shifts"] = module
    spec.loader.exec_module(module)
    return module


shifts = _load_shifts()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Four real Kermany images (grey, 96 x 96), two per class."""
    rows = [line.split(",") for line in (MINI / "test.csv").read_text().splitlines()[1:]]
    picked = [r for r in rows if r[1] == "0"][:2] + [r for r in rows if r[1] == "1"][:2]
    out = []
    for r in picked:
        with Image.open(MINI / r[0]) as image:
            out.append(np.asarray(image.convert("L").resize((96, 96), Image.Resampling.BILINEAR)))
    return np.stack(out)


@pytest.mark.parametrize("name", shifts.SHIFT_NAMES)
def test_deterministic_shape_dtype_and_changes_the_image(images: np.ndarray, name: str) -> None:
    first = shifts.apply_shift(images, name, seed=3)
    again = shifts.apply_shift(images, name, seed=3)
    assert first.shape == images.shape and first.dtype == np.uint8
    np.testing.assert_array_equal(first, again)
    changed = np.abs(first.astype(int) - images.astype(int)).mean(axis=(1, 2))
    assert (changed > 0.5).all(), f"{name} left an image (almost) unchanged: mean abs change {changed}"
    # image i's version depends only on (seed, shift, i), not on the others processed with it
    alone = shifts.get_shift(name).transform(images[2], shifts.image_rng(3, name, 2))
    np.testing.assert_array_equal(alone, first[2])


@pytest.mark.parametrize("name", ["noise-12", "rotate-crop"])
def test_random_shifts_depend_on_the_seed(images: np.ndarray, name: str) -> None:
    assert not np.array_equal(shifts.apply_shift(images, name, seed=3), shifts.apply_shift(images, name, seed=4))


def test_each_shift_does_what_its_name_says(images: np.ndarray) -> None:
    x = images.astype(float)
    expected_gamma = np.clip(np.round(255 * (x / 255) ** 0.6), 0, 255)
    np.testing.assert_array_equal(shifts.apply_shift(images, "gamma-0.6", 0), expected_gamma)
    assert shifts.apply_shift(images, "gamma-1.6", 0).mean() < images.mean()
    flat = shifts.apply_shift(images, "contrast-0.5", 0).astype(float)
    np.testing.assert_allclose(flat.std(axis=(1, 2)), 0.5 * x.std(axis=(1, 2)), rtol=0.02)
    noisy = shifts.apply_shift(images, "noise-12", 0).astype(float)
    assert 9.0 < (noisy - x).std() < 12.5  # sigma 12, a little less where clipped at 0 or 255
    # resampling loses high frequencies: less difference between neighbouring pixels
    blurred = shifts.apply_shift(images, "resample-0.33", 0).astype(float)
    assert np.abs(np.diff(blurred, axis=2)).mean() < 0.7 * np.abs(np.diff(x, axis=2)).mean()
    # JPEG at quality 10 equals PIL's own round trip
    buffer = io.BytesIO()
    Image.fromarray(images[0]).save(buffer, format="JPEG", quality=10)
    np.testing.assert_array_equal(
        shifts.apply_shift(images[:1], "jpeg-10", 0)[0],
        np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("L")),
    )


def test_rejects_what_is_not_grey_uint8(images: np.ndarray) -> None:
    with pytest.raises(ValueError, match="uint8 \\[N, H, W\\]"):
        shifts.apply_shift(images.astype(np.float32), "gamma-0.6", 0)
    with pytest.raises(ValueError, match="unknown shift 'blur'"):
        shifts.apply_shift(images, "blur", 0)

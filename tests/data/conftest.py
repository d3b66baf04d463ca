"""Shared fixtures for the data tests: the shipped Kermany subset and real CXR files."""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from fedfreeze.data import ImageSet, load_image_set
from fedfreeze.sample_data import kermany_mini

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cxr_samples"
KERMANY_CLASSES = ["normal", "pneumonia"]


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def train_manifest() -> Path:
    return kermany_mini("train")


@pytest.fixture(scope="session")
def train_rows(train_manifest: Path) -> list[dict[str, str]]:
    with train_manifest.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="session")
def sample_images(train_manifest: Path, train_rows: list[dict[str, str]]) -> list[Path]:
    """Absolute paths of the first 6 shipped JPEGs (3 normal, 3 pneumonia)."""
    normal = [r for r in train_rows if r["label"] == "0"][:3]
    pneumonia = [r for r in train_rows if r["label"] == "1"][:3]
    return [train_manifest.parent / r["path"] for r in normal + pneumonia]


@pytest.fixture(scope="session")
def kermany_train(train_manifest: Path) -> ImageSet:
    """The shipped train subset at 32 px, loaded once per test session."""
    return load_image_set(train_manifest, image_size=32, class_names=KERMANY_CLASSES, progress=False)


@pytest.fixture
def write_manifest(tmp_path: Path) -> Callable[..., Path]:
    """Write rows (first row = header) to a CSV in tmp_path and return its path."""

    def write(rows: Sequence[Sequence[object]], name: str = "manifest.csv", folder: Path | None = None) -> Path:
        target = (folder or tmp_path) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("w", newline="") as handle:
            csv.writer(handle).writerows(rows)
        return target

    return write

"""Rebuild tests/fixtures/mnist_subset/mnist_subset.npz from the MNIST IDX files in ../shared/data/mnist.

The first ``--train-per-class`` digits of each class of the official training set and the first
``--test-per-class`` of each class of the official test set, unchanged (28 x 28, uint8), in the
MedMNIST-style keys that ``fedfreeze.data.load_image_set`` reads: ``train_images``,
``train_labels``, ``test_images``, ``test_labels``.

    .venv/bin/python scripts/make_mnist_fixture.py [--mnist ../shared/data/mnist]
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "mnist_subset" / "mnist_subset.npz"


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` images of every class, in file order."""
    picked = np.concatenate([np.flatnonzero(labels == k)[:per_class] for k in range(10)])
    return np.sort(picked)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist", type=Path, default=ROOT.parent / "shared" / "data" / "mnist")
    parser.add_argument("--train-per-class", type=int, default=50)
    parser.add_argument("--test-per-class", type=int, default=20)
    args = parser.parse_args()

    from fedfreeze.data.arrays import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, read_idx

    arrays = {}
    for split, prefix, per_class in (("train", "train", args.train_per_class), ("test", "t10k", args.test_per_class)):
        images = read_idx(args.mnist / f"{prefix}-images-idx3-ubyte.gz", IDX_IMAGES_MAGIC)
        labels = read_idx(args.mnist / f"{prefix}-labels-idx1-ubyte.gz", IDX_LABELS_MAGIC)
        rows = first_per_class(labels, per_class)
        arrays[f"{split}_images"] = images[rows].copy()
        arrays[f"{split}_labels"] = labels[rows].astype(np.uint8).copy()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    digest = hashlib.sha256(OUT.read_bytes()).hexdigest()[:16]
    print(
        f"{OUT}: {OUT.stat().st_size:,} bytes, sha256 {digest}, "
        + ", ".join(f"{k} {v.shape}" for k, v in arrays.items())
    )


if __name__ == "__main__":
    main()

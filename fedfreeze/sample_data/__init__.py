"""Small real datasets shipped with fedfreeze, for tests and demos (see each folder's ATTRIBUTION.md)."""

from __future__ import annotations

from pathlib import Path

KERMANY_MINI_SPLITS = ("train", "test")


def kermany_mini(split: str = "train") -> Path:
    """Manifest of the Kermany paediatric CXR subset: "train" (300 images, 3 sites) or "test" (100 held out)."""
    if split not in KERMANY_MINI_SPLITS:
        raise ValueError(f"split should be one of {', '.join(KERMANY_MINI_SPLITS)}, got {split!r}")
    manifest = Path(__file__).resolve().parent / "kermany_mini" / f"{split}.csv"
    if not manifest.is_file():
        raise FileNotFoundError(
            f"{manifest} is missing: the sample data was not installed with the package "
            "(rebuild it with scripts/make_sample_data.py)"
        )
    return manifest

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


def kermany_mini_site(folder: Path, site: str, *, only_label: str | None = None) -> Path:
    """``folder/manifest.csv`` and its images: one site's rows of the shipped train split copied into a
    data folder of its own, as a site keeps it (a manifest names images inside its folder), for
    deployment tests and benchmarks on one machine."""
    import csv
    import shutil

    source = kermany_mini("train")
    with source.open(newline="") as handle:
        rows = [
            r for r in csv.DictReader(handle) if r["site"] == site and (only_label is None or r["label"] == only_label)
        ]
    if not rows:
        raise ValueError(
            f"the shipped subset has no rows for site {site!r}" + (f", label {only_label}" if only_label else "")
        )
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient_id"])
        for row in rows:
            (folder / row["path"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source.parent / row["path"], folder / row["path"])
            writer.writerow([row["path"], row["label"], row["patient_id"]])
    return folder

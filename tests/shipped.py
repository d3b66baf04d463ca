"""The shipped Kermany images named from a test's own manifest.

A manifest's image paths must lie in its folder (``data/manifest.py``), so a test that writes a
manifest of shipped images in its temporary folder links the shipped folder there and names the
images through the link, as a site whose images sit on another disk would.
"""

from __future__ import annotations

from pathlib import Path

from fedfreeze.sample_data import kermany_mini

SHIPPED = kermany_mini("train").parent
LINK = "kermany_mini"


def beside(folder: Path, image: str | Path) -> str:
    """``image`` (a shipped image, absolute or relative to the shipped folder) as a manifest in
    ``folder`` names it, through a link to the shipped folder made there once."""
    link = folder / LINK
    if not link.exists():
        folder.mkdir(parents=True, exist_ok=True)
        link.symlink_to(SHIPPED, target_is_directory=True)
    path = Path(image)
    relative = path.relative_to(SHIPPED) if path.is_absolute() else path
    return str(Path(LINK) / relative)


def site_folder(folder: Path, per_class: int) -> Path:
    """A site's data folder: the first ``per_class`` shipped training images of each class copied into
    ``folder/images`` and its ``manifest.csv`` (path, label, patient_id, site)."""
    import csv
    import shutil

    with kermany_mini("train").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows = [r for r in rows if r["label"] == "0"][:per_class] + [r for r in rows if r["label"] == "1"][:per_class]
    (folder / "images").mkdir(parents=True)
    lines = ["path,label,patient_id,site"]
    for i, row in enumerate(rows):
        shutil.copyfile(SHIPPED / row["path"], folder / "images" / f"{i}.jpeg")
        lines.append(f"images/{i}.jpeg,{row['label']},{row['patient_id']},{row['site']}")
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return folder

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

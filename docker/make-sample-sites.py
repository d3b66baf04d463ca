#!/usr/bin/env python3
"""Write the shipped Kermany subset as one self-contained data folder per hospital site.

    python3 docker/make-sample-sites.py [OUT] [--sites site-a,site-b]

OUT (default docker/sites) gets OUT/site-a/manifest.csv with the images beside it (paths in the
manifest are relative), so each folder can be mounted read-only into its site's container as
/data. Standard library only: it runs on a host without fedfreeze installed.
"""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "fedfreeze" / "sample_data" / "kermany_mini" / "train.csv"


def write_sites(out: Path, only: set[str] | None = None) -> dict[str, int]:
    rows = list(csv.DictReader(SOURCE.open(newline="")))
    sites = sorted({r["site"] for r in rows} if only is None else only)
    unknown = set(sites) - {r["site"] for r in rows}
    if unknown:
        raise SystemExit(f"make-sample-sites: no site {sorted(unknown)} in {SOURCE}")
    counts = {}
    for site in sites:
        folder = out / site
        mine = [r for r in rows if r["site"] == site]
        with (_fresh(folder) / "manifest.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label", "patient_id"])
            for row in mine:
                target = folder / row["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(SOURCE.parent / row["path"], target)
                writer.writerow([row["path"], row["label"], row["patient_id"]])
        counts[site] = len(mine)
    return counts


def _fresh(folder: Path) -> Path:
    """An empty folder; only a folder this script wrote before (it holds manifest.csv) is replaced."""
    if folder.exists():
        if any(folder.iterdir()) and not (folder / "manifest.csv").is_file():
            raise SystemExit(f"make-sample-sites: {folder} exists and is not a site folder; not touched")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=Path(__file__).resolve().parent / "sites")
    parser.add_argument("--sites", default=None, help="comma-separated site names (default: all)")
    args = parser.parse_args()
    only = set(args.sites.split(",")) if args.sites else None
    for site, n in write_sites(args.out, only).items():
        print(f"make-sample-sites: {args.out / site}: {n} images")


if __name__ == "__main__":
    main()

"""Split one dataset into hospital sites for a simulation, always by patient.

A manifest with a ``site`` column keeps its sites. Otherwise patients are dealt to ``n`` sites
either uniformly (IID) or with label skew: for each class, the share of its patients that goes to
each site is drawn from a Dirichlet(alpha) distribution (small alpha, strong skew). Each site's data
is written to its own folder, as a manifest (images stay where they are) or an ``.npz``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from fedfreeze.data.dataset import ImageSet
from fedfreeze.errors import DataError

SITES_FILE = "sites.json"


def patient_table(labels: np.ndarray, patient_ids: list[str]) -> tuple[list[str], np.ndarray]:
    """Patients in first-seen order and each one's label (the largest label among their images)."""
    order: dict[str, int] = {}
    for pid, label in zip(patient_ids, labels, strict=True):
        order[pid] = max(order.get(pid, 0), int(label))
    return list(order), np.array(list(order.values()))


def assign_sites(
    labels: np.ndarray,
    patient_ids: list[str],
    n_sites: int,
    *,
    alpha: float | None,
    seed: int,
    min_per_class: int = 2,
    attempts: int = 200,
) -> np.ndarray:
    """Site index (0..n_sites-1) of every image; every site gets at least ``min_per_class`` patients of each class.

    ``alpha=None`` is IID: patients shuffled and dealt in turn. A draw that leaves a site without
    enough of a class is redrawn (up to ``attempts`` times); if none works the skew is too strong
    for this many sites and the error says so.
    """
    if n_sites < 1:
        raise DataError(f"sites should be at least 1, got {n_sites}")
    patients, patient_labels = patient_table(labels, patient_ids)
    classes = np.unique(patient_labels)
    for k in classes:
        have = int((patient_labels == k).sum())
        if have < n_sites * min_per_class:
            raise DataError(
                f"class {int(k)} has {have} patients: too few for {n_sites} sites with "
                f"{min_per_class} patients of each class"
            )
    rng = np.random.default_rng(seed)
    for _ in range(attempts):
        site_of_patient = np.empty(len(patients), dtype=np.int64)
        for k in classes:
            members = rng.permutation(np.flatnonzero(patient_labels == k))
            if alpha is None:
                site_of_patient[members] = np.arange(len(members)) % n_sites
            else:
                shares = rng.dirichlet(np.full(n_sites, alpha))
                cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
                for site, chunk in enumerate(np.split(members, cuts)):
                    site_of_patient[chunk] = site
        counts = np.array(
            [[np.sum((site_of_patient == s) & (patient_labels == k)) for k in classes] for s in range(n_sites)]
        )
        if (counts >= min_per_class).all():
            index = {pid: i for i, pid in enumerate(patients)}
            return np.array([site_of_patient[index[pid]] for pid in patient_ids])
    raise DataError(
        f"no Dirichlet(alpha={alpha}) draw gave all {n_sites} sites {min_per_class} patients of each "
        f"class in {attempts} tries: raise alpha or use fewer sites"
    )


def write_sites(
    data: ImageSet,
    site_index: np.ndarray,
    out: Path,
    names: list[str] | None = None,
    *,
    as_manifest: bool,
) -> list[dict[str, object]]:
    """One folder per site, ``out/site-<i>/data``, holding a manifest of the original image files
    (``as_manifest``; the images are not copied) or the decoded images as ``data.npz``."""
    out.mkdir(parents=True, exist_ok=True)
    n_sites = int(site_index.max()) + 1
    summary = [
        write_site(
            data.subset(np.flatnonzero(site_index == site)),
            out,
            site,
            names[site] if names else f"site-{site}",
            as_manifest=as_manifest,
        )
        for site in range(n_sites)
    ]
    write_summary(out, summary)
    return summary


def write_site(
    part: ImageSet, out: Path, number: int, name: str, *, as_manifest: bool, role: str = "train"
) -> dict[str, object]:
    """``out/site-<number>/data`` for one site, and its line in ``sites.json``."""
    folder = out / f"site-{number}" / "data"
    folder.mkdir(parents=True, exist_ok=True)
    if as_manifest:
        with (folder / "manifest.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label", "patient_id"])
            for source, label, pid in zip(part.sources, part.labels.tolist(), part.patient_ids, strict=True):
                writer.writerow([str(Path(source).resolve()), label, pid])
    else:
        images = part.images.permute(0, 2, 3, 1).numpy()
        images = images[..., 0] if images.shape[-1] == 1 else images
        np.savez_compressed(folder / "data.npz", train_images=images, train_labels=part.labels.numpy())
    return {
        "site": f"site-{number}",
        "name": name,
        "role": role,
        "images": len(part),
        "patients": len(set(part.patient_ids)),
        "class_counts": part.class_counts(),
    }


def write_summary(out: Path, summary: list[dict[str, object]]) -> None:
    (out / SITES_FILE).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")

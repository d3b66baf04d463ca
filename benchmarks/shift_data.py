"""The shift benchmark's data: Kermany split by patient into 3 label-skewed training sites and a
held-out set nobody trains or chooses on, the held-out set under each acquisition shift, and NIH
adult chest X-rays (another hospital and population) kept apart.

Every split is by patient and seeded; the manifests are written once to the work folder and read
back on a re-run, so a resumed benchmark scores the same images.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import KERMANY, SHARED
from PIL import Image
from shifts import SHIFTS, apply_shift

NIH = SHARED / "nih_cxr14_pneumonia"
HELD_OUT = "kermany-held-out"
NIH_SET = "nih-adult"


@dataclass(frozen=True)
class Sizes:
    """How many images each part gets; sites are (name, images, share of normal images)."""

    sites: tuple[tuple[str, int, float], ...]
    held_out: int
    nih: int  # 0 or more than the set: all of it
    input_size: int

    def describe(self) -> dict[str, Any]:
        return {
            "sites": [{"site": s, "images": n, "normal_share": f} for s, n, f in self.sites],
            "held_out_images": self.held_out,
            "nih_images": self.nih,
            "input_size": self.input_size,
        }


FULL = Sizes(
    sites=(("site-a", 400, 0.50), ("site-b", 400, 0.12), ("site-c", 400, 0.12)), held_out=450, nih=0, input_size=128
)
QUICK = Sizes(
    sites=(("site-a", 60, 0.50), ("site-b", 60, 0.15), ("site-c", 60, 0.15)), held_out=80, nih=80, input_size=128
)


def _read_rows(manifest: Path) -> list[dict[str, str]]:
    if not manifest.is_file():
        raise SystemExit(f"benchmark data not found: {manifest} (set FEDFREEZE_SHARED_DATA)")
    with manifest.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _write_manifest(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient_id"])
        writer.writerows(rows)
    return path


def _take(patients: list[str], images: dict[str, list[dict[str, str]]], target: int, used: set[str]) -> list[str]:
    """Patients from ``patients`` (in order, skipping used ones) until ``target`` images are reached."""
    picked, count = [], 0
    for pid in patients:
        if count >= target:
            break
        if pid in used:
            continue
        picked.append(pid)
        used.add(pid)
        count += len(images[pid])
    if count < target:
        raise SystemExit(f"not enough patients for {target} images (got {count})")
    return picked


def make_split(work: Path, sizes: Sizes, seed: int) -> dict[str, Any]:
    """Write ``sites/<site>/manifest.csv``, ``held_out.csv`` and ``nih.csv`` under ``work``; returns
    what each holds. Held-out patients are drawn first at random (natural prevalence); each site then
    takes normal and pneumonia patients until it reaches its images and its share of normal ones."""
    rows = _read_rows(KERMANY / "manifest.csv")
    images: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        images.setdefault(r["patient_id"], []).append(r)
    label = {pid: rs[0]["label"] for pid, rs in images.items()}
    if any(len({r["label"] for r in rs}) > 1 for rs in images.values()):
        raise SystemExit("a Kermany patient has images of both classes: the split assumes one class per patient")
    rng = np.random.default_rng(seed)
    everyone = sorted(images)
    order = [everyone[i] for i in rng.permutation(len(everyone))]
    used: set[str] = set()
    held_out = _take(order, images, sizes.held_out, used)
    by_class = {c: [p for p in order if label[p] == c] for c in ("0", "1")}
    site_patients: dict[str, list[str]] = {}
    for name, n, normal_share in sizes.sites:
        n_normal = round(n * normal_share)
        site_patients[name] = _take(by_class["0"], images, n_normal, used) + _take(
            by_class["1"], images, n - n_normal, used
        )

    def rows_of(patients: list[str]) -> list[tuple[str, str, str]]:
        return [
            (str(KERMANY / r["path"]), r["label"], pid)
            for pid in sorted(patients)
            for r in sorted(images[pid], key=lambda r: r["path"])
        ]

    info: dict[str, Any] = {"seed": seed, "sizes": sizes.describe(), "sites": {}}
    for name, patients in site_patients.items():
        site_rows = rows_of(patients)
        _write_manifest(work / "sites" / name / "manifest.csv", site_rows)
        info["sites"][name] = _counts(site_rows)
    held_rows = rows_of(held_out)
    _write_manifest(work / "held_out.csv", held_rows)
    info["held_out"] = _counts(held_rows)

    nih_rows = [(str(NIH / r["path"]), r["label"], r["patient_id"]) for r in _read_rows(NIH / "manifest.csv")]
    if 0 < sizes.nih < len(nih_rows):  # a class-stratified sample of whole patients, for --quick
        nih_rng = np.random.default_rng(seed + 1)
        chosen = {c: [r for r in nih_rows if r[1] == c] for c in ("0", "1")}
        keep = []
        for members in chosen.values():
            keep += [members[i] for i in sorted(nih_rng.choice(len(members), size=sizes.nih // 2, replace=False))]
        nih_rows = keep
    _write_manifest(work / "nih.csv", nih_rows)
    info["nih"] = _counts(nih_rows)
    dev = set().union(*map(set, site_patients.values()))
    if dev & set(held_out):
        raise SystemExit("internal error: a held-out patient is also in a training site")
    (work / "split.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def _counts(rows: list[tuple[str, str, str]]) -> dict[str, int]:
    return {
        "images": len(rows),
        "patients": len({r[2] for r in rows}),
        "normal": sum(r[1] == "0" for r in rows),
        "pneumonia": sum(r[1] == "1" for r in rows),
    }


@dataclass
class EvalSet:
    """One benchmark set: model-ready images (uint8 [N, 3, S, S]), labels, and each image's patient."""

    name: str
    group: str  # "internal-like", "shifted" or "external"
    images: torch.Tensor
    labels: np.ndarray
    patient_ids: list[str]
    description: str


def _to_model_input(grey: np.ndarray, size: int) -> torch.Tensor:
    """Grey uint8 [N, H, W] resized like the loader does (PIL bilinear, antialiased), as 3 channels."""
    out = np.empty((len(grey), size, size), dtype=np.uint8)
    for i, image in enumerate(grey):
        pil = Image.fromarray(image, mode="L")
        if pil.size != (size, size):
            pil = pil.resize((size, size), Image.Resampling.BILINEAR)
        out[i] = np.asarray(pil)
    return torch.from_numpy(out)[:, None].expand(-1, 3, -1, -1).contiguous()


def load_sets(work: Path, input_size: int, seed: int) -> list[EvalSet]:
    """The held-out set as is, under each shift (applied at the stored 224 px), and NIH."""
    from fedfreeze.data.dataset import load_image_set

    held = load_image_set(work / "held_out.csv", image_size=224, channels=1, progress=False, outside_paths=True)
    grey = held.images[:, 0].numpy()
    labels = held.labels.numpy()
    sets = [
        EvalSet(
            HELD_OUT,
            "internal-like",
            _to_model_input(grey, input_size),
            labels,
            list(held.patient_ids),
            "held-out Kermany patients, as acquired",
        )
    ]
    for shift in SHIFTS:
        sets.append(
            EvalSet(
                shift.name,
                "shifted",
                _to_model_input(apply_shift(grey, shift.name, seed), input_size),
                labels,
                list(held.patient_ids),
                shift.description,
            )
        )
    nih = load_image_set(work / "nih.csv", image_size=input_size, channels=3, progress=False, outside_paths=True)
    sets.append(
        EvalSet(
            NIH_SET,
            "external",
            nih.images,
            nih.labels.numpy(),
            list(nih.patient_ids),
            "NIH ChestX-ray14 adults (another hospital and population), zero-shot",
        )
    )
    return sets

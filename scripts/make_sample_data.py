"""Build fedfreeze/sample_data/kermany_mini/ from the shared Kermany 224 px copy.

Picks whole patients with a fixed seed, copies their JPEGs byte for byte
(checking each md5 against the source manifest) and writes train.csv (300
images over three sites) and test.csv (100 held-out images from other
patients). Re-running with the same seed and source gives the same files.

    python scripts/make_sample_data.py [--source DIR] [--out DIR] [--seed N]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_SOURCE = Path("/work/shared/data/kermany_cxr_224")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "fedfreeze" / "sample_data" / "kermany_mini"
DEFAULT_SEED = 2018
MAX_IMAGES_PER_PATIENT = 3
LABEL_NAMES = {0: "normal", 1: "pneumonia"}

# bucket -> label -> (images, share of those images from patients with 2-3 images).
# Sites differ a little in size and prevalence, as real hospitals do.
PLAN: dict[str, dict[int, tuple[int, float]]] = {
    "test": {0: (50, 0.2), 1: (50, 0.2)},
    "site-a": {0: (48, 0.25), 1: (72, 0.5)},
    "site-b": {0: (45, 0.25), 1: (55, 0.5)},
    "site-c": {0: (27, 0.25), 1: (53, 0.5)},
}


@dataclass(frozen=True)
class Patient:
    patient_id: str
    label: int
    rows: tuple[dict[str, str], ...]


def load_patients(source: Path) -> dict[int, list[Patient]]:
    """Patients per label, leaving out those with byte-identical copies or more than 3 images."""
    with (source / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    copies = Counter(row["md5"] for row in rows)
    grouped: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        grouped[row["patient_id"]].append(row)
    by_label: dict[int, list[Patient]] = defaultdict(list)
    for patient_id in sorted(grouped):
        patient_rows = grouped[patient_id]
        labels = {int(row["label"]) for row in patient_rows}
        if len(labels) != 1 or len(patient_rows) > MAX_IMAGES_PER_PATIENT:
            continue
        if any(copies[row["md5"]] > 1 for row in patient_rows):
            continue
        by_label[labels.pop()].append(Patient(patient_id, int(patient_rows[0]["label"]), tuple(patient_rows)))
    return by_label


def allocate(by_label: dict[int, list[Patient]], seed: int) -> dict[str, list[Patient]]:
    """Fill each bucket with whole patients: first multi-image ones up to the share, then singles."""
    rng = np.random.default_rng(seed)
    buckets: dict[str, list[Patient]] = {name: [] for name in PLAN}
    for label, patients in sorted(by_label.items()):
        order = [patients[i] for i in rng.permutation(len(patients))]
        multi = [p for p in order if len(p.rows) > 1]
        single = [p for p in order if len(p.rows) == 1]
        for name, plan in PLAN.items():
            target, multi_share = plan[label]
            multi_target = round(target * multi_share)
            taken = 0
            while multi and taken + len(multi[0].rows) <= multi_target:
                patient = multi.pop(0)
                buckets[name].append(patient)
                taken += len(patient.rows)
            while taken < target:
                buckets[name].append(single.pop(0))
                taken += 1
    return buckets


def write_subset(source: Path, out: Path, buckets: dict[str, list[Patient]]) -> None:
    """Copy images and write train.csv / test.csv."""
    if out.exists():
        shutil.rmtree(out / "images", ignore_errors=True)
    for name in LABEL_NAMES.values():
        (out / "images" / name).mkdir(parents=True, exist_ok=True)
    train_rows, test_rows = [], []
    for bucket, patients in buckets.items():
        for patient in sorted(patients, key=lambda p: (p.label, p.patient_id)):
            for row in sorted(patient.rows, key=lambda r: r["path"]):
                relative = f"images/{LABEL_NAMES[patient.label]}/{Path(row['path']).name}"
                shutil.copyfile(source / row["path"], out / relative)
                digest = hashlib.md5((out / relative).read_bytes()).hexdigest()
                if digest != row["md5"]:
                    raise SystemExit(f"md5 mismatch for {row['path']}: {digest} != {row['md5']}")
                record = {
                    "path": relative,
                    "label": str(patient.label),
                    "label_name": LABEL_NAMES[patient.label],
                    "patient_id": patient.patient_id,
                }
                if bucket == "test":
                    test_rows.append(record)
                else:
                    train_rows.append({**record, "site": bucket})
    _write_csv(out / "train.csv", ["path", "label", "label_name", "patient_id", "site"], train_rows)
    _write_csv(out / "test.csv", ["path", "label", "label_name", "patient_id"], test_rows)


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def summary(buckets: dict[str, list[Patient]]) -> str:
    lines = []
    for name, patients in buckets.items():
        counts = Counter(p.label for p in patients for _ in p.rows)
        sizes = Counter(len(p.rows) for p in patients)
        lines.append(
            f"{name}: {sum(counts.values())} images ({counts[0]} normal / {counts[1]} pneumonia), "
            f"{len(patients)} patients (images per patient: {dict(sorted(sizes.items()))})"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args()
    buckets = allocate(load_patients(args.source), args.seed)
    write_subset(args.source, args.out, buckets)
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(summary(buckets))
    print(f"wrote {args.out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()

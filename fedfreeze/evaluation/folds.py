"""Folds of an experiment: repeated patient-level stratified k-fold *within every site*.

Every site keeps its own test fold (a hospital's patients are tested at that hospital), and every
arm of the experiment sees exactly the same folds. Within a site and a repeat:

1. each patient gets one *test image*, drawn at random (``test-images = "one-per-patient"``;
   with ``"all"`` every image of a test patient is tested); the patient's class is that image's
   label (``"all"``: the most frequent label of its images, the smaller on ties);
2. the patients of each class are shuffled and dealt to the k folds in turn, each class starting
   where the previous one stopped, so fold sizes differ by at most one;
3. with ``balance-test``, a test fold keeps as many patients of each class as its rarest class has
   (drawn at random); the surplus patients of that fold train instead, so no image is wasted and
   no patient is ever on both sides of a fold;
4. training uses every image of every patient not tested in that fold; the other images of a
   patient tested with one image are used by no one in that fold.

Draws are seeded by (seed, repeat, site name), so adding a site does not change another's folds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from fedfreeze.errors import DataError

TestImages = Literal["one-per-patient", "all"]


@dataclass(frozen=True, eq=False)
class SiteSplit:
    """One site's share of a fold: image indices (into the whole data set), sorted."""

    site: str
    train: np.ndarray
    test: np.ndarray


@dataclass(frozen=True, eq=False)
class ExperimentFold:
    """Fold ``fold`` of repeat ``repeat``: every site's training and test images."""

    repeat: int
    fold: int
    sites: dict[str, SiteSplit] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"r{self.repeat + 1}-f{self.fold + 1}"

    @property
    def train(self) -> np.ndarray:
        return np.sort(np.concatenate([s.train for s in self.sites.values()]))

    @property
    def test(self) -> np.ndarray:
        return np.sort(np.concatenate([s.test for s in self.sites.values()]))


def _stable_int(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def _majority(values: list[int]) -> int:
    return int(np.bincount(values).argmax())


def experiment_folds(
    labels: Sequence[int] | np.ndarray,
    patient_ids: Sequence[str],
    sites: Sequence[str],
    *,
    folds: int,
    repeats: int,
    seed: int,
    balance_test: bool = True,
    test_images: TestImages = "one-per-patient",
) -> list[ExperimentFold]:
    """Every (repeat, fold) with each site's patient-level, stratified, optionally balanced split."""
    y = np.asarray(labels).astype(np.int64)
    if not (len(y) == len(patient_ids) == len(sites)):
        raise DataError(f"experiment folds: {len(y)} labels, {len(patient_ids)} patient ids, {len(sites)} sites")
    if folds < 2 or repeats < 1:
        raise DataError(f"experiment folds: folds should be >= 2 and repeats >= 1, got {folds} and {repeats}")
    if test_images not in ("one-per-patient", "all"):
        raise DataError(f"experiment folds: test-images should be 'one-per-patient' or 'all', got {test_images!r}")
    site_names = sorted(set(sites))
    images_of: dict[str, dict[str, list[int]]] = {s: {} for s in site_names}
    for index, (pid, site) in enumerate(zip(patient_ids, sites, strict=True)):
        images_of[site].setdefault(str(pid), []).append(index)
    owners: dict[str, str] = {}
    for site in site_names:
        for pid in images_of[site]:
            if pid in owners:
                raise DataError(
                    f"patient {pid!r} has images at sites {owners[pid]!r} and {site!r}; "
                    "a patient must belong to one site"
                )
            owners[pid] = site

    result = [ExperimentFold(repeat=r, fold=k) for r in range(repeats) for k in range(folds)]
    for site in site_names:
        patients = sorted(images_of[site])
        for repeat in range(repeats):
            rng = np.random.default_rng([seed, repeat, _stable_int(site)])
            splits = _site_repeat(y, patients, images_of[site], site, folds, rng, balance_test, test_images)
            for k, split in enumerate(splits):
                result[repeat * folds + k].sites[site] = split
    return result


def _site_repeat(
    y: np.ndarray,
    patients: list[str],
    images_of: dict[str, list[int]],
    site: str,
    folds: int,
    rng: np.random.Generator,
    balance_test: bool,
    test_images: TestImages,
) -> list[SiteSplit]:
    if test_images == "one-per-patient":
        test_image = {pid: int(rng.choice(images_of[pid])) for pid in patients}
        patient_class = {pid: int(y[test_image[pid]]) for pid in patients}
    else:
        patient_class = {pid: _majority([int(y[i]) for i in images_of[pid]]) for pid in patients}
    classes = sorted(set(patient_class.values()))
    counts = {c: sum(1 for p in patients if patient_class[p] == c) for c in classes}
    if len(classes) < 2 or min(counts.values()) < folds:
        shown = ", ".join(f"class {c}: {n}" for c, n in counts.items())
        raise DataError(
            f"site {site!r}: {folds} test folds need at least {folds} patients of each of two "
            f"classes, but patients per class are {shown}; use fewer folds or more data"
        )
    fold_of: dict[str, int] = {}
    start = 0
    for c in classes:
        members = [patients[i] for i in rng.permutation(len(patients)) if patient_class[patients[i]] == c]
        for offset, pid in enumerate(members):
            fold_of[pid] = (start + offset) % folds
        start = (start + len(members)) % folds
    splits = []
    for k in range(folds):
        in_fold = [p for p in patients if fold_of[p] == k]
        tested = in_fold
        if balance_test:
            per_class = {c: [p for p in in_fold if patient_class[p] == c] for c in classes}
            keep = min(len(v) for v in per_class.values())
            tested = [p for c in classes for p in rng.permutation(per_class[c])[:keep].tolist()]
        tested_set = set(tested)
        train = [i for p in patients if p not in tested_set for i in images_of[p]]
        if test_images == "one-per-patient":
            test = [test_image[p] for p in tested]
        else:
            test = [i for p in tested for i in images_of[p]]
        splits.append(
            SiteSplit(
                site=site, train=np.array(sorted(train), dtype=np.int64), test=np.array(sorted(test), dtype=np.int64)
            )
        )
    return splits

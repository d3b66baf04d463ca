"""Patient-level splits: repeated stratified k-fold, and one train/validation split.

Images of one patient are correlated (same child, same visit), so they always
land on the same side of a split; otherwise test scores leak.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedfreeze.errors import DataError

LabelsLike = Sequence[int] | np.ndarray | torch.Tensor


@dataclass(frozen=True, eq=False)
class Fold:
    """One fold of one repeat: index arrays (sorted) into the ImageSet."""

    repeat: int
    fold: int
    train: np.ndarray
    test: np.ndarray


def patient_folds(labels: LabelsLike, patient_ids: Sequence[str], *, folds: int, repeats: int, seed: int) -> list[Fold]:
    """Repeated patient-level stratified k-fold (StratifiedGroupKFold, random_state=seed+repeat).

    Every image is tested exactly once per repeat; every test fold holds every
    class present in `labels`.
    """
    y, groups = _check_inputs(labels, patient_ids, "patient_folds")
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise DataError(f"patient_folds: folds should be an integer >= 2, got {folds!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise DataError(f"patient_folds: repeats should be an integer >= 1, got {repeats!r}")
    per_class = _patients_per_class(y, groups)
    if min(per_class.values()) < folds:
        raise DataError(
            f"patient_folds: folds={folds} needs at least {folds} patients in every class, "
            f"but patients per class are {_format_counts(per_class)}; use fewer folds or more data"
        )
    result: list[Fold] = []
    for repeat in range(repeats):
        from sklearn.model_selection import StratifiedGroupKFold  # here: a site's round never needs it

        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed + repeat)
        for fold, (train, test) in enumerate(splitter.split(np.zeros(len(y)), y, groups)):
            missing = sorted(set(per_class) - set(y[test].tolist()))
            if missing:
                raise DataError(
                    f"patient_folds: repeat {repeat} fold {fold} has no test image of class(es) {missing} "
                    f"(patients per class: {_format_counts(per_class)}, folds={folds}); use fewer folds"
                )
            result.append(Fold(repeat=repeat, fold=fold, train=np.sort(train), test=np.sort(test)))
    return result


def _stratified_pick(items: np.ndarray, strata: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` items drawn without replacement, each stratum in proportion to its size.

    Largest-remainder rounding; every stratum with at least two items gives at least one.
    """
    rng = np.random.default_rng(seed)
    values, sizes = np.unique(strata, return_counts=True)
    exact = sizes * count / len(items)
    take = np.floor(exact).astype(int)
    take = np.maximum(take, np.where(sizes >= 2, 1, 0))
    for i in np.argsort(-(exact - np.floor(exact))):
        if take.sum() >= count:
            break
        if take[i] < sizes[i] - (1 if sizes[i] >= 2 else 0):
            take[i] += 1
    while take.sum() > count:
        take[int(np.argmax(take))] -= 1
    picked = [rng.permutation(items[strata == value])[:k] for value, k in zip(values, take, strict=True)]
    return np.concatenate(picked) if picked else items[:0]


def split_patients(
    labels: LabelsLike, patient_ids: Sequence[str], *, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """One patient-level train/validation split, stratified by each patient's majority label.

    `test_fraction` is the share of patients (not images) on the validation
    side (rounded up). Returns sorted image indices (train, validation); both
    are non-empty and, when the data holds several classes, each holds all of
    them.
    """
    y, groups = _check_inputs(labels, patient_ids, "split_patients")
    if not isinstance(test_fraction, (int, float)) or isinstance(test_fraction, bool) or not 0 < test_fraction < 1:
        raise DataError(f"split_patients: test_fraction should be between 0 and 1 (exclusive), got {test_fraction!r}")
    patients = sorted(set(groups.tolist()))
    patient_label = np.array([_majority(y[groups == patient]) for patient in patients])
    classes = sorted(set(y.tolist()))
    n_patients = len(patients)
    n_val = math.ceil(test_fraction * n_patients)
    n_train = n_patients - n_val
    per_class = _patients_per_class(y, groups)
    where = (
        f"split_patients: {len(y)} images of {n_patients} patients (patients per class: {_format_counts(per_class)}) "
        f"with test_fraction={test_fraction} give {n_train} train / {n_val} validation patients"
    )
    if min(n_train, n_val) < max(1, len(classes)):
        raise DataError(f"{where}; each side needs at least {max(1, len(classes))} patient(s)")
    if len(classes) > 1:
        by_majority = {c: int((patient_label == c).sum()) for c in classes}
        if min(by_majority.values()) < 2:
            raise DataError(
                f"{where}; every class needs at least 2 patients (by majority label: {_format_counts(by_majority)})"
            )
    in_val = set(_stratified_pick(np.array(patients, dtype=object), patient_label, n_val, seed).tolist())
    is_val = np.array([patient in in_val for patient in groups.tolist()])
    train, val = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    for side, index in (("train", train), ("validation", val)):
        missing = sorted(set(classes) - set(y[index].tolist()))
        if missing:
            raise DataError(f"{where}; the {side} side got no image of class(es) {missing}")
    return train, val


def _check_inputs(labels: LabelsLike, patient_ids: Sequence[str], caller: str) -> tuple[np.ndarray, np.ndarray]:
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.ndim != 1 or (y.size and not np.issubdtype(y.dtype, np.integer)):
        raise DataError(f"{caller}: labels should be a 1-D integer array, got {y.dtype} {y.shape}")
    if len(patient_ids) != len(y):
        raise DataError(f"{caller}: {len(y)} labels but {len(patient_ids)} patient ids")
    if len(y) == 0:
        raise DataError(f"{caller}: no images to split")
    if y.min() < 0:
        raise DataError(f"{caller}: labels should be non-negative class indices, got {int(y.min())}")
    return y.astype(np.int64), np.array([str(p) for p in patient_ids], dtype=object)


def _patients_per_class(y: np.ndarray, groups: np.ndarray) -> dict[int, int]:
    """Distinct patients with at least one image of each class present."""
    return {int(c): len(set(groups[y == c].tolist())) for c in sorted(set(y.tolist()))}


def _majority(values: np.ndarray) -> int:
    """Most frequent label (smallest on ties)."""
    return int(np.bincount(values).argmax())


def _format_counts(counts: dict[int, int]) -> str:
    return ", ".join(f"class {c}: {n}" for c, n in counts.items())

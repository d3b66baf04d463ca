"""Patient-level k-fold and train/validation splits on the shipped subset's real patient ids."""

from __future__ import annotations

import numpy as np
import pytest

from fedfreeze.data import ImageSet, patient_folds, split_patients
from fedfreeze.errors import DataError


def patients(image_set: ImageSet, index: np.ndarray) -> set[str]:
    return {image_set.patient_ids[i] for i in index.tolist()}


def test_folds_are_patient_disjoint_and_cover_every_image(kermany_train: ImageSet) -> None:
    folds = patient_folds(kermany_train.labels, kermany_train.patient_ids, folds=5, repeats=3, seed=7)
    assert [(f.repeat, f.fold) for f in folds] == [(r, k) for r in range(3) for k in range(5)]
    overall = kermany_train.labels.float().mean().item()
    labels = kermany_train.labels.numpy()
    for repeat in range(3):
        tested = np.concatenate([f.test for f in folds if f.repeat == repeat])
        assert np.array_equal(np.sort(tested), np.arange(len(kermany_train)))  # each image tested exactly once
    for fold in folds:
        assert not patients(kermany_train, fold.train) & patients(kermany_train, fold.test)
        assert np.array_equal(np.sort(np.concatenate([fold.train, fold.test])), np.arange(len(kermany_train)))
        assert abs(labels[fold.test].mean() - overall) < 0.1  # stratification roughly kept
        assert set(labels[fold.test].tolist()) == {0, 1}


def test_repeats_differ_and_seed_reproduces(kermany_train: ImageSet) -> None:
    first = patient_folds(kermany_train.labels, kermany_train.patient_ids, folds=4, repeats=2, seed=1)
    again = patient_folds(kermany_train.labels, kermany_train.patient_ids, folds=4, repeats=2, seed=1)
    assert all(np.array_equal(a.test, b.test) for a, b in zip(first, again, strict=False))
    assert not np.array_equal(first[0].test, first[4].test)
    # repeat 1 with seed 1 is repeat 0 with seed 2
    shifted = patient_folds(kermany_train.labels, kermany_train.patient_ids, folds=4, repeats=1, seed=2)
    assert all(np.array_equal(a.test, b.test) for a, b in zip(first[4:], shifted, strict=False))


def test_multi_image_patients_stay_together(kermany_train: ImageSet) -> None:
    counts: dict[str, int] = {}
    for patient in kermany_train.patient_ids:
        counts[patient] = counts.get(patient, 0) + 1
    assert max(counts.values()) >= 2  # otherwise this test would prove nothing
    for fold in patient_folds(kermany_train.labels, kermany_train.patient_ids, folds=5, repeats=1, seed=0):
        test_patients = patients(kermany_train, fold.test)
        assert sum(counts[p] for p in test_patients) == len(fold.test)


def test_too_few_patients_per_class(kermany_train: ImageSet) -> None:
    labels = kermany_train.labels.numpy()
    normals = np.flatnonzero(labels == 0)
    first_three = list(dict.fromkeys(kermany_train.patient_ids[i] for i in normals.tolist()))[:3]
    keep = [i for i in normals.tolist() if kermany_train.patient_ids[i] in first_three]
    small = kermany_train.subset(np.concatenate([keep, np.flatnonzero(labels == 1)]))
    message = r"folds=5 needs at least 5 patients in every class, but patients per class are class 0: 3, class 1: \d+"
    with pytest.raises(DataError, match=message):
        patient_folds(small.labels, small.patient_ids, folds=5, repeats=1, seed=0)
    assert len(patient_folds(small.labels, small.patient_ids, folds=3, repeats=1, seed=0)) == 3


def test_fold_arguments_checked(kermany_train: ImageSet) -> None:
    with pytest.raises(DataError, match=r"folds should be an integer >= 2, got 1"):
        patient_folds(kermany_train.labels, kermany_train.patient_ids, folds=1, repeats=1, seed=0)
    with pytest.raises(DataError, match=r"repeats should be an integer >= 1, got 0"):
        patient_folds(kermany_train.labels, kermany_train.patient_ids, folds=2, repeats=0, seed=0)
    with pytest.raises(DataError, match=r"patient_folds: 300 labels but 2 patient ids"):
        patient_folds(kermany_train.labels, ["a", "b"], folds=2, repeats=1, seed=0)


def test_split_patients_is_disjoint_stratified_and_reproducible(kermany_train: ImageSet) -> None:
    train, val = split_patients(kermany_train.labels, kermany_train.patient_ids, test_fraction=0.2, seed=3)
    assert not patients(kermany_train, train) & patients(kermany_train, val)
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(kermany_train)))
    n_patients = len(set(kermany_train.patient_ids))
    assert len(patients(kermany_train, val)) == int(np.ceil(0.2 * n_patients))
    labels = kermany_train.labels.numpy()
    assert abs(labels[val].mean() - labels.mean()) < 0.1
    again = split_patients(kermany_train.labels, kermany_train.patient_ids, test_fraction=0.2, seed=3)
    assert np.array_equal(again[1], val)
    other = split_patients(kermany_train.labels, kermany_train.patient_ids, test_fraction=0.2, seed=4)
    assert not np.array_equal(other[1], val)


def test_split_patients_errors_name_sizes(kermany_train: ImageSet) -> None:
    labels = kermany_train.labels.numpy()
    tiny = kermany_train.subset([int(np.flatnonzero(labels == 0)[0]), *np.flatnonzero(labels == 1)[:2].tolist()])
    # The first two pneumonia images belong to one patient.
    message = r"3 images of 2 patients \(patients per class: class 0: 1, class 1: 1\) .* give 1 train / 1 validation"
    with pytest.raises(DataError, match=message):
        split_patients(tiny.labels, tiny.patient_ids, test_fraction=0.2, seed=0)
    with pytest.raises(DataError, match=r"test_fraction should be between 0 and 1 \(exclusive\), got 1"):
        split_patients(kermany_train.labels, kermany_train.patient_ids, test_fraction=1, seed=0)
    with pytest.raises(DataError, match=r"split_patients: no images to split"):
        split_patients([], [], test_fraction=0.2, seed=0)


def test_split_patients_with_one_class_only_needs_two_patients(kermany_train: ImageSet) -> None:
    normals = kermany_train.subset(kermany_train.labels == 0)
    train, val = split_patients(normals.labels, normals.patient_ids, test_fraction=0.25, seed=0)
    assert len(train) > 0 and len(val) > 0
    single = normals.subset([0])
    with pytest.raises(DataError, match=r"1 train / 1 validation|0 train / 1 validation"):
        split_patients(single.labels, single.patient_ids, test_fraction=0.25, seed=0)

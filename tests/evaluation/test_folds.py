"""Experiment folds on the shipped subset's real patients and sites: no leaks, balanced tests,
one image per patient."""

from __future__ import annotations

import csv
from collections import Counter

import numpy as np
import pytest

from fedfreeze.errors import DataError
from fedfreeze.evaluation.folds import experiment_folds
from fedfreeze.sample_data import kermany_mini


@pytest.fixture(scope="module")
def shipped():
    rows = list(csv.DictReader(kermany_mini("train").open()))
    labels = np.array([int(r["label"]) for r in rows])
    return labels, [r["patient_id"] for r in rows], [r["site"] for r in rows]


@pytest.fixture(scope="module")
def folds(shipped):
    labels, patients, sites = shipped
    return experiment_folds(labels, patients, sites, folds=3, repeats=2, seed=5)


def test_every_site_keeps_its_own_patient_disjoint_test_fold(shipped, folds):
    labels, patients, sites = shipped
    assert [(f.repeat, f.fold) for f in folds] == [(r, k) for r in range(2) for k in range(3)]
    for fold in folds:
        assert sorted(fold.sites) == ["site-a", "site-b", "site-c"]
        for site, split in fold.sites.items():
            assert {sites[i] for i in split.train} == {site} and {sites[i] for i in split.test} == {site}
            train_patients = {patients[i] for i in split.train}
            test_patients = {patients[i] for i in split.test}
            assert not train_patients & test_patients, f"{fold.name} {site}: a patient on both sides"
            assert set(labels[split.train].tolist()) == {0, 1}


def test_no_patient_is_tested_twice_in_a_repeat(shipped, folds):
    _, patients, _ = shipped
    for repeat in range(2):
        tested = [patients[i] for f in folds if f.repeat == repeat for i in f.test]
        assert len(tested) == len(set(tested))


def test_test_folds_are_balanced_with_one_image_per_patient(shipped, folds):
    labels, patients, _ = shipped
    assert max(Counter(patients).values()) > 1  # the data has patients with several images
    for fold in folds:
        for site, split in fold.sites.items():
            counts = Counter(labels[split.test].tolist())
            assert counts[0] == counts[1] > 0, (fold.name, site, counts)
            tested = [patients[i] for i in split.test]
            assert len(tested) == len(set(tested)), "one image per patient at test"


def test_test_image_varies_between_repeats_but_not_between_calls(shipped, folds):
    labels, patients, sites = shipped
    again = experiment_folds(labels, patients, sites, folds=3, repeats=2, seed=5)
    assert all(
        np.array_equal(a.test, b.test) and np.array_equal(a.train, b.train) for a, b in zip(folds, again, strict=False)
    )
    assert not np.array_equal(folds[0].test, folds[3].test)
    other_seed = experiment_folds(labels, patients, sites, folds=3, repeats=1, seed=6)
    assert not np.array_equal(folds[0].test, other_seed[0].test)


def test_unbalanced_all_images_option(shipped):
    labels, patients, sites = shipped
    folds = experiment_folds(labels, patients, sites, folds=3, repeats=1, seed=0, balance_test=False, test_images="all")
    # every image is tested exactly once per repeat, and a tested patient brings all its images
    tested = np.sort(np.concatenate([f.test for f in folds]))
    assert np.array_equal(tested, np.arange(len(labels)))
    for fold in folds:
        assert np.array_equal(np.sort(np.concatenate([fold.train, fold.test])), np.arange(len(labels)))


def test_too_few_patients_is_named():
    labels = [0, 0, 1, 1, 1, 1]
    with pytest.raises(DataError, match="site 'x': 3 test folds need at least 3 patients"):
        experiment_folds(labels, ["a", "b", "c", "d", "e", "f"], ["x"] * 6, folds=3, repeats=1, seed=0)
    with pytest.raises(DataError, match="patient 'a' has images at sites"):
        experiment_folds([0, 1], ["a", "a"], ["x", "y"], folds=2, repeats=1, seed=0)

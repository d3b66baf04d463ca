import numpy as np
import pytest

from fedfreeze.data.partition import assign_sites
from fedfreeze.errors import DataError


def data(n_patients=120, seed=0):
    rng = np.random.default_rng(seed)
    patients = [f"p{i}" for i in range(n_patients)]
    labels_by_patient = rng.integers(0, 2, n_patients)
    images_per = rng.integers(1, 4, n_patients)
    ids = [p for p, k in zip(patients, images_per, strict=False) for _ in range(k)]
    labels = np.array([labels_by_patient[int(p[1:])] for p in ids])
    return labels, ids


@pytest.mark.parametrize("alpha", [None, 0.5])
def test_every_patient_at_exactly_one_site(alpha):
    labels, ids = data()
    sites = assign_sites(labels, ids, 4, alpha=alpha, seed=1)
    owner = {}
    for pid, site in zip(ids, sites, strict=False):
        assert owner.setdefault(pid, site) == site
    for site in range(4):
        assert set(labels[sites == site]) == {0, 1}


def test_dirichlet_skews_labels_more_than_iid():
    labels, ids = data(400)

    def spread(sites):
        shares = [labels[sites == s].mean() for s in range(5)]
        return max(shares) - min(shares)

    iid = spread(assign_sites(labels, ids, 5, alpha=None, seed=2))
    skewed = spread(assign_sites(labels, ids, 5, alpha=0.3, seed=2))
    assert skewed > iid + 0.1


def test_too_few_patients_for_the_sites():
    labels, ids = data(12)
    with pytest.raises(DataError, match="too few for 10 sites"):
        assign_sites(labels, ids, 10, alpha=None, seed=0)

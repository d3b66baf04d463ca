"""``fedfreeze suggest``: one patient from each stratum of the score range, the same list for the same
seed, and a manifest the site fills in for ``adapt --labels use``."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from fedfreeze.adaptation.suggest import suggest_patients
from fedfreeze.cli import main
from fedfreeze.errors import ConfigError
from tests.adaptation.conftest import write_rows


def test_one_patient_per_stratum_deterministic_for_a_seed() -> None:
    rng = np.random.default_rng(0)
    scores = rng.random(300)
    pids = [f"p{i // 2}" for i in range(300)]  # 150 patients, two images each
    picked = suggest_patients(scores, pids, 10, seed=3)
    assert picked == suggest_patients(scores, pids, 10, seed=3)
    assert [p.patient_id for p in picked] != [p.patient_id for p in suggest_patients(scores, pids, 10, seed=4)]
    # patient scores (mean logit) sorted: each pick lies in its own tenth of the ranking
    z = np.log(scores / (1 - scores))
    means = {f"p{k}": z[2 * k : 2 * k + 2].mean() for k in range(150)}
    ranked = sorted(means, key=lambda p: (means[p], p))
    for p in picked:
        rank = ranked.index(p.patient_id)
        assert (p.stratum - 1) * 15 <= rank < p.stratum * 15
        assert len(p.images) == 2
    assert len({p.patient_id for p in picked}) == 10
    # the whole score range is covered: the lowest and the highest tenth each give one patient
    assert min(means[p.patient_id] for p in picked) <= means[ranked[14]]
    assert max(means[p.patient_id] for p in picked) >= means[ranked[135]]


def test_more_patients_than_the_site_holds_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"--n 5 is more patients than the site holds \(3\)"):
        suggest_patients(np.array([0.1, 0.2, 0.3]), ["a", "b", "c"], 5)


@pytest.mark.slow
def test_the_command_writes_a_manifest_to_fill_in(model_dir: Path, test_rows, tmp_path: Path, capsys) -> None:
    site = write_rows(tmp_path / "site.csv", test_rows, ["path", "patient_id"])
    out = tmp_path / "to-label.csv"
    args = ["suggest", "--model", str(model_dir), "--data", str(site), "--n", "12", "--out", str(out)]
    assert main(args) == 0
    rows = list(csv.DictReader(out.open()))
    assert len({r["patient_id"] for r in rows}) == 12 and all(r["label"] == "" for r in rows)
    assert all((out.parent / r["path"]).is_file() for r in rows)  # paths resolve from the written file
    assert main(args) == 2 and "exists; choose another file or --force" in capsys.readouterr().err
    assert main([*args[:-4], "--n", "500", "--out", str(tmp_path / "x.csv")]) == 2
    assert "more patients than the site holds (88)" in capsys.readouterr().err

"""EM prevalence: exact on calibrated synthetic posteriors, the likelihood's maximiser, and on real
images resampled to a known prevalence, through ``fedfreeze adapt``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from fedfreeze.adaptation.prevalence import em_prevalence, estimate_prevalence, likelihood_prevalence, logit
from fedfreeze.cli import main
from fedfreeze.evaluate import evaluate_model
from tests.adaptation.conftest import write_rows


def calibrated_scores(prevalence: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Cases x ~ N(+1, 1) (positive) or N(-1, 1): the exact posterior at a balanced prior is sigmoid(2x)."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < prevalence
    x = rng.normal(np.where(y, 1.0, -1.0), 1.0)
    return 1.0 / (1.0 + np.exp(-2.0 * x)), y


@pytest.mark.parametrize("prevalence", [0.1, 0.3, 0.75])
def test_em_recovers_the_prevalence_of_exact_posteriors(prevalence: float) -> None:
    scores, y = calibrated_scores(prevalence, 20000, seed=1)
    fit = em_prevalence(scores, train_prior=0.5)
    assert fit.converged
    # the sampling s.d. of the estimate is below 0.006 here; the naive mean score is far off
    assert fit.prevalence == pytest.approx(y.mean(), abs=0.02)
    assert abs(scores.mean() - y.mean()) > 0.02 or prevalence == 0.5


def test_em_uses_the_training_prior() -> None:
    scores, y = calibrated_scores(0.3, 20000, seed=2)
    # the same cases scored by a model trained at prior 0.8: posterior logit shifted by logit(0.8)
    shifted = 1.0 / (1.0 + np.exp(-(logit(scores) + logit(0.8))))
    assert em_prevalence(shifted, train_prior=0.8).prevalence == pytest.approx(
        em_prevalence(scores).prevalence, abs=1e-6
    )


def test_em_fixed_point_is_the_maximum_likelihood_prior() -> None:
    scores, _ = calibrated_scores(0.35, 500, seed=3)
    u, v = scores / 0.5, (1 - scores) / 0.5
    direct = minimize_scalar(
        lambda pi: -np.log(pi * u + (1 - pi) * v).sum(),
        bounds=(1e-9, 1 - 1e-9),
        method="bounded",
        options={"xatol": 1e-12},
    ).x
    assert em_prevalence(scores).prevalence == pytest.approx(direct, abs=1e-6)
    assert likelihood_prevalence(scores, np.ones((1, len(scores))), 0.5)[0] == pytest.approx(direct, abs=1e-9)
    # a weight of 2 is the same as the case listed twice (what a bootstrap replicate relies on)
    weights = np.ones(len(scores))
    weights[:100] = 2
    doubled = np.r_[scores, scores[:100]]
    assert likelihood_prevalence(scores, weights[None], 0.5)[0] == pytest.approx(
        em_prevalence(doubled).prevalence, abs=1e-6
    )


def test_bootstrap_resamples_patients_not_images() -> None:
    scores, _ = calibrated_scores(0.3, 200, seed=4)
    one_each = estimate_prevalence(scores, [str(i) for i in range(200)], replicates=400)
    # every image listed 5 times under its own patient: the same evidence, so the same interval;
    # counted as independent images it would shrink by sqrt(5)
    repeated = estimate_prevalence(np.repeat(scores, 5), [str(i) for i in np.repeat(np.arange(200), 5)], replicates=400)
    assert repeated.prevalence == pytest.approx(one_each.prevalence, abs=1e-6)
    width, width_repeated = one_each.ci_high - one_each.ci_low, repeated.ci_high - repeated.ci_low
    assert width_repeated == pytest.approx(width, rel=0.25)
    assert one_each.n_patients == repeated.n_patients == 200


def resample(rows: list[dict[str, str]], positives: int, negatives: int, seed: int) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    pos = [r for r in rows if r["label"] == "1"]
    neg = [r for r in rows if r["label"] == "0"]
    return [pos[i] for i in rng.choice(len(pos), positives, replace=False)] + [
        neg[i] for i in rng.choice(len(neg), negatives, replace=False)
    ]


@pytest.mark.slow
def test_adapt_estimates_known_prevalences_of_real_images(model_dir: Path, test_rows, tmp_path: Path) -> None:
    """kermany_mini/test.csv (50/50) resampled to ~20 % and ~80 % pneumonia, given to adapt without labels.

    Tolerance: the truth must lie inside the estimate's own 95 % patient-level bootstrap interval
    (about +/- 0.11 for 63 images), the interval adapt reports; EM's remaining error is the model's
    miscalibration, which that interval does not cover, so a badly calibrated model fails here.
    """
    estimates = {}
    for name, (positives, negatives) in {"low": (13, 50), "high": (50, 13)}.items():
        chosen = resample(test_rows, positives, negatives, seed=7)
        data = write_rows(tmp_path / f"{name}.csv", chosen, ["path", "patient_id"])
        out = tmp_path / f"adapted-{name}"
        assert (
            main(
                [
                    "adapt",
                    "--model",
                    str(model_dir),
                    "--data",
                    str(data),
                    "--out",
                    str(out),
                    "--quiet",
                    "--bootstrap",
                    "500",
                    "--allow-unverified",  # 63 images: fewer than the check needs to vouch
                ]
            )
            == 0
        )
        record = json.loads((out / "model.json").read_text())["adaptations"][-1]
        assert [c["vouched"] for c in record["checks"]] == [False] and "only 63 images" in record["checks"][0]["reason"]
        estimate = record["prevalence"]
        truth = positives / (positives + negatives)
        assert estimate["ci_low"] <= truth <= estimate["ci_high"], (name, truth, estimate)
        assert estimate["ci_high"] - estimate["ci_low"] < 0.3
        assert record["n_images"] == 63 and record["n_patients"] == len({r["patient_id"] for r in chosen})
        estimates[name] = estimate["prevalence"]
    assert estimates["low"] < 0.5 < estimates["high"]


@pytest.mark.slow
def test_prior_shift_keeps_decisions_and_accuracy_objective_moves_them(
    model_dir: Path, test_rows, test_set, test_scores, tmp_path: Path, capsys
) -> None:
    """Default objective: the threshold moves with the shift, so every decision (hence sensitivity and
    specificity) is the one the source model made; --objective accuracy puts it at 0.5."""
    chosen = resample(test_rows, 13, 50, seed=8)
    unlabelled = write_rows(tmp_path / "site.csv", chosen, ["path", "patient_id"])
    labelled = write_rows(tmp_path / "site-labelled.csv", chosen, ["path", "label", "patient_id"])
    kept, accurate = tmp_path / "kept", tmp_path / "accuracy"
    assert (
        main(
            [
                "adapt",
                "--model",
                str(model_dir),
                "--data",
                str(unlabelled),
                "--out",
                str(kept),
                "--quiet",
                "--bootstrap",
                "200",
                "--allow-unverified",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "estimated prevalence of 'pneumonia'" in printed and "every decision unchanged" in printed
    assert "NOT vouched for, stored anyway (--allow-unverified)" in printed
    assert (
        main(
            [
                "adapt",
                "--model",
                str(model_dir),
                "--data",
                str(unlabelled),
                "--out",
                str(accurate),
                "--quiet",
                "--bootstrap",
                "200",
                "--objective",
                "accuracy",
                "--allow-unverified",
            ]
        )
        == 0
    )
    card = json.loads((kept / "model.json").read_text())
    pi = card["adaptations"][-1]["prevalence"]["prevalence"]
    op = card["operating-points"]["site"]  # named after site.csv
    assert card["local-site"] == "site" and card["threshold"] == 0.4 and card["calibration"] is None
    assert op["evidence"] == "label-free-prevalence" and op["labels-used"] is False and op["promise"] is None
    shift = op["calibration"]["b"]
    assert op["calibration"]["method"] == "platt" and op["calibration"]["a"] == 1.0
    assert shift == pytest.approx(float(logit(pi) - logit(0.5)), abs=1e-12)
    assert op["threshold"] == pytest.approx(1 / (1 + np.exp(-(logit(0.4) + shift))))
    assert json.loads((accurate / "model.json").read_text())["operating-points"]["site"]["threshold"] == 0.5

    before = evaluate_model(model_dir, labelled, bootstrap=0)
    after = evaluate_model(kept, labelled, bootstrap=0)
    assert (after["tp"], after["fp"], after["tn"], after["fn"]) == (
        before["tp"],
        before["fp"],
        before["tn"],
        before["fn"],
    )
    assert after["auroc"] == pytest.approx(before["auroc"])
    # some raw scores lie between the old and the new threshold: had evaluate not applied the card's
    # calibration, their decisions would have changed
    position = {source: i for i, source in enumerate(test_set.sources)}
    raw = test_scores[[position[row["path"]] for row in chosen]]
    assert pi < 0.5 and np.any((raw >= op["threshold"]) & (raw < 0.4))
    # at ~20 % prevalence the Bayes rule for accuracy (posterior >= 0.5, i.e. raw >= sigmoid(-shift))
    # calls fewer cases positive than the stored threshold did
    assert (raw >= 1 / (1 + np.exp(shift))).sum() < (raw >= 0.4).sum()


@pytest.mark.slow
def test_the_check_vouches_for_em_where_only_the_class_mix_changed(model_dir: Path, tmp_path: Path, capsys) -> None:
    """kermany_mini/train (300 images) is what the fixture's reference scores come from: its scores fit
    a reference mixture, so EM runs without --allow-unverified and the record says it was vouched for."""
    import csv

    from fedfreeze.sample_data import kermany_mini

    manifest = kermany_mini("train")
    with manifest.open(newline="") as handle:
        rows = [{**r, "path": str(manifest.parent / r["path"])} for r in csv.DictReader(handle)]
    data = write_rows(tmp_path / "site.csv", rows, ["path", "patient_id"])
    out = tmp_path / "adapted"
    assert (
        main(
            [
                "adapt",
                "--model",
                str(model_dir),
                "--data",
                str(data),
                "--out",
                str(out),
                "--quiet",
                "--bootstrap",
                "100",
            ]
        )
        == 0
    )
    assert "check: prevalence (EM) vouched for" in capsys.readouterr().out
    record = json.loads((out / "model.json").read_text())["adaptations"][-1]
    assert [c["vouched"] for c in record["checks"]] == [True]

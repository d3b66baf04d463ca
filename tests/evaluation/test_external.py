"""External validation: contract metrics, patient-level bootstrap, threshold analysis, one-class sets."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, roc_auc_score

from fedfreeze.errors import DataError
from fedfreeze.evaluation.calibration import expected_calibration_error, reliability_table
from fedfreeze.evaluation.external import external_validation, patient_strata
from fedfreeze.metrics import METRIC_KEYS, binary_metrics, classification_metrics, youden_threshold

CONTRACT = ("auroc", "balanced_accuracy", "f1", "sensitivity", "specificity", "threshold", "n", "tp", "fp", "tn", "fn")


def _set(rng: np.random.Generator, patients: int = 60, images_per_patient: int = 2):
    """Patients with one label each and several images, scores correlated within a patient."""
    patient_label = rng.integers(0, 2, patients)
    patient_level = 0.3 * patient_label + 0.5 * rng.random(patients)
    labels = np.repeat(patient_label, images_per_patient)
    scores = np.clip(np.repeat(patient_level, images_per_patient) + 0.2 * rng.random(len(labels)), 0, 1)
    ids = np.repeat([f"P{i:03d}" for i in range(patients)], images_per_patient)
    return labels, scores, ids


def test_contract_metrics_equal_classification_metrics(rng):
    labels, scores, ids = _set(rng)
    result = external_validation(labels, scores, ids, 0.42, bootstrap=50)
    expected = classification_metrics(labels, scores, 0.42)
    assert {key: result[key] for key in CONTRACT} == expected
    assert result["auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert result["n_patients"] == 60 and result["n"] == 120
    assert result["undefined"] == [] and result["single_class"] is None


def test_calibration_section_matches_the_calibration_module(rng):
    labels, scores, ids = _set(rng)
    calibration = external_validation(labels, scores, ids, 0.5, bootstrap=0)["calibration"]
    assert calibration["brier"] == pytest.approx(brier_score_loss(labels, scores))
    assert calibration["ece"] == pytest.approx(expected_calibration_error(labels, scores))
    assert calibration["reliability"] == reliability_table(labels, scores)
    assert calibration["mean_score"] == pytest.approx(scores.mean())
    assert "10 equal-width" in calibration["ece_definition"]


def test_interval_contains_the_point_estimate_and_is_reproducible(rng):
    labels, scores, ids = _set(rng, patients=80)
    result = external_validation(labels, scores, ids, 0.45, bootstrap=400, seed=3)
    ci = result["ci"]
    for key in METRIC_KEYS:
        low, high = ci[key]
        assert low <= result[key] <= high, (key, low, result[key], high)
        assert high - low > 0.0, key
    low, high = ci["brier"]
    assert low <= result["calibration"]["brier"] <= high
    assert ci["replicates"] == 400 and ci["confidence"] == 0.95
    again = external_validation(labels, scores, ids, 0.45, bootstrap=400, seed=3)["ci"]
    other = external_validation(labels, scores, ids, 0.45, bootstrap=400, seed=4)["ci"]
    assert again == ci
    assert other["auroc"] != ci["auroc"]


def test_a_patients_images_move_together(rng):
    """Duplicating every image inside its patient leaves a patient-level interval unchanged; giving
    the copies their own patient ids (what an image-level bootstrap assumes) narrows it."""
    labels, scores, ids = _set(rng, patients=50, images_per_patient=1)
    one = external_validation(labels, scores, ids, 0.45, bootstrap=500)["ci"]
    twice = external_validation(np.repeat(labels, 2), np.repeat(scores, 2), np.repeat(ids, 2), 0.45, bootstrap=500)[
        "ci"
    ]
    split_ids = [f"{p}-{copy}" for p in ids for copy in ("a", "b")]
    split = external_validation(np.repeat(labels, 2), np.repeat(scores, 2), split_ids, 0.45, bootstrap=500)["ci"]
    for key in (*METRIC_KEYS, "brier", "ece"):
        assert twice[key] == pytest.approx(one[key], abs=1e-12), key
    width = {name: ci["auroc"][1] - ci["auroc"][0] for name, ci in (("one", one), ("split", split))}
    assert width["split"] < 0.85 * width["one"], width


def test_patient_strata_by_class_with_a_mixed_patient():
    labels = np.array([0, 0, 1, 1, 0, 1])
    units = np.array([0, 0, 1, 2, 2, 3])  # patient 2 has a normal and a pneumonia image
    assert patient_strata(labels, units, 4).tolist() == ["0", "1", "mixed", "1"]


def test_threshold_analysis_rows(rng):
    labels, scores, ids = _set(rng)
    analysis = external_validation(labels, scores, ids, 0.37, bootstrap=0)["thresholds"]
    rows = {row["name"]: row for row in analysis["rows"]}
    assert list(rows) == ["stored", "0.5", "youden_on_this_set"]
    for name, threshold in (("stored", 0.37), ("0.5", 0.5), ("youden_on_this_set", youden_threshold(labels, scores))):
        expected = binary_metrics(labels, scores, threshold)
        assert rows[name]["threshold"] == pytest.approx(threshold)
        for key in ("sensitivity", "specificity", "balanced_accuracy", "f1", "tp", "fp", "tn", "fn"):
            assert rows[name][key] == expected[key], (name, key)
    assert "diagnostic only" in rows["youden_on_this_set"]["note"]
    assert "fitted to the data it is scored on" in rows["youden_on_this_set"]["note"]
    # Youden's row is the best balanced accuracy this set allows
    assert rows["youden_on_this_set"]["balanced_accuracy"] >= max(
        rows["stored"]["balanced_accuracy"], rows["0.5"]["balanced_accuracy"]
    )


def test_score_summary_per_class(rng):
    labels, scores, ids = _set(rng)
    summaries = external_validation(labels, scores, ids, 0.5, bootstrap=0)["score_summary"]
    for summary, label in zip(summaries, (0, 1), strict=False):
        mine = scores[labels == label]
        assert summary["label"] == label and summary["n"] == len(mine)
        assert summary["mean"] == pytest.approx(mine.mean())
        assert summary["median"] == pytest.approx(np.median(mine))
        assert summary["q25"] == pytest.approx(np.quantile(mine, 0.25))
        assert summary["histogram_counts"] == np.histogram(mine, bins=20, range=(0, 1))[0].tolist()


def test_one_class_reports_what_is_defined(rng):
    scores = rng.random(30)
    ids = [f"N{i // 3}" for i in range(30)]
    result = external_validation(np.zeros(30, dtype=int), scores, ids, 0.4, bootstrap=100)
    assert result["single_class"] == 0
    assert result["undefined"] == ["auroc", "balanced_accuracy", "f1", "sensitivity"]
    for key in result["undefined"]:
        assert result[key] is None and result["ci"][key] is None
    assert result["specificity"] == pytest.approx(np.mean(scores < 0.4))
    assert result["tn"] + result["fp"] == 30 and result["tp"] == result["fn"] == 0
    low, high = result["ci"]["specificity"]
    assert low <= result["specificity"] <= high
    assert result["calibration"]["brier"] == pytest.approx(brier_score_loss(np.zeros(30), scores))
    assert result["calibration"]["mean_score"] == pytest.approx(scores.mean())
    assert [row["name"] for row in result["thresholds"]["rows"]] == ["stored", "0.5"]  # no Youden with one class
    positives = external_validation(np.ones(30, dtype=int), scores, ids, 0.4, bootstrap=0)
    assert positives["single_class"] == 1 and positives["specificity"] is None
    assert positives["sensitivity"] == pytest.approx(np.mean(scores >= 0.4))


def test_bootstrap_zero_turns_intervals_off(rng):
    labels, scores, ids = _set(rng)
    assert external_validation(labels, scores, ids, 0.5, bootstrap=0)["ci"] is None


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"scores": np.full((4, 2), 0.5)}, r"1-D positive-class scores .*shape \(4, 2\)"),
        ({"scores": np.array([0.1, 0.2, 1.2, 0.3])}, r"scores in \[0, 1\] .*got 1.2 at case 2"),
        ({"labels": np.array([0, 1, 2, 1])}, r"binary labels 0/1, got \[0, 1, 2\]"),
        ({"patient_ids": ["a", "b"]}, "one label and one patient id per score"),
        ({"threshold": 1.0}, r"threshold should be in \(0, 1\), got 1.0"),
        ({"bootstrap": -5}, "bootstrap replicates should be 0 .* got -5"),
        ({"confidence": 95}, r"confidence should be in \(0, 1\), got 95"),
    ],
)
def test_bad_input_is_rejected(change, match):
    args = {
        "labels": np.array([0, 1, 0, 1]),
        "scores": np.array([0.1, 0.8, 0.3, 0.6]),
        "patient_ids": ["a", "b", "c", "d"],
        "threshold": 0.5,
        "bootstrap": 10,
        "confidence": 0.95,
    }
    args.update(change)
    with pytest.raises(DataError, match=match):
        external_validation(
            args.pop("labels"), args.pop("scores"), args.pop("patient_ids"), args.pop("threshold"), **args
        )

"""``fedfreeze adapt`` end to end: labelled recalibration, the written folder, and every rejected input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedfreeze import __version__
from fedfreeze.cli import main
from fedfreeze.config import ModelConfig
from fedfreeze.data.dataset import load_image_set
from fedfreeze.evaluate import evaluate_model
from fedfreeze.model_io import load_model, make_card, save_model
from fedfreeze.models.registry import build_model
from fedfreeze.training.engine import predict_scores
from tests.adaptation.conftest import CLASSES, SIZE, STORED_THRESHOLD, write_rows


def split_by_patient(rows: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Alternate patients (sorted by id) into a fitting half and a held-out half."""
    patients = sorted({r["patient_id"] for r in rows})
    fitting = set(patients[::2])
    return [r for r in rows if r["patient_id"] in fitting], [r for r in rows if r["patient_id"] not in fitting]


def test_labelled_adaptation_is_recorded_and_applied_by_evaluate(
    model_dir: Path, test_rows, tmp_path: Path, capsys
) -> None:
    fitting, held_out = split_by_patient(test_rows)
    fit_csv = write_rows(tmp_path / "fit.csv", fitting, ["path", "label", "patient_id"])
    held_csv = write_rows(tmp_path / "held.csv", held_out, ["path", "label", "patient_id"])
    out = tmp_path / "adapted"
    code = main(
        [
            "adapt",
            "--model",
            str(model_dir),
            "--data",
            str(fit_csv),
            "--out",
            str(out),
            "--quiet",
            "--calibrate",
            "platt",
            "--threshold-rule",
            "target-sensitivity",
            "--target-sensitivity",
            "0.9",
            "--bootstrap",
            "300",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "optimistic" in printed.lower() and "Platt scaling a =" in printed and "target sensitivity 0.9" in printed

    model, card = load_model(out)  # loads like any model folder
    record = card.adaptations[-1]
    assert record["kind"] == "recalibration-platt+threshold-target-sensitivity"
    assert record["source_model"] == str(model_dir.resolve())
    assert record["source_weights_sha256"] == hashlib.sha256((model_dir / "weights.pt").read_bytes()).hexdigest()
    assert record["data"] == str(fit_csv.resolve()) and record["labels_used"] is True
    assert record["n_images"] == len(fitting) and record["n_patients"] == len({r["patient_id"] for r in fitting})
    assert record["fedfreeze_version"] == __version__ and record["date_utc"].endswith("+00:00")
    fit = record["recalibration"]
    assert fit["threshold_ci"][0] <= fit["threshold"] <= fit["threshold_ci"][1]
    assert fit["log_loss_after"] < fit["log_loss_before"]
    assert card.calibration is not None and card.calibration.method == "platt"
    assert (card.calibration.a, card.calibration.b) == pytest.approx((fit["a"], fit["b"]))
    assert card.threshold == pytest.approx(fit["threshold"]) and card.threshold != STORED_THRESHOLD

    # evaluate scores the held-out patients through the card's calibration and threshold
    held = load_image_set(held_csv, image_size=SIZE, channels=3, class_names=CLASSES, progress=False)
    raw = predict_scores(model, held.images, torch.device("cpu"))
    decided = card.calibration.apply(raw) >= card.threshold
    y = held.labels.numpy() == 1
    result = evaluate_model(out, held_csv, bootstrap=0)
    assert (result["tp"], result["fp"]) == (int((decided & y).sum()), int((decided & ~y).sum()))
    calibrated_mean = float(card.calibration.apply(raw).mean())
    assert result["calibration"]["mean_score"] == pytest.approx(calibrated_mean, abs=1e-6)
    assert abs(calibrated_mean - float(raw.mean())) > 1e-3  # so the check above could fail
    assert result["threshold"] == pytest.approx(card.threshold)


def test_a_second_adaptation_composes_with_the_first(model_dir: Path, test_rows, tmp_path: Path) -> None:
    fitting, _ = split_by_patient(test_rows)
    first, second = tmp_path / "first", tmp_path / "second"
    labelled = write_rows(tmp_path / "fit.csv", fitting, ["path", "label", "patient_id"])
    assert (
        main(
            [
                "adapt",
                "--model",
                str(model_dir),
                "--data",
                str(labelled),
                "--out",
                str(first),
                "--quiet",
                "--bootstrap",
                "50",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "adapt",
                "--model",
                str(first),
                "--data",
                str(labelled),
                "--out",
                str(second),
                "--quiet",
                "--bootstrap",
                "50",
            ]
        )
        == 0
    )
    one, two = json.loads((first / "model.json").read_text()), json.loads((second / "model.json").read_text())
    assert [a["kind"] for a in two["adaptations"]] == ["recalibration-temperature+threshold-youden"] * 2
    assert two["adaptations"][1]["source_model"] == str(first.resolve())
    # temperature scaling refitted on the same cases after itself finds nothing more to do
    assert two["adaptations"][1]["recalibration"]["a"] == pytest.approx(1.0, abs=1e-6)
    assert two["calibration"]["a"] == pytest.approx(one["calibration"]["a"], rel=1e-6)


@pytest.fixture(scope="module")
def three_class_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(weights="none", input_size=32, num_classes=3)
    model, _ = build_model(cfg)
    return save_model(tmp_path_factory.mktemp("mc") / "m", model, make_card(model, cfg))


def run(args: list[str], capsys) -> tuple[int, str]:
    code = main(["adapt", *args])
    return code, capsys.readouterr().err


def test_bad_inputs_exit_2_with_one_line(
    model_dir: Path, test_rows, tmp_path: Path, three_class_model: Path, capsys
) -> None:
    unlabelled = write_rows(tmp_path / "u.csv", test_rows[::4], ["path", "patient_id"])
    labelled = write_rows(tmp_path / "l.csv", test_rows[::4], ["path", "label", "patient_id"])
    empty = write_rows(tmp_path / "empty.csv", [], ["path", "patient_id"])
    out = str(tmp_path / "out")
    m = str(model_dir)
    cases = {
        "empty manifest": (
            ["--model", m, "--data", str(empty), "--out", out],
            r"empty\.csv is empty: it has a header but no rows",
        ),
        "labels requested": (
            ["--model", m, "--data", str(unlabelled), "--out", out, "--labels", "use"],
            rf"labels requested but {unlabelled} has no label column",
        ),
        "not a model folder": (
            ["--model", str(tmp_path), "--data", str(unlabelled), "--out", out],
            r"is not a model folder: model\.json is missing",
        ),
        "multi-class EM": (
            ["--model", str(three_class_model), "--data", str(unlabelled), "--out", out],
            r"has 3 classes: prevalence estimation \(EM\) is for binary models only",
        ),
        "multi-class labels": (
            ["--model", str(three_class_model), "--data", str(labelled), "--out", out],
            r"has 3 classes: recalibration and threshold choice are for binary models only",
        ),
        "labelled option without labels": (
            ["--model", m, "--data", str(unlabelled), "--out", out, "--calibrate", "platt"],
            r"--calibrate do\(es\) not apply here: no labels are used",
        ),
        "unlabelled option with labels": (
            ["--model", m, "--data", str(labelled), "--out", out, "--objective", "accuracy"],
            r"--objective do\(es\) not apply here: the labelled cases are used",
        ),
        "nothing to do": (
            ["--model", m, "--data", str(unlabelled), "--out", out, "--prevalence", "none"],
            r"nothing to adapt",
        ),
        "out is the source": (
            ["--model", m, "--data", str(unlabelled), "--out", m],
            r"is the --model folder: write to a new folder",
        ),
        "train prior": (
            ["--model", m, "--data", str(unlabelled), "--out", out, "--train-prior", "1.5"],
            r"--train-prior should be a prevalence strictly between 0 and 1, got 1\.5",
        ),
    }
    for name, (args, message) in cases.items():
        code, err = run(args, capsys)
        assert code == 2, name
        assert err.startswith("fedfreeze adapt: error: ") and err.count("\n") == 1, (name, err)
        assert __import__("re").search(message, err), (name, err)
    assert not Path(out).exists()  # nothing written by a refused run


def test_multi_class_model_can_reestimate_batchnorm_alone(three_class_model: Path, test_rows, tmp_path: Path) -> None:
    data = write_rows(tmp_path / "u.csv", test_rows[::4], ["path", "patient_id"])
    out = tmp_path / "adapted"
    assert (
        main(
            [
                "adapt",
                "--model",
                str(three_class_model),
                "--data",
                str(data),
                "--out",
                str(out),
                "--quiet",
                "--bn",
                "reestimate",
                "--prevalence",
                "none",
            ]
        )
        == 0
    )
    _, card = load_model(out)
    assert card.adaptations[-1]["kind"] == "batchnorm-statistics" and card.calibration is None
    assert np.isclose(card.threshold, load_model(three_class_model)[1].threshold)

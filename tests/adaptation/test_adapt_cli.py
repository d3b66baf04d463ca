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
from fedfreeze.model_io import load_model, make_card, model_sha256, save_model
from fedfreeze.models.registry import build_model
from fedfreeze.training.engine import predict_scores
from tests.adaptation.conftest import CLASSES, SIZE, STORED_THRESHOLD, write_rows

pytestmark = pytest.mark.slow  # its tests share a trained model folder, minutes to make on 2 cores


def split_by_patient(rows: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Alternate patients (sorted by id) into a fitting half and a held-out half."""
    patients = sorted({r["patient_id"] for r in rows})
    fitting = set(patients[::2])
    return [r for r in rows if r["patient_id"] in fitting], [r for r in rows if r["patient_id"] not in fitting]


def adapt(args: list[str]) -> int:
    return main(["adapt", *args])


def test_labelled_adaptation_makes_a_site_operating_point_that_evaluate_uses(
    model_dir: Path, test_rows, tmp_path: Path, capsys
) -> None:
    fitting, held_out = split_by_patient(test_rows)
    fit_csv = write_rows(tmp_path / "fit.csv", fitting, ["path", "label", "patient_id"])
    held_csv = write_rows(tmp_path / "held.csv", held_out, ["path", "label", "patient_id"])
    out = tmp_path / "adapted"
    code = adapt(
        [
            "--model",
            str(model_dir),
            "--data",
            str(fit_csv),
            "--out",
            str(out),
            "--site",
            "site-x",
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
    assert "OPTIMISTIC" in printed and "Platt scaling a =" in printed and "target-sensitivity 0.9" in printed
    assert "promised on patients the fit did not use" in printed and "operating point of site 'site-x'" in printed

    model, card = load_model(out)  # loads like any model folder
    record = card.adaptations[-1]
    assert record["kind"] == "recalibration-platt+threshold-target-sensitivity" and record["site"] == "site-x"
    assert record["source_model"] == str(model_dir.resolve())
    assert record["source_weights_sha256"] == hashlib.sha256((model_dir / "weights.pt").read_bytes()).hexdigest()
    assert record["data"] == str(fit_csv.resolve()) and record["labels_used"] is True
    assert record["n_images"] == len(fitting) and record["n_patients"] == len({r["patient_id"] for r in fitting})
    assert record["fedfreeze_version"] == __version__ and record["date_utc"].endswith("+00:00")
    fit = record["recalibration"]
    assert fit["threshold_ci"][0] <= fit["threshold"] <= fit["threshold_ci"][1]
    assert fit["log_loss_after"] < fit["log_loss_before"]
    # the site's operating point holds the fit; the global threshold and calibration stay as training left them
    assert card.threshold == pytest.approx(STORED_THRESHOLD) and card.calibration is None
    assert card.local_site == "site-x" and set(card.operating_points) == {"site-x"}
    op = card.operating_points["site-x"]
    assert op.threshold == pytest.approx(fit["threshold"]) and op.threshold != STORED_THRESHOLD
    assert op.calibration is not None and op.calibration.method == "platt"
    assert (op.calibration.a, op.calibration.b) == pytest.approx((fit["a"], fit["b"]))
    assert op.model_sha256 == model_sha256(model) and op.labels_used and op.evidence == "labelled-patients"
    assert op.promise is not None and op.promise.balanced_accuracy == pytest.approx(
        fit["out_of_bootstrap_balanced_accuracy"]
    )
    assert op.n_positive_patients + op.n_negative_patients == op.n_patients

    # evaluate scores the held-out patients through the site's calibration and threshold
    held = load_image_set(held_csv, image_size=SIZE, channels=3, class_names=CLASSES, progress=False)
    raw = predict_scores(model, held.images, torch.device("cpu"))
    decided = op.calibration.apply(raw) >= op.threshold
    y = held.labels.numpy() == 1
    result = evaluate_model(out, held_csv, bootstrap=0)
    assert (result["tp"], result["fp"]) == (int((decided & y).sum()), int((decided & ~y).sum()))
    calibrated_mean = float(op.calibration.apply(raw).mean())
    assert result["calibration"]["mean_score"] == pytest.approx(calibrated_mean, abs=1e-6)
    assert abs(calibrated_mean - float(raw.mean())) > 1e-3  # so the check above could fail
    assert result["threshold"] == pytest.approx(op.threshold)
    assert result["operating_point"]["site"] == "site-x" and result["operating_point"]["validated_at_site"]


def test_a_second_site_adds_its_own_operating_point(model_dir: Path, test_rows, tmp_path: Path) -> None:
    fitting, held_out = split_by_patient(test_rows)
    first, second = tmp_path / "first", tmp_path / "second"
    a = write_rows(tmp_path / "a.csv", fitting, ["path", "label", "patient_id"])
    b = write_rows(tmp_path / "b.csv", held_out, ["path", "label", "patient_id"])
    common = ["--quiet", "--bootstrap", "50"]
    assert adapt(["--model", str(model_dir), "--data", str(a), "--out", str(first), "--site", "a", *common]) == 0
    assert adapt(["--model", str(first), "--data", str(b), "--out", str(second), *common]) == 0  # named after b.csv
    one, two = json.loads((first / "model.json").read_text()), json.loads((second / "model.json").read_text())
    assert [x["kind"] for x in two["adaptations"]] == ["recalibration-temperature+threshold-binormal"] * 2
    assert two["adaptations"][1]["source_model"] == str(first.resolve())
    assert set(two["operating-points"]) == {"a", "b"} and two["local-site"] == "b"
    assert two["operating-points"]["a"] == one["operating-points"]["a"]  # the first site's point is kept as it was
    assert two["calibration"] is None and two["threshold"] == one["threshold"] == STORED_THRESHOLD


def test_a_head_refit_changes_the_head_and_runs_at_one_half(model_dir: Path, test_rows, tmp_path: Path) -> None:
    fitting, held_out = split_by_patient(test_rows)
    fit_csv = write_rows(tmp_path / "fit.csv", fitting, ["path", "label", "patient_id"])
    out = tmp_path / "refit"
    assert (
        adapt(
            [
                "--model",
                str(model_dir),
                "--data",
                str(fit_csv),
                "--out",
                str(out),
                "--refit",
                "head",
                "--quiet",
                "--bootstrap",
                "30",
                "--site",
                "s",
            ]
        )
        == 0
    )
    source, _ = load_model(model_dir)
    model, card = load_model(out)
    before, after = source.state_dict(), model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["head.fc.bias", "head.fc.weight"]  # only the head moved
    op = card.operating_points["s"]
    assert op.threshold == 0.5 and op.model_sha256 == model_sha256(model) and op.promise is not None
    assert card.adaptations[-1]["kind"] == "head-refit" and card.calibration is None


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
    one_class = write_rows(
        tmp_path / "one.csv", [r for r in test_rows if r["label"] == "0"][:12], ["path", "label", "patient_id"]
    )
    by_class = {c: [r for r in test_rows if r["label"] == c] for c in ("0", "1")}
    few_rows = []
    for rows in by_class.values():
        patients = sorted({r["patient_id"] for r in rows})[:3]
        few_rows += [r for r in rows if r["patient_id"] in patients]
    few = write_rows(tmp_path / "few.csv", few_rows, ["path", "label", "patient_id"])
    model, card = load_model(model_dir)
    no_reference = save_model(tmp_path / "no-ref", model, card.model_copy(update={"reference_scores": None}))
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
        "one class labelled": (
            ["--model", m, "--data", str(one_class), "--out", out],
            r"need labelled cases of both classes",
        ),
        "too few patients of a class": (
            ["--model", m, "--data", str(few), "--out", out],
            r"needs at least 5 labelled patients of each class; got 3 negative and 3 positive",
        ),
        "label-free on a small site": (
            ["--model", m, "--data", str(unlabelled), "--out", out],
            r"refused prevalence \(EM\) at this site, nothing written: only 25 images: at least 150 are needed",
        ),
        "label-free without a reference": (
            ["--model", str(no_reference), "--data", str(unlabelled), "--out", out],
            r"refused prevalence \(EM\) at this site, nothing written: the model folder holds no reference scores",
        ),
        "AdaBN on a small site": (
            ["--model", m, "--data", str(unlabelled), "--out", out, "--bn", "reestimate", "--prevalence", "none"],
            r"refused BatchNorm re-estimation \(AdaBN\) at this site, nothing written",
        ),
        "refit with a threshold rule": (
            ["--model", m, "--data", str(labelled), "--out", out, "--refit", "head", "--threshold-rule", "youden"],
            r"--calibrate and --threshold-rule do not apply with --refit head",
        ),
        "empty site name": (
            ["--model", m, "--data", str(labelled), "--out", out, "--site", " "],
            r"--site should be a non-empty name",
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

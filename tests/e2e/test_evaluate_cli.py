"""``fedfreeze evaluate`` as a hospital runs it: intervals, calibration, report files, one-class data."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import brier_score_loss

from fedfreeze.cli import main
from fedfreeze.data.dataset import load_image_set
from fedfreeze.metrics import classification_metrics
from fedfreeze.model_io import CARD_FILE, ScoreCalibration, load_model, model_scores, read_card
from fedfreeze.sample_data import kermany_mini
from fedfreeze.training.engine import predict_scores
from tests.shipped import beside

pytestmark = pytest.mark.slow  # each test runs, or shares, a federation or a trained model

PROBE_ONLY = """
[model]
input-size = 96
[train]
probe-epochs = 3
epochs = 0
[cv]
folds = 2
"""
CONTRACT = ("auroc", "balanced_accuracy", "f1", "sensitivity", "specificity", "n", "threshold", "tp", "fp", "tn", "fn")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A probe-only EfficientNet-Lite0 on the shipped train split (a few seconds on cached features)."""
    root = tmp_path_factory.mktemp("evaluate")
    config = root / "site.toml"
    config.write_text(PROBE_ONLY)
    out = root / "run"
    code = main(
        ["site-train", "--config", str(config), "--data", str(kermany_mini("train")), "--out", str(out), "--quiet"]
    )
    assert code == 0
    return out


@pytest.fixture(scope="module")
def recalibrated(trained, tmp_path_factory) -> Path:
    """The same model with a Platt recalibration on its card: evaluate must score through it."""
    folder = tmp_path_factory.mktemp("recalibrated") / "model"
    shutil.copytree(trained, folder)
    card = read_card(folder).model_copy(
        update={"calibration": ScoreCalibration(method="platt", a=1.8, b=-0.6, fitted_on="test")}
    )
    (folder / CARD_FILE).write_text(card.model_dump_json(by_alias=True, indent=2), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def normal_only(tmp_path_factory) -> Path:
    """The held-out manifest's normal rows only (through a link): an external set with one class."""
    test = kermany_mini("test")
    with test.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["label"] == "0"]
    path = tmp_path_factory.mktemp("one_class") / "normal_only.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "path": beside(path.parent, row["path"])})
    return path


def _direct_scores(model_dir: Path, data: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, calibrated scores and raw scores, computed here without the evaluate command."""
    model, card = load_model(model_dir)
    images = load_image_set(
        data,
        image_size=card.model.input_size,
        channels=card.model.in_channels,
        class_names=card.class_names,
        num_classes=card.model.num_classes,
    )
    device = torch.device("cpu")
    return (
        images.labels.numpy(),
        model_scores(model, card, images.images, device),
        predict_scores(model, images.images, device),
    )


def test_json_keeps_the_contract_and_scores_through_the_card_calibration(recalibrated, capsys):
    test = kermany_mini("test")
    code = main(
        [
            "evaluate",
            "--model",
            str(recalibrated),
            "--data",
            str(test),
            "--json",
            "--device",
            "cpu",
            "--bootstrap",
            "200",
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    labels, scores, raw = _direct_scores(recalibrated, test)
    threshold = read_card(recalibrated).threshold
    expected = classification_metrics(labels, scores, threshold)
    assert set(CONTRACT) <= set(result)
    for key in CONTRACT:
        assert result[key] == pytest.approx(expected[key], abs=1e-9), key
    # the calibration changes threshold-dependent figures and the Brier score: evaluate used model_scores
    assert result["calibration"]["brier"] == pytest.approx(brier_score_loss(labels, scores), abs=1e-9)
    assert abs(brier_score_loss(labels, raw) - result["calibration"]["brier"]) > 1e-3
    assert result["score_calibration"]["method"] == "platt"
    assert result["ci"]["replicates"] == 200
    for key in ("auroc", "balanced_accuracy", "f1", "sensitivity", "specificity"):
        low, high = result["ci"][key]
        assert low <= result[key] <= high
    assert result["n"] == 100 and result["n_patients"] == 88


def test_text_lines_and_report_files(trained, tmp_path, capsys):
    report = tmp_path / "report"
    code = main(
        [
            "evaluate",
            "--model",
            str(trained),
            "--data",
            str(kermany_mini("test")),
            "--device",
            "cpu",
            "--report",
            str(report),
            "--bootstrap",
            "300",
            "--seed",
            "7",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    provenance, operating, *lines = out.splitlines()
    assert provenance.startswith("model: site-train, fedfreeze ")  # what produced the model, then the figures
    assert "is the global model's and was not validated at this site" in operating  # which threshold, and whose
    keys = [line.split()[0] for line in lines[:8]]
    assert keys == ["auroc", "balanced_accuracy", "f1", "sensitivity", "specificity", "brier", "ece", "mean_score"]
    interval = re.compile(r"^(\w+)\s+(\d\.\d{4})\s+\[(\d\.\d{3}), (\d\.\d{3})\]$")
    saved = json.loads((report / "evaluation.json").read_text())
    for line in lines[:7]:
        match = interval.match(line)
        assert match, line
        key, value, low, high = match.group(1), *map(float, match.groups()[1:])
        figure = saved["calibration"][key] if key in ("brier", "ece") else saved[key]
        assert value == pytest.approx(figure, abs=5e-5)
        assert [low, high] == pytest.approx(saved["ci"][key], abs=5e-4)
    assert any(line.startswith("threshold") and f"{saved['threshold']:.4f}" in line for line in lines)
    assert "diagnostic only" in out
    for name in ("reliability.png", "scores.png"):
        data = (report / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5_000, name
    assert saved["ci"]["seed"] == 7 and saved["ci"]["replicates"] == 300
    assert len(saved["calibration"]["reliability"]) == 10
    assert [row["name"] for row in saved["thresholds"]["rows"]] == ["stored", "0.5", "youden_on_this_set"]
    assert sum(s["n"] for s in saved["score_summary"]) == 100


def test_one_class_data_exits_2_with_one_line_and_the_defined_figures(trained, normal_only, capsys):
    code = main(
        ["evaluate", "--model", str(trained), "--data", str(normal_only), "--device", "cpu", "--bootstrap", "0"]
    )
    captured = capsys.readouterr()
    assert code == 2
    err_lines = captured.err.strip().splitlines()
    assert len(err_lines) == 1, captured.err
    assert str(normal_only) in err_lines[0] and "only class 'normal'" in err_lines[0]  # named by label_name
    assert "AUROC and balanced accuracy are undefined" in err_lines[0]
    labels, scores, _ = _direct_scores(trained, normal_only)
    threshold = read_card(trained).threshold
    out = captured.out
    assert re.search(rf"^specificity\s+{np.mean(scores < threshold):.4f}$", out, re.M), out
    assert re.search(rf"^brier\s+{brier_score_loss(labels, scores):.4f}$", out, re.M), out
    assert re.search(r"^ece\s+\d\.\d{4}$", out, re.M), out
    assert re.search(rf"^mean_score\s+{scores.mean():.4f}", out, re.M), out
    assert re.search(r"^n\s+50\b", out, re.M), out
    assert re.search(r"^auroc\s+undefined", out, re.M), out
    assert "[" not in out  # --bootstrap 0: no intervals

    code = main(
        [
            "evaluate",
            "--model",
            str(trained),
            "--data",
            str(normal_only),
            "--device",
            "cpu",
            "--json",
            "--bootstrap",
            "50",
        ]
    )
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert code == 2 and len(captured.err.strip().splitlines()) == 1
    assert result["auroc"] is None and result["balanced_accuracy"] is None and result["sensitivity"] is None
    assert result["specificity"] == pytest.approx(np.mean(scores < threshold))
    assert result["n"] == 50 and result["single_class"] == 0
    assert result["calibration"]["ece"] >= 0.0 and result["ci"]["specificity"] is not None


def test_bad_arguments_are_one_clear_line(trained, tmp_path, capsys):
    code = main(["evaluate", "--model", str(trained), "--data", str(kermany_mini("test")), "--bootstrap", "-1"])
    err = capsys.readouterr().err
    assert code == 2 and "--bootstrap) should be 0 (no intervals) or a positive count, got -1" in err
    multi = tmp_path / "multi"
    shutil.copytree(trained, multi)
    card = json.loads((multi / CARD_FILE).read_text())
    card["model"]["num-classes"], card["class-names"] = 3, ["a", "b", "c"]
    (multi / CARD_FILE).write_text(json.dumps(card))
    code = main(
        ["evaluate", "--model", str(multi), "--data", str(kermany_mini("test")), "--report", str(tmp_path / "r")]
    )
    assert code == 2 and "--report needs a binary model" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()

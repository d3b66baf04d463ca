"""End to end on the shipped real subset: site-train, then evaluate on held-out patients."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedfreeze.cli import main
from fedfreeze.sample_data import kermany_mini

pytestmark = pytest.mark.slow  # each test runs, or shares, a federation or a trained model

FAST = """
[model]
input-size = 128
[train]
probe-epochs = 5
epochs = 2
unfreeze = { layer4 = 0.0 }
batch-size = 32
[cv]
folds = 2
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("site")
    config = root / "site.toml"
    config.write_text(FAST)
    out = root / "run"
    code = main(
        ["site-train", "--config", str(config), "--data", str(kermany_mini("train")), "--out", str(out), "--quiet"]
    )
    assert code == 0
    return out


def test_metrics_file_has_folds_and_summary(trained):
    report = json.loads((trained / "metrics.json").read_text())
    assert len(report["folds"]) == 2
    for fold in report["folds"]:
        for key in ("auroc", "balanced_accuracy", "f1", "sensitivity", "specificity"):
            assert 0.0 <= fold[key] <= 1.0
        # the probe trained on cached features, the fine-tuning epoch on images
        assert [e["cached_features"] for e in fold["epochs"]] == [True] * 5 + [False, False]
        assert fold["epochs"][-1]["parts"] == ["head", "layer4"]
    assert set(report["summary"]) == {"auroc", "balanced_accuracy", "f1", "sensitivity", "specificity"}
    assert report["summary"]["auroc"]["mean"] > 0.8
    # features were computed once for all folds and the refit
    assert report["feature_cache"] == {"hits": 2, "misses": 1}
    assert (trained / "model.json").is_file() and (trained / "weights.pt").is_file()


@pytest.mark.process
def test_evaluate_json_contract_on_unseen_patients(trained):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedfreeze",
            "evaluate",
            "--model",
            str(trained),
            "--data",
            str(kermany_mini("test")),
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(proc.stdout)
    assert {"auroc", "balanced_accuracy", "f1", "sensitivity", "specificity", "n"} <= set(result)
    assert result["n"] == 100
    assert result["auroc"] > 0.85, result  # chance is 0.5
    assert result["balanced_accuracy"] > 0.7, result
    card = json.loads((trained / "model.json").read_text())
    assert result["threshold"] == pytest.approx(card["threshold"])


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nprobe-epochs = -1\n")
    code = main(
        ["site-train", "--config", str(bad), "--data", str(kermany_mini("train")), "--out", str(tmp_path / "x")]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "train.probe-epochs" in err and "greater than or equal to 0" in err
    code = main(["evaluate", "--model", str(tmp_path), "--data", str(kermany_mini("test"))])
    assert code == 2 and "model.json is missing" in capsys.readouterr().err

"""``fedfreeze experiment`` end to end on a small slice of the shipped Kermany subset (3 real sites):
the report files, resuming after a stop, and configs that must be refused."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from fedfreeze.cli import main
from fedfreeze.errors import ConfigError, OutputError
from fedfreeze.experiment import runner
from fedfreeze.experiment.config import load_experiment, parse_experiment
from fedfreeze.experiment.runner import ExperimentInterrupted, run_experiment
from fedfreeze.flower.inprocess import run_in_process
from fedfreeze.outputs import partial_path
from fedfreeze.sample_data import kermany_mini
from tests.shipped import beside

# 32 px keeps each training to a fraction of a second (the pretrained weights still rank the cases
# better than chance, so the statistics are not degenerate); the files do not need a good model.
EXPERIMENT = """
[experiment]
data = "{data}"
folds = 2
repeats = 1
bootstrap = 200
comparisons = [["federated", "site-alone"], ["federated", "pooled"]]

[model]
input-size = 32
[train]
probe-epochs = 2
epochs = 0
batch-size = 16
[federation]
rounds = 2
probe-rounds = 2
probe-local-epochs = 2
score-bins = 20

[arms.federated]
mode = "federated"
description = "the sites train together"
[arms.site-alone]
mode = "site"
[arms.pooled]
mode = "pooled"
train = {{ probe-epochs = 3 }}
"""


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """10 patients of each class per site (all their images), through a link in the manifest's folder."""
    manifest = kermany_mini("train")
    rows = list(csv.DictReader(manifest.open()))
    taken: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        chosen = taken.setdefault((r["site"], r["label"]), [])
        if r["patient_id"] not in chosen and len(chosen) < 10:
            chosen.append(r["patient_id"])
    keep = {pid for ids in taken.values() for pid in ids}
    path = tmp_path_factory.mktemp("data") / "small.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient_id", "site"])
        for r in rows:
            if r["patient_id"] in keep:
                writer.writerow([beside(path.parent, r["path"]), r["label"], r["patient_id"], r["site"]])
    return path


def write_config(folder: Path, data: Path, text: str = EXPERIMENT) -> Path:
    path = folder / "exp.toml"
    path.write_text(text.format(data=data))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, small_data):
    """Stopped after 2 of 6 (fold, arm) results, then run again to the end through the CLI."""
    root = tmp_path_factory.mktemp("exp")
    config = write_config(root, small_data)
    out = root / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is faster, and kinder to a shared machine
    try:
        with pytest.raises(ExperimentInterrupted):
            run_experiment(load_experiment(config), out, progress=False, stop_after=2, run_federation=run_in_process)
        before, trained, code = resume(config, out)
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return root, out, before, trained


def resume(config: Path, out: Path) -> tuple[dict[Path, bytes], list[str], int]:
    """Continue the stopped experiment through the command line (--resume), recording what it trains."""
    partial = partial_path(out.resolve())  # a stopped experiment's folder: --out appears only when it finishes
    assert not out.exists()
    before = {p.relative_to(partial / "folds"): p.read_bytes() for p in (partial / "folds").rglob("*.json")}
    trained: list[str] = []
    real = runner.run_fold_arm

    def counting(arm, fold, *args, **kwargs):
        trained.append(f"{fold.name}/{arm.name}")
        return real(arm, fold, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "run_fold_arm", counting)
        code = main(["experiment", "--config", str(config), "--out", str(out), "--quiet", "--resume"])
    return before, trained, code


@pytest.mark.slow
def test_resume_trains_only_what_was_missing(finished):
    _, out, before, trained = finished
    assert sorted(str(p) for p in before) == ["r1-f1/federated.json", "r1-f1/site-alone.json"]
    assert trained == ["r1-f1/pooled", "r1-f2/federated", "r1-f2/site-alone", "r1-f2/pooled"]
    for path, content in before.items():
        assert (out / "folds" / path).read_bytes() == content, f"{path} was redone"
    assert not (out / runner.WORK_DIR).exists()  # federations' models and caches cleaned up


def test_report_files(finished):
    _, out, _, _ = finished
    for name in ("report.md", "roc.png", "sites.png", "rounds.png", "summary.json", "predictions.csv", "folds.csv"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in ("roc.png", "sites.png", "rounds.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    for text in (
        "## Results, all sites pooled",
        "## Results per site",
        "### federated − site-alone",
        "### federated − pooled",
        "DeLong's test on the mean AUROC over folds",
        "p (paired bootstrap)",
        "p (corrected t-test)",
        "One image per patient at test",
        "Balanced test folds",
        "![",
        "site-a",
        "site-b",
        "site-c",
    ):
        assert text in report, text
    assert "### site-alone − pooled" not in report  # only the comparisons asked for


def test_summary_numbers_are_consistent(finished):
    _, out, _, _ = finished
    summary = json.loads((out / "summary.json").read_text())
    assert summary["folds_finished"] == {"federated": 2, "site-alone": 2, "pooled": 2}
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    for arm in ("federated", "site-alone", "pooled"):
        pooled = summary["arms"][arm]["pooled"]
        auroc = pooled["metrics"]["auroc"]
        assert pooled["folds"] == 2
        assert auroc["ci_low"] <= auroc["mean"] <= auroc["ci_high"]
        assert len([r for r in rows if r["arm"] == arm]) == pooled["n_test_total"]
        assert set(summary["arms"][arm]) == {"pooled", "site-a", "site-b", "site-c"}
    comp = summary["comparisons"][0]
    assert (comp["first"], comp["second"]) == ("federated", "site-alone")
    assert 0.0 <= comp["scopes"]["pooled"]["delong"]["p_value"] <= 1.0
    fed_rounds = json.loads((out / "folds" / "r1-f1" / "federated.json").read_text())["training"]["rounds"]
    assert [r["round"] for r in fed_rounds] == [1, 2, 3]  # two rounds, then the final evaluation


def test_same_test_cases_for_every_arm(finished):
    _, out, _, _ = finished
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    cases = {
        arm: sorted((r["fold"], r["site"], r["source"]) for r in rows if r["arm"] == arm)
        for arm in ("federated", "site-alone", "pooled")
    }
    assert cases["federated"] == cases["site-alone"] == cases["pooled"]


def test_changed_arm_or_protocol_is_refused(finished, small_data):
    root, out, _, _ = finished
    changed = EXPERIMENT.replace("train = {{ probe-epochs = 3 }}", "train = {{ probe-epochs = 4 }}")
    with pytest.raises(ConfigError, match="made with other settings for arm 'pooled'"):
        run_experiment(
            load_experiment(write_config(root, small_data, changed)),
            out,
            progress=False,
            resume=True,
            run_federation=run_in_process,
        )
    other_folds = EXPERIMENT.replace("folds = 2", "folds = 3")
    with pytest.raises(ConfigError, match="another protocol or data"):
        run_experiment(
            load_experiment(write_config(root, small_data, other_folds)),
            out,
            progress=False,
            resume=True,
            run_federation=run_in_process,
        )
    with pytest.raises(OutputError, match="exists and is not empty: give --force to replace it or --resume"):
        run_experiment(
            load_experiment(write_config(root, small_data)), out, progress=False, run_federation=run_in_process
        )


def test_config_errors_name_the_field(tmp_path):
    base = {"experiment": {"data": "x.csv"}, "arms": {"a": {"mode": "site"}}}
    with pytest.raises(ConfigError, match=r"arms\.b: model\.weigths: unknown key"):
        parse_experiment(
            {**base, "arms": {"a": {"mode": "site"}, "b": {"mode": "site", "model": {"weigths": "x"}}}}, "exp.toml"
        )
    with pytest.raises(ConfigError, match=r"arms\.a\.mode: Input should be 'site', 'federated' or 'pooled'"):
        parse_experiment({**base, "arms": {"a": {"mode": "central"}}}, "exp.toml")
    with pytest.raises(ConfigError, match=r"arms\.a: train\.epochs: Input should be greater than or equal to 0"):
        parse_experiment({**base, "train": {"epochs": -1}}, "exp.toml")
    with pytest.raises(ConfigError, match="federation settings apply to federated arms only"):
        parse_experiment({**base, "arms": {"a": {"mode": "site", "federation": {"rounds": 2}}}}, "exp.toml")
    with pytest.raises(ConfigError, match="comparisons names unknown arm 'b'"):
        parse_experiment(
            {"experiment": {"data": "x.csv", "comparisons": [["a", "b"]]}, "arms": base["arms"]}, "exp.toml"
        )
    with pytest.raises(ConfigError, match=r"experiment\.folds: Input should be greater than or equal to 2"):
        parse_experiment({**base, "experiment": {"data": "x.csv", "folds": 1}}, "exp.toml")
    with pytest.raises(ConfigError, match=r"experiment\.bootstrp: unknown key"):
        parse_experiment({**base, "experiment": {"data": "x.csv", "bootstrp": 10}}, "exp.toml")
    arms = {"a": {"mode": "site"}, "b": {"mode": "federated", "model": {"weights": "none"}}}
    exp = parse_experiment({**base, "model": {"input-size": 96}, "arms": arms}, "exp.toml", base_dir=tmp_path)
    assert exp.arms["b"].cfg.model.input_size == 96 and exp.arms["b"].cfg.model.weights == "none"
    assert exp.arms["a"].cfg.model.weights == "package"
    assert exp.comparisons() == [("a", "b")]
    assert exp.data_path == tmp_path / "x.csv"
    assert exp.arms["a"].fingerprint() != exp.arms["b"].fingerprint()


def test_a_federated_arm_without_a_runner_is_refused(tmp_path, small_data):
    """The harness imports no Flower adapter: the caller passes the federation's runner (the CLI does)."""
    with pytest.raises(ConfigError, match="arm\\(s\\) federated are federated: pass run_federation"):
        run_experiment(load_experiment(write_config(tmp_path, small_data)), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()

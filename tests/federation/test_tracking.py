"""federation.tracking: every round's figures in TensorBoard and MLflow, written by the real libraries to a
local folder and read back with their own readers (tensorboard's EventAccumulator, MLflow's client)."""

from __future__ import annotations

import logging
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from fedfreeze.cli import main as cli_main
from fedfreeze.errors import ConfigError, MissingExtraError
from fedfreeze.federation.config import load_fed_config
from fedfreeze.federation.coordinator import Coordinator
from fedfreeze.federation.records import RoundRecord
from fedfreeze.federation.trackers import TensorBoardWriter
from fedfreeze.federation.tracking import Tracking
from fedfreeze.outputs import partial_path
from tests.federation.conftest import fast_config
from tests.federation.test_evaluation_sites import held_out_folder  # noqa: F401 (a fixture)
from tests.federation.test_federation_inprocess import node_configs, run, tampering_client

TRAINING_SITES = ("site-a", "site-b", "site-c")
FIGURES = ("auroc", "balanced_accuracy", "f1", "sensitivity", "specificity", "n")


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, site_folders, held_out_folder):  # noqa: F811 (the imported fixture)
    """Three training sites and an evaluation-only one, tracked to both, two (probe) rounds; every training
    site crashes in round 2, so the run fails there, and a resumed run completes it."""
    tmp = tmp_path_factory.mktemp("tracking")
    nodes = node_configs(site_folders, tmp / "state")
    nodes[len(nodes) + 1] = {
        "data-path": str(held_out_folder),
        "site-name": "held-out",
        "state-dir": str(tmp / "state" / "held-out"),
    }
    config = fast_config(tmp, rounds=2, extra='evaluation-sites = ["held-out"]\ntracking = ["tensorboard", "mlflow"]')
    out = tmp / "out"
    crashing = tampering_client({}, crash={site: {2} for site in TRAINING_SITES})
    failed = run(out, config, nodes, crashing)
    folder = partial_path(out.resolve()) / "tracking"
    between = {"mlflow": mlflow_runs(folder), "tensorboard": tensorboard_series(folder)}
    completed = run(out, config, nodes, resume=True)
    return out / "tracking", failed, between, completed


@pytest.mark.slow
def test_tensorboard_holds_every_round_of_metrics_json(tracked):
    folder, failed, between, completed = tracked
    assert failed["status"] == "failed" and failed["completed_rounds"] == 1, failed["reason"]
    assert completed["status"] == "completed", completed["reason"]
    # the failed run had written its first round; the resumed run added round 2 and the final evaluation
    assert between["tensorboard"] == expected_series(failed)
    series = tensorboard_series(folder)
    assert series == expected_series(completed)
    assert sorted(series["pooled/auroc"]) == [1, 2, 3]  # 3: the final evaluation, as in rounds.csv
    assert "evaluation_site/held-out/auroc" in series and "pooled/auroc_low" in series


@pytest.mark.slow
def test_mlflow_run_holds_the_same_figures_and_ends_with_the_run(tracked):
    folder, failed, between, completed = tracked
    [(status_then, _, _)] = between["mlflow"]  # one run, marked failed when the federation failed
    assert status_then == "FAILED"
    [(status, tags, params)] = mlflow_runs(folder)  # the resumed federation continued the same run
    assert status == "FINISHED"
    assert tags["fedfreeze.status"] == "completed" and tags["fedfreeze.reason"] == ""
    assert params["federation.rounds"] == "2" and params["federation.evaluation-sites"] == '["held-out"]'
    assert mlflow_series(folder) == expected_series(completed)


def test_a_missing_package_stops_simulate_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    config = fast_config(tmp_path, extra='tracking = ["mlflow"]')
    code = cli_main(["simulate", "--config", str(config), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        "fedfreeze simulate: error: federation.tracking = ['mlflow'] needs mlflow-skinny, which is not "
        "installed here: pip install 'fedfreeze[tracking]'"
    ]
    assert not (tmp_path / "out").exists() and not partial_path(tmp_path / "out").exists()  # nothing started


def test_a_coordinator_without_the_package_refuses_to_start(tmp_path, monkeypatch):
    """A deployment's ServerApp (and an in-process run) checks too: the coordinator refuses before any round."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    cfg = load_fed_config(fast_config(tmp_path, extra='tracking = ["tensorboard", "mlflow"]'))
    with pytest.raises(MissingExtraError, match=r"needs tensorboard, .*pip install 'fedfreeze\[tracking\]'$"):
        Coordinator(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tracking_is_off_by_default_and_its_folder_stays_in_the_output(tmp_path):
    assert load_fed_config(fast_config(tmp_path)).federation.tracking == []
    for bad in ("/var/tracking", "../tracking", "a/../../b", ".", ""):
        with pytest.raises(ConfigError, match=r"federation.tracking-dir: .*inside the run's output folder"):
            load_fed_config(fast_config(tmp_path, extra=f'tracking-dir = "{bad}"'))
    with pytest.raises(ConfigError, match=r"federation.tracking: .*names a tracker twice"):
        load_fed_config(fast_config(tmp_path, extra='tracking = ["mlflow", "mlflow"]'))
    with pytest.raises(ConfigError, match=r"federation.tracking.0"):
        load_fed_config(fast_config(tmp_path, extra='tracking = ["wandb"]'))


def test_a_failing_tracker_is_dropped_with_a_warning_and_the_run_goes_on(tmp_path, monkeypatch):
    calls: list[int] = []

    def full_disk(self: TensorBoardWriter, step: int, scalars: dict[str, float]) -> None:
        calls.append(step)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(TensorBoardWriter, "log", full_disk)
    warnings = Recorded(logging.WARNING)
    logger = logging.getLogger("fedfreeze.federation.tracking")
    logger.addHandler(warnings)
    cfg = load_fed_config(fast_config(tmp_path, extra='tracking = ["tensorboard"]'))
    tracking = Tracking(cfg, tmp_path / "out")
    rounds = [RoundRecord(round=1, parts=["head"], bytes_up=10)]
    try:
        tracking.export(rounds, None, status="running")
        tracking.export([*rounds, RoundRecord(round=2, parts=["head"])], None, status="completed")
    finally:
        logger.removeHandler(warnings)
    assert calls == [1]  # dropped after its first failure
    [warning] = warnings.messages
    assert "tensorboard stopped (OSError" in warning and "metrics.json holds every figure" in warning


class Recorded(logging.Handler):
    """The messages a logger emits (whatever handlers and propagation a federation run left it)."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


# --- what the trackers should hold, computed here from metrics.json alone -------------------------


def expected_series(metrics: dict[str, Any]) -> dict[str, dict[int, float]]:
    """Series name -> {round: value} for every round of ``metrics.json`` and its final evaluation."""
    series: dict[str, dict[int, float]] = defaultdict(dict)

    def put(name: str, step: int, value: Any) -> None:
        if value is not None and math.isfinite(value):
            series[name][step] = float(value)

    def figures(prefix: str, step: int, values: dict[str, Any]) -> None:
        for key in FIGURES:
            put(f"{prefix}/{key}", step, values.get(key))
        for key, (low, high) in values.get("ranges", {}).items():
            put(f"{prefix}/{key}_low", step, low)
            put(f"{prefix}/{key}_high", step, high)

    for record in [*metrics["rounds"], *([metrics["final"]] if metrics["final"] else [])]:
        step = record["round"]
        figures("pooled", step, record["pooled"]["at_threshold_used"])
        figures("evaluation_sites", step, record["evaluation_sites"]["at_threshold_used"])
        [held_out] = [row for row in record["sites"] if row["site"] == "held-out"]
        figures("evaluation_site/held-out", step, {key: held_out.get(f"val_{key}") for key in FIGURES})
        for key in ("auroc", "balanced-accuracy", "f1"):
            put(f"weighted_mean/{key.replace('-', '_')}", step, record["weighted_mean"].get(key))
        put("threshold/used", step, record["threshold_used"])
        put("threshold/next", step, record["threshold_next"])
        put("threshold/interval_low", step, record["threshold_interval"][0])
        put("threshold/interval_high", step, record["threshold_interval"][1])
        put("bytes/up", step, record["bytes_up"])
        put("bytes/down", step, record["bytes_down"])
        put("seconds/round", step, record["round_seconds"])
        put("seconds/max_site_train", step, max(row.get("train_seconds", 0.0) for row in record["sites"]))
        put("sites/replied", step, len(record["sites"]))
        put("sites/rejected", step, len(record["rejected"]))
        put("sites/failed", step, len(record["failures"]))
    return dict(series)


def tensorboard_series(folder: Path) -> dict[str, dict[int, float]]:
    """Every scalar in the event files under ``folder/tensorboard``; a step written twice fails."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    events = EventAccumulator(str(folder / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    series: dict[str, dict[int, float]] = {}
    for tag in events.Tags()["tensors"]:
        points = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto).item())) for e in events.Tensors(tag)]
        assert len({step for step, _ in points}) == len(points), f"{tag}: a step written twice {points}"
        series[tag] = dict(points)
    return series


def mlflow_runs(folder: Path) -> list[tuple[str, dict[str, str], dict[str, str]]]:
    """(status, tags, parameters) of every run in the tracking folder's MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(folder / 'mlflow.db').resolve()}")
    experiment = client.get_experiment_by_name("fedfreeze")
    return [(r.info.status, r.data.tags, r.data.params) for r in client.search_runs([experiment.experiment_id])]


def mlflow_series(folder: Path) -> dict[str, dict[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(folder / 'mlflow.db').resolve()}")
    [run_] = client.search_runs([client.get_experiment_by_name("fedfreeze").experiment_id])
    series: dict[str, dict[int, float]] = {}
    for key in run_.data.metrics:
        history = client.get_metric_history(run_.info.run_id, key)
        assert len({m.step for m in history}) == len(history), f"{key}: a step logged twice"
        series[key] = {m.step: m.value for m in history}
    return series

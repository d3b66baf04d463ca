"""A coordinator restart in a real loopback deployment: nothing lost, no round counted twice.

The SuperLink is killed while a federation is running (after its first round is checkpointed), then
started again on the same database; the sites reconnect on their own, and ``fedfreeze run --resume``
continues the federation from the coordinator's checkpoint.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedfreeze.deploy import launch
from fedfreeze.outputs import partial_path
from tests.federation.processes import Tracker, check_completed, run_cli, site_folder, tracked, wait_online

CONFIG = """
[model]
input-size = 64
[train]
batch-size = 16
[federation]
rounds = 4
probe-rounds = 3
probe-local-epochs = 5
local-epochs = 1
unfreeze = { layer4 = 0.0 }
score-bins = 100
min-sites = 2
site-wait = 120
"""
CONNECTION = "fedfreeze-restart"


@pytest.fixture
def tracker(tmp_path: Path) -> Iterator[Tracker]:
    with tracked(tmp_path) as track:
        yield track


def superlink(tmp_path: Path, port: int, tracker: Tracker) -> launch.Managed:
    cmd = launch.superlink_command(port=port, database=tmp_path / "superlink.db", insecure=True)
    return launch.Managed("superlink", cmd, tmp_path / "logs" / "superlink.log", tracker.env)


def wait_for_round(metrics_path: Path, rounds: int, run: subprocess.Popen, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert run.poll() is None, "the run ended before it could be interrupted"
        if metrics_path.is_file():
            try:
                metrics = json.loads(metrics_path.read_text())
            except json.JSONDecodeError:  # caught between two writes
                metrics = {}
            if metrics.get("completed_rounds", 0) >= rounds:
                return metrics
        time.sleep(0.2)
    raise AssertionError(f"round {rounds} not checkpointed within {timeout:.0f} s")


def test_coordinator_restart_resumes_without_losing_or_repeating_a_round(tracker: Tracker, tmp_path: Path):
    port = launch.free_port()
    address = f"127.0.0.1:{port}"
    launch.write_flwr_home(Path(tracker.env["FLWR_HOME"]), [launch.Connection(CONNECTION, address)])
    config = tmp_path / "fed.toml"
    config.write_text(CONFIG)
    out = tmp_path / "fed"
    link = superlink(tmp_path, port, tracker).start()
    sites = []
    try:
        launch.wait_healthy(address, link)
        for name in ("site-a", "site-b"):
            cmd = [
                sys.executable,
                "-m",
                "fedfreeze",
                "site",
                "--data",
                str(site_folder(tmp_path / name, name)),
                "--name",
                name,
                "--insecure",
                "--superlink",
                address,
                "--port",
                str(launch.free_port()),
                "--state-dir",
                str(tmp_path / "state" / name),
                "--threads",
                "1",
            ]
            env = tracker.env_with(FLWR_HOME=str(tmp_path / "home" / name))
            sites.append(launch.Managed(name, cmd, tmp_path / "logs" / f"{name}.log", env).start())
        wait_online(CONNECTION, tracker.env, 2, [link, *sites])

        run_args = ["run", "--superlink", address, "--insecure", "--config", str(config), "--out", str(out)]
        log = (tmp_path / "logs" / "run-1.log").open("w")
        first = subprocess.Popen(
            [sys.executable, "-m", "fedfreeze", *run_args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=tracker.env,
            start_new_session=True,
        )
        # a run writes aside until it completes (fedfreeze.outputs): its rounds so far are in the partial folder
        before = wait_for_round(partial_path(out) / "metrics.json", 1, first)
        link.stop()  # the coordinator goes down mid-federation
        assert first.wait(timeout=120) != 0  # and the interrupted run reports failure
        log.close()
        stopped_at = json.loads((partial_path(out) / "metrics.json").read_text())["completed_rounds"]
        assert not out.exists()  # nothing that looks finished
        assert stopped_at >= 1 and stopped_at < 4

        link = superlink(tmp_path, port, tracker).start()  # same port, same database
        launch.wait_healthy(address, link)
        wait_online(CONNECTION, tracker.env, 2, [link, *sites], timeout=90)  # the sites come back by themselves
        code, output = run_cli([*run_args, "--resume"], tracker, tmp_path / "logs" / "run-2.log")
        assert code == 0, output[-3000:]
    finally:
        tracker.running()
        for proc in [*sites, link]:
            proc.stop()

    metrics = json.loads((out / "metrics.json").read_text())
    check_completed(metrics, rounds=4)  # rounds 1..4, each exactly once
    # the rounds finished before the restart are the very same records (nothing recomputed or lost)
    assert metrics["rounds"][0] == before["rounds"][0]
    assert "resuming after round" in output
    left = tracker.leftovers()
    assert not left, f"still running: {left}"

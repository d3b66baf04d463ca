"""The coordinator SIGKILLed mid-federation, started again, then restored from a backup: nothing lost,
nothing left running, no round counted twice, and every status says what happened.

On a real loopback deployment (``fedfreeze server`` with metrics, two ``fedfreeze site``):

1. after round 1 is checkpointed, ``fedfreeze backup`` copies the running coordinator's state;
2. ``fedfreeze server`` is SIGKILLed: every process it started is gone at once; ``fedfreeze run``
   says the coordinator does not answer; ``metrics.json`` still says ``running`` (nobody was left
   to write it);
3. started again on the same state folder (JSON log lines), it marks the run ``interrupted``
   with the time and the last completed round, in ``metrics.json`` and ``fedfreeze runs``; the
   sites reconnect by themselves; the metrics endpoint shows them online and the last run's
   status;
4. stopped, its state replaced by ``fedfreeze restore`` of the backup, started again: the sites
   come back, and ``fedfreeze run --resume`` continues after the checkpointed round: rounds 1-4
   each once, the round-1 record unchanged; the metrics then show the run completed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fedfreeze.deploy import launch
from fedfreeze.outputs import partial_path
from tests.federation.conftest import small_config
from tests.federation.processes import (
    Tracker,
    check_completed,
    gone_within,
    record_timing,
    run_cli,
    site_folder,
    wait_online,
)

pytestmark = [pytest.mark.process, pytest.mark.slow]

CONFIG = small_config(
    rounds=4, probe_rounds=3, probe_local_epochs=5, local_epochs=1, unfreeze={"layer4": 0.0}, site_wait=120
)
CONNECTION = "fedfreeze-restart"
ROLE = "FEDFREEZE_TEST_ROLE"


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


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """``/metrics`` parsed line by line, strictly (a malformed line fails the test): name -> samples."""
    import re

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    sample = re.compile(r'^([a-z_:][a-z0-9_:]*)(\{((?:[a-z_]+="(?:[^"\\]|\\.)*",?)*)\})? (-?[0-9.e+-]+|NaN)$')
    families: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        found = sample.match(line)
        assert found, f"not a Prometheus sample line: {line!r}"
        labels = dict(re.findall(r'([a-z_]+)="((?:[^"\\]|\\.)*)"', found.group(3) or ""))
        families.setdefault(found.group(1), []).append((labels, float(found.group(4))))
    return families


def value(families: dict, name: str, **labels: str) -> float:
    matches = [v for found, v in families.get(name, []) if all(found.get(k) == x for k, x in labels.items())]
    assert len(matches) == 1, (name, labels, families.get(name))
    return matches[0]


def wait_metric(port: int, name: str, expected: float, timeout: float = 90.0, **labels: str) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        families = scrape(port)
        if any(
            v == expected and all(found.get(k) == x for k, x in labels.items()) for found, v in families.get(name, [])
        ):
            return families
        assert time.monotonic() < deadline, (name, labels, families.get(name))
        time.sleep(1.0)


def test_coordinator_killed_restarted_and_restored_resumes_without_losing_or_repeating_a_round(
    tracker: Tracker, tmp_path: Path
):
    port, metrics_port = launch.free_port(), launch.free_port()
    address = f"127.0.0.1:{port}"
    launch.write_flwr_home(Path(tracker.env["FLWR_HOME"]), [launch.Connection(CONNECTION, address)])
    config = tmp_path / "fed.toml"
    config.write_text(CONFIG)
    out = tmp_path / "fed"
    state = tmp_path / "state" / "coordinator"
    logs = tmp_path / "logs"

    def coordinator(folder: Path, name: str, *extra: str) -> launch.Managed:
        cmd = [sys.executable, "-m", "fedfreeze", "server", "--insecure", "--port", str(port)]
        cmd += ["--state-dir", str(folder), "--metrics-port", str(metrics_port), *extra]
        return launch.Managed(name, cmd, logs / f"{name}.log", tracker.env_with(**{ROLE: "coordinator"})).start()

    link = coordinator(state, "coordinator-1")
    sites = []
    try:
        launch.wait_healthy(address, link)
        for name in ("site-a", "site-b"):
            cmd = [sys.executable, "-m", "fedfreeze", "site", "--data", str(site_folder(tmp_path / name, name))]
            cmd += ["--name", name, "--insecure", "--superlink", address, "--port", str(launch.free_port())]
            cmd += ["--state-dir", str(tmp_path / "state" / name), "--threads", "1"]
            env = tracker.env_with(FLWR_HOME=str(tmp_path / "home" / name))
            sites.append(launch.Managed(name, cmd, logs / f"{name}.log", env).start())
        wait_online(CONNECTION, tracker.env, 2, [link, *sites])

        run_args = ["run", "--superlink", address, "--insecure", "--config", str(config), "--out", str(out)]
        with (logs / "run-1.log").open("w") as log:
            first = subprocess.Popen(
                [sys.executable, "-m", "fedfreeze", *run_args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=tracker.env,
                start_new_session=True,
            )
        # a run writes aside until it completes (fedfreeze.outputs): its rounds so far are in the partial folder
        partial = partial_path(out) / "metrics.json"
        before = wait_for_round(partial, 1, first)
        code, said = run_cli(
            ["backup", "--state-dir", str(state), "--out", str(tmp_path / "backup.tar.gz")],
            tracker,
            logs / "backup.log",
        )
        assert code == 0 and said.startswith("backup: "), said
        assert (tmp_path / "backup.tar.gz").stat().st_mode & 0o077 == 0

        # the coordinator killed outright mid-federation: everything it started goes with it
        assert link.process is not None
        os.kill(link.process.pid, signal.SIGKILL)
        gone, left = gone_within(ROLE, "coordinator", 20)
        assert not left and gone < 3, (gone, left)
        assert first.wait(timeout=120) == 2
        last = (logs / "run-1.log").read_text().strip().splitlines()[-1]
        assert last.startswith(f"fedfreeze run: error: the coordinator at {address} does not answer"), last
        stopped_at = json.loads(partial.read_text())
        assert stopped_at["status"] == "running" and not out.exists()  # nobody was left to write it; nothing finished
        done = stopped_at["completed_rounds"]
        assert 1 <= done < 4

        # started again on the same state: the run is marked interrupted, with when and after which round
        journal = tmp_path / "coordinator.jsonl"
        started_again = time.monotonic()
        link = coordinator(state, "coordinator-2", "--log-format", "json", "--log-file", str(journal))
        launch.wait_healthy(address, link)
        metrics = json.loads(partial.read_text())
        assert metrics["status"] == "interrupted", metrics["reason"]
        info = metrics["interrupted"]
        assert info["completed_rounds"] == done and info["last_round_at"] and info["at"] >= info["last_round_at"]
        assert metrics["reason"].startswith(f"interrupted after round {done} (noticed {info['at']}): the coordinator")
        lines = [json.loads(line) for line in journal.read_text().splitlines()]  # every line is one JSON object
        assert all({"time", "level", "process", "message"} <= set(line) for line in lines)
        warned = [line for line in lines if line["level"] == "WARNING" and "interrupted after round" in line["message"]]
        assert len(warned) == 1 and warned[0]["process"] == "coordinator", lines[:10]
        code, listing = run_cli(
            ["runs", "--superlink", address, "--insecure", "--state-dir", str(state)], tracker, logs / "runs-1.log"
        )
        assert code == 0 and "interrupted (Flower: " in listing and f"{done}/4" in listing, listing

        wait_online(CONNECTION, tracker.env, 2, [link, *sites], timeout=90)  # the sites come back by themselves
        back = time.monotonic() - started_again
        families = wait_metric(metrics_port, "fedfreeze_sites_online", 2.0)
        assert value(families, "fedfreeze_coordinator_up") == 1.0
        assert value(families, "fedfreeze_sites_registered") == 2.0
        assert value(families, "fedfreeze_last_run_status", status="interrupted") == 1.0
        assert value(families, "fedfreeze_last_run_status", status="completed") == 0.0
        assert value(families, "fedfreeze_last_run_completed_rounds") == float(done)
        assert len(families["fedfreeze_site_online"]) == 2
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/health", timeout=10) as response:
            assert response.status == 200

        # stopped; its state replaced by the backup taken after round 1; started again; resumed
        assert link.process is not None
        os.kill(link.process.pid, signal.SIGTERM)
        assert link.process.wait(timeout=30) == 0
        code, said = run_cli(
            ["restore", str(tmp_path / "backup.tar.gz"), "--state-dir", str(state), "--force"],
            tracker,
            logs / "restore.log",
        )
        assert code == 0 and said.startswith("restore: "), said
        link = coordinator(state, "coordinator-3")
        launch.wait_healthy(address, link)
        assert "interrupted after round" in link.log_path.read_text()  # the backup's note said running
        wait_online(CONNECTION, tracker.env, 2, [link, *sites], timeout=90)
        code, output = run_cli([*run_args, "--resume"], tracker, logs / "run-2.log")
        assert code == 0, output[-3000:]
        families = scrape(metrics_port)
        assert value(families, "fedfreeze_last_run_status", status="completed") == 1.0
        assert value(families, "fedfreeze_runs", status="interrupted") == 1.0
    finally:
        tracker.running()
        for proc in [*sites, link]:
            proc.stop()

    metrics = json.loads((out / "metrics.json").read_text())
    check_completed(metrics, rounds=4)  # rounds 1..4, each exactly once
    assert metrics["interrupted"] is None
    # the rounds finished before the kill are the very same records (nothing recomputed or lost)
    assert metrics["rounds"][0] == before["rounds"][0]
    assert "resuming after round" in output
    record_timing(
        "coordinator SIGKILL, restart, restore, resume",
        all_gone_seconds=round(gone, 2),
        completed_rounds_at_kill=done,
        sites_back_after_restart_seconds=round(back, 1),
        resumed_rounds=[r["round"] for r in metrics["rounds"]],
    )
    left = tracker.leftovers()
    assert not left, f"still running: {left}"

"""The fault table of process lifetime, on a real loopback deployment (``fedfreeze server`` and ``site``).

Each fault is injected while a federation runs; afterwards no process of the killed side is left
after a bounded time, and the run's state says what happened:

- a site's ``fedfreeze site`` SIGKILLed while its ClientApp trains (round 2): every process of that
  site is gone within 5 s (its SuperNode by the parent-death signal, the superexec and the
  ClientApp by the guards);
- the coordinator SIGTERMed in the middle of that round: it stops within 10 s with every process
  it started, ``metrics.json`` says ``interrupted`` after round 1, ``fedfreeze run`` says the
  coordinator does not answer;
- a site's ``fedfreeze site`` SIGKILLed while the site's approval runner checks a job's app (the
  runner blocked on reading the approved-apps list): every process of the site is gone within 5 s.

The coordinator SIGKILLed and restarted is ``test_coordinator_restart.py``. Timings go to
``benchmarks/results/fault-table/`` through ``benchmarks/fault_table.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fedfreeze.deploy import launch
from fedfreeze.flower.approval import app_hash
from fedfreeze.outputs import partial_path
from tests.federation.conftest import small_config
from tests.federation.processes import (
    Tracker,
    age_seconds,
    gone_within,
    marked,
    messages,
    record_timing,
    site_folder,
    wait_online,
)

pytestmark = [pytest.mark.process, pytest.mark.slow]

ROLE = "FEDFREEZE_TEST_ROLE"  # marks every process of the coordinator, of a site, of the operator's run


def slow_second_round(min_sites: int) -> str:
    return small_config(
        rounds=2,
        probe_rounds=1,
        probe_local_epochs=2,
        local_epochs=40,
        unfreeze={"layer4": 0.0},
        min_sites=min_sites,
        site_wait=60,
    )


@pytest.fixture
def tracker(tracker: Tracker, tmp_path: Path) -> Tracker:
    """The shared tracker (tests/federation/conftest.py), with HOME in the test's folder."""
    tracker.env["HOME"] = str(tmp_path / "home")  # whatever Flower would put in ~/.flwr would land here
    return tracker


def fedfreeze(tracker: Tracker, tmp_path: Path, role: str, *args: str) -> launch.Managed:
    """``python -m fedfreeze ARGS`` in the background, every process of it marked ``ROLE=role``."""
    cmd = [sys.executable, "-m", "fedfreeze", *args]
    return launch.Managed(role, cmd, tmp_path / "logs" / f"{role}.log", tracker.env_with(**{ROLE: role})).start()


def coordinator(tracker: Tracker, tmp_path: Path, port: int) -> launch.Managed:
    state = tmp_path / "state" / "coordinator"
    return fedfreeze(
        tracker, tmp_path, "coordinator", "server", "--insecure", "--port", str(port), "--state-dir", str(state)
    )


def site(tracker: Tracker, tmp_path: Path, name: str, address: str, *extra: str) -> launch.Managed:
    data = site_folder(tmp_path / "data" / name, name)
    state = tmp_path / "state" / name
    args = ["site", "--insecure", "--data", str(data), "--name", name, "--superlink", address]
    args += ["--port", str(launch.free_port()), "--state-dir", str(state), "--threads", "1", *extra]
    return fedfreeze(tracker, tmp_path, name, *args)


def submit(tracker: Tracker, tmp_path: Path, address: str, config: Path, out: Path) -> subprocess.Popen[bytes]:
    log = (tmp_path / "logs" / "run.log").open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "fedfreeze", "run", "--insecure", "--superlink", address, "--config", str(config)]
        + ["--out", str(out)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=tracker.env_with(**{ROLE: "run"}),
        start_new_session=True,
    )


def completed_rounds(out: Path) -> int:
    """Rounds done, from the run's folder while it works (written aside until published, ``outputs.py``)."""
    try:
        return int(json.loads((partial_path(out) / "metrics.json").read_text()).get("completed_rounds", 0))
    except (OSError, ValueError):
        return 0


def clientapp_training(name: str, after_round: int, out: Path, run: subprocess.Popen[bytes], tracker: Tracker) -> int:
    """The pid of ``name``'s ClientApp of the round after ``after_round``, once it has trained for 5 s."""
    deadline = time.monotonic() + 300
    earlier: set[int] | None = None  # ClientApps of the earlier round, still ending when its checkpoint is written
    while True:
        assert time.monotonic() < deadline, f"round {after_round + 1} never reached {name}'s training"
        assert run.poll() is None, "the run ended early"
        tracker.running()
        if completed_rounds(out) >= after_round and earlier is None:
            earlier = set(marked(ROLE, name))
        if earlier is not None:
            for pid, cmd in marked(ROLE, name).items():
                if "flwr-clientapp" in cmd and pid not in earlier and age_seconds(pid) > 5:
                    return pid
        time.sleep(0.3)


def test_a_site_killed_mid_round_then_the_coordinator_stopped_leave_nothing_running(tracker: Tracker, tmp_path: Path):
    port = launch.free_port()
    address = f"127.0.0.1:{port}"
    link = coordinator(tracker, tmp_path, port)
    sites: dict[str, launch.Managed] = {}
    run = None
    try:
        launch.wait_healthy(address, link)
        for name in ("site-a", "site-b"):
            sites[name] = site(tracker, tmp_path, name, address)
        home = launch.write_flwr_home(tmp_path / "cli", [launch.Connection("c", address)])
        wait_online("c", tracker.env_with(FLWR_HOME=str(home)), 2, [link, *sites.values()])
        config = tmp_path / "fed.toml"
        config.write_text(slow_second_round(min_sites=2))
        out = tmp_path / "fed"
        run = submit(tracker, tmp_path, address, config, out)
        clientapp = clientapp_training("site-b", 1, out, run, tracker)

        # 1. SIGKILL to site-b's `fedfreeze site` (what a service manager sees as the site) mid-training
        before = marked(ROLE, "site-b")
        assert clientapp in before and len(before) >= 4, before  # fedfreeze site, SuperNode, superexec, ClientApp
        assert sites["site-b"].process is not None
        os.kill(sites["site-b"].process.pid, signal.SIGKILL)
        site_gone, left = gone_within(ROLE, "site-b", 20)
        assert not left, f"still running {site_gone:.1f} s after site-b was killed: {left}"
        assert site_gone < 5, site_gone

        # 2. SIGTERM to the coordinator while round 2 waits for site-a's and site-b's replies
        assert link.process is not None
        processes = marked(ROLE, "coordinator")
        assert any("flwr-serverapp" in cmd for cmd in processes.values()), processes
        told = time.monotonic()
        os.kill(link.process.pid, signal.SIGTERM)
        assert link.process.wait(timeout=30) == 0, link.tail(30)
        _, left = gone_within(ROLE, "coordinator", 20)
        stop_seconds = time.monotonic() - told  # until every process of the coordinator has ended
        assert not left, f"still running after the coordinator's SIGTERM: {left}"
        assert stop_seconds < 10, stop_seconds
        log = messages(link.log_path.read_text())
        assert any(line.startswith("stopping: SIGTERM to flwr-serverapp") for line in log), log[-20:]
        said = [line for line in log if line.startswith("stopped (signal 15) in")]
        assert len(said) == 1, log[-20:]

        assert not out.exists()  # an interrupted run is not published; its folder is kept aside for --resume
        metrics = json.loads((partial_path(out) / "metrics.json").read_text())
        assert metrics["status"] == "interrupted" and metrics["completed_rounds"] == 1, metrics["reason"]
        info = metrics["interrupted"]
        assert info["completed_rounds"] == 1 and info["last_round_at"] and info["at"]
        assert "the coordinator was stopped while it ran" in info["how"]
        assert metrics["reason"].startswith("interrupted after round 1 (noticed ")
        assert "--resume" in metrics["reason"]

        assert run.wait(timeout=120) == 2
        last = (tmp_path / "logs" / "run.log").read_text().strip().splitlines()[-1]
        assert last.startswith("fedfreeze run: error: the federation was interrupted after round 1 (noticed "), last

        # site-a, whose coordinator went away in the middle of its training, stops cleanly with all it started
        assert sites["site-a"].process is not None
        os.kill(sites["site-a"].process.pid, signal.SIGTERM)
        assert sites["site-a"].process.wait(timeout=30) == 0, sites["site-a"].tail(20)
        site_a_gone, left = gone_within(ROLE, "site-a", 20)
        assert not left, left
        record_timing(
            "site SIGKILL mid-round (fedfreeze site, ClientApp training)",
            processes_before=len(before),
            all_gone_seconds=round(site_gone, 2),
        )
        record_timing(
            "coordinator SIGTERM mid-round",
            processes_before=len(processes),
            all_gone_seconds=round(stop_seconds, 2),
            metrics_status=metrics["status"],
            completed_rounds=metrics["completed_rounds"],
        )
    finally:
        tracker.running()
        if run is not None and run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
        for proc in [*sites.values(), link]:
            proc.stop()
    left = tracker.leftovers()
    assert not left, f"still running: {left}"


class ListServer:
    """Serves an approved-apps list through a FIFO, one reader at a time, until told to stop: the next
    reader then blocks in its open(), inside the approval check."""

    def __init__(self, path: Path, text: str) -> None:
        self.path, self.text = path, text.encode()
        os.mkfifo(path)
        self.serving = threading.Event()
        self.serving.set()
        self.done = threading.Event()
        self.served = 0
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while not self.done.is_set():
            if not self.serving.is_set():
                time.sleep(0.05)
                continue
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: no reader yet
                time.sleep(0.05)
                continue
            try:
                os.set_blocking(fd, True)  # opened without waiting for a reader; written as a plain file
                os.write(fd, self.text)
                self.served += 1
            except OSError:  # the reader went away
                pass
            finally:
                os.close(fd)


def test_a_site_killed_during_the_approval_check_leaves_nothing_running(tracker: Tracker, tmp_path: Path):
    port = launch.free_port()
    address = f"127.0.0.1:{port}"
    approved = ListServer(tmp_path / "approved-apps.fifo", app_hash(launch.APP_DIR).line() + "\n")
    link = coordinator(tracker, tmp_path, port)
    member = None
    run = None
    try:
        launch.wait_healthy(address, link)
        member = site(tracker, tmp_path, "site-a", address, "--approved-apps", str(approved.path))
        home = launch.write_flwr_home(tmp_path / "cli", [launch.Connection("c", address)])
        wait_online("c", tracker.env_with(FLWR_HOME=str(home)), 1, [link, member])
        assert approved.served >= 2  # the site read its list at start-up, and its runner's check did
        approved.serving.clear()  # from now on a reader of the list waits: the runner, in its check

        config = tmp_path / "fed.toml"
        config.write_text(slow_second_round(min_sites=1))
        run = submit(tracker, tmp_path, address, config, tmp_path / "fed")
        deadline = time.monotonic() + 120
        runner = None
        while runner is None:
            assert time.monotonic() < deadline, "the site never started a ClientApp"
            assert run.poll() is None
            tracker.running()
            runner = next(
                (p for p, cmd in marked(ROLE, "site-a").items() if "app-approval/bin/flwr-clientapp" in cmd), None
            )
            time.sleep(0.1)
        time.sleep(2.0)  # Python has started; the runner has the job's app and waits for the list
        assert runner in marked(ROLE, "site-a"), "the runner ended before it could be caught in its check"
        assert "is approved" not in member.log_path.read_text() and "refused app" not in member.log_path.read_text()

        # SIGKILL to `fedfreeze site`: no supervisor is left to clean up; the SuperNode dies with it, its
        # superexec with the SuperNode (a guard), and the runner with the superexec (armed before its check)
        before = marked(ROLE, "site-a")
        assert member.process is not None
        os.kill(member.process.pid, signal.SIGKILL)
        gone, left = gone_within(ROLE, "site-a", 20)
        assert not left, f"still running {gone:.1f} s after site-a was killed in the approval check: {left}"
        assert gone < 5, gone
        record_timing(
            "site SIGKILL during the approval check (fedfreeze site)",
            processes_before=len(before),
            all_gone_seconds=round(gone, 2),
        )
    finally:
        approved.done.set()
        tracker.running()
        if run is not None and run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
        for proc in [p for p in (member, link) if p is not None]:
            proc.stop()
    left = tracker.leftovers()
    assert not left, f"still running: {left}"

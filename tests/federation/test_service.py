"""systemd units for the coordinator and a site, and how the processes stop as systemd stops them.

systemd does not run as PID 1 on the machines the tests run on, so a unit is never started here.
What is checked: the units in ``deploy/systemd/`` are what ``fedfreeze service --print`` writes;
``systemd-analyze verify`` accepts the units (directives, the ExecStart program); and the stop
semantics of both kill modes, emulated on real processes: ``KillMode=mixed`` (SIGTERM to the main
process: the fault table, ``test_lifetime.py``) and ``KillMode=control-group`` (SIGTERM to every
process of the unit at once), each ending every process well within ``TimeoutStopSec``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedfreeze.cli import main
from fedfreeze.deploy import launch, service
from tests.federation.processes import Tracker, gone_within, marked, record_timing, site_folder, wait_online

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"
ROLE = "FEDFREEZE_TEST_ROLE"
# what deploy/systemd/ was printed with (docs/deployment.md#running-as-a-service)
COORDINATOR_ARGS = ["--fedfreeze", "/opt/fedfreeze/.venv/bin/fedfreeze", "--tls-dir", "/etc/fedfreeze/coordinator"]
SITE_ARGS = [
    "--fedfreeze",
    "/opt/fedfreeze/.venv/bin/fedfreeze",
    "--name",
    "site-a",
    "--data",
    "/srv/cxr/site-a",
    "--superlink",
    "fl.coordinator.example.org:9093",
    "--approved-apps",
    "/etc/fedfreeze/site-a/approved-apps.txt",
]


def printed(capsys, role: str, args: list[str]) -> str:
    assert main(["service", "--print", role, *args]) == 0
    return capsys.readouterr().out


def unit_text(printed: str) -> str:
    return printed.split("\n", 1)[1]  # the first line names the unit file


def test_the_units_in_deploy_systemd_are_what_fedfreeze_service_prints(capsys):
    coordinator = printed(capsys, "coordinator", COORDINATOR_ARGS)
    assert coordinator.startswith("# fedfreeze-coordinator.service\n")
    assert (UNITS / "fedfreeze-coordinator.service").read_text() == unit_text(coordinator)
    site = printed(capsys, "site", SITE_ARGS)
    assert site.startswith("# fedfreeze-site-site-a.service\n")
    assert (UNITS / "fedfreeze-site-site-a.service").read_text() == unit_text(site)
    # keys go in as credentials (root's files stay root's); fedfreeze alone gets the SIGTERM; restarts for ever
    for text in (coordinator, site):
        assert "KillMode=mixed" in text and f"TimeoutStopSec={service.STOP_TIMEOUT}" in text
        assert "User=fedfreeze" in text and "StartLimitIntervalSec=0" in text and "Restart=on-failure" in text
    assert (
        "--tls-dir %d" in coordinator
        and "LoadCredential=server.key:/etc/fedfreeze/coordinator/server.key" in coordinator
    )
    assert "--auth-key %d/site.key" in site and "LoadCredential=site.key:/etc/fedfreeze/site-a/site-a.key" in site
    assert "ReadOnlyPaths=/srv/cxr/site-a" in site and f"RestartSec={service.SITE_RESTART}" in site


def test_a_site_unit_needs_its_name_data_and_coordinator(capsys):
    assert main(["service", "--print", "site", "--name", "site-a"]) == 2
    assert capsys.readouterr().err.strip() == "fedfreeze service: error: a site's unit needs --data, --superlink"


@pytest.mark.process
@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_both_units(tmp_path: Path, capsys):
    """With this installation's fedfreeze as ExecStart (verify checks that it can run) and real files."""
    etc = tmp_path / "etc"
    etc.mkdir()
    for name in ("ca.pem", "server.pem", "server.key", "site-a.key", "approved-apps.txt"):
        (etc / name).write_text("")
    (tmp_path / "data").mkdir()
    units = {
        "fedfreeze-coordinator.service": unit_text(printed(capsys, "coordinator", ["--tls-dir", str(etc)])),
        "fedfreeze-site-site-a.service": unit_text(
            printed(
                capsys,
                "site",
                ["--name", "site-a", "--data", str(tmp_path / "data"), "--superlink", "x:9093", "--keys-dir", str(etc)],
            )
        ),
    }
    for name, text in units.items():
        (tmp_path / name).write_text(text)
        proc = subprocess.run(
            ["systemd-analyze", "verify", str(tmp_path / name)], capture_output=True, text=True, timeout=60
        )
        complaints = [line for line in proc.stderr.splitlines() if name in line or "Failed" in line]
        assert proc.returncode == 0 and not complaints, proc.stderr
    bad = units["fedfreeze-coordinator.service"].replace("KillMode=mixed", "KillMode=bogus")
    (tmp_path / "bad.service").write_text(bad)
    proc = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "bad.service")], capture_output=True, text=True)
    assert "Failed to parse kill mode" in proc.stderr  # the check above would see a bad directive


@pytest.mark.process
def test_every_process_of_a_unit_sigtermed_at_once_ends_well_within_the_stop_timeout(tracker: Tracker, tmp_path: Path):
    """``KillMode=control-group``: systemd SIGTERMs every process of the unit at the same moment."""
    port = launch.free_port()
    address = f"127.0.0.1:{port}"

    def start(role: str, *args: str) -> launch.Managed:
        cmd = [sys.executable, "-m", "fedfreeze", *args]
        return launch.Managed(role, cmd, tmp_path / f"{role}.log", tracker.env_with(**{ROLE: role})).start()

    link = start("coordinator", "server", "--insecure", "--port", str(port), "--state-dir", str(tmp_path / "state"))
    site = None
    try:
        launch.wait_healthy(address, link)
        data = site_folder(tmp_path / "data", "site-a")
        site = start("site-a", "site", "--insecure", "--data", str(data), "--name", "site-a", "--superlink", address)
        home = launch.write_flwr_home(tmp_path / "cli", [launch.Connection("c", address)])
        wait_online("c", tracker.env_with(FLWR_HOME=str(home)), 1, [link, site])
        took = {}
        for role in ("site-a", "coordinator"):  # the site first, as the docs stop them
            group = marked(ROLE, role)
            assert len(group) >= 3, group  # fedfreeze, the Flower process, its superexec
            told = time.monotonic()
            for pid in group:
                os.kill(pid, signal.SIGTERM)
            gone, left = gone_within(ROLE, role, service.STOP_TIMEOUT)
            assert not left, f"{role}: still running {service.STOP_TIMEOUT} s after SIGTERM to all: {left}"
            took[role] = time.monotonic() - told
            assert took[role] < 10, took
        assert site.process is not None and site.process.wait(timeout=5) == 0
        assert link.process is not None and link.process.wait(timeout=5) == 0
        record_timing(
            "SIGTERM to every process at once (KillMode=control-group)",
            **{f"{role}_all_gone_seconds": round(seconds, 2) for role, seconds in took.items()},
        )
    finally:
        tracker.running()
        for proc in [p for p in (site, link) if p is not None]:
            proc.stop()
    left = tracker.leftovers()
    assert not left, f"still running: {left}"

"""Secure aggregation with Flower's own processes: in its simulation runtime (Ray), and on a loopback
deployment over TLS (``fedfreeze server --tls-dir``, two ``fedfreeze site --root-cert``, ``fedfreeze
run``), where every stage of SecAgg+ is its own message and the site keeps its secrets in the state
its SuperNode holds between messages. (In process, with the message audit: test_secure_aggregation.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedfreeze.deploy import launch
from tests.federation.conftest import small_config
from tests.federation.processes import Tracker, check_completed, messages, run_cli, site_folder, wait_online

pytestmark = [pytest.mark.process, pytest.mark.slow]

DOCKER = Path(__file__).resolve().parents[2] / "docker"


def check_secure(metrics: dict, sites: int) -> None:
    """Every round and the final evaluation pooled the exact sum of the training sites' statistics."""
    for record in [*metrics["rounds"], metrics["final"]]:
        assert record["secure_sum"]["groups"]["train"] == {"sites": sites, "dropped": [], "threshold": 2}, record
        assert record["pooled"]["cells"]["min_cell_count"] == 1
        assert len(record["pooled"]["cells"]["secure_sum"]["sites"]) == sites
        assert record["secure_sum"]["bytes_down"] > 0 and record["secure_sum"]["mask_bytes_up"] > 0


def test_secure_aggregation_in_the_simulation_runtime(tracker: Tracker, tmp_path: Path):
    config = tmp_path / "fed.toml"
    config.write_text(small_config(rounds=2, probe_rounds=2, probe_local_epochs=3, secure_aggregation=True))
    out = tmp_path / "sim"
    code, log = run_cli(["simulate", "--config", str(config), "--out", str(out)], tracker, tmp_path / "sim.log")
    assert code == 0, log[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    check_completed(metrics, rounds=2)
    check_secure(metrics, sites=3)
    assert "[exact: secure sum of 3 sites]" in log and "val-cell" not in log


def test_secure_aggregation_on_a_tls_deployment(tracker: Tracker, tmp_path: Path):
    secrets = tmp_path / "secrets"
    made = subprocess.run(
        ["bash", str(DOCKER / "make-certs.sh"), "--out", str(secrets), "--owner", str(os.getuid()), "coordinator",
         "localhost", "127.0.0.1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stdout + made.stderr
    ca = secrets / "ca.pem"
    port = launch.free_port()
    address = f"127.0.0.1:{port}"
    link = launch.Managed(
        "superlink",
        [sys.executable, "-m", "fedfreeze", "server", "--host", "127.0.0.1", "--port", str(port), "--state-dir",
         str(tmp_path / "state" / "coordinator"), "--tls-dir", str(secrets), "--no-auth"],
        tmp_path / "logs" / "superlink.log",
        tracker.env,
    ).start()  # fmt: skip
    sites: list[launch.Managed] = []
    try:
        launch.wait_healthy(address, link, tls=launch.TLSFiles(ca))
        assert "--ssl-certfile" in link.log_path.read_text() and "--insecure" not in link.log_path.read_text()
        for name in ("site-a", "site-b"):
            cmd = [
                sys.executable, "-m", "fedfreeze", "site", "--data", str(site_folder(tmp_path / name, name)),
                "--name", name, "--superlink", address, "--port", str(launch.free_port()),
                "--state-dir", str(tmp_path / "state" / name), "--root-cert", str(ca), "--no-auth",
            ]  # fmt: skip
            env = tracker.env_with(FLWR_HOME=str(tmp_path / "home" / name), OMP_NUM_THREADS="1")
            sites.append(launch.Managed(name, cmd, tmp_path / "logs" / f"{name}.log", env).start())
        launch.write_flwr_home(Path(tracker.env["FLWR_HOME"]), [launch.Connection("secure-tls", address, ca)])
        wait_online("secure-tls", tracker.env, 2, [link, *sites], timeout=90.0)
        config = tmp_path / "fed.toml"
        config.write_text(small_config(rounds=1, probe_rounds=1, probe_local_epochs=3, secure_aggregation=True))
        out = tmp_path / "fed"
        code, log = run_cli(
            ["run", "--superlink", address, "--root-cert", str(ca), "--config", str(config), "--out", str(out)],
            tracker,
            tmp_path / "logs" / "run.log",
        )
        assert code == 0, log[-3000:]
        metrics = json.loads((out / "metrics.json").read_text())
        check_completed(metrics, rounds=1)
        check_secure(metrics, sites=2)
        lines = messages(log)
        assert any("[exact: secure sum of 2 sites]" in line for line in lines), log[-3000:]
        assert not any("val-cell" in line for line in lines)
    finally:
        tracker.running()
        for proc in reversed(sites):
            proc.stop()
        link.stop()

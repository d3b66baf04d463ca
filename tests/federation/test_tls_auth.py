"""The topology of docker/compose.yaml without containers, on loopback: TLS and site authentication on.

What ``docker/test-podman.sh`` checks in containers (opt-in: it builds images for minutes), checked
here with processes on every test run:

- ``docker/make-certs.sh`` makes a CA and the coordinator's certificate, ``docker/make-site-key.sh``
  each site's key pair (the scripts the hospitals use);
- ``fedfreeze server --tls-dir --auth`` (the server image's entry point) starts a SuperLink that only
  speaks TLS and only admits registered SuperNodes; ``fedfreeze register`` registers site-a and
  site-b (and again: idempotent);
- two SuperNodes through ``fedfreeze site --root-cert --auth-key`` (the site image's entry point)
  and ``fedfreeze run --root-cert`` run a federation to completion with pooled metrics;
- a site whose key was never registered is refused, and a registered site that trusts another CA
  cannot connect: both exit with Flower's connection error, and neither is ever online;
- ``fedfreeze sites`` lists the sites by their registered names with their keys' fingerprints;
  ``fedfreeze unregister site-b`` revokes site-b's key, and site-b, started again, is refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedfreeze.cli import main
from fedfreeze.deploy import launch
from fedfreeze.state.keys import fingerprint
from tests.federation.conftest import small_config
from tests.federation.processes import TAG_VAR, Tracker, check_completed, run_cli, site_folder, wait_online

DOCKER = Path(__file__).resolve().parents[2] / "docker"
CONNECTION = "fedfreeze-tls"
CONFIG = small_config(rounds=1, probe_rounds=1, probe_local_epochs=3)


def script(name: str, *args: str | Path) -> str:
    """Run one of docker/'s scripts (as the hospital's IT staff would); its output."""
    proc = subprocess.run(["bash", str(DOCKER / name), *map(str, args)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


@pytest.mark.process
def test_tls_and_site_authentication_on_loopback(tracker: Tracker, tmp_path: Path, monkeypatch, capsys):
    owner = str(os.getuid())  # keys owned by whoever runs the processes (49999 in the images)
    secrets, public, other = tmp_path / "secrets", tmp_path / "site-keys", tmp_path / "other-ca"
    script("make-certs.sh", "--out", secrets, "--owner", owner, "coordinator", "localhost", "127.0.0.1")
    script("make-certs.sh", "--out", other, "--owner", owner)  # a CA the coordinator's certificate does not come from
    for site in ("site-a", "site-b", "site-c", "site-d"):
        script("make-site-key.sh", "--secrets", secrets, "--public", public, "--owner", owner, site)
    assert (secrets / "server.key").stat().st_mode & 0o077 == 0  # private keys: mode 600
    assert (secrets / "site-a.key").stat().st_mode & 0o077 == 0

    # the coordinator: TLS and SuperNode authentication, through the server image's entry point
    port = launch.free_port()
    address = f"127.0.0.1:{port}"
    ca = secrets / "ca.pem"
    link = launch.Managed(
        "superlink",
        [
            sys.executable,
            "-m",
            "fedfreeze",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--state-dir",
            str(tmp_path / "state" / "coordinator"),
            "--tls-dir",
            str(secrets),
            "--auth",
        ],
        tmp_path / "logs" / "superlink.log",
        tracker.env,
    ).start()
    sites: list[launch.Managed] = []
    try:
        launch.wait_healthy(address, link, tls=launch.TLSFiles(ca))
        link_log = link.log_path.read_text()
        assert "--ssl-certfile" in link_log and "--enable-supernode-auth" in link_log  # the printed command
        assert "--insecure" not in link_log

        # register site-a, site-b and site-d (site-c never); a second registration changes nothing
        monkeypatch.setenv(TAG_VAR, tracker.tag)  # `fedfreeze register` runs in this process; its flwr is tagged

        def register(site: str) -> str:
            capsys.readouterr()
            args = ["register", str(public / f"{site}.pub"), "--superlink", address, "--root-cert", str(ca)]
            assert main(args) == 0, capsys.readouterr()
            return capsys.readouterr().out

        for site in ("site-a", "site-b", "site-d"):
            assert f"{site}: registered, node id" in register(site)
        assert "site-a: this public key is registered already" in register("site-a")

        def site(name: str, root_cert: Path, data_site: str) -> launch.Managed:
            cmd = [
                sys.executable,
                "-m",
                "fedfreeze",
                "site",
                "--data",
                str(site_folder(tmp_path / name, data_site)),
                "--name",
                name,
                "--superlink",
                address,
                "--port",
                str(launch.free_port()),
                "--state-dir",
                str(tmp_path / "state" / name),
                "--root-cert",
                str(root_cert),
                "--auth-key",
                str(secrets / f"{name}.key"),
            ]
            # each site its own FLWR_HOME, as on its own machine; one thread each on this shared machine
            env = tracker.env_with(FLWR_HOME=str(tmp_path / "home" / name), OMP_NUM_THREADS="1")
            proc = launch.Managed(name, cmd, tmp_path / "logs" / f"{name}.log", env).start()
            sites.append(proc)
            return proc

        members = [site("site-a", ca, "site-a"), site("site-b", ca, "site-b")]
        unregistered = site("site-c", ca, "site-c")
        wrong_ca = site("site-d", other / "ca.pem", "site-c")

        # (a) an unregistered key is refused; (b) a registered site that trusts another CA cannot connect
        for proc in (unregistered, wrong_ca):
            assert proc.process is not None
            assert proc.process.wait(timeout=60) != 0, proc.tail(30)
        assert "Failed to activate SuperNode" in unregistered.log_path.read_text(), unregistered.tail(30)
        wrong_log = wrong_ca.log_path.read_text()
        assert "CERTIFICATE_VERIFY_FAILED" in wrong_log, wrong_log
        assert "Failed to initialize the connection" in wrong_log, wrong_log

        launch.write_flwr_home(Path(tracker.env["FLWR_HOME"]), [launch.Connection(CONNECTION, address, ca)])
        wait_online(CONNECTION, tracker.env, 2, [link, *members])
        nodes = launch.flwr_json(["supernode", "ls", CONNECTION], tracker.env)["nodes"]
        assert sorted(n["status"] for n in nodes) == ["online", "online", "registered"], nodes  # site-d: never online

        # a federation over TLS, between the two registered sites
        (tmp_path / "fed.toml").write_text(CONFIG)
        out = tmp_path / "fed"
        code, log = run_cli(
            [
                "run",
                "--superlink",
                address,
                "--root-cert",
                str(ca),
                "--config",
                str(tmp_path / "fed.toml"),
                "--out",
                str(out),
            ],
            tracker,
            tmp_path / "logs" / "run.log",
        )
        assert code == 0, log[-3000:]
        assert "federation completed: 1 of 1 round (1 probe)" in log
        metrics = json.loads((out / "metrics.json").read_text())
        check_completed(metrics, rounds=1)
        assert sorted(s["site"] for s in metrics["final"]["sites"]) == ["site-a", "site-b"]
        status = launch.run_status(CONNECTION, None, tracker.env)
        assert status["status"] == "finished:completed", status

        # the sites by the names they were registered with, and their keys' fingerprints as ssh-keygen prints them
        tls = ["--superlink", address, "--root-cert", str(ca)]
        capsys.readouterr()
        assert main(["sites", *tls]) == 0
        rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
        for name in ("site-a", "site-b"):
            assert (
                rows[name].split()[1] == "online" and fingerprint((public / f"{name}.pub").read_bytes()) in rows[name]
            )
        assert rows["site-d"].split()[1] == "registered"  # its key is registered; it never got in
        assert "2 of 3 registered sites online; offline: site-d (last seen never)" in rows["2"]

        # unregistering a site's key locks it out: started again, it is refused
        assert main(["unregister", "site-b", *tls]) == 0
        said = capsys.readouterr().out
        assert said.startswith("site-b: unregistered (node id ") and "can no longer join" in said, said
        assert main(["unregister", "site-b", *tls]) == 2
        assert "SITE 'site-b': no registered site of that name or node id" in capsys.readouterr().err
        members[1].stop()
        again = site("site-b", ca, "site-b")
        assert again.process is not None and again.process.wait(timeout=90) != 0, again.tail(30)
        assert "Failed to activate SuperNode" in again.log_path.read_text(), again.tail(30)
        assert main(["sites", *tls, "--json"]) == 0
        listed = {s["name"]: s for s in json.loads(capsys.readouterr().out)}
        assert listed["site-b"]["status"] == "unregistered" and listed["site-a"]["status"] == "online"
    finally:
        tracker.running()  # remember every process, to wait until each has ended and been reaped
        for proc in reversed(sites):
            proc.stop()
        link.stop()
    assert {"flower-superlink", "flower-supernode", "flwr-serverapp", "flwr-clientapp"} <= tracker.names()

"""Running a federation the way a hospital's IT does, without containers: real Flower processes on loopback.

- Safe by default: ``fedfreeze server`` and ``site`` refuse to start without TLS unless told
  ``--insecure``; an insecure coordinator listens on 127.0.0.1 only; ``--help`` shows the defaults.
- A second site on one machine with the first one's port is refused in one line, before Flower starts.
- With TLS and site authentication (the default): an unregistered site says why it cannot join
  and how to fix it; ``fedfreeze sites`` and ``fedfreeze runs`` list sites and runs; a site's
  SuperNode killed mid-round takes its ClientApp with it within seconds, and the round records one
  failure for that site, by name, with Flower's reason and the seconds it took; the coordinator's
  log says whom it waits for meanwhile; Flower's installed apps stay in the state folders.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedfreeze.cli import build_parser, main
from fedfreeze.deploy import launch
from fedfreeze.outputs import partial_path
from tests.federation.conftest import read_metrics, small_config
from tests.federation.processes import Tracker, messages, record_timing, run_cli, site_folder, wait_online

DOCKER = Path(__file__).resolve().parents[2] / "docker"
SITE_VAR = "FEDFREEZE_TEST_SITE"  # marks every process of one site (the SuperNode's children inherit it)
# Round 1 probes the head (quick); round 2 fine-tunes layer4 for many epochs: long enough to kill a
# site in the middle of its training.
SLOW_SECOND_ROUND = small_config(
    rounds=2, probe_rounds=1, probe_local_epochs=2, local_epochs=40, unfreeze={"layer4": 0.0}
)


@pytest.fixture
def tracker(tracker: Tracker, tmp_path: Path) -> Tracker:
    """The shared tracker (tests/federation/conftest.py), with HOME in the test's folder."""
    tracker.env["HOME"] = str(tmp_path / "home")  # whatever Flower would put in ~/.flwr would land here
    return tracker


# ---------------------------------------------------------------------------------------- refusals, help
def test_no_tls_and_no_insecure_is_refused_in_one_line(tmp_path: Path, capsys):
    state = tmp_path / "coordinator-state"
    assert main(["server", "--state-dir", str(state)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedfreeze server: error: give --tls-dir DIR") and "--insecure" in err
    assert len(err.splitlines()) == 1
    assert not state.exists()  # refused before anything was made

    assert main(["site", "--data", str(tmp_path), "--name", "site-a"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedfreeze site: error: give --root-cert CA.pem") and "--insecure" in err
    assert len(err.splitlines()) == 1

    assert main(["site", "--data", str(tmp_path), "--name", "site-a", "--root-cert", str(tmp_path / "ca.pem")]) == 2
    assert "give --auth-key SITE.key" in capsys.readouterr().err  # site authentication is the default too

    assert main(["run", "--out", str(tmp_path / "out")]) == 2
    assert "give --root-cert CA.pem" in capsys.readouterr().err

    assert main(["server", "--insecure", "--auth", "--state-dir", str(state)]) == 2
    assert "--auth needs TLS" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command, defaults",
    [
        ("server", ["(default: 9093)", "(default: coordinator-state)", "127.0.0.1 with --insecure"]),
        ("site", ["(default: 9094)", "(default: 127.0.0.1:9093)", "(default: ~/.cache/fedfreeze/NAME)"]),
        ("run", ["(default: fed-demo.toml)", "(default: a temporary folder; nothing goes to ~/.flwr)"]),
    ],
)
def test_help_shows_the_defaults(command: str, defaults: list[str]):
    subcommands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    text = " ".join(subcommands[command].format_help().split())  # argparse wraps lines
    for default in defaults:
        assert default in text, (command, default)
    assert "(default: None)" not in text and "(default: False)" not in text


# ---------------------------------------------------------------------------------------- insecure, ports
def listening(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of the sockets listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                found.append(address)
    return found


@pytest.mark.process
def test_insecure_coordinator_is_loopback_only_and_a_busy_site_port_is_refused(tracker: Tracker, tmp_path: Path):
    port = launch.free_port()
    link = launch.Managed(
        "superlink",
        [
            sys.executable,
            "-m",
            "fedfreeze",
            "server",
            "--insecure",
            "--port",
            str(port),
            "--state-dir",
            str(tmp_path / "state"),
        ],
        tmp_path / "logs" / "superlink.log",
        tracker.env,
    ).start()
    sites: list[launch.Managed] = []
    try:
        launch.wait_healthy(f"127.0.0.1:{port}", link)
        assert listening(port) == ["0100007F"]  # 127.0.0.1 only: no 0.0.0.0, no ::
        log = link.log_path.read_text()
        said = [line for line in messages(log) if line.startswith("fedfreeze server: --insecure")]
        assert len(said) == 1 and "no TLS" in said[0] and "no site authentication" in said[0]
        assert "only processes on this machine" in said[0] and f"127.0.0.1:{port}" in said[0]
        assert f"--host 127.0.0.1 --port {port}" in log  # the printed Flower command

        # a second coordinator on the same port: one line, exit 2
        code, output = run_cli(
            ["server", "--insecure", "--port", str(port), "--state-dir", str(tmp_path / "s2")],
            tracker,
            tmp_path / "logs" / "server-2.log",
            timeout=60,
        )
        assert code == 2 and f"--port {port}: 127.0.0.1:{port} is in use" in output, output

        # two sites on one machine: the second one with the first one's ClientApp port is refused
        site_port = launch.free_port()

        def site(name: str) -> list[str]:
            return [
                "site",
                "--insecure",
                "--data",
                str(site_folder(tmp_path / name, name)),
                "--name",
                name,
                "--superlink",
                f"127.0.0.1:{port}",
                "--port",
                str(site_port),
                "--state-dir",
                str(tmp_path / "state" / name),
            ]

        sites.append(
            launch.Managed(
                "site-a",
                [sys.executable, "-m", "fedfreeze", *site("site-a")],
                tmp_path / "logs" / "site-a.log",
                tracker.env,
            ).start()
        )
        deadline = time.monotonic() + 60
        while not launch.port_busy(site_port) and time.monotonic() < deadline:
            assert sites[0].alive(), sites[0].tail()
            time.sleep(0.3)
        code, output = run_cli(site("site-b"), tracker, tmp_path / "logs" / "site-b.log", timeout=60)
        assert code == 2, output
        errors = [line for line in output.splitlines() if "error" in line]
        assert errors == [
            f"fedfreeze site: error: --port {site_port}: 127.0.0.1:{site_port} is in use, probably by "
            f"another site on this machine; give each site its own port, e.g. --port "
            f"{launch.free_port_from(site_port + 1)}"
        ], output
        assert "Traceback" not in output and "flower-supernode" not in output  # refused before Flower started
        assert sites[0].alive()  # the first site goes on

        home = launch.write_flwr_home(tmp_path / "cli", [launch.Connection("c", f"127.0.0.1:{port}")])
        wait_online("c", tracker.env_with(FLWR_HOME=str(home)), 1, [link, sites[0]])
        code, output = run_cli(
            ["sites", "--superlink", f"127.0.0.1:{port}", "--insecure"],
            tracker,
            tmp_path / "logs" / "sites.log",
            timeout=60,
        )
        assert code == 0 and "1 of 1 registered sites online" in output, output
    finally:
        tracker.running()
        for proc in [*sites, link]:
            proc.stop()
    left = tracker.leftovers()
    assert not left, f"still running: {left}"


# ---------------------------------------------------------------------------------------- TLS + auth
def script(name: str, *args: str | Path) -> None:
    proc = subprocess.run(["bash", str(DOCKER / name), *map(str, args)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def site_processes(site: str) -> dict[int, str]:
    """Running (not zombie) processes whose environment marks them as ``site``'s: pid -> command line."""
    marker = f"{SITE_VAR}={site}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state in ("Z", "X") or marker not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except (OSError, IndexError):
            continue
    return found


def age_seconds(pid: int) -> float:
    """Seconds since the process started (Linux /proc)."""
    started = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - started / os.sysconf("SC_CLK_TCK")


@pytest.mark.process
def test_tls_deployment_kill_a_site_mid_round(tracker: Tracker, tmp_path: Path, capsys):
    owner = str(os.getuid())
    secrets, public = tmp_path / "secrets", tmp_path / "site-keys"
    script("make-certs.sh", "--out", secrets, "--owner", owner, "coordinator", "localhost", "127.0.0.1")
    for site in ("site-a", "site-b", "site-c"):
        script("make-site-key.sh", "--secrets", secrets, "--public", public, "--owner", owner, site)
    ca = secrets / "ca.pem"
    port = launch.free_port()
    address = f"127.0.0.1:{port}"
    state = tmp_path / "state"
    # TLS and site authentication without asking for them: the defaults
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
            str(state / "coordinator"),
            "--tls-dir",
            str(secrets),
        ],
        tmp_path / "logs" / "superlink.log",
        tracker.env,
    ).start()
    sites: dict[str, launch.Managed] = {}
    run: subprocess.Popen | None = None
    try:
        launch.wait_healthy(address, link, tls=launch.TLSFiles(ca))
        assert "--enable-supernode-auth" in link.log_path.read_text()
        node_ids = {}
        for site in ("site-a", "site-b"):
            code, output = run_cli(
                ["register", str(public / f"{site}.pub"), "--superlink", address, "--root-cert", str(ca)],
                tracker,
                tmp_path / "logs" / f"register-{site}.log",
            )
            assert code == 0, output
            node_ids[site] = int(re.search(rf"{site}: registered, node id (\d+)", output).group(1))

        def start(site: str) -> launch.Managed:
            cmd = [
                sys.executable,
                "-m",
                "fedfreeze",
                "site",
                "--data",
                str(site_folder(tmp_path / site, site)),
                "--name",
                site,
                "--superlink",
                address,
                "--port",
                str(launch.free_port()),
                "--state-dir",
                str(state / site),
                "--root-cert",
                str(ca),
                "--auth-key",
                str(secrets / f"{site}.key"),
                "--threads",
                "1",
            ]
            sites[site] = launch.Managed(
                site, cmd, tmp_path / "logs" / f"{site}.log", tracker.env_with(**{SITE_VAR: site})
            ).start()
            return sites[site]

        # a site whose key was never registered: Flower's exit code, then one line with the cause and the fix
        refused = start("site-c")
        assert refused.process is not None and refused.process.wait(timeout=90) == 1, refused.tail(30)
        assert "Exit Code: 305" in refused.log_path.read_text()  # Flower's code is in its message, not its status
        last = refused.tail(1)
        assert last.startswith(
            "fedfreeze site: error: site site-c could not join (Flower exit code 305): the "
            "coordinator refused this site: most likely its public key is not registered "
            "there"
        ), last
        assert f"`fedfreeze register site-c.pub --superlink {address} --root-cert CA.pem`" in last
        assert len(last) < 600 and "\n" not in last

        start("site-a")
        start("site-b")
        cli_home = launch.write_flwr_home(tmp_path / "cli", [launch.Connection("c", address, ca)])
        wait_online("c", tracker.env_with(FLWR_HOME=str(cli_home)), 2, [link, sites["site-a"], sites["site-b"]])
        tls_args = ["--superlink", address, "--root-cert", str(ca)]
        code, output = run_cli(["sites", *tls_args], tracker, tmp_path / "logs" / "sites-1.log", timeout=60)
        assert code == 0 and "2 of 2 registered sites online" in output, output
        assert all(str(node_ids[s]) in output for s in ("site-a", "site-b"))

        # a federation whose second round is slow; site-b's SuperNode is killed while it trains
        (tmp_path / "fed.toml").write_text(SLOW_SECOND_ROUND)
        out = tmp_path / "fed"
        run_log = tmp_path / "logs" / "run.log"
        with run_log.open("w") as handle:
            run = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fedfreeze",
                    "run",
                    *tls_args,
                    "--config",
                    str(tmp_path / "fed.toml"),
                    "--out",
                    str(out),
                ],
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=tracker.env,
                start_new_session=True,
            )
        deadline = time.monotonic() + 300
        clientapp = None
        earlier: set[int] | None = None  # ClientApps of round 1, still ending when its checkpoint is written
        while clientapp is None:
            assert time.monotonic() < deadline, "round 2 never reached site-b's training"
            assert run.poll() is None, run_log.read_text()[-3000:]
            tracker.running()
            metrics = partial_path(out) / "metrics.json"  # the run writes aside until it completes
            done = json.loads(metrics.read_text()).get("completed_rounds", 0) if metrics.is_file() else 0
            if done >= 1 and earlier is None:
                earlier = set(site_processes("site-b"))
            if earlier is not None:  # round 2 is under way: wait until site-b's ClientApp is into its training
                clientapp = next(
                    (
                        pid
                        for pid, cmd in site_processes("site-b").items()
                        if "flwr-clientapp" in cmd and pid not in earlier and age_seconds(pid) > 8
                    ),
                    None,
                )
            time.sleep(0.5)
        supernode = next(pid for pid, cmd in site_processes("site-b").items() if "flower-supernode" in cmd)
        before = site_processes("site-b")
        assert clientapp in before and len(before) >= 4  # `fedfreeze site`, SuperNode, superexec, ClientApp
        os.kill(supernode, signal.SIGKILL)
        killed_at = time.monotonic()
        while (left := site_processes("site-b")) and time.monotonic() - killed_at < 30:
            time.sleep(0.2)
        gone_after = time.monotonic() - killed_at
        assert not left, f"still running {gone_after:.0f} s after site-b's SuperNode was killed: {left}"
        assert gone_after < 10, gone_after
        assert "ended by signal 9" in sites["site-b"].tail(5)

        assert run.wait(timeout=300) == 2  # 1 site left, min-sites = 2: the run fails, and says so
        log = run_log.read_text()
        metrics = read_metrics(out)
        assert metrics["status"] == "failed" and metrics["completed_rounds"] == 1
        failed = metrics["failed_round"]
        assert failed["round"] == 2 and failed["rejected"] == []
        assert len(failed["failures"]) == 1, failed["failures"]  # one record for site-b, none for the SuperLink
        failure = failed["failures"][0]
        assert (failure["node"], failure["site"]) == (node_ids["site-b"], "site-b")
        assert failure["reason"].startswith("the site's SuperNode stopped reporting"), failure
        assert "Node Unavailable" in failure["reason"]
        waited = time.monotonic() - killed_at
        assert 8 < failure["seconds"] < 8 + waited + 5, (failure, waited)  # pushed before the kill; not 900 s
        assert "1 valid replies of training sites, fewer than min-sites = 2 (1 failed, 0 rejected)" in metrics["reason"]
        # while it waits, the coordinator says whom for; once site-b's failure is in, it says so
        waiting = re.findall(
            r"round 2: (\d) of 2 sites replied \(([^)]*)\)(, 1 failed \(site-b\))?; waiting for "
            r"(\d) \(([^)]*)\); giving up in (\d+) s",
            log,
        )
        assert waiting, log[-3000:]
        for replied, _, failed, pending, who, _ in waiting:
            assert int(replied) + bool(failed) + int(pending) == 2, waiting
            assert ("site-b" in who) != bool(failed), waiting
        assert "round 2: site-b failed after" in log

        record_timing(
            "site SIGKILL mid-round (its SuperNode, ClientApp training)",
            processes_before=len(before),
            all_gone_seconds=round(gone_after, 2),
            failure_recorded_after_seconds=failure["seconds"],
        )
        with capsys.disabled():
            print(
                f"\nsite-b's SuperNode killed: all its processes gone after {gone_after:.1f} s; its one failure "
                f"record came {failure['seconds']:.1f} s after the round's messages were pushed"
            )
        code, output = run_cli(["runs", *tls_args], tracker, tmp_path / "logs" / "runs.log", timeout=60)
        assert code == 0 and "finished:failed" in output and "1 run(s)" in output, output

        # Flower's installed apps are in the state folders, nothing in the home folder
        assert any((state / "coordinator" / "flwr-home" / "apps").iterdir())
        assert any((state / "site-a" / "flwr-home" / "apps").iterdir())
        assert not (tmp_path / "home" / ".flwr").exists()

        # SIGTERM to `fedfreeze site` alone (not its process group) stops its SuperNode too
        wrapper = sites["site-a"].process
        assert wrapper is not None
        os.kill(wrapper.pid, signal.SIGTERM)
        assert wrapper.wait(timeout=30) == 0, sites["site-a"].tail(20)
        deadline = time.monotonic() + 15
        while site_processes("site-a") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not site_processes("site-a")
    finally:
        tracker.running()
        if run is not None and run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
        for proc in [*sites.values(), link]:
            proc.stop()
    left = tracker.leftovers()
    assert not left, f"still running: {left}"


@pytest.mark.process
def test_make_certs_help_is_a_usage_message():
    proc = subprocess.run(["bash", str(DOCKER / "make-certs.sh"), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: bash docker/make-certs.sh [--out DIR] [--days N] [--owner UID] [NAME ...]")
    assert "--owner UID" in proc.stdout and "set -euo" not in proc.stdout and "OUT=" not in proc.stdout
    bad = subprocess.run(["bash", str(DOCKER / "make-certs.sh"), "--out"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and bad.stderr.strip() == "make-certs: --out needs a value (see --help)"


CHILD = """
import sys, time
from fedfreeze.deploy.launch import die_with_parent
if sys.argv[1] == "guard":
    die_with_parent()
print("armed", flush=True)
time.sleep(60)
"""
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.process
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a parent-death signal is Linux's")
@pytest.mark.parametrize("guard", [True, False])
def test_a_process_with_the_guard_ends_with_its_parent(guard: bool):
    """What a site's ClientApp does at start-up (client/app.py): its parent killed outright, it gets SIGTERM."""
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, CHILD, "guard" if guard else "none"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert parent.stdout.readline().strip() == "armed"
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 5
    while (
        time.monotonic() < deadline
        and Path(f"/proc/{child}").exists()
        and Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    ):
        time.sleep(0.1)
    alive = Path(f"/proc/{child}").exists() and Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[
        0
    ] not in ("Z", "X")
    if alive:
        os.kill(child, signal.SIGKILL)
    assert alive is not guard  # with the guard it is gone; without it, it would train on, orphaned


def final_metrics(rule: str, threshold: float) -> dict:
    """The parts of metrics.json that ``fedfreeze run`` prints, for a binary federation."""
    at = {
        "threshold": threshold,
        "n": 51,
        "auroc": 0.96,
        "balanced_accuracy": 0.94,
        "f1": 0.95,
        "sensitivity": 0.93,
        "specificity": 0.96,
    }
    return {
        "status": "completed",
        "completed_rounds": 2,
        "totals": {"bytes_up": 2e7, "seconds": 39},
        "threshold_rule": rule,
        "model": "runs/quick/model",
        "exported": {
            "round": 2,
            "rule": "last round",
            "threshold_interval": [0.47, 0.67],
            "pooled": {"at_threshold_next": at},
        },
        "final": {"weighted_mean": {"auroc": 0.97}},
    }


@pytest.mark.parametrize("rule, threshold", [("youden", 0.47), ("0.5", 0.5)])
def test_printed_metrics_name_their_threshold(rule: str, threshold: float, capsys):
    from fedfreeze.cli.report import print_federation

    print_federation(final_metrics(rule, threshold), Path("runs/quick"))
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines if line.startswith("  ") and not line.startswith("  (")}
    assert set(rows) == {"auroc", "balanced_accuracy", "f1", "sensitivity", "specificity"}
    assert rows.pop("auroc").endswith("(over all thresholds)")
    assert all(row.endswith(f"at threshold {threshold:.3f}") for row in rows.values()), rows
    header = next(line for line in lines if line.startswith("pooled validation metrics"))
    if rule == "youden":  # fitted to the very data it is reported on
        assert "chosen (youden, bootstrap 95% interval 0.470-0.670) on these same validation data" in header
        assert "optimistic" in header
    else:
        assert "is the config's (federation.threshold = 0.5)" in header and "optimistic" not in header
    assert "over all thresholds" in next(line for line in lines if "weighted mean" in line)


def test_printed_metrics_from_cells_show_the_range_the_cells_allow(capsys):
    from fedfreeze.cli.report import print_federation

    metrics = final_metrics("0.5", 0.5)
    at = metrics["exported"]["pooled"]["at_threshold_next"]
    at["ranges"] = {key: [at[key] - 0.1, min(at[key] + 0.02, 1.0)] for key in ("auroc", "balanced_accuracy")}
    metrics["exported"]["pooled"]["cells"] = {"min_cell_count": 5, "allocation": "binormal"}
    print_federation(metrics, Path("runs/quick"))
    lines = capsys.readouterr().out.splitlines()
    assert next(line for line in lines if line.startswith("  auroc")).endswith("[cells allow 0.860-0.980]")
    assert next(line for line in lines if line.startswith("  f1")).endswith("at threshold 0.500")
    assert any("cells of at least 5 validation cases" in line for line in lines)


@pytest.mark.parametrize(
    ("check", "said"),
    [
        (
            {
                "checked": True,
                "how": "100 evaluation-only image(s) compared with 300 training image(s) ...; none shared",
            },
            "evaluation-only sites (held-out; held out: 100 evaluation-only image(s) compared with 300",
        ),
        (None, "evaluation-only sites (held-out; not checked to be held out from the training sites' data)"),
    ],
)
def test_the_summary_calls_evaluation_sites_held_out_only_when_it_was_checked(check, said, capsys):
    """A deployment's coordinator cannot compare the sites' data: its summary must not claim it did."""
    from fedfreeze.cli.report import print_federation
    from fedfreeze.data.overlap import NOT_CHECKED

    metrics = final_metrics("0.5", 0.5)
    at = metrics["exported"]["pooled"]["at_threshold_next"]
    metrics["final"]["evaluation_sites"] = {"sites": ["held-out"], "at_threshold_next": {**at, "n": 100}}
    metrics["held_out_check"] = check or NOT_CHECKED
    print_federation(metrics, Path("runs/quick"))
    out = capsys.readouterr().out
    assert said in out and "data no site trained on" not in out

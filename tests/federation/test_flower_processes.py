"""End to end with Flower's own processes, on the shipped real chest X-rays.

- ``fedfreeze simulate``: Flower's simulation runtime (a SuperLink in simulation mode, Ray).
- A loopback deployment: one ``flower-superlink``, two ``flower-supernode`` started through
  ``fedfreeze site`` (each with its own data folder and ``FLWR_HOME``), and ``fedfreeze run``.
- ``fedfreeze run`` fails when the ServerApp fails, although ``flwr run`` itself exits 0.

Every process these tests start carries a private tag in its environment (children inherit it:
``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``, Ray's daemons and workers), so the
tests can prove that none is left running, and the teardown kills any that is, by process id.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedfreeze.cli import main
from fedfreeze.federation import launch
from fedfreeze.sample_data import kermany_mini

SMALL_CONFIG = """
[model]
input-size = 64
[train]
batch-size = 16
[federation]
rounds = 3
probe-rounds = 2
probe-local-epochs = 5
local-epochs = 1
unfreeze = { layer4 = 0.0 }
score-bins = 100
min-sites = 2
"""

TAG_VAR = "FEDFREEZE_TEST_TAG"
CONNECTION = "fedfreeze-test"
RUN_TIMEOUT = 240  # seconds; a run takes ~25 s (simulation) to ~50 s (deployment) on 2 cores


# ---------------------------------------------------------------------------------------- processes
def _process(pid: int) -> tuple[str, str, bytes, str] | None:
    """(state, program name, environment, command line) of a process, or None once it is gone.

    A process that is exiting (or a zombie) has no readable environment or command line any more,
    but it still has a state.
    """
    proc = Path("/proc") / str(pid)
    try:
        comm, rest = (proc / "stat").read_text().split(" (", 1)[1].rsplit(")", 1)
    except (OSError, IndexError, ValueError):
        return None
    try:
        environ = (proc / "environ").read_bytes()
        cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        environ, cmdline = b"", ""
    return rest.split()[0], comm, environ, cmdline


@dataclass
class Tracker:
    """Every process of one test carries ``TAG_VAR=tag``; the tracker remembers each one it has seen."""

    tag: str
    marks: tuple[str, ...]  # a command line naming one of these (the test's folder) is the test's too
    env: dict[str, str]
    seen: dict[int, str] = field(default_factory=dict)  # pid -> command line
    comms: dict[int, str] = field(default_factory=dict)  # pid -> program name (a reused pid has another)

    def env_with(self, **extra: str) -> dict[str, str]:
        return {**self.env, **extra}

    def running(self) -> dict[int, str]:
        """The test's processes now running (zombies excluded)."""
        needle = f"{TAG_VAR}={self.tag}".encode()
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            info = _process(int(entry.name))
            if info is None or info[0] == "Z":
                continue
            _, comm, environ, cmdline = info
            if needle in environ.split(b"\0") or any(mark in cmdline for mark in self.marks):
                found[int(entry.name)] = cmdline
                self.comms[int(entry.name)] = comm
        self.seen.update(found)
        return found

    def leftovers(self, timeout: float = 20.0) -> dict[int, str]:
        """Wait for the test's processes to end and be reaped; what is left after ``timeout`` seconds.

        Flower's detached children (the SuperLink's ``flower-superexec``, its ``flwr-serverapp`` or
        ``flwr-simulation``) notice their parent's end by polling, so they exit a moment later.
        """
        deadline = time.monotonic() + timeout
        while True:
            left = self.running()
            for pid in set(self.seen) - set(left):
                info = _process(pid)
                if info is not None and info[1] == self.comms[pid]:  # exiting, or ended but not reaped yet
                    left[pid] = f"[{info[1]}] state {info[0]}"
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.5)

    def names(self) -> set[str]:
        return names(self.seen)


@pytest.fixture
def tracker(tmp_path: Path) -> Iterator[Tracker]:
    """A tagged environment (private FLWR_HOME); at teardown every process of the test that still runs
    is killed by its id, and the test fails."""
    tag = uuid.uuid4().hex
    # Ray's unix sockets live under its temp dir and must stay under 107 bytes: a short folder of its own
    ray_tmp = Path(tempfile.mkdtemp(prefix="ffray-"))
    env = launch.flower_env(tmp_path / "flwr-home", {TAG_VAR: tag, "RAY_TMPDIR": str(ray_tmp)})
    track = Tracker(tag, (str(tmp_path),), env)
    try:
        yield track
    finally:
        left = track.leftovers()
        for pid in track.running():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
        assert not left, f"processes left running (now killed): {left}"


def run_cli(args: Sequence[str], track: Tracker, log: Path, timeout: float = RUN_TIMEOUT) -> tuple[int, str]:
    """``python -m fedfreeze ARGS`` in its own process group (killed on timeout), watching what it starts."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "fedfreeze", *args], stdout=handle,
                                stderr=subprocess.STDOUT, env=track.env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                pytest.fail(f"`fedfreeze {' '.join(args)}` ran past {timeout} s; its log ends:\n"
                            + "\n".join(log.read_text(errors="replace").splitlines()[-40:]))
            track.running()
            time.sleep(0.5)
    return proc.returncode, log.read_text(errors="replace")


def names(processes: Mapping[int, str]) -> set[str]:
    """Program names: ``flower-superlink``, ``flwr-simulation``, ``raylet``, ``ray::ClientAppActor.run``..."""
    out = set()
    for cmdline in processes.values():
        words = cmdline.split()
        program = words[1] if len(words) > 1 and Path(words[0]).name.startswith("python") else words[0]
        out.add(Path(program).name if "/" in program else program)
    return out


def evaluate_json(model: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    """``fedfreeze evaluate --json`` on the 100 held-out patients (in this process: no second torch start)."""
    capsys.readouterr()
    assert main(["evaluate", "--model", str(model), "--data", str(kermany_mini("test")), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def write_config(path: Path) -> Path:
    path.write_text(SMALL_CONFIG)
    return path


def site_folder(folder: Path, site: str, *, only_label: str | None = None) -> Path:
    """``folder/manifest.csv`` with one site's rows of the shipped train.csv (absolute image paths)."""
    source = kermany_mini("train")
    rows = [r for r in csv.DictReader(source.open()) if r["site"] == site
            and (only_label is None or r["label"] == only_label)]
    assert rows, f"no rows for {site}"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient_id"])
        for row in rows:
            writer.writerow([str((source.parent / row["path"]).resolve()), row["label"], row["patient_id"]])
    return folder


def check_completed(metrics: dict, rounds: int) -> None:
    assert metrics["status"] == "completed", metrics.get("reason")
    assert metrics["completed_rounds"] == rounds
    assert [r["round"] for r in metrics["rounds"]] == list(range(1, rounds + 1))
    pooled = metrics["final"]["pooled"]["at_threshold_next"]
    for key in ("auroc", "balanced_accuracy", "f1", "sensitivity", "specificity"):
        assert 0.0 <= pooled[key] <= 1.0
    assert pooled["n"] > 0
    assert Path(metrics["model"], "model.json").is_file()


def check_uplink(metrics: dict) -> None:
    """Probe rounds send the head only (a few kB), the fine-tuning round also layer4 (MBs)."""
    rounds = metrics["rounds"]
    assert [r["parts"] for r in rounds] == [["head"], ["head"], ["head", "layer4"]]
    assert all(r["bytes_up"] > 0 for r in rounds)
    assert max(rounds[0]["bytes_up"], rounds[1]["bytes_up"]) * 1000 <= rounds[2]["bytes_up"]


# ---------------------------------------------------------------------------------------- simulation
def test_simulation_completes_and_leaves_nothing_running(tracker: Tracker, tmp_path: Path, capsys):
    out = tmp_path / "sim"
    code, log = run_cli(["simulate", "--config", str(write_config(tmp_path / "fed.toml")), "--out", str(out)],
                        tracker, tmp_path / "logs" / "simulate.log")
    assert code == 0, log[-3000:]

    metrics = json.loads((out / "metrics.json").read_text())
    check_completed(metrics, rounds=3)
    assert len({s["site"] for s in metrics["final"]["sites"]}) == 3  # every simulated site answered
    check_uplink(metrics)

    # Flower's and Ray's processes were seen while it ran (so "none left" is not vacuous) ...
    assert {"flower-superlink", "flower-superexec", "flwr-simulation", "raylet", "gcs_server"} <= tracker.names()
    assert any(name.startswith("ray::") for name in tracker.names())  # Ray's workers (ClientAppActor)
    # ... and none is left once `fedfreeze simulate` has returned
    left = tracker.leftovers()
    assert not left, f"still running after `fedfreeze simulate` returned: {left}"

    result = evaluate_json(out / "model", capsys)
    assert result["n"] == 100
    assert result["auroc"] > 0.75, result  # patients never seen; chance is 0.5


# ---------------------------------------------------------------------------------------- deployment
@dataclass
class Deployment:
    address: str
    link: launch.Managed
    sites: list[launch.Managed]
    tracker: Tracker

    def stop(self) -> None:
        self.tracker.running()  # remember every process, to wait until each has ended and been reaped
        for site in self.sites:
            site.stop()
        self.link.stop()


def wait_online(connection: str, env: Mapping[str, str], count: int, processes: Sequence[launch.Managed],
                timeout: float = 60.0) -> None:
    """Poll ``flwr supernode ls`` until ``count`` SuperNodes are online."""
    deadline = time.monotonic() + timeout
    online: list = []
    while time.monotonic() < deadline:
        for proc in processes:
            if not proc.alive():
                raise AssertionError(f"{proc.name} exited; its log ends:\n{proc.tail(30)}")
        try:
            answer = launch.flwr_json(["supernode", "ls", connection], env)
        except launch.LaunchError:  # the Control API may answer a moment after /health
            answer = {}
        online = [n for n in answer.get("nodes", []) if n.get("status") == "online"]
        if len(online) >= count:
            return
        time.sleep(0.5)
    raise AssertionError(f"{len(online)} of {count} SuperNodes online after {timeout:.0f} s")


@pytest.fixture
def deploy(tracker: Tracker, tmp_path: Path) -> Iterator[Callable[[Mapping[str, Path]], Deployment]]:
    """Start a SuperLink and one SuperNode per site (through ``fedfreeze site``); all stopped at teardown."""
    started: list[launch.Managed] = []

    def start(sites: Mapping[str, Path]) -> Deployment:
        port = launch.free_port()
        address = f"127.0.0.1:{port}"
        launch.write_flwr_home(Path(tracker.env["FLWR_HOME"]), [launch.Connection(CONNECTION, address)])
        link = launch.Managed("superlink", launch.superlink_command(port=port, database=tmp_path / "superlink.db"),
                              tmp_path / "logs" / "superlink.log", tracker.env)
        started.append(link.start())
        launch.wait_healthy(address, link)
        nodes = []
        for name, data in sites.items():
            cmd = [sys.executable, "-m", "fedfreeze", "site", "--data", str(data), "--name", name,
                   "--superlink", address, "--port", str(launch.free_port()),
                   "--state-dir", str(tmp_path / "state" / name)]
            # Each site its own FLWR_HOME, as on its own machine. The two sites share this machine's
            # cores: one thread each, as Ray gives each simulated site (with torch's default threads
            # per process, one fine-tuning epoch took 10.3 s instead of 1.2 s here).
            env = tracker.env_with(FLWR_HOME=str(tmp_path / "home" / name), OMP_NUM_THREADS="1")
            nodes.append(launch.Managed(name, cmd, tmp_path / "logs" / f"{name}.log", env).start())
            started.append(nodes[-1])
        wait_online(CONNECTION, tracker.env, len(nodes), [link, *nodes])
        return Deployment(address, link, nodes, tracker)

    try:
        yield start
    finally:
        tracker.running()
        for proc in reversed(started):  # the sites first, then the SuperLink
            proc.stop()


def overhead_rows(metrics: dict) -> list[dict]:
    """Per round: its seconds at the coordinator, the slowest site's training, and the rest (orchestration)."""
    rows = []
    for record in metrics["rounds"]:
        train = max(s["train_seconds"] for s in record["sites"])
        rows.append({"round": record["round"], "parts": record["parts"], "round_seconds": record["round_seconds"],
                     "max_site_train_seconds": train, "overhead_seconds": record["round_seconds"] - train})
    return rows


def test_loopback_deployment_completes(deploy, tracker: Tracker, tmp_path: Path, capsys):
    dep = deploy({"site-a": site_folder(tmp_path / "site-a", "site-a"),
                  "site-b": site_folder(tmp_path / "site-b", "site-b")})
    out = tmp_path / "fed"
    code, log = run_cli(["run", "--superlink", dep.address, "--config", str(write_config(tmp_path / "fed.toml")),
                         "--out", str(out)], tracker, tmp_path / "logs" / "run.log")
    assert code == 0, log[-3000:]

    metrics = json.loads((out / "metrics.json").read_text())
    check_completed(metrics, rounds=3)
    assert sorted(s["site"] for s in metrics["final"]["sites"]) == ["site-a", "site-b"]
    check_uplink(metrics)

    rows = overhead_rows(metrics)
    final = {"round": "final evaluation", "round_seconds": metrics["final"]["round_seconds"]}
    (tmp_path / "overhead.json").write_text(json.dumps({"rounds": rows, "final": final}, indent=1))
    with capsys.disabled():
        print("\nloopback deployment, 2 SuperNodes on one 2-core machine:")
        for row in rows:
            print(f"  round {row['round']} ({'+'.join(row['parts'])}): {row['round_seconds']:.1f} s, "
                  f"slowest site's training {row['max_site_train_seconds']:.2f} s, "
                  f"overhead {row['overhead_seconds']:.1f} s")
        print(f"  final evaluation: {final['round_seconds']:.1f} s  ({tmp_path / 'overhead.json'})")
    assert all(row["overhead_seconds"] > 0 for row in rows)

    result = evaluate_json(Path(metrics["model"]), capsys)
    assert result["n"] == 100
    assert result["auroc"] > 0.75, result  # patients never seen; chance is 0.5

    # every process of the topology was seen, the SuperLink's and the SuperNodes' children too ...
    dep.stop()
    assert {"flower-superlink", "flower-supernode", "flower-superexec", "flwr-serverapp", "flwr-clientapp"} \
        <= tracker.names()
    # ... and none is left once the SuperNodes and the SuperLink are stopped
    left = tracker.leftovers()
    assert not left, f"still running after stopping the SuperLink and the SuperNodes: {left}"


def test_run_fails_when_the_server_app_fails(deploy, tracker: Tracker, tmp_path: Path, monkeypatch, capsys):
    """site-b holds one class only: its reply is an error, 1 valid reply < min-sites = 2, the ServerApp raises.

    ``fedfreeze run`` runs in this process, so a spy on ``launch.submit`` sees what ``flwr run`` itself
    returned for the same run (one run shows both sides of Flower's trap).
    """
    dep = deploy({"site-a": site_folder(tmp_path / "site-a", "site-a"),
                  "site-b": site_folder(tmp_path / "site-b", "site-b", only_label="1")})
    submit = launch.submit
    flwr_codes = []

    def spy(*args, **kwargs):
        code, run_id = submit(*args, **kwargs)
        flwr_codes.append(code)
        return code, run_id

    monkeypatch.setattr(launch, "submit", spy)
    monkeypatch.setenv(TAG_VAR, tracker.tag)
    out = tmp_path / "fed"
    code = main(["run", "--superlink", dep.address, "--config", str(write_config(tmp_path / "fed.toml")),
                 "--out", str(out), "--flwr-home", str(tmp_path / "flwr-cli")])
    captured = capsys.readouterr()

    assert flwr_codes == [0]  # `flwr run --stream` exits 0 although the ServerApp failed (flwr 1.42) ...
    assert code == 2, captured.err  # ... `fedfreeze run` does not
    assert "finished:failed" in captured.err
    assert "site 'site-b' needs both classes" in captured.out  # the site's error, in the ServerApp's log stream
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "failed"
    assert "fewer than min-sites = 2" in metrics["reason"], metrics["reason"]
    assert metrics["model"] is None

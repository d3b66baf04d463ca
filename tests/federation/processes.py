"""Helpers of the tests that start Flower's own processes (test_flower_processes, test_tls_auth).

Every process such a test starts carries a private tag in its environment (children inherit it:
``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``, Ray's daemons and workers), so the
test can prove that none is left running, and its teardown kills any that is, by process id.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedfreeze.deploy import launch
from fedfreeze.sample_data import kermany_mini_site

TAG_VAR = "FEDFREEZE_TEST_TAG"
RUN_TIMEOUT = 240  # seconds; a run takes ~25 s (simulation) to ~50 s (deployment) on 2 cores


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


@contextmanager
def tracked(tmp_path: Path) -> Iterator[Tracker]:
    """A tagged environment (private FLWR_HOME); on exit every process of the test that still runs
    is killed by its id, and the test fails. The body of each test module's ``tracker`` fixture."""
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
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedfreeze", *args],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=track.env,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                pytest.fail(
                    f"`fedfreeze {' '.join(args)}` ran past {timeout} s; its log ends:\n"
                    + "\n".join(log.read_text(errors="replace").splitlines()[-40:])
                )
            track.running()
            time.sleep(0.5)
    return proc.returncode, log.read_text(errors="replace")


STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z [A-Z]+\s+")  # fedfreeze.deploy.logs' text lines


def messages(text: str) -> list[str]:
    """The lines of a coordinator's or site's output without the time and level in front."""
    return [STAMP.sub("", line) for line in text.splitlines()]


def marked(var: str, value: str) -> dict[int, str]:
    """Running (not zombie) processes whose environment holds ``var=value``: pid -> command line."""
    needle = f"{var}={value}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        info = _process(int(entry.name))
        if info is not None and info[0] not in ("Z", "X") and needle in info[2].split(b"\0"):
            found[int(entry.name)] = info[3]
    return found


def gone_within(var: str, value: str, timeout: float) -> tuple[float, dict[int, str]]:
    """Seconds until no process marked ``var=value`` runs (polled every 0.05 s), and what is left after ``timeout``."""
    started = time.monotonic()
    while (left := marked(var, value)) and time.monotonic() - started < timeout:
        time.sleep(0.05)
    return time.monotonic() - started, left


def age_seconds(pid: int) -> float:
    """Seconds since the process started (Linux /proc)."""
    started = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - started / os.sysconf("SC_CLK_TCK")


TIMINGS_VAR = "FEDFREEZE_FAULT_TIMINGS"  # benchmarks/fault_table.py: a JSON file the fault tests add their timings to


def record_timing(fault: str, **figures: object) -> None:
    """Add a fault's measured figures to the file ``TIMINGS_VAR`` names (nothing when unset)."""
    path = os.environ.get(TIMINGS_VAR)
    if not path:
        return
    target = Path(path)
    known = json.loads(target.read_text()) if target.is_file() else {}
    known[fault] = figures
    target.write_text(json.dumps(known, indent=1) + "\n")


def names(processes: Mapping[int, str]) -> set[str]:
    """Program names: ``flower-superlink``, ``flwr-simulation``, ``raylet``, ``ray::ClientAppActor.run``..."""
    out = set()
    for cmdline in processes.values():
        words = cmdline.split()
        program = words[1] if len(words) > 1 and Path(words[0]).name.startswith("python") else words[0]
        out.add(Path(program).name if "/" in program else program)
    return out


def site_folder(folder: Path, site: str, *, only_label: str | None = None) -> Path:
    """``folder/manifest.csv`` with one site's rows of the shipped train.csv (absolute image paths)."""
    return kermany_mini_site(folder, site, only_label=only_label)


def wait_online(
    connection: str, env: Mapping[str, str], count: int, processes: Sequence[launch.Managed], timeout: float = 60.0
) -> None:
    """``launch.wait_sites_online``, failing the test (not erroring it) when the sites never come up."""
    try:
        launch.wait_sites_online(connection, env, count, processes, timeout)
    except launch.LaunchError as err:
        raise AssertionError(str(err)) from err


def check_completed(metrics: dict, rounds: int) -> None:
    """metrics.json of a completed federation: every round, pooled metrics, an exported model."""
    assert metrics["status"] == "completed", metrics.get("reason")
    assert metrics["completed_rounds"] == rounds
    assert [r["round"] for r in metrics["rounds"]] == list(range(1, rounds + 1))
    pooled = metrics["final"]["pooled"]["at_threshold_next"]
    for key in ("auroc", "balanced_accuracy", "f1", "sensitivity", "specificity"):
        assert 0.0 <= pooled[key] <= 1.0
    assert pooled["n"] > 0
    assert Path(metrics["model"], "model.json").is_file()
    # every reply met the release rule: the coordinator rejects one that does not (a cell below min-cell-count)
    for record in metrics["rounds"]:
        assert record["rejected"] == [], record["rejected"]
        cells = record["pooled"]["cells"]  # the default rule, what the test's config set, or a secure sum
        assert cells["min_cell_count"] >= 5 or "secure_sum" in cells
    card = Path(metrics["model"], "MODEL_CARD.md")
    assert card.is_file()
    provenance = json.loads(Path(metrics["model"], "model.json").read_text())["provenance"]
    assert provenance["rounds"] and len(provenance["rounds"]) >= rounds

"""``fedfreeze server`` and ``site`` stay the parent of everything Flower starts, and stop all of it.

The rules, each in this one place:

- **Every process is marked.** The Flower process (SuperLink or SuperNode) runs with a private
  tag in its environment, which its children inherit (``launch.TAG_VARIABLE``): the supervisor
  finds them all, in any session.
- **SIGTERM, SIGINT or SIGHUP stops everything within ``grace`` seconds**, deepest first, so a
  process can report its end to the one above it while that one still listens: the ServerApp or
  ClientApps, then the superexec, then the SuperLink or SuperNode. The SuperLink's HTTP server
  (uvicorn) waits on SIGTERM for open connections to close, a minute with a site's long poll or a
  ``flwr run --stream`` open (57 s measured); a SIGINT a second later makes it quit at once
  (uvicorn's "CTRL+C to force quit"). Whatever is left when ``grace`` runs out is SIGKILLed.
- **When the Flower process ends by itself** (crashed, killed), what it started is stopped too,
  and the supervisor exits with its code: a service manager sees the failure and restarts it.
- **When the supervisor is killed outright** (SIGKILL), Linux SIGKILLs the Flower process
  (``PR_SET_PDEATHSIG``), and the guards (``guard.py``) take its children with it.
- **As a container's PID 1** (the images' entry points), it also collects the exit status of the
  orphans the kernel hands it, so no zombie stays.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedfreeze.deploy.launch import TAG_VARIABLE, tagged_pids
from fedfreeze.deploy.logs import LogSink

STOP_GRACE = 10.0  # seconds from the first SIGTERM to SIGKILL for what is left
LEVEL_WAIT = 3.0  # at most this long for one level of the process tree to end before the next is told
FORCE_AFTER = 1.0  # a Flower process still up this long after SIGTERM gets SIGINT (uvicorn: force quit)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PR_SET_PDEATHSIG = 1


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _program(pid: int) -> str:
    """A process's program name (``flower-superlink``, ``flwr-serverapp``: the script a Python runs)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [w.decode(errors="replace") for w in raw if w]
    if len(words) > 1 and Path(words[0]).name.startswith("python"):
        return Path(words[1]).name if words[1] != "-m" else " ".join(words[1:3])
    return Path(words[0]).name if words else "?"


def _signal(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _reap_adopted(keep: int) -> None:
    """Collect the exit status of ended processes adopted by this process (as a container's PID 1),
    except ``keep`` (the Flower process, which ``Popen`` waits for), so none stays a zombie."""
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == keep:
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] == "Z" and int(fields[1]) == me:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(entry.name), os.WNOHANG)


def _killed_with_us() -> None:
    """In the child, before exec: SIGKILL when the supervisor dies (survives exec)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


@dataclass
class Supervisor:
    """Runs one Flower process and everything it starts; see the module's rules."""

    cmd: list[str]
    env: Mapping[str, str]
    sink: LogSink
    markers: Sequence[str] = ()
    grace: float = STOP_GRACE
    tag: str = field(default_factory=lambda: uuid.uuid4().hex)
    seen: set[str] = field(default_factory=set)
    stop_requested: int | None = None  # the signal that asked us to stop
    stopped_in: float | None = None  # seconds the stop took, once asked
    _wake: threading.Event = field(default_factory=threading.Event)

    def run(self) -> int:
        """The Flower process's exit code (negative: the signal that ended it)."""
        env = {**self.env, TAG_VARIABLE: self.tag}
        proc = subprocess.Popen(
            list(self.cmd),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # a terminal's Ctrl-C reaches it once, through us
            preexec_fn=_killed_with_us,
        )
        reader = threading.Thread(target=self._echo, args=(proc,), daemon=True)
        reader.start()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        try:
            while proc.poll() is None:
                if self.stop_requested is not None and self.stopped_in is None:
                    self._stop(proc)
                    break
                self._wake.wait(0.2)
                self._wake.clear()
                if os.getpid() == 1:  # a container's init: orphans of Flower's processes end up ours
                    _reap_adopted(proc.pid)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if proc.poll() is None:  # leaving early (an exception): leave nothing behind
                self._stop(proc)
        code = proc.wait()
        self._end_rest(time.monotonic() + 3.0)
        reader.join(timeout=2.0)  # the children's copies of the pipe are gone with them
        return code

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.stop_requested is None:
            self.stop_requested = signum
        self._wake.set()

    def _echo(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            self.sink.write(line)
            self.seen.update(m for m in self.markers if m in line)

    def processes(self) -> list[int]:
        """The running processes started under this supervisor (zombies excluded)."""
        return [pid for pid in tagged_pids(self.tag) if _alive(pid)]

    def _stop(self, proc: subprocess.Popen[bytes]) -> None:
        """Deepest first: SIGTERM each level of the process tree, wait for it, then the next."""
        started = time.monotonic()
        deadline = started + self.grace
        for level in self._levels(proc.pid):
            names = ", ".join(f"{_program(p)} {p}" for p in sorted(level))
            self.sink.note(f"stopping: SIGTERM to {names}")
            _signal(level, signal.SIGTERM)
            told = time.monotonic()
            level_end = min(deadline, told + LEVEL_WAIT)
            forced = proc.pid not in level
            while time.monotonic() < level_end and any(_alive(p) for p in level):
                if not forced and time.monotonic() - told > FORCE_AFTER and proc.poll() is None:
                    forced = True
                    self.sink.note(f"stopping: SIGINT to {_program(proc.pid)} {proc.pid} (still up after SIGTERM)")
                    _signal([proc.pid], signal.SIGINT)
                time.sleep(0.05)
        self._end_rest(deadline)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        if proc.poll() is None:
            _signal([proc.pid], signal.SIGKILL)
        self.stopped_in = time.monotonic() - started

    def _levels(self, root: int) -> list[list[int]]:
        """The processes under this supervisor by depth below the Flower process, deepest first; any
        whose parent is not among them (orphans) count as deepest."""
        pids = set(self.processes()) | ({root} if _alive(root) else set())
        depth: dict[int, int] = {root: 0}

        def depth_of(pid: int, trail: int = 0) -> int:
            if pid in depth:
                return depth[pid]
            parent = _parent(pid)
            if parent is None or parent not in pids or trail > 64:
                depth[pid] = 1_000  # an orphan: first to go
                return depth[pid]
            depth[pid] = depth_of(parent, trail + 1) + 1
            return depth[pid]

        by_depth: dict[int, list[int]] = {}
        for pid in pids:
            by_depth.setdefault(depth_of(pid), []).append(pid)
        return [by_depth[d] for d in sorted(by_depth, reverse=True)]

    def _end_rest(self, deadline: float) -> None:
        """SIGTERM whatever is left, then SIGKILL it at ``deadline``."""
        left = self.processes()
        if not left:
            return
        _signal(left, signal.SIGTERM)
        while time.monotonic() < deadline and (left := self.processes()):
            time.sleep(0.05)
        _signal(self.processes(), signal.SIGKILL)

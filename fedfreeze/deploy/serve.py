"""The long-running commands, ``fedfreeze server`` and ``fedfreeze site``, once their options are checked.

Both run their Flower process under a ``Supervisor`` (what stops when), with the guards first on its
``PATH`` (children end with their parent) and every line through a ``LogSink`` (timestamps, files,
JSON). The coordinator also holds a lock on its state folder, marks the runs its last end
interrupted, tells its ServerApps where to note their runs, and serves metrics when asked.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shlex
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from fedfreeze.deploy import launch, metrics
from fedfreeze.deploy.guard import with_guards, write_guards
from fedfreeze.deploy.logs import LogSink
from fedfreeze.deploy.supervise import Supervisor
from fedfreeze.errors import ConfigError
from fedfreeze.state import runstate

LOCK_FILE = "coordinator.lock"


def sink_for(args: argparse.Namespace, process: str) -> LogSink:
    """The sink the command's ``--log-file`` and ``--log-format`` ask for."""
    return LogSink(process, fmt=getattr(args, "log_format", "text"), log_file=getattr(args, "log_file", None))


@contextlib.contextmanager
def state_lock(state: Path) -> Iterator[None]:
    """One coordinator per state folder: a second one would mark the first one's runs interrupted."""
    path = state / LOCK_FILE
    handle: IO[str] = path.open("a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ConfigError(
                f"--state-dir {state}: in use by another coordinator ({holder}); stop it, or give this one its own "
                "state folder"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


@dataclass
class Outcome:
    """How a supervised Flower process ended."""

    code: int  # its exit code; negative: the signal that ended it
    seen: set[str]  # the markers its output held
    stop_signal: int | None  # the signal that asked fedfreeze to stop, if one did
    stopped_in: float | None  # seconds the stop took

    def exit_code(self) -> int:
        """0 for a stop that was asked for; else the Flower process's code (128 + signal, the shell's way)."""
        if self.stop_signal is not None:
            return 0
        return 128 - self.code if self.code < 0 else self.code


def supervised(cmd: Sequence[str], env: dict[str, str], sink: LogSink, markers: Sequence[str] = ()) -> Outcome:
    """Run ``cmd`` under a supervisor, printing it first as it could be typed."""
    sink.note("$ " + " ".join(shlex.quote(c) for c in cmd))
    supervisor = Supervisor(list(cmd), env, sink, markers)
    code = supervisor.run()
    if supervisor.stop_requested is not None and supervisor.stopped_in is not None:
        sink.note(
            f"stopped (signal {supervisor.stop_requested}) in {supervisor.stopped_in:.1f} s, with every process it started"
        )
    return Outcome(code, set(supervisor.seen), supervisor.stop_requested, supervisor.stopped_in)


def guarded_env(state: Path) -> dict[str, str]:
    """Flower's environment for a coordinator or site with this state folder: its ``FLWR_HOME`` there
    (the apps Flower installs land in it, not in ``~/.flwr``), the guards first on the ``PATH``."""
    env = launch.flower_env(launch.flwr_home_in(state))
    return with_guards(env, write_guards(state, launch.bin_dir()))


@dataclass(frozen=True)
class Watch:
    """How the coordinator (or a site) reaches its own Flower process, and where its metrics go."""

    address: str  # HOST:PORT of the SuperLink (or the SuperNode's local port), dialled on loopback
    ca: Path | None  # the federation's CA (TLS), None without TLS
    certificates: dict[str, Path]  # name -> certificate whose expiry is a metric
    metrics_port: int | None = None
    metrics_file: Path | None = None

    def health_url(self) -> str:
        return f"{'https' if self.ca else 'http'}://{self.address}/health"


def loopback(host: str, port: int) -> str:
    """The address a process on the coordinator's machine dials to reach it."""
    return f"127.0.0.1:{port}" if host in ("0.0.0.0", "::", "", "127.0.0.1", "localhost") else f"{host}:{port}"


def _look(watch: Watch) -> list[dict[str, object]]:
    from fedfreeze.flower.control import control

    with control(watch.address, watch.ca, check_hostname=False) as coordinator:  # loopback: the CA, not the name
        return [site.as_json() for site in coordinator.sites()]


def run_coordinator(cmd: Sequence[str], state: Path, sink: LogSink, watch: Watch) -> int:
    """The SuperLink under supervision, on a locked state folder, watched by an ``Observer``."""
    with state_lock(state):
        for note in runstate.mark_interrupted_runs(state):
            sink.note(f"run {note.run_id} ({note.out_dir}): {note.reason}", "WARNING")
        env = guarded_env(state)
        env[runstate.STATE_VARIABLE] = str(state)
        observer = metrics.Observer(lambda: _look(watch), state, watch.certificates, watch.metrics_file).start()
        server = None
        if watch.metrics_port is not None:
            server = metrics.serve(watch.metrics_port, observer.poll, lambda: _healthy(watch))
            sink.note(f"metrics: http://127.0.0.1:{watch.metrics_port}/metrics, health: .../health")
        try:
            outcome = supervised(cmd, env, sink)
        finally:
            observer.stop()
            if server is not None:
                server.shutdown()
    if outcome.stop_signal is None:
        sink.note(
            f"the SuperLink ended by itself (exit code {outcome.code}); every process it started is stopped", "ERROR"
        )
    return outcome.exit_code()


def _healthy(watch: Watch) -> bool:
    return metrics.flower_health(watch.health_url(), watch.ca)


def run_site(cmd: Sequence[str], env: dict[str, str], sink: LogSink, markers: Sequence[str], watch: Watch) -> Outcome:
    """The SuperNode under supervision (``env``: ``guarded_env``, with the approval runner in front when
    the site has a list); ``--metrics-port``: whether its SuperNode answers, its CA's expiry."""
    server = None
    if watch.metrics_port is not None:

        def text() -> str:
            up = metrics.Family("fedfreeze_site_up", "1 when the site's SuperNode answers its local /health")
            up.add(1.0 if _healthy(watch) else 0.0)
            days = {name: metrics.certificate_days_left(path) for name, path in watch.certificates.items()}
            return metrics.render([up, metrics.certificate_family(days)])

        server = metrics.serve(watch.metrics_port, text, lambda: _healthy(watch))
        sink.note(f"metrics: http://127.0.0.1:{watch.metrics_port}/metrics, health: .../health")
    try:
        return supervised(cmd, env, sink, markers)
    finally:
        if server is not None:
            server.shutdown()

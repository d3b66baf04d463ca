"""Start and stop Flower's own processes with fedfreeze's safe defaults.

Thin on purpose: every function builds the plain Flower command line (printed before it runs, so
it can be copied), and the plain Flower commands keep working without fedfreeze. The defaults
avoid the traps seen with Flower 1.42: a SuperLink keeps its state in a database, never installs
dependencies at run time, and a run counts as done only when ``flwr ls`` says
``finished:completed`` (``flwr run`` exits 0 even when the ServerApp crashed).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fedfreeze.deploy.logs import LogSink
from fedfreeze.errors import LaunchError, unreachable

APP_DIR = Path(__file__).resolve().parents[2]  # the project folder: pyproject.toml, server/, client/


UNAVAILABLE = "Connection to the SuperLink is unavailable"  # what every flwr command says then


@dataclass(frozen=True)
class TLSFiles:
    """The coordinator's certificate authority, certificate and key (PEM files)."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True)
class Connection:
    """How the ``flwr`` command line reaches a SuperLink (one ``[superlink.NAME]`` entry)."""

    name: str
    address: str
    root_certificates: Path | None = None

    def toml(self) -> str:
        lines = [f"[superlink.{self.name}]", f'address = "{self.address}"']
        if self.root_certificates is None:
            lines.append("insecure = true")
        else:
            lines.append(f'root-certificates = "{self.root_certificates.resolve()}"')
        return "\n".join(lines) + "\n"


def bin_dir() -> Path:
    """Where this Python's console scripts are (flower-superlink, flwr, ...)."""
    return Path(sys.executable).parent


TAG_VARIABLE = "FEDFREEZE_LAUNCH_TAG"


QUIET_WARNINGS = (
    # Ray's ray.init: "Tip: In future versions of Ray, Ray will no longer override accelerator visible
    # devices env var if num_gpus=0", a FutureWarning about Ray's own defaults, at every simulation start
    "ignore::FutureWarning:ray._private.worker",
    # typer (Flower's CLI) on ``import flwr``: Click 8.2's deprecation of two of its functions
    "ignore::DeprecationWarning:typer",
)


def flower_env(
    flwr_home: Path | None = None, extra: Mapping[str, str] | None = None, tag: str | None = None
) -> dict[str, str]:
    """The environment for Flower processes: this venv first on PATH, no update check, no telemetry.

    ``tag`` marks every process started with this environment, and their children (Flower starts
    the SuperLink's ServerApp executor and Ray's workers in sessions of their own, out of reach of
    a process-group kill), so ``stop_tagged`` can find them all.
    """
    env = dict(os.environ)
    if tag is not None:
        env[TAG_VARIABLE] = tag
    env["PATH"] = f"{bin_dir()}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    # Flower sends usage events to its own server from every process, and each exit waits up to 4 s for
    # that send: a site or coordinator talks to nothing but each other, and stops without the wait
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    # warnings of Flower's dependencies that no user can act on, filtered in every process Flower starts
    # (the filters of fedfreeze/flower/__init__.py reach only the processes that import fedfreeze)
    env["PYTHONWARNINGS"] = ",".join(filter(None, [env.get("PYTHONWARNINGS"), *QUIET_WARNINGS]))
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    env.update(extra or {})
    return env


def write_flwr_home(folder: Path, connections: Sequence[Connection]) -> Path:
    """A private ``FLWR_HOME`` whose ``config.toml`` holds these connections."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.toml").write_text("".join(c.toml() + "\n" for c in connections), encoding="utf-8")
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def node_config_arg(values: Mapping[str, Any]) -> str:
    """``{"data-path": "/d", "x": 1}`` -> ``data-path="/d" x=1`` (Flower's --node-config syntax)."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            parts.append(f"{key}={str(value).lower()}")
        elif isinstance(value, (int, float)):
            parts.append(f"{key}={value}")
        else:
            parts.append(f"{key}={json.dumps(str(value))}")
    return " ".join(parts)


def superlink_command(
    *,
    host: str = "127.0.0.1",
    port: int = 9093,
    database: Path | None = None,
    simulation: bool = False,
    tls: TLSFiles | None = None,
    supernode_auth: bool = False,
    insecure: bool = False,
) -> list[str]:
    """``flower-superlink`` with a state database and no run-time dependency installation.

    TLS is the default: without ``tls`` the caller must say ``insecure=True`` (a simulation or a test
    on loopback), so no code path ends up in clear text by leaving an argument out.
    """
    cmd = [
        str(bin_dir() / "flower-superlink"),
        "--host",
        host,
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    if database is not None:
        cmd += ["--database", str(database)]
    if simulation:
        cmd += ["--simulation", "--isolation", "subprocess"]
    if tls is None:
        if supernode_auth:
            raise LaunchError("SuperNode authentication needs TLS: give the CA, certificate and key")
        if not insecure:
            raise LaunchError("a SuperLink without TLS files must be asked for explicitly (insecure=True)")
        cmd.append("--insecure")
    else:
        if insecure:
            raise LaunchError("TLS files and insecure=True contradict each other: give one of them")
        cmd += ["--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key)]
        if supernode_auth:
            cmd.append("--enable-supernode-auth")
    return cmd


def supernode_command(
    *,
    superlink: str,
    node_config: Mapping[str, Any],
    port: int = 9094,
    root_certificates: Path | None = None,
    auth_key: Path | None = None,
    insecure: bool = False,
) -> list[str]:
    """``flower-supernode`` for one site, with its node config (data path, site name, state folder).

    Like ``superlink_command``: without ``root_certificates`` the caller must say ``insecure=True``.
    """
    if root_certificates is None and not insecure:
        raise LaunchError(
            "a SuperNode without the coordinator's CA certificate must be asked for explicitly (insecure=True)"
        )
    if root_certificates is not None and insecure:
        raise LaunchError("a CA certificate and insecure=True contradict each other: give one of them")
    cmd = [
        str(bin_dir() / "flower-supernode"),
        "--superlink",
        superlink,
        "--port",
        str(port),
        "--node-config",
        node_config_arg(node_config),
    ]
    cmd += ["--insecure"] if root_certificates is None else ["--root-certificates", str(root_certificates)]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    return cmd


def flwr_home_in(state_dir: Path) -> Path:
    """The ``FLWR_HOME`` of a SuperLink or SuperNode: inside its state folder, so the apps Flower
    installs for every run (``FLWR_HOME/apps``) land there and not in the user's ``~/.flwr``."""
    return state_dir / "flwr-home"


def port_busy(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``host:port`` cannot be bound now (another SuperNode or SuperLink holds it).

    Binds like Flower's servers do (``SO_REUSEADDR``, so a port in TIME_WAIT counts as free).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def free_port_from(start: int, host: str = "127.0.0.1", tries: int = 100) -> int:
    """The first port from ``start`` on that is free (for a suggestion in an error message)."""
    for port in range(start, min(start + tries, 65536)):
        if not port_busy(port, host):
            return port
    return free_port()


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies; True when it is set.

    A site's ``flwr-clientapp`` is started by the SuperNode's ``flower-superexec``; when the SuperNode
    is killed, the superexec exits but the ClientApp used to go on training and retrying, orphaned.
    The parent may die before this call: then the parent is gone already (reparented), and ``sig``
    is sent at once. A no-op (False) off Linux.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent or _orphaned(parent):
        os.kill(os.getpid(), sig)
    return True


def _orphaned(parent: int) -> bool:
    """Reparented to init already: the parent is PID 1 and PID 1 is no Flower process (in a
    container whose PID 1 is ``flower-superexec`` that is the real parent)."""
    if parent != 1:
        return False
    try:
        init = Path("/proc/1/cmdline").read_bytes()
    except OSError:
        return False
    return b"flower-superexec" not in init and b"flwr" not in init


def register_command(*, public_key: Path, connection: str, name: str | None = None) -> list[str]:
    """``flwr supernode register KEY CONNECTION``: the site holding the matching private key may join
    a SuperLink started with ``--enable-supernode-auth``."""
    cmd = [str(bin_dir() / "flwr"), "supernode", "register", str(public_key), connection]
    if name:
        cmd += ["--name", name]
    return cmd + ["--format", "json"]


ALREADY_REGISTERED = "Public key already in use"  # flwr 1.42's answer to a second registration of a key


def register(cmd: Sequence[str], env: Mapping[str, str]) -> str | None:
    """Run a ``register_command``: the new SuperNode's node id, or None when the key was registered
    before (so registering is idempotent). ``--format json`` exits 0 even on failure: read the answer."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, env=dict(env), timeout=120)
    try:
        answer = json.loads(proc.stdout)
    except json.JSONDecodeError as err:
        raise LaunchError(f"`flwr supernode register` gave no JSON: {proc.stdout[-500:]} {proc.stderr[-500:]}") from err
    if answer.get("success"):
        return str(answer["node-id"])
    message = str(answer.get("error-message", "")).strip()
    if ALREADY_REGISTERED in message:
        return None
    raise LaunchError(f"`flwr supernode register` failed: {message.splitlines()[-1] if message else answer}")


def run_command(
    *,
    connection: str,
    run_config: Mapping[str, Any],
    app_dir: Path = APP_DIR,
    federation_config: Mapping[str, Any] | None = None,
    stream: bool = True,
) -> list[str]:
    """``flwr run APP CONNECTION`` with run-config overrides."""
    cmd = [str(bin_dir() / "flwr"), "run", str(app_dir), connection]
    if stream:
        cmd.append("--stream")
    if run_config:
        cmd += ["--run-config", node_config_arg(run_config)]
    if federation_config:
        cmd += ["--federation-config", node_config_arg(federation_config)]
    return cmd


def show(cmd: Sequence[str], out: IO[str] | None = None) -> None:
    """Print a command the way a user would type it."""
    print("$ " + " ".join(shlex.quote(c) for c in cmd), file=out or sys.stderr, flush=True)


@dataclass
class Managed:
    """A background Flower process in its own process group, logged to a file, always stopped."""

    name: str
    cmd: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Managed:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.cmd, stdout=handle, stderr=subprocess.STDOUT, env=self.env or None, start_new_session=True
        )
        handle.close()
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL. Flower's own children in other sessions exit
        when they see their parent gone; ``stop_tagged`` makes sure of it."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=grace)
        except ProcessLookupError:
            pass

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> Managed:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def tagged_pids(tag: str) -> list[int]:
    """Processes whose environment carries ``tag`` (Linux ``/proc``)."""
    marker = f"{TAG_VARIABLE}={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return pids


def stop_tagged(tag: str, grace: float = 10.0) -> int:
    """SIGTERM, then SIGKILL, every process carrying ``tag``; returns how many were still running."""
    pids = tagged_pids(tag)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (pids := [p for p in pids if _running(p)]):
            time.sleep(0.2)
        if not pids:
            break
    return len(tagged_pids(tag))


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ")[-1][:1] not in ("Z", "X")  # zombies have exited
    except OSError:
        return False


def wait_healthy(
    address: str, process: Managed | None = None, *, tls: TLSFiles | None = None, timeout: float = 60.0
) -> None:
    """Wait until a SuperLink answers ``/health`` (a process that dies meanwhile is an error)."""
    scheme = "http" if tls is None else "https"
    url = f"{scheme}://{address}/health"
    context = None
    if tls is not None:
        import ssl

        context = ssl.create_default_context(cafile=str(tls.ca))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise LaunchError(f"{process.name} exited during start-up; its log ends:\n{process.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=1.0, context=context) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise LaunchError(f"no answer from {url} within {timeout:.0f} s")


def flwr_json(args: Sequence[str], env: Mapping[str, str]) -> dict[str, Any]:
    """Run ``flwr ... --format json`` and parse its answer."""
    proc = subprocess.run(
        [str(bin_dir() / "flwr"), *args, "--format", "json"], capture_output=True, text=True, env=dict(env), timeout=120
    )
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as err:
        raise LaunchError(f"`flwr {' '.join(args)}` gave no JSON: {proc.stdout[-500:]} {proc.stderr[-500:]}") from err


def run_status(
    connection: str, run_id: str | None, env: Mapping[str, str], address: str | None = None
) -> dict[str, Any]:
    """The ``flwr ls`` entry of a run (the newest run when ``run_id`` is None). A coordinator that does
    not answer is ``CoordinatorUnreachable``; one that answers without the run, a ``LaunchError``."""
    answer = flwr_json(["ls", connection], env)
    if not answer.get("success", True):
        message = str(answer.get("error-message", ""))
        if UNAVAILABLE in message:
            raise unreachable(address or connection, f"Flower: {UNAVAILABLE}")
        raise LaunchError(
            f"`flwr ls {connection}` failed: {message.strip().splitlines()[-1] if message.strip() else answer}"
        )
    runs = answer.get("runs", [])
    if run_id is not None:
        runs = [r for r in runs if str(r.get("run-id")) == str(run_id)]
    if not runs:
        where = f"the coordinator at {address}" if address else f"`flwr ls {connection}`"
        raise LaunchError(f"{where} answers but lists no run {run_id or ''}".strip())
    return max(runs, key=lambda r: r.get("pending-at", ""))


def wait_sites_online(
    connection: str, env: Mapping[str, str], count: int, processes: Sequence[Managed], timeout: float = 60.0
) -> None:
    """Poll ``flwr supernode ls`` until ``count`` SuperNodes are online; a watched process that exits
    meanwhile ends the wait with its log's end, rather than a timeout that hides why."""
    deadline = time.monotonic() + timeout
    online = 0
    while time.monotonic() < deadline:
        for proc in processes:
            if not proc.alive():
                raise LaunchError(f"{proc.name} exited; its log ends:\n{proc.tail(30)}")
        try:
            nodes = flwr_json(["supernode", "ls", connection], env).get("nodes", [])
        except LaunchError:  # the Control API may answer a moment after /health
            nodes = []
        online = sum(n.get("status") == "online" for n in nodes)
        if online >= count:
            return
        time.sleep(0.5)
    raise LaunchError(f"{online} of {count} SuperNodes online after {timeout:.0f} s")


# lines of Flower's simulation that no fedfreeze user can act on: fedfreeze sets the number of simulated
# SuperNodes itself (one per site), so Flower's notice of its changed default and how to resize is noise
FLOWER_NOISE = (
    "default simulated SuperNodes changed from",
    "To change federation size, use the following command",
    "flwr federation simulation-config",
)


def submit(cmd: Sequence[str], env: Mapping[str, str], log: IO[str] | None = None) -> tuple[int, str | None]:
    """Run ``flwr run`` to the end of its log stream; return its exit code and the run id it printed.
    The stream's lines get a timestamp, and lose Flower's colour codes off a terminal (``logs.LogSink``);
    Flower's notices about settings fedfreeze makes itself (``FLOWER_NOISE``) are left out."""
    show(cmd)
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(env))
    run_id = None
    sink = LogSink("run", console=log)
    assert proc.stdout is not None
    for line in proc.stdout:
        if any(noise in line for noise in FLOWER_NOISE):
            continue
        sink.write(line)
        if "Successfully started run" in line:
            run_id = line.strip().split()[-1]
    return proc.wait(), run_id


def require_completed(
    connection: str, run_id: str | None, env: Mapping[str, str], address: str | None = None
) -> dict[str, Any]:
    """Raise unless ``flwr ls`` reports the run ``finished:completed``."""
    if run_id is None:
        raise LaunchError("`flwr run` did not start a run (see its output above)")
    deadline = time.monotonic() + 30
    entry = run_status(connection, run_id, env, address)
    while not str(entry.get("status", "")).startswith("finished") and time.monotonic() < deadline:
        time.sleep(1.0)
        entry = run_status(connection, run_id, env, address)
    if entry.get("status") != "finished:completed":
        raise LaunchError(f"run {entry.get('run-id')} ended {entry.get('status')}: {entry.get('status-details')}")
    return entry

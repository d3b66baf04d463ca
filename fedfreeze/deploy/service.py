"""``fedfreeze service --print coordinator|site``: systemd units for the coordinator and a site.

The decisions, each made here once:

- **A dedicated user** (``fedfreeze``), its folders made by systemd with the right owner and mode
  (``StateDirectory=``, ``LogsDirectory=``, mode 0700); the process may write nowhere else
  (``ProtectSystem=strict``, ``ReadWritePaths=`` for a coordinator's run folders).
- **Keys stay root's.** The private key (and the coordinator's certificate) are handed over with
  ``LoadCredential=``: systemd copies them, readable by this service only, into ``%d`` (its
  credentials folder); the files in ``/etc/fedfreeze`` stay ``root:root``, mode 600.
- **Stopping**: ``KillMode=mixed`` sends SIGTERM to fedfreeze alone, which stops what it started
  deepest-first within 10 s (``supervise.py``: a ServerApp records its run as interrupted while
  its SuperLink still listens); after ``TimeoutStopSec=30`` systemd SIGKILLs whatever is left of
  the unit's control group. (``control-group`` would SIGTERM every process at once; fedfreeze
  stops within the same bound then too, ``tests/federation/test_service.py``.)
- **Restarting**: on failure only (a stop asked for exits 0). A site that stopped uncleanly is
  refused by the coordinator for about a minute (Flower's re-activation refusal): it is restarted
  every 30 s, for ever (``StartLimitIntervalSec=0``), and joins once the coordinator lets it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

USER = "fedfreeze"
STOP_TIMEOUT = 30  # seconds before systemd SIGKILLs the unit's control group (fedfreeze stops within 10)
COORDINATOR_RESTART = 5
SITE_RESTART = 30  # Flower refuses a SuperNode that did not sign off for about 60 s: try every 30 s

HARDENING = """\
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictSUIDSGID=yes
LockPersonality=yes
UMask=0077"""


def _quote(words: list[str]) -> str:
    """An ExecStart= line: systemd's quoting is close to the shell's for plain paths and words."""
    return " ".join(shlex.quote(w) for w in words)


@dataclass(frozen=True)
class Unit:
    name: str  # the unit file's name
    text: str


def _unit(
    description: str, *, states: list[str], credentials: dict[str, Path], cmd: list[str], restart: int, extra: str = ""
) -> str:
    """A unit's text: ``states`` are folders below /var/lib (the first is the working folder);
    ``credentials``: name in ``%d`` -> file systemd copies there."""
    loaded = "".join(f"LoadCredential={name}:{path}\n" for name, path in credentials.items())
    return f"""\
# Written by `fedfreeze service --print`: fedfreeze {description}. See docs/deployment.md#running-as-a-service.
[Unit]
Description=fedfreeze {description}
After=network-online.target
Wants=network-online.target
StartLimitIntervalSec=0

[Service]
Type=simple
User={USER}
Group={USER}
StateDirectory={" ".join(states)}
StateDirectoryMode=0700
LogsDirectory={USER}
LogsDirectoryMode=0750
WorkingDirectory=/var/lib/{states[0]}
Environment=PYTHONUNBUFFERED=1
{loaded}ExecStart={_quote(cmd)}
KillMode=mixed
KillSignal=SIGTERM
TimeoutStopSec={STOP_TIMEOUT}
Restart=on-failure
RestartSec={restart}
{extra}{HARDENING}

[Install]
WantedBy=multi-user.target
"""


def coordinator_unit(fedfreeze: Path, tls_dir: Path, *, port: int = 9093, metrics_port: int | None = 9464) -> Unit:
    """The coordinator: ``fedfreeze server`` with TLS files from ``tls_dir`` (ca.pem, server.pem,
    server.key), its state in /var/lib/fedfreeze/coordinator, run folders in /var/lib/fedfreeze/runs
    (``fedfreeze run --out /var/lib/fedfreeze/runs/NAME``: the ServerApp writes them)."""
    cmd = [str(fedfreeze), "server", "--tls-dir", "%d", "--state-dir", f"/var/lib/{USER}/coordinator"]
    cmd += ["--port", str(port), "--log-file", f"/var/log/{USER}/coordinator.log"]
    if metrics_port is not None:
        cmd += ["--metrics-port", str(metrics_port)]
    text = _unit(
        "coordinator (Flower SuperLink)",
        states=[f"{USER}/coordinator", f"{USER}/runs"],
        credentials={name: Path(tls_dir) / name for name in ("ca.pem", "server.pem", "server.key")},
        cmd=cmd,
        restart=COORDINATOR_RESTART,
    )
    return Unit("fedfreeze-coordinator.service", text)


def site_unit(
    fedfreeze: Path,
    name: str,
    data: Path,
    superlink: str,
    keys_dir: Path,
    *,
    approved_apps: Path | None = None,
    port: int = 9094,
    threads: int | None = None,
    metrics_port: int | None = None,
) -> Unit:
    """One site: ``fedfreeze site`` with the CA and its key from ``keys_dir`` (ca.pem, NAME.key), its
    data read-only, its state in /var/lib/fedfreeze/NAME."""
    cmd = [str(fedfreeze), "site", "--name", name, "--data", str(data), "--superlink", superlink]
    cmd += ["--root-cert", "%d/ca.pem", "--auth-key", "%d/site.key", "--state-dir", f"/var/lib/{USER}/{name}"]
    cmd += ["--port", str(port), "--log-file", f"/var/log/{USER}/{name}.log"]
    if approved_apps is not None:
        cmd += ["--approved-apps", str(approved_apps)]
    if threads:
        cmd += ["--threads", str(threads)]
    if metrics_port is not None:
        cmd += ["--metrics-port", str(metrics_port)]
    readonly = [data, *([approved_apps] if approved_apps else [])]
    text = _unit(
        f"site {name} (Flower SuperNode)",
        states=[f"{USER}/{name}"],
        credentials={"ca.pem": Path(keys_dir) / "ca.pem", "site.key": Path(keys_dir) / f"{name}.key"},
        cmd=cmd,
        restart=SITE_RESTART,
        extra="".join(f"ReadOnlyPaths={path}\n" for path in readonly),
    )
    return Unit(f"fedfreeze-site-{name}.service", text)


def installed_fedfreeze() -> Path:
    """The ``fedfreeze`` command of this environment (the unit runs exactly this installation)."""
    return Path(sys.executable).parent / "fedfreeze"


def service_command(args: argparse.Namespace) -> int:
    fedfreeze = Path(args.fedfreeze) if args.fedfreeze else installed_fedfreeze()
    if args.role == "coordinator":
        metrics_port = args.metrics_port if args.metrics_port is not None else 9464
        unit = coordinator_unit(fedfreeze, args.tls_dir, port=args.port or 9093, metrics_port=metrics_port)
    else:
        from fedfreeze.errors import ConfigError

        missing = [
            o for o, v in (("--name", args.name), ("--data", args.data), ("--superlink", args.superlink)) if not v
        ]
        if missing:
            raise ConfigError(f"a site's unit needs {', '.join(missing)}")
        unit = site_unit(
            fedfreeze,
            args.name,
            Path(args.data),
            args.superlink,
            args.keys_dir or Path("/etc/fedfreeze") / args.name,
            approved_apps=args.approved_apps,
            port=args.port or 9094,
            threads=args.threads,
            metrics_port=args.metrics_port,
        )
    print(f"# {unit.name}\n{unit.text}", end="")
    return 0

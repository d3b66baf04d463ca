"""The command line of running a federation as a service: options and subcommands, added to the
parser ``fedfreeze.cli`` builds (the handlers live in ``serve``, ``operator``, ``service``, ``backup``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedfreeze.deploy.logs import LOG_FORMATS


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (1-65535)")
    return value


def add_operations(
    sub: Any, formatter: type[argparse.HelpFormatter], check_tls: Callable[[argparse.Namespace], None]
) -> None:
    """``sub``: the parser's subcommands; ``check_tls``: the one rule of TLS options (fedfreeze/cli/options.py)."""
    parsers: dict[str, argparse.ArgumentParser] = sub.choices
    for name in ("server", "site"):
        p = parsers[name]
        p.add_argument(
            "--log-file",
            type=Path,
            default=None,
            metavar="PATH",
            help="also write every line to PATH, rotated at 10 MB (5 old files kept: PATH.1 ... PATH.5)",
        )
        p.add_argument(
            "--log-format",
            choices=LOG_FORMATS,
            default="text",
            help="text: a UTC timestamp and the level on every line; json: one JSON object per line "
            "(time, level, process, message)",
        )
        p.add_argument(
            "--metrics-port",
            type=_port,
            default=None,
            metavar="PORT",
            help="serve Prometheus metrics at http://127.0.0.1:PORT/metrics and a health check at /health",
        )
    parsers["server"].add_argument(
        "--metrics-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="write the metrics to PATH every 10 s (for node_exporter's textfile collector)",
    )
    parsers["runs"].add_argument(
        "--state-dir",
        default=None,
        help="the coordinator's state folder, to show fedfreeze's own status of each run (interrupted, "
        "completed rounds) (default: coordinator-state, when it is in the current folder)",
    )

    def checked(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        def run(args: argparse.Namespace) -> int:
            check_tls(args)
            return handler(args)

        return run

    p = sub.add_parser(
        "unregister",
        formatter_class=formatter,
        help="revoke a site's key: the site can no longer join the coordinator",
        description="Unregister a site at the coordinator (Flower's `flwr supernode unregister`), by the name it "
        "was registered with or its node id. Its key can never be registered again: the site needs a new key pair.",
    )
    p.add_argument("site", help="the site's registered name (`fedfreeze sites`), or its node id")
    connection_options(p)
    p.set_defaults(func=checked(_unregister))
    _add_backup(sub, formatter)
    _add_service(sub, formatter)


def _add_service(sub: Any, formatter: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser(
        "service",
        formatter_class=formatter,
        help="print a systemd unit for the coordinator or a site",
        description="Print a systemd unit (fedfreeze/deploy/service.py says why each line is there): a "
        "dedicated user, its keys as credentials, stop and restart rules. Install it with "
        "`fedfreeze service --print ... > /etc/systemd/system/NAME.service` (docs/deployment.md).",
    )
    p.add_argument("--print", dest="role", choices=("coordinator", "site"), required=True, help="which unit")
    p.add_argument(
        "--fedfreeze",
        default=None,
        help="the fedfreeze program the unit runs (default: this installation's, next to its Python)",
    )
    p.add_argument(
        "--tls-dir",
        type=Path,
        default=Path("/etc/fedfreeze/coordinator"),
        help="coordinator: the folder of ca.pem, server.pem, server.key (root's, mode 600)",
    )
    p.add_argument("--name", default=None, help="site: its name (as registered)")
    p.add_argument("--data", default=None, help="site: its data folder (manifest.csv), mounted read-only")
    p.add_argument("--superlink", default=None, help="site: the coordinator's address, HOST:PORT")
    p.add_argument(
        "--keys-dir",
        type=Path,
        default=None,
        help="site: the folder of ca.pem and NAME.key (root's, mode 600) (default: /etc/fedfreeze/NAME)",
    )
    p.add_argument("--approved-apps", type=Path, default=None, help="site: its approved-apps list")
    p.add_argument("--port", type=_port, default=None, help="coordinator: 9093; site: its local port, 9094")
    p.add_argument("--threads", type=int, default=None, help="site: CPU threads for training")
    p.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        help="metrics and health on 127.0.0.1:PORT (default: 9464 for the coordinator, none for a site)",
    )
    p.set_defaults(func=_service)


def _service(args: argparse.Namespace) -> int:
    from fedfreeze.deploy.service import service_command

    return service_command(args)


def _add_backup(sub: Any, formatter: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser(
        "backup",
        formatter_class=formatter,
        help="copy the coordinator's state (registered sites, run history) into one archive, also while it runs",
    )
    p.add_argument("--state-dir", type=Path, default=Path("coordinator-state"), help="the coordinator's state folder")
    p.add_argument("--out", type=Path, required=True, help="the archive to write (.tar.gz, mode 600)")
    p.add_argument("--force", action="store_true", help="replace an existing archive")
    p.set_defaults(func=_backup)

    p = sub.add_parser(
        "restore",
        formatter_class=formatter,
        help="put a backup into a coordinator's state folder (the coordinator stopped)",
    )
    p.add_argument("archive", type=Path, help="an archive from `fedfreeze backup`")
    p.add_argument("--state-dir", type=Path, default=Path("coordinator-state"), help="the state folder to fill")
    p.add_argument("--force", action="store_true", help="replace the database and notes already in --state-dir")
    p.set_defaults(func=_restore)


def _backup(args: argparse.Namespace) -> int:
    from fedfreeze.deploy.backup import backup

    manifest = backup(args.state_dir, args.out, force=args.force)
    runs = sum(name.startswith("runs/") for name in manifest["files"])
    print(
        f"backup: {args.out} (the SuperLink database, {runs} run note(s); Flower {manifest['flower']}, schema "
        f"{manifest['schema_revision']}, {manifest['created_at']})"
    )
    return 0


def _restore(args: argparse.Namespace) -> int:
    from fedfreeze.deploy.backup import restore

    manifest = restore(args.archive, args.state_dir, force=args.force)
    print(
        f"restore: {args.state_dir} now holds the backup of {manifest['created_at']} (Flower {manifest['flower']}); "
        f"start the coordinator with --state-dir {args.state_dir}: runs that were running then are marked "
        "interrupted, and `fedfreeze run ... --resume` continues them"
    )
    return 0


def connection_options(p: argparse.ArgumentParser) -> None:
    """How a command reaches a coordinator: its address, the federation's CA certificate or --insecure."""
    p.add_argument("--superlink", default="127.0.0.1:9093", help="the coordinator's address, HOST:PORT")
    p.add_argument(
        "--root-cert",
        type=Path,
        default=None,
        help="the federation's CA certificate ca.pem (TLS); required unless --insecure",
    )
    p.add_argument("--insecure", action="store_true", help="for a coordinator started with --insecure")


def _unregister(args: argparse.Namespace) -> int:
    from fedfreeze.deploy.operator import unregister_command

    return unregister_command(args)

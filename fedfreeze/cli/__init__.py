"""The ``fedfreeze`` command line: thin wrappers that parse arguments and call the library."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence

from fedfreeze import __version__
from fedfreeze.cli import experiment_command, federation_commands, service_commands, site_commands
from fedfreeze.cli.options import ShowDefaults, check_client_tls
from fedfreeze.errors import FedfreezeError


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand; each command module adds its own, in the order ``--help`` lists them."""
    parser = argparse.ArgumentParser(prog="fedfreeze", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fedfreeze {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    site_commands.add_parsers(sub)  # site-train, evaluate, suggest, adapt
    federation_commands.add_simulate_parser(sub)
    service_commands.add_parsers(sub)  # server, site, app-hash
    federation_commands.add_coordinator_parsers(sub)  # run, register, sites, runs
    site_commands.add_models_parser(sub)
    experiment_command.add_parser(sub)

    # running a federation as a service (fedfreeze/deploy/commands.py): log and metrics options of
    # server and site, runs --state-dir, and the subcommands unregister, service, backup, restore
    from fedfreeze.deploy.commands import add_operations

    add_operations(sub, ShowDefaults, check_client_tls)
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so every `with` block stops the processes it started


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        return int(args.func(args))
    except FedfreezeError as err:
        print(f"fedfreeze {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a file the run writes or reads that the system refuses: full disk, permissions
        where = f": {err.filename}" if err.filename else ""
        print(f"fedfreeze {args.command}: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

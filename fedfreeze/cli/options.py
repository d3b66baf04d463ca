"""What the commands share: help texts, the help formatter, and the one rule of TLS options."""

from __future__ import annotations

import argparse
from typing import TypeAlias

Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
"""The ``fedfreeze`` parser's subcommands, to which each command module adds its parsers."""

FORCE_HELP = "replace an existing non-empty --out (the new folder takes its place only when the run has finished)"


OUTSIDE_HELP = (
    "let a manifest name images outside its own folder (absolute paths, ../); by default such a row is refused"
)


class ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, except where there is none to show (None, off flags)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def check_client_tls(args: argparse.Namespace) -> None:
    """An operator's command talks TLS unless told otherwise, like ``fedfreeze server`` and ``site``."""
    tls_or_insecure(
        args.insecure,
        args.root_cert,
        "--root-cert",
        "give --root-cert CA.pem (the federation's CA certificate), or --insecure for a "
        "coordinator started with --insecure",
    )


def tls_or_insecure(insecure: bool, given: object, option: str, missing: str) -> None:
    """Exactly one of a TLS option and ``--insecure``: the one rule of server, site and the operator's
    commands (``missing`` says what to give when neither is)."""
    from fedfreeze.errors import ConfigError

    if insecure and given:
        raise ConfigError(f"--insecure and {option} contradict each other: give one of them")
    if not insecure and not given:
        raise ConfigError(missing)

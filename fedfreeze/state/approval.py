"""A site's list of approved apps, and the ClientApp runner that enforces it (Flower-free parts).

Whoever can submit a run to the coordinator runs its code at every connected site. A site started
with ``fedfreeze site --approved-apps FILE`` runs a job's code only when the job's Flower app
(FAB) has a hash listed in FILE: the SHA-256 of the FAB's bytes, which is the hash Flower itself
gives the run (``fedfreeze app-hash`` prints it; ``fedfreeze.flower.approval`` has the check).

FILE holds one hash per line; ``#`` starts a comment, on a line of its own or after the hash::

    # fedfreeze 0.1.0, approved 2026-12-01 by the radiology IT
    b0be482c70e9f87d04a33faf5246f39e03bea3c2b93ca7b49bf7e65f9a99e98a  # fedfreeze/fedfreeze 0.1.0

How the check gets in front of the app's code: Flower's SuperNode (in its default ``subprocess``
isolation) starts ``flower-superexec``, which starts, for every message, the program named
``flwr-clientapp`` that it finds first on its ``PATH``. ``write_runner`` writes fedfreeze's
``flwr-clientapp`` into the site's state folder, and ``fedfreeze site`` puts that folder first on the
SuperNode's ``PATH``: Flower then starts fedfreeze's runner, which checks the app's hash before the
app is unpacked and only then hands over to Flower's own ClientApp code (see
``fedfreeze.flower.approval`` for why this hook and not another). The runner reads FILE afresh for
every message: a line added to FILE takes effect at the next job, without restarting the site.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedfreeze.errors import ConfigError

HASH_PATTERN = re.compile(r"[0-9a-fA-F]{64}")
RUNNER_FOLDER = "app-approval"  # in the site's state folder: the runner Flower starts, the refused FABs
REFUSED_FOLDER = "refused-apps"  # in RUNNER_FOLDER: every refused FAB, as received (HASH.fab), for review
# What Flower's superexec can start at a SuperNode besides a ClientApp: an AgentApp (a run whose app is
# an AgentApp bundle) and the tasks an AgentApp may create. fedfreeze has none of them; each would run
# code from the run's FAB without passing the ClientApp check, so the runner refuses them outright.
OTHER_TASK_COMMANDS = ("flwr-agentapp", "flwr-connector", "flwr-model")


class ApprovalListError(ConfigError):
    """The approved-apps file cannot be read, or one of its lines is not an app hash."""


@dataclass(frozen=True)
class ApprovedApps:
    """The hashes in an approved-apps file (lower case), each with the line it is on."""

    path: Path
    lines: Mapping[str, int]

    def __contains__(self, fab_hash: object) -> bool:
        return isinstance(fab_hash, str) and fab_hash.lower() in self.lines

    def __len__(self) -> int:
        return len(self.lines)


def parse_approved(text: str, source: Path) -> ApprovedApps:
    """The hashes of an approved-apps file's ``text``; the first malformed line is an error naming it."""
    found: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        if not HASH_PATTERN.fullmatch(entry):
            shown = entry if len(entry) <= 80 else entry[:77] + "..."
            raise ApprovalListError(
                f"{source}, line {number}: {shown!r} is not an app hash (64 hex digits, as `fedfreeze app-hash` "
                "prints it; one per line, '#' starts a comment)"
            )
        found.setdefault(entry.lower(), number)
    return ApprovedApps(source, found)


def load_approved(path: Path) -> ApprovedApps:
    """Read and parse an approved-apps file (errors name the file, and the line when there is one)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ApprovalListError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ApprovalListError(f"{path}: cannot be read ({err})") from None
    return parse_approved(text, Path(path))


# The runner is a Python script that /bin/sh starts (a shebang line holds at most 127 bytes on many
# kernels and no spaces, which a Python's path may exceed or contain): sh reads the third line as
# `exec PYTHON "$0" "$@"`, Python reads it as a string, so the script runs under this site's Python
# with ``sys.argv[0]`` its own path, ending in ``flwr-clientapp`` as Flower's own script's does
# (client/app.py and Flower's exit handling look at that name).
RUNNER = """#!/bin/sh
# Written by `fedfreeze site --approved-apps`; rewritten at every start of the site.
''''exec {python} "$0" "$@" # '''
# Flower's flower-superexec starts this file, by its name {command}, for every task of this site.
import sys

from fedfreeze.deploy.guard import arm_from_arguments

arm_from_arguments()  # SIGKILLed with the superexec that starts it (fedfreeze/deploy/guard.py)
from fedfreeze.flower.approval import {function}  # noqa: E402

sys.exit({function}({arguments}))
"""


def write_runner(folder: Path, approved: Path, site: str, python: str | None = None) -> Path:
    """Write fedfreeze's ``flwr-clientapp`` (and refusing stand-ins for Flower's other task programs)
    into ``folder/bin``; return that ``bin`` folder, which goes first on the SuperNode's ``PATH``."""
    bin_dir = Path(folder) / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    (Path(folder) / REFUSED_FOLDER).mkdir(exist_ok=True)
    python = shlex.quote(python or sys.executable)
    programs = {
        "flwr-clientapp": (
            "clientapp_main",
            f"{str(Path(approved).resolve())!r}, site={site!r}, refused_dir={str(Path(folder, REFUSED_FOLDER).resolve())!r}",
        ),
        **{command: ("refuse_task_main", f"{command!r}, site={site!r}") for command in OTHER_TASK_COMMANDS},
    }
    for command, (function, arguments) in programs.items():
        path = bin_dir / command
        partial = path.with_name(f".{command}.tmp")
        partial.write_text(
            RUNNER.format(python=python, command=command, function=function, arguments=arguments), encoding="utf-8"
        )
        partial.chmod(0o755)
        os.replace(partial, path)
    return bin_dir


def check_runner(bin_dir: Path, env: Mapping[str, str]) -> str:
    """Start the written runner once, as Flower will (by its name, on ``env``'s ``PATH``), in its
    check mode: it reads the approved-apps file and finds its hooks in Flower's ClientApp code.

    Catches, before the SuperNode starts, what would otherwise refuse every job: a state folder
    that allows no programs (mounted ``noexec``), another ``flwr-clientapp`` first on the ``PATH``, a
    Flower whose ClientApp code has changed. Returns the runner's one line; raises ``ConfigError``.
    """
    found = _which("flwr-clientapp", env.get("PATH", ""))
    expected = Path(bin_dir) / "flwr-clientapp"
    if found is None or found.resolve() != expected.resolve():
        raise ConfigError(
            f"the approval runner {expected} is not the flwr-clientapp the SuperNode would start ({found})"
        )
    try:
        proc = subprocess.run(
            ["flwr-clientapp", "--fedfreeze-check"], capture_output=True, text=True, env=dict(env), timeout=120
        )
    except OSError as err:
        raise ConfigError(
            f"cannot start the approval runner {expected} ({err}): the state folder must allow running "
            "programs (not mounted noexec); give --state-dir another folder"
        ) from None
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    if proc.returncode != 0:
        raise ConfigError(f"the approval runner {expected} failed its check: {lines[-1] if lines else proc.returncode}")
    return lines[-1] if lines else ""


def _which(command: str, path: str) -> Path | None:
    for folder in path.split(os.pathsep):
        candidate = Path(folder or ".") / command
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None

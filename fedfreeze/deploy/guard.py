"""Flower's child programs end with their parent, at once, whatever killed it.

Flower starts its helpers by name from the ``PATH``: the SuperLink and the SuperNode start
``flower-superexec``, which starts ``flwr-serverapp`` (coordinator) or ``flwr-clientapp`` (site)
for every task. Each is given ``--parent-pid`` and polls it every 0.2 s; that poll fails to notice
a parent that has died but not been reaped (a zombie still "exists"), a helper killed in its first
seconds was never polling, and the graceful exit it starts then can take 10-50 s (seen: a
ClientApp training on after its SuperNode was killed; a ServerApp left for 20-50 s after its
SuperLink).

``write_guards`` writes, into the state folder, a program of the same name for each of them, put
first on the ``PATH`` of the SuperLink or SuperNode. It asks Linux to SIGKILL it when its parent
dies (``PR_SET_PDEATHSIG``, which survives ``exec``), checks that the parent is still the one
Flower named (else the parent died before the signal was armed: it exits at once), then
``exec``s Flower's own program with the same arguments, in the same process. The guard runs
before any of Flower's code and imports nothing but ``ctypes`` and ``os``.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
from pathlib import Path

GUARD_FOLDER = "guard"  # in the state folder of the coordinator or the site: GUARD_FOLDER/bin
GUARDED = ("flower-superexec", "flwr-serverapp", "flwr-clientapp")
PR_SET_PDEATHSIG = 1  # linux/prctl.h

GUARD = """#!/bin/sh
# Written by fedfreeze (fedfreeze/deploy/guard.py) at every start of the coordinator or site.
''''exec {python} -S -E "$0" "$@" # '''
# {program}: Flower's own program, started so that it is SIGKILLed when its parent dies.
import ctypes
import os
import sys

REAL = {real!r}
args = sys.argv[1:]
expected = None
for i, arg in enumerate(args[:-1]):
    if arg == "--parent-pid" and args[i + 1].isdigit():
        expected = int(args[i + 1])
try:
    armed = ctypes.CDLL(None, use_errno=True).prctl({prctl}, {signal}, 0, 0, 0) == 0
except (OSError, AttributeError):
    armed = False
if armed and expected is not None and os.getppid() != expected:
    sys.exit(1)  # the parent died before the signal was armed
os.execv(REAL, [REAL, *args])
"""


def write_guards(state_dir: Path, real_bin: Path, python: str | None = None) -> Path:
    """Write the guarded programs into ``state_dir/guard/bin``; return that folder (first on the PATH)."""
    folder = Path(state_dir) / GUARD_FOLDER / "bin"
    folder.mkdir(parents=True, exist_ok=True)
    for program in GUARDED:
        path = folder / program
        partial = path.with_name(f".{program}.tmp")
        partial.write_text(
            GUARD.format(
                python=shlex.quote(python or sys.executable),
                program=program,
                real=str(Path(real_bin) / program),
                prctl=PR_SET_PDEATHSIG,
                signal=int(signal.SIGKILL),
            ),
            encoding="utf-8",
        )
        partial.chmod(0o755)
        os.replace(partial, path)
    return folder


def arm_from_arguments(argv: list[str] | None = None) -> bool:
    """The guard, for a program fedfreeze runs in place of Flower's (the site's approval runner):
    SIGKILL with the parent named by ``--parent-pid``; exit now if that parent is gone already.
    True when armed (Linux)."""
    args = list(sys.argv[1:] if argv is None else argv)
    expected = next(
        (int(args[i + 1]) for i, arg in enumerate(args[:-1]) if arg == "--parent-pid" and args[i + 1].isdigit()),
        None,
    )
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if expected is not None and os.getppid() != expected:
        sys.exit(1)
    return True


def with_guards(env: dict[str, str], guard_bin: Path) -> dict[str, str]:
    """``env`` with the guards first on its ``PATH``."""
    return {**env, "PATH": f"{guard_bin}{os.pathsep}{env.get('PATH', '')}"}

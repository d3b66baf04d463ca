"""The code a model came from: the installed package's git commit, and whether tracked files differ
from it (``None`` when git or the checkout is absent, never an error). Part of every provenance
(``fedfreeze.provenance``).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

GIT_TIMEOUT_S = 5.0


def source_root() -> Path:
    """The folder holding the installed ``fedfreeze`` package (a checkout's root when installed -e)."""
    return Path(__file__).resolve().parent.parent


def git_state(root: Path | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout whose root is ``root`` (default: ``source_root()``).

    ``dirty``: a tracked file differs from the commit (``git describe --dirty``'s sense). (None,
    None) when git is missing, fails, or ``root`` is not the top of a checkout (an installed wheel
    inside some other repository must not report that repository's commit).
    """
    commit, changed = git_changes(root)
    return commit, None if changed is None else bool(changed)


def git_changes(root: Path | None = None) -> tuple[str | None, list[str] | None]:
    """(commit, the tracked paths that differ from it): ``git_state`` with the paths its ``dirty`` counts
    (untracked files are not among them), as ``git status --porcelain`` names them. (None, None) where
    ``git_state`` gives (None, None); the paths are None alone when git cannot read the status."""
    root = (root or source_root()).resolve()
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root:
        return None, None
    commit = _git(root, "rev-parse", "HEAD")
    if not commit:
        return None, None
    status = _git(root, "status", "--porcelain", "--untracked-files=no", strip=False)
    return commit, None if status is None else [line[3:] for line in status.splitlines() if line.strip()]


def _git(root: Path, *args: str, strip: bool = True) -> str | None:
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # a status must not take the index lock
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
            env=env,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() if strip else done.stdout

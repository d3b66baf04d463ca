"""Output folders as transactions: written aside, renamed into place, locked while written.

Every command that writes a model or report folder (``site-train``, ``adapt``, ``simulate``, ``run``,
``experiment``, ``evaluate --report``) opens it with :func:`output_folder`, so that

* a run writes into a hidden sibling (``.NAME.partial``) and renames it into place only when it has
  finished: an interrupted run never leaves a folder that looks complete, and a folder it replaces
  (``--force``) stays untouched until then;
* one run at a time holds a folder (a lock file ``.NAME.lock`` beside it, released by the kernel
  when the process dies, so a killed run never blocks the next);
* an existing non-empty folder is refused unless ``--force`` (replace it) or ``--resume`` (continue
  it, where a command can) is given, and so is a folder that is or holds one of the run's inputs
  (``--init``, ``--model``, ``--data``: replacing it would delete what the run reads).

A resumable run (``simulate``, ``run``, ``experiment``) keeps its partial folder when it stops after
writing something, for ``--resume`` to continue; any other run's partial folder is scrap, removed
when the run stops (or, after a kill, by the next run).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import signal
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from fedfreeze.errors import OutputError

CRASH_VARIABLE = "FEDFREEZE_CRASH_AT"  # tests: the named point at which a run kills itself (SIGKILL)
LOCK_POLL_S = 0.5


@dataclass(frozen=True)
class Output:
    """Where a run writes (``work``) and the folder it becomes when it finishes (``final``): files
    and records name ``final``, never the partial folder."""

    final: Path
    work: Path


def partial_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial")


def is_partial(path: str | Path) -> bool:
    """Whether ``path`` is, or lies in, a run's partial folder: work in progress or scrap, never a
    finished output, whatever it holds."""
    return any(part.startswith(".") and part.endswith(".partial") for part in Path(path).resolve().parts)


def _old_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def _lock_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.lock")


def crash_point(name: str) -> None:
    """Kill this process here when ``FEDFREEZE_CRASH_AT`` names this point (fault injection for the
    tests that kill a run between two of its writes); does nothing otherwise."""
    if os.environ.get(CRASH_VARIABLE) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def check_output(
    path: str | Path,
    option: str = "--out",
    *,
    force: bool = False,
    resume: bool = False,
    resumable: bool = False,
    inputs: Mapping[str, str | Path | None] | None = None,
) -> Path:
    """The resolved folder, or an ``OutputError`` saying why it cannot be written (before any work)."""
    final = Path(path).expanduser().resolve()
    if final.exists() and not final.is_dir():
        raise OutputError(f"{option} {path} is a file, not a folder: name a new folder")
    for name, given in (inputs or {}).items():
        if given is None:
            continue
        source = Path(given).expanduser().resolve()
        if source == final:
            raise OutputError(f"{option} {path} is the {name} folder: write to a new folder")
        if final in source.parents:
            raise OutputError(f"{option} {path} holds the {name} {given}: replacing it would delete an input")
    if final.is_dir() and any(final.iterdir()) and not (force or resume):
        also = " or --resume to continue it" if resumable else ""
        raise OutputError(f"{option} {path} exists and is not empty: give --force to replace it{also}, or a new folder")
    return final


@contextlib.contextmanager
def output_folder(
    path: str | Path,
    option: str = "--out",
    *,
    force: bool = False,
    resume: bool = False,
    resumable: bool = False,
    inputs: Mapping[str, str | Path | None] | None = None,
    wait: float = 0.0,
) -> Iterator[Output]:
    """Hold ``path`` for one run: lock it, check it, yield where to write, publish it on success.

    ``resumable``: the run can continue a stopped one (``--resume``); its partial folder is kept
    when it stops, and one left by an earlier run is refused unless ``resume`` or ``force``.
    ``wait``: seconds to wait for another run's lock before refusing (a command refuses at once; a
    coordinator restarted under a run whose ServerApp is still ending waits for it to end).
    """
    final = Path(path).expanduser().resolve()
    check_output(path, option, force=force, resume=resume and resumable, resumable=resumable, inputs=inputs)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{option} {path}: cannot create {final.parent}: {err.strerror}") from None
    with _locked(final, option, path, wait):
        _recover(final)
        check_output(path, option, force=force, resume=resume and resumable, resumable=resumable, inputs=inputs)
        work = _start(final, option, path, force=force, resume=resume and resumable, resumable=resumable)
        try:
            yield Output(final=final, work=work)
        except BaseException:
            if not resumable or not any(work.iterdir()):  # nothing written yet: nothing to resume
                shutil.rmtree(work, ignore_errors=True)
            raise
        crash_point("staged")
        _publish(work, final, option, path)


@contextlib.contextmanager
def _locked(final: Path, option: str, shown: str | Path, wait: float) -> Iterator[None]:
    """An exclusive ``flock`` on ``.NAME.lock`` for the run's lifetime; the file is removed after."""
    lock = _lock_path(final)
    deadline = time.monotonic() + wait
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise OutputError(f"{option} {shown}: cannot create the lock file {lock}: {err.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_pid(fd)
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES) and time.monotonic() < deadline:
                time.sleep(LOCK_POLL_S)
                continue
            if err.errno in (errno.EAGAIN, errno.EACCES):
                raise OutputError(
                    f"{option} {shown} is being written by another fedfreeze run{holder}: wait for it to end, "
                    f"or choose another {option}"
                ) from None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino  # not a file another run removed meanwhile
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return ""
    return f" (process {text})" if text.isdigit() else ""


def _recover(final: Path) -> None:
    """Finish what a run killed in mid-publish left: its previous folder set aside comes back (the new
    one never arrived), or is removed (the new one did)."""
    old = _old_path(final)
    if not old.exists():
        return
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.rename(final)


def _start(final: Path, option: str, shown: str | Path, *, force: bool, resume: bool, resumable: bool) -> Path:
    """The partial folder this run writes into: fresh, or (``resume``) the stopped run's, or a copy of
    the finished folder it continues."""
    work = partial_path(final)
    try:
        if work.exists() and resume:
            return work
        if work.exists() and resumable and not force:
            raise OutputError(
                f"{option} {shown}: an unfinished run was left in {work}: give --resume to continue it, "
                "or --force to start again"
            )
        shutil.rmtree(work, ignore_errors=True)
        if resume and final.is_dir() and any(final.iterdir()):
            shutil.copytree(final, work, symlinks=True)
        else:
            work.mkdir()
    except OSError as err:
        raise OutputError(f"{option} {shown}: cannot write {work}: {err.strerror}") from None
    return work


def _publish(work: Path, final: Path, option: str, shown: str | Path) -> None:
    """Rename the finished folder into place; a folder it replaces is set aside first and removed
    after (a kill in between leaves no folder at ``final``: the next run puts the old one back)."""
    old = _old_path(final)
    try:
        if final.is_dir() and not any(final.iterdir()):
            final.rmdir()
        elif final.exists():
            final.rename(old)
            crash_point("swapping")
        work.rename(final)
    except OSError as err:
        raise OutputError(f"{option} {shown}: cannot move the finished run into place: {err.strerror}") from None
    shutil.rmtree(old, ignore_errors=True)

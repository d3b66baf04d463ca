"""Code approval at the site: a job's code runs only if its app's hash is on the site's list.

**The hash.** A Flower app travels as a FAB (a zip of ``pyproject.toml``, ``server/*.py`` and
``client/*.py``; fedfreeze itself is installed at the site). Flower names it by the SHA-256 of the
FAB's bytes: ``flwr run`` computes ``hashlib.sha256(build_fab_from_disk(app)).hexdigest()``
(``flwr.cli.run.run``), the SuperLink recomputes it when it stores the FAB and records it as the
run's ``fab_hash`` (``flwr ls --format json`` shows it as ``fab-hash``), and a ClientApp process
recomputes it from the bytes it receives (``flwr.cli.install.install_from_fab``). ``app_hash``
computes it the same way, with Flower's own ``build_fab_from_disk``, so ``fedfreeze app-hash``
prints the very string the site checks and Flower reports as the run's ``fab_hash``. One changed
byte in any file of the app, or in its ``pyproject.toml``, gives another hash.

**Where the check sits, and why there.** What Flower 1.42 offers and why it is not used alone:

- ``flower-supernode --trusted-entities`` accepts a FAB only if the SuperLink marked it
  ``valid_license`` and it carries an Ed25519 signature by a listed key, both made by Flower Hub's
  review. A self-hosted SuperLink provides neither, so every job would be refused; it cannot be
  given a list of hashes.
- The SuperNode process holds the FAB before any ClientApp starts, but offers no hook there other
  than that one; a check inside it would mean replacing its message loop.
- ``--isolation process`` with an external ``flower-superexec`` changes nothing about where a
  check can go: that superexec, like the one the SuperNode starts itself in the default
  ``subprocess`` isolation, starts the program named ``flwr-clientapp`` found first on its
  ``PATH`` (``TASK_TYPE_TO_COMMAND`` and its ``SubprocessExecutor``), and it would add a second
  long-running process per site to start, supervise and stop with the SuperNode. In ``subprocess``
  isolation the SuperNode starts the superexec with its own environment, so the site's ``PATH``
  decides which ``flwr-clientapp`` runs. That is Flower's mechanism for choosing the ClientApp
  program, and ``fedfreeze site --approved-apps`` uses it: fedfreeze's runner (written by
  ``fedfreeze.state.approval.write_runner``) comes first on the SuperNode's ``PATH``.
- Refusing before the ClientApp process starts (in the superexec) would send no reply: the
  coordinator would wait for the round's timeout and record "no reply". Inside the ClientApp
  process, Flower's own error handling turns the refusal into an error reply carrying its reason,
  which the coordinator records at once as that site's one failure.

The runner runs Flower's own ``flwr-clientapp`` code (``flwr_clientapp``) with two of its
module-level names wrapped (``flwr.supernode.runtime.run_clientapp``; Flower is pinned to 1.42.0,
and ``tests/federation/test_approval.py`` checks the names and their order): ``pull_task_input``,
which brings the message, context, run and FAB from the SuperNode, to learn the site's name, the
run and the hashes Flower states; and ``install_from_fab``, which would unpack the FAB into
``FLWR_HOME/apps`` before the ClientApp is imported from there, to check the SHA-256 of the FAB's
bytes against the approved list first. A refused app is never unpacked, written to ``FLWR_HOME``
or imported; the site logs the refusal with the app's hash and keeps the FAB, as received, for
review. A FAB whose stated hash differs from its content's is refused too (Flower would load the
app folder named after the stated hash).
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import sys
import tomllib
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedfreeze.errors import ConfigError
from fedfreeze.state.approval import ApprovalListError, load_approved

HOOKED_MODULE = "flwr.supernode.runtime.run_clientapp"
HOOKS = ("pull_task_input", "install_from_fab")  # run_clientapp calls them in this order, then loads the app
KEEP_AT_MOST = 50  # refused FABs kept for review (each at most Flower's 10 MB)


class AppNotApproved(Exception):
    """A site refused to run an app: ``str()`` is ``"SITE refused to run app HASH: WHY"``."""


REFUSED = re.compile(r"(?P<site>.+?) refused to run app (?P<hash>[0-9a-f]{64}): (?P<why>.*)", re.DOTALL)
# what Flower's ClientApp process sends for an exception: run_clientapp's ``str(type(ex)) + ":<'" + str(ex) + "'>"``
WRAPPED = re.compile(rf"<class '{re.escape(__name__)}\.AppNotApproved'>:<'(?P<text>.*)'>", re.DOTALL)


@dataclass(frozen=True)
class Refusal:
    site: str
    fab_hash: str
    text: str


def refusal_in(reason: str | None) -> Refusal | None:
    """The site's refusal in an error reply's reason (Flower's wording around it removed), if it is one."""
    wrapped = WRAPPED.fullmatch(reason.strip()) if reason else None
    if wrapped is None:
        return None
    text = wrapped.group("text")
    found = REFUSED.fullmatch(text)
    if found is None:
        return None
    return Refusal(found.group("site"), found.group("hash"), text)


def fab_hash(content: bytes) -> str:
    """Flower's hash of a FAB: the SHA-256 of its bytes, as 64 lower-case hex digits."""
    return hashlib.sha256(content).hexdigest()


@dataclass(frozen=True)
class AppHash:
    fab_hash: str
    app: str  # publisher/name version
    files: list[str]

    def line(self) -> str:
        """A line for an approved-apps file: the hash, and what it is in a comment."""
        return f"{self.fab_hash}  # {self.app} ({len(self.files)} files: {' '.join(self.files)})"


def app_hash(path: Path) -> AppHash:
    """The hash Flower gives the app in folder ``path`` when ``flwr run`` submits it (or of a ``.fab``
    file, as it is). Never imports the app: Flower's ``build_fab_from_disk`` only reads its files."""
    path = Path(path)
    if path.is_file():
        content = path.read_bytes()
    elif path.is_dir():
        from flwr.cli.build import build_fab_from_disk
        from flwr.cli.utils import AppPathDepthError

        if not (path / "pyproject.toml").is_file():
            raise ConfigError(f"{path}: no pyproject.toml: not a Flower app folder")
        try:
            content = build_fab_from_disk(path)
        except (ValueError, AppPathDepthError) as err:
            raise ConfigError(f"{path}: Flower cannot build an app from it: {err}") from None
    else:
        raise ConfigError(f"{path}: no such folder or file")
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as fab:  # read, never extracted
            names = [n for n in fab.namelist() if not n.startswith(".info/")]
            config = tomllib.loads(fab.read("pyproject.toml").decode("utf-8"))
        publisher = config["tool"]["flwr"]["app"]["publisher"]
        app = f"{publisher}/{config['project']['name']} {config['project']['version']}"
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path}: not a Flower app bundle ({err})") from None
    return AppHash(fab_hash(content), app, names)


# ---------------------------------------------------------------------------------------- the runner
def log_site(level: int, message: str) -> None:
    from flwr.supercore import log

    log(level, message)


@dataclass
class Guard:
    """The check between Flower's ``pull_task_input`` and ``install_from_fab`` in one ClientApp process."""

    approved: Path
    site: str
    refused_dir: Path | None = None
    run_id: int | None = None
    stated: tuple[str, ...] = ()  # the hashes the SuperNode states for the run and its FAB

    def wrap_pull(self, pull: Callable[..., Any]) -> Callable[..., Any]:
        def pull_task_input(*args: Any, **kwargs: Any) -> Any:
            message, context, run, fab = pull(*args, **kwargs)
            self.site = str(context.node_config.get("site-name", self.site))
            self.run_id = run.run_id
            self.stated = (run.fab_hash, fab.hash_str)
            return message, context, run, fab

        return pull_task_input

    def wrap_install(self, install: Callable[..., Any]) -> Callable[..., Any]:
        def install_from_fab(fab_file: Any, *args: Any, **kwargs: Any) -> Any:
            self.check(fab_file)
            return install(fab_file, *args, **kwargs)

        return install_from_fab

    def check(self, fab_file: bytes | Path) -> str:
        """Return the FAB's hash if it may run here; else log, keep the FAB and raise ``AppNotApproved``."""
        content = fab_file.read_bytes() if isinstance(fab_file, Path) else bytes(fab_file)
        digest = fab_hash(content)
        run = f"run {self.run_id}" if self.run_id is not None else "a run"
        why = None
        line = None
        try:
            approved = load_approved(self.approved)
        except ApprovalListError as err:
            why = f"the site's approved-apps list cannot be used ({err})"
        else:
            line = approved.lines.get(digest)
            if line is None:
                why = (
                    "its hash is not on the site's list of approved apps (`fedfreeze app-hash` prints an app's "
                    "hash; any change to the app changes it)"
                )
        stated = [h for h in self.stated if h and h.lower() != digest]
        if why is None and stated:
            why = f"the run states the app hash {stated[0]}, but the app's content has another"
        if why is None:
            log_site(
                logging.INFO,
                f"fedfreeze site {self.site}: {run}: app {digest} is approved ({self.approved}, line {line})",
            )
            return digest
        kept = self.keep(digest, content)
        log_site(
            logging.ERROR,
            f"fedfreeze site {self.site}: {run}: refused app {digest}: {why}; nothing of it was unpacked or run"
            + (f"; the app as received: {kept}" if kept else ""),
        )
        raise AppNotApproved(f"{self.site} refused to run app {digest}: {why}")

    def keep(self, digest: str, content: bytes) -> Path | None:
        """The refused FAB, as received, for the site's IT to review (``unzip -l``); at most KEEP_AT_MOST."""
        if self.refused_dir is None:
            return None
        path = self.refused_dir / f"{digest}.fab"
        try:
            if not path.exists():
                if sum(1 for _ in self.refused_dir.glob("*.fab")) >= KEEP_AT_MOST:
                    return None
                partial = path.with_suffix(".part")
                partial.write_bytes(content)
                partial.replace(path)
        except OSError:
            return None
        return path


class HideRefusalTraceback(logging.Filter):
    """Drop Flower's "ClientApp raised an exception" record (with a traceback of the runner's own
    frames) for a refusal: the runner has logged the refusal in one line already, and no ClientApp ran."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], AppNotApproved))


def hooked_module() -> Any:
    """Flower's ClientApp code, with the names the runner wraps (``RuntimeError`` if it lacks one)."""
    import importlib

    module = importlib.import_module(HOOKED_MODULE)
    missing = [name for name in HOOKS if not callable(getattr(module, name, None))]
    if missing:
        raise RuntimeError(f"{HOOKED_MODULE} has no {', '.join(missing)}: not the Flower code fedfreeze checks")
    return module


def install(guard: Guard) -> None:
    """Wrap the hooks of Flower's ClientApp code in this process."""
    module = hooked_module()
    module.pull_task_input = guard.wrap_pull(module.pull_task_input)
    module.install_from_fab = guard.wrap_install(module.install_from_fab)
    logging.getLogger("flwr").addFilter(HideRefusalTraceback())


def clientapp_main(approved: str, *, site: str, refused_dir: str | None = None) -> int:
    """fedfreeze's ``flwr-clientapp``: Flower's own, with the check in front of the app's code.

    ``--fedfreeze-check`` (what ``fedfreeze site`` runs once at start-up): read the list and find
    the hooks, print one line, exit 0; or say what is wrong and exit 2.
    """
    guard = Guard(Path(approved), site, Path(refused_dir) if refused_dir else None)
    if sys.argv[1:] == ["--fedfreeze-check"]:
        try:
            listed = load_approved(Path(approved))
            hooked_module()
        except (ApprovalListError, RuntimeError, ImportError) as err:
            print(f"approval runner: {err}", file=sys.stderr)
            return 2
        print(f"approval runner ready: {len(listed)} approved app(s) in {approved}")
        return 0
    try:
        install(guard)
    except (RuntimeError, ImportError) as err:  # refuse everything rather than run unchecked
        print(f"fedfreeze site {site}: refused to start a ClientApp: {err}", file=sys.stderr, flush=True)
        return 1
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    flwr_clientapp()  # ends with sys.exit
    return 0


def refuse_task_main(command: str, *, site: str) -> int:
    """fedfreeze's stand-in for Flower's other task programs at a site (``flwr-agentapp``, ...): each
    would run code from a run's app without the ClientApp's check, and fedfreeze uses none of them."""
    print(
        f"fedfreeze site {site}: refused to start {command}: this site runs approved ClientApps only",
        file=sys.stderr,
        flush=True,
    )
    return 1

"""``fedfreeze backup`` and ``restore``: the coordinator's state folder as one archive, and back.

What the coordinator cannot lose is its SuperLink database (registered sites and their keys, run
history) and fedfreeze's notes beside it (``runs/``, ``sites.json``). The database is copied with
SQLite's online backup API, which gives a consistent copy while the coordinator runs (copying the
file could catch it between two writes). Flower's installed apps (``flwr-home``) and the guards
are made again at start-up and are left out. A run's outputs (``metrics.json``, checkpoints, the
model) live in its output folder, a plain folder to back up as files.

The archive records the Flower version and the database's schema revision: a Flower upgrade
migrates the database when it starts, and an older Flower cannot read a migrated one, so a
restore refuses a backup made by a newer Flower than the one installed (a rollback restores the
backup taken before the upgrade).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import sqlite3
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from fedfreeze.errors import ConfigError
from fedfreeze.state import runstate, sitebook

DATABASE = "superlink.db"  # fedfreeze server's --database, in its state folder
MANIFEST = "fedfreeze-backup.json"
FORMAT = 1


def _flower_version() -> str:
    return importlib.metadata.version("flwr")


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:3] if part.isdigit())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _schema_revision(database: Path) -> str | None:
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as con:
            row = con.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error:
        return None
    return str(row[0]) if row else None


def backup(state_dir: Path, out: Path, *, force: bool = False) -> dict[str, Any]:
    """Write ``out`` (a .tar.gz) from the coordinator's state folder; returns the archive's manifest."""
    state_dir, out = Path(state_dir), Path(out)
    database = state_dir / DATABASE
    if not database.is_file():
        raise ConfigError(
            f"--state-dir {state_dir}: no {DATABASE} there (the folder `fedfreeze server --state-dir` uses)"
        )
    if out.exists() and not force:
        raise ConfigError(f"--out {out}: exists already (give --force to replace it)")
    with tempfile.TemporaryDirectory(prefix="fedfreeze-backup-") as tmp:
        copy = Path(tmp) / DATABASE
        source = sqlite3.connect(str(database), timeout=30)
        target = sqlite3.connect(str(copy))
        try:
            source.backup(target)  # consistent while the SuperLink writes
        finally:
            target.close()
            source.close()
        files: dict[str, bytes] = {DATABASE: copy.read_bytes()}
    for note in sorted(runstate.runs_folder(state_dir).glob("*.json")):
        files[f"{runstate.RUNS_FOLDER}/{note.name}"] = note.read_bytes()
    if (state_dir / sitebook.SITES_FILE).is_file():
        files[sitebook.SITES_FILE] = (state_dir / sitebook.SITES_FILE).read_bytes()
    with tempfile.TemporaryDirectory(prefix="fedfreeze-backup-") as tmp:
        (Path(tmp) / DATABASE).write_bytes(files[DATABASE])
        revision = _schema_revision(Path(tmp) / DATABASE)
    manifest = {
        "format": FORMAT,
        "created_at": runstate.utc_now(),
        "state_dir": str(state_dir.resolve()),
        "flower": _flower_version(),
        "schema_revision": revision,
        "files": {name: _sha256(data) for name, data in files.items()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with tarfile.open(partial, "w:gz") as archive:
        for name, data in [(MANIFEST, json.dumps(manifest, indent=1).encode()), *files.items()]:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o600
            archive.addfile(info, io.BytesIO(data))
    partial.chmod(0o600)  # the database holds the sites' public keys and the runs' configurations
    partial.replace(out)
    return manifest


def read_archive(path: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest and files of a backup, each file checked against its SHA-256; only the names a
    backup holds are read (no other path is ever written from an archive)."""
    try:
        with tarfile.open(path, "r:gz") as archive:
            members = {m.name: m for m in archive.getmembers() if m.isfile()}
            if MANIFEST not in members:
                raise ConfigError(f"{path}: not a fedfreeze backup (no {MANIFEST})")
            manifest = json.loads(archive.extractfile(members[MANIFEST]).read())  # type: ignore[union-attr]
            files = {}
            for name, digest in manifest["files"].items():
                allowed = name in (DATABASE, sitebook.SITES_FILE) or (
                    name.startswith(f"{runstate.RUNS_FOLDER}/") and name.count("/") == 1 and ".." not in name
                )
                if not allowed or name not in members:
                    raise ConfigError(f"{path}: unexpected or missing file {name!r}")
                data = archive.extractfile(members[name]).read()  # type: ignore[union-attr]
                if _sha256(data) != digest:
                    raise ConfigError(f"{path}: {name} does not match its SHA-256 in the manifest (damaged archive)")
                files[name] = data
    except (OSError, tarfile.TarError, ValueError, KeyError) as err:
        raise ConfigError(f"{path}: cannot be read as a fedfreeze backup ({err})") from None
    return manifest, files


def restore(archive: Path, state_dir: Path, *, force: bool = False) -> dict[str, Any]:
    """Put a backup into ``state_dir`` (which must hold no database, unless ``force``); the coordinator
    must not be running on it. Returns the manifest."""
    from fedfreeze.deploy.serve import state_lock

    manifest, files = read_archive(Path(archive))
    backed_up, installed = str(manifest.get("flower", "?")), _flower_version()
    if _version_key(backed_up) > _version_key(installed):
        raise ConfigError(
            f"{archive}: made with Flower {backed_up}, newer than the installed {installed}: its database may be "
            "migrated beyond what this Flower reads; restore a backup taken before the upgrade"
        )
    state_dir = Path(state_dir)
    if (state_dir / DATABASE).exists() and not force:
        raise ConfigError(f"--state-dir {state_dir}: holds a {DATABASE} already (give --force to replace it)")
    state_dir.mkdir(parents=True, exist_ok=True)
    with state_lock(state_dir):  # refuses while a coordinator runs on this folder
        for stale in (f"{DATABASE}-wal", f"{DATABASE}-shm", sitebook.SITES_FILE):
            (state_dir / stale).unlink(missing_ok=True)
        for note in runstate.runs_folder(state_dir).glob("*.json"):  # notes of runs the backup does not know
            note.unlink()
        for name, data in files.items():
            target = state_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            partial.write_bytes(data)
            partial.chmod(0o600)
            partial.replace(target)
    return manifest

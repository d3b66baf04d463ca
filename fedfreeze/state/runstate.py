"""What the coordinator knows of each federation it runs, kept in its state folder.

A ServerApp killed with its coordinator (SIGKILL, power loss) writes nothing more: its
``metrics.json`` would say ``running`` forever, and Flower's own record of the run can stay
``running`` too. So the ServerApp notes every run here (``STATE_DIR/runs/RUN_ID.json``: its output
folder, status, completed rounds, last update), and ``fedfreeze server`` reads the notes when it
starts: a run still noted ``running`` was interrupted by the coordinator's end. It is marked
``interrupted`` with the time this was found, the time of its last completed round and the number
of completed rounds, in the note and in the run's ``metrics.json`` (``fedfreeze run --resume``
continues it). A run stopped by a SIGTERM to the coordinator marks itself, at once.

The ServerApp finds the state folder through ``STATE_VARIABLE``, which ``fedfreeze server`` puts in
the environment Flower's processes inherit; a ServerApp without it (a simulation) notes nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

STATE_VARIABLE = "FEDFREEZE_COORDINATOR_STATE"
RUNS_FOLDER = "runs"
METRICS_FILE = "metrics.json"  # fedfreeze.federation.report.METRICS_FILE (its module imports torch)
RUNNING, COMPLETED, FAILED, INTERRUPTED = "running", "completed", "failed", "interrupted"
FOUND_AT_START = (
    "the coordinator stopped while this run was running (killed, crashed or its machine went down); "
    "found when the coordinator started again"
)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class RunNote:
    """One run, as the coordinator's state folder keeps it."""

    run_id: int
    out_dir: str
    status: str
    completed_rounds: int
    rounds_planned: int
    started_at: str
    updated_at: str
    reason: str | None = None
    interrupted: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def runs_folder(state_dir: Path) -> Path:
    return Path(state_dir) / RUNS_FOLDER


def write_note(state_dir: Path, note: RunNote) -> Path:
    folder = runs_folder(state_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{note.run_id}.json"
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(asdict(note), indent=1) + "\n", encoding="utf-8")
    partial.replace(path)
    return path


def read_notes(state_dir: Path) -> list[RunNote]:
    """Every run noted in the state folder, oldest first (unreadable notes are skipped)."""
    notes = []
    for path in sorted(runs_folder(state_dir).glob("*.json")):
        try:
            notes.append(RunNote(**json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError, TypeError):
            continue
    return sorted(notes, key=lambda n: n.started_at)


def note_run(
    run_id: int | None,
    out_dir: Path,
    status: str,
    *,
    completed_rounds: int,
    rounds_planned: int,
    reason: str | None = None,
    interrupted: dict[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Path | None:
    """The ServerApp's note of its run (None without a coordinator state folder or a run id)."""
    state = (os.environ if env is None else env).get(STATE_VARIABLE)
    if not state or run_id is None:
        return None
    path = runs_folder(Path(state)) / f"{run_id}.json"
    started = utc_now()
    try:
        started = json.loads(path.read_text(encoding="utf-8"))["started_at"]
    except (OSError, ValueError, KeyError):
        pass
    note = RunNote(
        run_id=int(run_id),
        out_dir=str(Path(out_dir).resolve()),
        status=status,
        completed_rounds=completed_rounds,
        rounds_planned=rounds_planned,
        started_at=started,
        updated_at=utc_now(),
        reason=reason,
        interrupted=interrupted,
    )
    return write_note(Path(state), note)


def interruption(how: str, completed_rounds: int, last_round_at: str | None, at: str | None = None) -> dict[str, Any]:
    """What ``metrics.json`` and the note say of an interruption: when it was found, the last completed
    round and when that one ended (the coordinator did nothing for this run after it)."""
    return {"at": at or utc_now(), "completed_rounds": completed_rounds, "last_round_at": last_round_at, "how": how}


def reason_for(info: Mapping[str, Any]) -> str:
    rounds = info["completed_rounds"]
    after = f"after round {rounds}" if rounds else "before its first round completed"
    return f"interrupted {after} (noticed {info['at']}): {info['how']}; `fedfreeze run ... --resume` continues it"


def mark_metrics_interrupted(out_dir: Path, info: Mapping[str, Any]) -> bool:
    """Set ``metrics.json``'s status to interrupted when it still says running; True when changed."""
    path = Path(out_dir) / METRICS_FILE
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if metrics.get("status") != RUNNING:
        return False
    metrics.update(status=INTERRUPTED, reason=reason_for(info), interrupted=dict(info))
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    partial.replace(path)
    return True


def mark_interrupted_runs(state_dir: Path) -> list[RunNote]:
    """At the coordinator's start: every run still noted running was interrupted; mark it so."""
    marked = []
    for note in read_notes(state_dir):
        if note.status != RUNNING:
            continue
        info = interruption(FOUND_AT_START, note.completed_rounds, note.updated_at)
        note.status, note.interrupted, note.reason = INTERRUPTED, info, reason_for(info)
        mark_metrics_interrupted(Path(note.out_dir), info)
        write_note(state_dir, note)
        marked.append(note)
    return marked

"""The operator's commands that ask a coordinator: ``fedfreeze sites``, ``runs`` and ``unregister``.

Sites are listed by the name given at registration, with their status, when they were last heard
from and their key's fingerprint; runs with Flower's status and, where the coordinator's state
folder can be read (on its machine), fedfreeze's own: a run the coordinator's crash interrupted
is ``interrupted`` here while Flower may still say ``running``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedfreeze.errors import ConfigError, LaunchError
from fedfreeze.flower.control import SiteInfo, control
from fedfreeze.state import runstate

DEFAULT_STATE = Path("coordinator-state")  # fedfreeze server's default --state-dir


def sites_command(args: argparse.Namespace) -> int:
    with control(args.superlink, args.root_cert) as coordinator:
        sites = coordinator.sites()
    if args.json:
        print(json.dumps([s.as_json() for s in sites], indent=1))
        return 0
    print(format_sites(sites))
    return 0


def format_sites(sites: list[SiteInfo]) -> str:
    width = max([len(s.label()) for s in sites] + [4])
    lines = [f"{'site':<{width}}  {'status':<12}  {'last seen (UTC)':<20}  {'node id':<20}  key fingerprint"]
    for s in sites:
        seen = (s.last_seen or "-")[:19].replace("T", " ")
        lines.append(
            f"{s.label():<{width}}  {s.status:<12}  {seen:<20}  {s.node_id:<20}  {s.fingerprint or '(no key: --no-auth)'}"
        )
    registered = [s for s in sites if s.status != "unregistered"]
    online = [s for s in registered if s.status == "online"]
    summary = f"{len(online)} of {len(registered)} registered sites online"
    offline = [s for s in registered if s.status != "online"]
    if offline:
        summary += "; offline: " + ", ".join(f"{s.label()} (last seen {s.last_seen or 'never'})" for s in offline)
    return "\n".join([*lines, summary])


def resolve_site(sites: list[SiteInfo], site: str) -> SiteInfo:
    """A site by its registered name or its node id; an unknown or ambiguous one is an error naming the choices."""
    matches = [s for s in sites if s.status != "unregistered" and (s.name == site or str(s.node_id) == site)]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(s.label() for s in sites if s.status != "unregistered") or "none"
    if not matches:
        raise ConfigError(f"SITE {site!r}: no registered site of that name or node id (registered: {known})")
    raise ConfigError(f"SITE {site!r}: {len(matches)} registered sites have that name: give the node id ({known})")


def unregister_command(args: argparse.Namespace) -> int:
    with control(args.superlink, args.root_cert) as coordinator:
        site = resolve_site(coordinator.sites(), args.site)
        coordinator.unregister(site.node_id)
        after = next((s for s in coordinator.sites() if s.node_id == site.node_id), None)
    if after is not None and after.status != "unregistered":
        raise LaunchError(f"{site.label()}: the coordinator still lists node {site.node_id} as {after.status}")
    print(
        f"{site.label()}: unregistered (node id {site.node_id}, key {site.fingerprint}); its key can no longer join. "
        "A key once registered cannot be registered again: the site needs a new key pair to come back"
    )
    return 0


def state_dir_for(args: argparse.Namespace) -> Path | None:
    """The coordinator's state folder to read run notes from: ``--state-dir``, else the default one
    when it is here (the command runs at the coordinator)."""
    if getattr(args, "state_dir", None):
        path = Path(args.state_dir)
        if not path.is_dir():
            raise ConfigError(f"--state-dir {path}: no such folder")
        return path
    return DEFAULT_STATE if runstate.runs_folder(DEFAULT_STATE).is_dir() else None


def runs_command(args: argparse.Namespace) -> int:
    with control(args.superlink, args.root_cert) as coordinator:
        flower = coordinator.runs()
    state = state_dir_for(args)
    notes = {n.run_id: n for n in runstate.read_notes(state)} if state is not None else {}
    rows = []
    for run_id, run in sorted(flower.items(), key=lambda item: str(item[1]["pending_at"])):
        if args.run_id is not None and run_id != args.run_id:
            continue
        note = notes.get(run_id)
        status = run["status"]
        details = run["details"] or ""
        row = {"run_id": run_id, "flower_status": status, "submitted": run["pending_at"], "details": details}
        if note is not None:
            row.update(
                status=note.status,
                out_dir=note.out_dir,
                completed_rounds=note.completed_rounds,
                rounds_planned=note.rounds_planned,
                updated_at=note.updated_at,
                reason=note.reason,
            )
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'run id':<22} {'status':<34} {'submitted (UTC)':<21} {'rounds':>7}  details")
    for row in rows:
        status = str(row["flower_status"])
        if row.get("status") == runstate.INTERRUPTED:
            status = f"interrupted (Flower: {status})"
        rounds = f"{row['completed_rounds']}/{row['rounds_planned']}" if "completed_rounds" in row else ""
        details = row.get("reason") or ("" if row["details"] == "N/A" else row["details"])
        print(f"{row['run_id']:<22} {status:<34} {str(row['submitted'])[:19]:<21} {rounds:>7}  {details}")
    where = f"; fedfreeze's notes from {state}" if state is not None else ""
    print(
        f"{len(rows)} run(s) (Flower's list{where}); finished:failed is a federation that did not complete, "
        "interrupted one the coordinator's end cut short (each one's metrics.json says why)"
    )
    return 0


def not_completed(out: Path, err: LaunchError) -> LaunchError:
    """Why ``fedfreeze run``'s federation did not complete: an interruption as ``metrics.json`` tells it
    (Flower's own record then says "failed: Task failed with unknown error" or still "running"),
    anything else as Flower's record or the coordinator's silence says."""
    try:
        metrics = json.loads((out / runstate.METRICS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return err
    if metrics.get("status") == runstate.INTERRUPTED:
        return LaunchError(f"the federation was {metrics.get('reason')}")
    return err

"""The coordinator's registered sites, by name, as its ServerApps read them.

A ServerApp learns a site's name from the site's first reply; before that, Flower gives it node
ids only, and nothing at all of a registered site that is not connected. ``fedfreeze server``
asks its SuperLink for the registered sites every few seconds (``metrics.Observer``) and writes
them here (``STATE_DIR/sites.json``), so the ServerApp's waits name every site, connected or not.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedfreeze.state.runstate import STATE_VARIABLE

SITES_FILE = "sites.json"


def write_sites(state_dir: Path, sites: list[dict[str, Any]]) -> None:
    path = Path(state_dir) / SITES_FILE
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(sites, indent=1) + "\n", encoding="utf-8")
    partial.replace(path)


def read_sites(env: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """The registered sites (node_id, name, status, last_seen) the coordinator last saw; none without a
    coordinator state folder (a simulation) or before its first look."""
    state = (os.environ if env is None else env).get(STATE_VARIABLE)
    if not state:
        return []
    try:
        sites = json.loads((Path(state) / SITES_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [s for s in sites if isinstance(s, dict) and "node_id" in s]


def names(sites: list[dict[str, Any]]) -> dict[int, str]:
    """node id -> registered name, for the registered sites that have one."""
    return {int(s["node_id"]): str(s["name"]) for s in sites if s.get("name") and s.get("status") != "unregistered"}


def not_connected(sites: list[dict[str, Any]], connected: set[int]) -> list[str]:
    """``site-b (offline, last seen ...)`` for each registered site that is not among ``connected``."""
    return [
        f"{s.get('name') or 'node ' + str(s['node_id'])} ({s.get('status', '?')}, last seen {s.get('last_seen') or 'never'})"
        for s in sites
        if s.get("status") != "unregistered" and int(s["node_id"]) not in connected
    ]

"""The coordinator's Control API, asked in this process: sites with their names and keys, runs, unregistering.

``flwr supernode ls`` drops what fedfreeze needs to name a site (the name given at registration,
the public key, the end of its heartbeat), and every ``flwr`` command is a new Python process
(1-2 s here). Flower's own HTTP client of the Control API (``ControlHttpClient``, what those
commands use; Flower is pinned to 1.42.0) answers in milliseconds with every field. A coordinator
that does not answer is a ``CoordinatorUnreachable`` (``errors.unreachable``), never an empty list.
"""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from flwr.proto.control_pb2 import ListNodesRequest, ListRunsRequest, UnregisterNodeRequest
from flwr.supercore.control import ControlHttpClient
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

from fedfreeze.errors import LaunchError, unreachable
from fedfreeze.state.keys import fingerprint


@dataclass(frozen=True)
class SiteInfo:
    """A registered site (a SuperNode) as the coordinator knows it."""

    node_id: int
    name: str  # the name given at registration ('' when there was none: a coordinator without site keys)
    status: str  # online, offline, unregistered
    registered_at: str | None
    last_seen: str | None  # when it was last heard from: now when online
    fingerprint: str | None  # SHA256:... of its public key, as `ssh-keygen -lf SITE.pub` prints it

    def label(self) -> str:
        return self.name or f"node {self.node_id}"

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _iso(value: str | None) -> str | None:
    return value.replace("+00:00", "Z") if value else None


class Control:
    """One connection to a coordinator's Control API."""

    def __init__(self, address: str, root_cert: Path | None, *, check_hostname: bool = True) -> None:
        self.address = address
        verify: ssl.SSLContext | bool = False
        if root_cert is not None:
            verify = ssl.create_default_context(cafile=str(root_cert))
            verify.check_hostname = check_hostname  # off only for the coordinator's own loopback calls
        scheme = "http" if root_cert is None else "https"
        self.client = ControlHttpClient(
            f"{scheme}://{address}",
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
            verify=verify,
        )

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self.client, method)(request)
        except httpx.TransportError as err:
            raise unreachable(self.address, str(err) or type(err).__name__) from None
        except Exception as err:  # Flower's typed errors of the Control API
            raise LaunchError(f"the coordinator at {self.address} refused {method}: {err}") from None

    def sites(self) -> list[SiteInfo]:
        answer = self._call("ListNodes", ListNodesRequest())
        now = time.time()
        sites = []
        for node in answer.nodes_info:
            online = node.status == "online" and (not node.HasField("online_until") or node.online_until > now)
            status = node.status if node.status != "online" or online else "offline"
            last = {
                "online": answer.now,
                "offline": node.last_deactivated_at or node.last_activated_at,
                "unregistered": node.unregistered_at,
            }.get(status)
            sites.append(
                SiteInfo(
                    node_id=int(node.node_id),
                    name=node.name if node.HasField("name") else "",
                    status=status,
                    registered_at=_iso(node.registered_at),
                    last_seen=_iso(last or None),
                    fingerprint=fingerprint(bytes(node.public_key)) if node.public_key else None,
                )
            )
        return sorted(sites, key=lambda s: (s.registered_at or "", s.node_id))

    def runs(self) -> dict[int, dict[str, Any]]:
        """run id -> Flower's status (``finished:completed``...), when it was submitted, details."""
        answer = self._call("ListRuns", ListRunsRequest())
        runs = {}
        for run_id, run in answer.run_dict.items():
            status = run.status.status + (f":{run.status.sub_status}" if run.status.sub_status else "")
            runs[int(run_id)] = {
                "status": status,
                "details": run.status.details,
                "pending_at": _iso(run.pending_at),
                "fab_hash": run.fab_hash,
            }
        return runs

    def unregister(self, node_id: int) -> None:
        self._call("UnregisterNode", UnregisterNodeRequest(node_id=node_id))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()


@contextlib.contextmanager
def control(address: str, root_cert: Path | None, *, check_hostname: bool = True) -> Iterator[Control]:
    connection = Control(address, root_cert, check_hostname=check_hostname)
    try:
        yield connection
    finally:
        connection.close()

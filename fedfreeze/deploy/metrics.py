"""What a monitoring system scrapes: Prometheus text from the coordinator (and a site), and ``/health``.

``fedfreeze server`` runs an ``Observer``: every ``INTERVAL`` seconds it asks its own SuperLink's
Control API (over loopback) for the registered sites, writes them for the ServerApps
(``sitebook``), reads the run notes (``runstate``) and the certificates' expiry, and renders the
metrics. ``--metrics-port`` serves them at ``http://127.0.0.1:PORT/metrics`` with ``/health``
beside them; ``--metrics-file`` writes them for node_exporter's textfile collector. Alert rules
on these names: ``deploy/prometheus/alerts.yml``.
"""

from __future__ import annotations

import contextlib
import http.server
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from fedfreeze.state import runstate, sitebook

INTERVAL = 10.0  # seconds between two looks at the SuperLink
STATUSES = (runstate.RUNNING, runstate.COMPLETED, runstate.FAILED, runstate.INTERRUPTED)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def certificate_days_left(path: Path, now: float | None = None) -> float | None:
    """Days until a PEM certificate expires (negative once it has); None when it cannot be read."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError):
        return None
    return (cert.not_valid_after_utc.timestamp() - (time.time() if now is None else now)) / 86400.0


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _timestamp(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone(UTC).timestamp()
    except ValueError:
        return None


@dataclass
class Family:
    """One metric: its help, type and samples (labels, value)."""

    name: str
    help: str
    kind: str = "gauge"
    samples: list[tuple[dict[str, object], float]] = field(default_factory=list)

    def add(self, value: float, **labels: object) -> Family:
        self.samples.append((labels, float(value)))
        return self

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        for labels, value in self.samples:
            inner = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            lines.append(f"{self.name}{{{inner}}} {value:g}" if inner else f"{self.name} {value:g}")
        return "\n".join(lines)


def render(families: Sequence[Family]) -> str:
    return "\n".join(f.render() for f in families) + "\n"


def coordinator_families(
    sites: list[dict[str, object]] | None,
    notes: list[runstate.RunNote],
    certificates: dict[str, float | None],
    polled_at: float,
) -> list[Family]:
    """The coordinator's metrics; ``sites`` None when its SuperLink did not answer."""
    up = Family("fedfreeze_coordinator_up", "1 when the coordinator's SuperLink answered the last look")
    up.add(0.0 if sites is None else 1.0)
    families = [up]
    if sites is not None:
        registered = [s for s in sites if s.get("status") != "unregistered"]
        online = Family("fedfreeze_site_online", "1 when the registered site is connected to the coordinator")
        seen = Family("fedfreeze_site_last_seen_timestamp_seconds", "when the coordinator last heard from the site")
        for s in registered:
            name = s.get("name") or f"node {s['node_id']}"
            online.add(1.0 if s.get("status") == "online" else 0.0, site=name, node_id=s["node_id"])
            if (stamp := _timestamp(str(s.get("last_seen") or ""))) is not None:
                seen.add(stamp, site=name, node_id=s["node_id"])
        families += [
            Family("fedfreeze_sites_registered", "sites whose key is registered (not unregistered)").add(
                len(registered)
            ),
            Family("fedfreeze_sites_online", "registered sites connected now").add(
                sum(s.get("status") == "online" for s in registered)
            ),
            online,
            seen,
        ]
    runs = Family("fedfreeze_runs", "federations this coordinator ran, by fedfreeze's status")
    for status in STATUSES:
        runs.add(sum(n.status == status for n in notes), status=status)
    families.append(runs)
    if notes:
        last = notes[-1]
        state = Family("fedfreeze_last_run_status", "1 for the status of the newest federation, 0 for the others")
        for status in STATUSES:
            state.add(1.0 if last.status == status else 0.0, status=status, run_id=last.run_id)
        families += [
            state,
            Family("fedfreeze_last_run_completed_rounds", "completed rounds of the newest federation").add(
                last.completed_rounds, run_id=last.run_id
            ),
            Family("fedfreeze_last_run_rounds_planned", "rounds the newest federation plans").add(
                last.rounds_planned, run_id=last.run_id
            ),
            Family("fedfreeze_last_run_updated_timestamp_seconds", "the newest federation's last note").add(
                _timestamp(last.updated_at) or 0.0, run_id=last.run_id
            ),
        ]
    families.append(certificate_family(certificates))
    families.append(Family("fedfreeze_metrics_timestamp_seconds", "when these figures were taken").add(polled_at))
    return families


def certificate_family(certificates: dict[str, float | None]) -> Family:
    days = Family("fedfreeze_certificate_expiry_days", "days until the certificate expires (negative: expired)")
    for name, left in certificates.items():
        if left is not None:
            days.add(round(left, 3), file=name)
    return days


@dataclass
class Observer:
    """The coordinator's look at itself every ``interval`` seconds (a daemon thread)."""

    look: Callable[[], list[dict[str, object]]]  # the registered sites, from the Control API
    state_dir: Path
    certificates: dict[str, Path]
    metrics_file: Path | None = None
    interval: float = INTERVAL
    text: str = ""
    healthy: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)

    def poll(self) -> str:
        try:
            sites: list[dict[str, object]] | None = self.look()
        except Exception:  # the SuperLink is starting, stopping or gone: up 0, try again later
            sites = None
        if sites is not None:
            sitebook.write_sites(self.state_dir, sites)
        self.healthy = sites is not None
        days = {name: certificate_days_left(path) for name, path in self.certificates.items()}
        self.text = render(coordinator_families(sites, runstate.read_notes(self.state_dir), days, time.time()))
        if self.metrics_file is not None:
            partial = self.metrics_file.with_name(self.metrics_file.name + ".tmp")
            partial.write_text(self.text, encoding="utf-8")
            partial.replace(self.metrics_file)
        return self.text

    def start(self) -> Observer:
        def loop() -> None:
            while not self._stop.is_set():
                with contextlib.suppress(Exception):
                    self.poll()
                self._stop.wait(self.interval)

        threading.Thread(target=loop, name="fedfreeze-observer", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()


def flower_health(url: str, ca: Path | None = None) -> bool:
    """Whether a Flower process's own ``/health`` answers 200 (the certificate chain checked, not the
    name: the check dials 127.0.0.1, as the containers' health check does)."""
    context = None
    if url.startswith("https://"):
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
        context.check_hostname = False
    try:
        with urllib.request.urlopen(url, timeout=4, context=context) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def serve(
    port: int, text: Callable[[], str], healthy: Callable[[], bool], host: str = "127.0.0.1"
) -> http.server.ThreadingHTTPServer:
    """``/metrics`` and ``/health`` on ``host:port`` (a daemon thread); returns the server (``shutdown()``)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._answer(200, text(), CONTENT_TYPE)
            elif path == "/health":
                ok = healthy()
                self._answer(200 if ok else 503, "ok\n" if ok else "unhealthy\n", "text/plain")
            else:
                self._answer(404, "not found: /metrics or /health\n", "text/plain")

        def _answer(self, code: int, body: str, kind: str) -> None:
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # a scrape every few seconds: not logged
            pass

    server = http.server.ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="fedfreeze-metrics", daemon=True).start()
    return server

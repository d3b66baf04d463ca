"""The Flower-free pieces of running a federation as a service: log lines, metrics, run notes, keys, backups."""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

from fedfreeze.deploy import backup, logs, metrics
from fedfreeze.errors import ConfigError
from fedfreeze.state import runstate
from fedfreeze.state.keys import fingerprint

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------- log lines
def test_a_flower_line_gets_a_time_and_its_level_and_loses_its_colour_codes():
    raw = "\x1b[92mINFO \x1b[0m:      Starting Flower SuperLink\n"
    entry = logs.parse(logs.clean(raw))
    assert (entry.level, entry.message) == ("INFO", "Starting Flower SuperLink")
    assert entry.text().startswith(entry.time + " INFO    Starting Flower SuperLink")
    assert "\x1b" not in entry.text()


def test_a_progress_bar_keeps_its_last_state_and_no_control_character():
    raw = "epoch 1:  10%|#         | 1/10\repoch 1:  50%|#####     | 5/10\repoch 1: 100%|##########| 10/10\x1b[A\n"
    assert logs.clean(raw) == "epoch 1: 100%|##########| 10/10"


def test_uvicorn_keeps_its_own_time_and_a_traceback_line_keeps_the_level_before_it():
    stamped = logs.parse("2026-12-07T21:33:43.342Z WARNING [uvicorn.error] Waiting for connections to close.")
    assert (stamped.time, stamped.level, stamped.logger) == ("2026-12-07T21:33:43.342Z", "WARNING", "uvicorn.error")
    assert logs.parse('  File "x.py", line 3, in f', "ERROR").level == "ERROR"


def test_json_lines_parse_and_the_file_rotates(tmp_path: Path):
    console = io.StringIO()
    sink = logs.LogSink("site site-a", fmt="json", console=console, log_file=tmp_path / "site.log")
    sink.write("\x1b[91mERROR \x1b[0m:     something failed\n")
    sink.note("fedfreeze site: warning: no --approved-apps", "WARNING")
    sink.note("only in the file", "ERROR", console=False)
    records = [json.loads(line) for line in console.getvalue().splitlines()]
    assert [(r["level"], r["process"], r["message"]) for r in records] == [
        ("ERROR", "site site-a", "something failed"),
        ("WARNING", "site site-a", "fedfreeze site: warning: no --approved-apps"),
    ]
    in_file = [json.loads(line) for line in (tmp_path / "site.log").read_text().splitlines()]
    assert [r["message"] for r in in_file][-1] == "only in the file"
    sink.close()

    small = logs.LogSink("coordinator", console=io.StringIO(), log_file=tmp_path / "small.log")
    assert small._file is not None
    small._file.maxBytes = 200  # type: ignore[attr-defined]  # the rotation itself is the standard library's
    for i in range(20):
        small.note(f"line {i}")
    small.close()
    assert (tmp_path / "small.log.1").is_file() and (tmp_path / "small.log").stat().st_size <= 200


def test_an_unknown_log_format_is_refused():
    with pytest.raises(ValueError, match="log format 'xml'"):
        logs.LogSink("x", fmt="xml")


# ---------------------------------------------------------------------------------------- metrics
def notes() -> list[runstate.RunNote]:
    common = {"out_dir": "/runs/x", "rounds_planned": 4, "updated_at": "2026-12-01T10:00:00Z"}
    return [
        runstate.RunNote(run_id=1, status="completed", completed_rounds=4, started_at="2026-12-01T09:00:00Z", **common),
        runstate.RunNote(
            run_id=2, status="interrupted", completed_rounds=1, started_at="2026-12-01T09:30:00Z", **common
        ),
    ]


SITES = [
    {"node_id": 11, "name": "site-a", "status": "online", "last_seen": "2026-12-01T10:00:00Z"},
    {"node_id": 12, "name": "site-b", "status": "offline", "last_seen": "2026-12-01T09:00:00Z"},
    {"node_id": 13, "name": "old", "status": "unregistered", "last_seen": None},
]


def test_the_coordinators_metrics_in_prometheus_text():
    parser = pytest.importorskip("prometheus_client.parser")  # the reference parser (test extra)
    text = metrics.render(metrics.coordinator_families(SITES, notes(), {"server.pem": 812.5}, 1.8e9))
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    value = {(f.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert value[("fedfreeze_sites_online", ())] == 1 and value[("fedfreeze_sites_registered", ())] == 2
    assert value[("fedfreeze_site_online", (("node_id", "12"), ("site", "site-b")))] == 0
    assert value[("fedfreeze_last_run_status", (("run_id", "2"), ("status", "interrupted")))] == 1
    assert value[("fedfreeze_last_run_status", (("run_id", "2"), ("status", "completed")))] == 0
    assert value[("fedfreeze_runs", (("status", "completed"),))] == 1
    assert value[("fedfreeze_certificate_expiry_days", (("file", "server.pem"),))] == 812.5
    assert not any(name == "fedfreeze_site_online" and ("site", "old") in labels for name, labels in value)

    down = metrics.render(metrics.coordinator_families(None, [], {}, 1.8e9))
    assert "fedfreeze_coordinator_up 0" in down and "fedfreeze_sites_online" not in down


@pytest.mark.process
def test_a_certificates_days_left(tmp_path: Path):
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "10"]
        + ["-subj", "/CN=x", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    left = metrics.certificate_days_left(cert)
    assert left is not None and 9.9 < left <= 10.0
    assert metrics.certificate_days_left(tmp_path / "missing.pem") is None


def test_every_alert_rule_uses_metrics_fedfreeze_exports():
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"]
    exported = {f.name for f in metrics.coordinator_families(SITES, notes(), {"server.pem": 1.0}, 1.0)}
    exported.add("fedfreeze_site_up")  # a site's own endpoint (serve.run_site)
    import re

    for rule in rules:
        used = set(re.findall(r"fedfreeze_[a-z_]+", rule["expr"]))
        assert used and used <= exported, (rule["alert"], used - exported)
    assert {r["alert"] for r in rules} >= {"FedfreezeSiteOffline", "FedfreezeRunFailed", "FedfreezeCertificateExpiring"}


# ---------------------------------------------------------------------------------------- run notes
def test_a_run_left_running_is_marked_interrupted_at_the_coordinators_start(tmp_path: Path):
    state, out = tmp_path / "state", tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"status": "running", "completed_rounds": 2, "reason": None}))
    env = {runstate.STATE_VARIABLE: str(state)}
    runstate.note_run(7, out, runstate.RUNNING, completed_rounds=2, rounds_planned=4, env=env)
    runstate.note_run(8, tmp_path / "done", runstate.COMPLETED, completed_rounds=4, rounds_planned=4, env=env)

    marked = runstate.mark_interrupted_runs(state)
    assert [n.run_id for n in marked] == [7]
    metrics_json = json.loads((out / "metrics.json").read_text())
    assert metrics_json["status"] == "interrupted"
    assert metrics_json["interrupted"]["completed_rounds"] == 2 and metrics_json["interrupted"]["last_round_at"]
    assert metrics_json["reason"].startswith("interrupted after round 2 (noticed ")
    assert {n.run_id: n.status for n in runstate.read_notes(state)} == {7: "interrupted", 8: "completed"}
    assert runstate.mark_interrupted_runs(state) == []  # once


def test_without_a_coordinator_state_folder_nothing_is_noted(tmp_path: Path):
    assert runstate.note_run(7, tmp_path, runstate.RUNNING, completed_rounds=0, rounds_planned=1, env={}) is None


# ---------------------------------------------------------------------------------------- keys
@pytest.mark.process
def test_the_fingerprint_is_the_one_ssh_keygen_prints(tmp_path: Path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(tmp_path / "k")], check=True)
    printed = subprocess.run(["ssh-keygen", "-lf", str(tmp_path / "k.pub")], capture_output=True, text=True, check=True)
    from cryptography.hazmat.primitives import serialization

    openssh = (tmp_path / "k.pub").read_bytes()
    pem = serialization.load_ssh_public_key(openssh).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert fingerprint(openssh) == fingerprint(pem) == printed.stdout.split()[1]


# ---------------------------------------------------------------------------------------- backups
def state_folder(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir()
    with sqlite3.connect(state / backup.DATABASE) as con:
        con.execute("CREATE TABLE alembic_version (version_num VARCHAR(32))")
        con.execute("INSERT INTO alembic_version VALUES ('abc123')")
        con.execute("CREATE TABLE node (node_id BIGINT, name VARCHAR)")
        con.execute("INSERT INTO node VALUES (11, 'site-a')")
    runstate.write_note(state, notes()[1])
    return state


def test_a_backup_restores_into_an_empty_folder_and_refuses_to_overwrite(tmp_path: Path):
    state = state_folder(tmp_path)
    manifest = backup.backup(state, tmp_path / "b.tar.gz")
    assert manifest["schema_revision"] == "abc123" and set(manifest["files"]) == {"superlink.db", "runs/2.json"}
    with pytest.raises(ConfigError, match="exists already"):
        backup.backup(state, tmp_path / "b.tar.gz")

    target = tmp_path / "restored"
    backup.restore(tmp_path / "b.tar.gz", target)
    with sqlite3.connect(target / backup.DATABASE) as con:
        assert con.execute("SELECT name FROM node").fetchall() == [("site-a",)]
    assert [n.run_id for n in runstate.read_notes(target)] == [2]
    with pytest.raises(ConfigError, match="holds a superlink.db already"):
        backup.restore(tmp_path / "b.tar.gz", target)


def test_a_damaged_or_foreign_archive_and_a_newer_flower_are_refused(tmp_path: Path):
    state = state_folder(tmp_path)
    backup.backup(state, tmp_path / "b.tar.gz")
    manifest, files = backup.read_archive(tmp_path / "b.tar.gz")

    def rewrite(path: Path, manifest: dict, files: dict[str, bytes]) -> Path:
        with tarfile.open(path, "w:gz") as archive:
            for name, data in [(backup.MANIFEST, json.dumps(manifest).encode()), *files.items()]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        return path

    damaged = rewrite(tmp_path / "damaged.tar.gz", manifest, {**files, "superlink.db": b"x"})
    with pytest.raises(ConfigError, match="does not match its SHA-256"):
        backup.restore(damaged, tmp_path / "r1")
    escaping = rewrite(
        tmp_path / "escape.tar.gz",
        {**manifest, "files": {**manifest["files"], "../evil": backup._sha256(b"x")}},
        {**files, "../evil": b"x"},
    )
    with pytest.raises(ConfigError, match="unexpected or missing file '../evil'"):
        backup.restore(escaping, tmp_path / "r2")
    newer = rewrite(tmp_path / "newer.tar.gz", {**manifest, "flower": "9.0.0"}, files)
    with pytest.raises(ConfigError, match="made with Flower 9.0.0, newer than the installed"):
        backup.restore(newer, tmp_path / "r3")
    assert not (tmp_path / "r1" / backup.DATABASE).exists() and not (tmp_path / "r3").exists()


# ---------------------------------------------------------------------------------------- a container's PID 1
PID1 = """
import io, threading, time
from pathlib import Path
from fedfreeze.deploy.logs import LogSink
from fedfreeze.deploy.supervise import Supervisor

def zombies():
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] == "Z":
                found.append(int(entry.name))
    return found

seen = []
threading.Timer(2.0, lambda: seen.append(zombies())).start()
# the stand-in for a Flower process: a child of it outlives its own parent, is adopted by PID 1, and ends
code = Supervisor(["sh", "-c", "(sleep 0.3 &); sleep 3"], {"PATH": "/usr/bin:/bin"}, LogSink("x", console=io.StringIO())).run()
print(__import__("os").getpid(), code, seen)
"""


@pytest.mark.process
@pytest.mark.skipif(
    not Path("/usr/bin/unshare").exists() or __import__("os").geteuid() != 0, reason="needs root and unshare"
)
def test_as_a_containers_pid_1_the_supervisor_leaves_no_zombie():
    import sys

    proc = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", PID1],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    pid, code, seen = proc.stdout.split(maxsplit=2)
    assert (pid, code) == ("1", "0") and seen.strip() == "[[]]", proc.stdout


def test_one_coordinator_per_state_folder(tmp_path: Path):
    from fedfreeze.deploy.serve import state_lock

    with state_lock(tmp_path):
        with pytest.raises(ConfigError, match=rf"--state-dir {tmp_path}: in use by another coordinator \(pid \d+\)"):
            with state_lock(tmp_path):
                pass
    with state_lock(tmp_path):  # free again once the first one ended
        pass

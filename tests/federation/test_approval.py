"""Code approval at the site: a site started with ``--approved-apps`` runs only approved apps.

- The approved-apps file: one hash per line, ``#`` comments; a malformed line stops the site in one
  line naming the file and the line (exit 2), before anything is started or written.
- ``fedfreeze site`` says at start-up which it is: approved apps only (and through which runner),
  or, without a list, one warning line.
- The runner's check, in process: an approved FAB passes; any other, a FAB whose stated hash is not
  its content's, or an unusable list, is refused with the hash, kept for review, and reaches the
  coordinator as that site's failure, by name, with the reason. The hooks it wraps are where Flower
  1.42's ClientApp code calls them (before it loads the app).
- On loopback, with real SuperLink and SuperNode processes: the approved app completes a federation;
  the same app with one line changed is refused at every site before any of its code is unpacked or
  imported, each site logs the hash, and the run fails naming the sites and the reason. The hash
  ``fedfreeze app-hash`` prints is the run's ``fab_hash`` as Flower reports it (``flwr ls``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
from flwr.app import Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedfreeze.cli import main
from fedfreeze.deploy import launch, serve
from fedfreeze.flower import approval as runner
from fedfreeze.flower import server as flower_server
from fedfreeze.flower.local_grid import LocalGrid
from fedfreeze.state import approval
from tests.federation.conftest import read_metrics, small_config
from tests.federation.processes import (
    Tracker,
    check_completed,
    messages,
    run_cli,
    site_folder,
    wait_online,
)

HASH_A = "b0be482c70e9f87d04a33faf5246f39e03bea3c2b93ca7b49bf7e65f9a99e98a"
HASH_B = "0123456789abcdef" * 4
CONNECTION = "fedfreeze-approval"
ONE_ROUND = small_config(rounds=1, probe_rounds=1, probe_local_epochs=1)


# ---------------------------------------------------------------------------------------- the list
def test_the_list_holds_hashes_and_comments(tmp_path: Path):
    path = tmp_path / "approved-apps.txt"
    path.write_text(
        "# approved releases of fedfreeze\n"
        "\n"
        f"{HASH_A}  # fedfreeze/fedfreeze 0.1.0\n"
        f"   {HASH_B.upper()}\t\n"
        f"{HASH_A}\n"  # listed twice: the first line counts
    )
    approved = approval.load_approved(path)
    assert dict(approved.lines) == {HASH_A: 3, HASH_B: 4}
    assert HASH_B in approved and HASH_B.upper() in approved and "0" * 64 not in approved
    assert len(approval.parse_approved("# nothing approved yet\n", path)) == 0


@pytest.mark.parametrize(
    "line",
    [HASH_A[:-1], f"{HASH_A} {HASH_B}", "sha256:" + HASH_A, "fedfreeze 0.1.0", HASH_A + "  fedfreeze 0.1.0"],
)
def test_a_malformed_line_is_one_error_naming_file_and_line(tmp_path: Path, line: str):
    path = tmp_path / "approved-apps.txt"
    path.write_text(f"# ok\n{HASH_A}\n{line}  # a note\n")
    with pytest.raises(approval.ApprovalListError) as err:
        approval.load_approved(path)
    message = str(err.value)
    assert message.startswith(f"{path}, line 3: {line[:20]!r}"[:-1]), message  # the line as written
    assert message.endswith(
        "is not an app hash (64 hex digits, as `fedfreeze app-hash` prints it; one per line, '#' starts a comment)"
    )
    assert "\n" not in message and len(message) < 300


def test_the_site_stops_at_a_malformed_or_missing_list_in_one_line(tmp_path: Path, capsys):
    bad = tmp_path / "approved-apps.txt"
    bad.write_text(f"{HASH_A}\nnot-a-hash\n")
    state = tmp_path / "state"
    base = ["site", "--insecure", "--data", str(tmp_path), "--name", "site-a", "--port", str(launch.free_port())]
    base += ["--state-dir", str(state)]

    assert main([*base, "--approved-apps", str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"fedfreeze site: error: {bad}, line 2: 'not-a-hash' is not an app hash (64 hex digits, as "
        "`fedfreeze app-hash` prints it; one per line, '#' starts a comment)"
    ]
    assert "flower-supernode" not in captured.out and not state.exists()  # refused before anything started

    assert main([*base, "--approved-apps", str(tmp_path / "missing.txt")]) == 2
    assert capsys.readouterr().err.splitlines() == [f"fedfreeze site: error: {tmp_path / 'missing.txt'}: no such file"]


def test_the_site_says_at_start_up_whether_it_checks_apps(tmp_path: Path, monkeypatch, capsys):
    """One line either way; with a list, fedfreeze's runner is the flwr-clientapp first on Flower's PATH."""
    started: list[dict[str, str]] = []

    def supervised(cmd: list[str], env: dict[str, str], sink: object, markers: object, watch: object) -> serve.Outcome:
        started.append(env)  # the environment the SuperNode would get
        return serve.Outcome(0, set(), None, None)

    monkeypatch.setattr(serve, "run_site", supervised)
    listed = tmp_path / "approved-apps.txt"
    listed.write_text(f"{HASH_A}\n")
    base = ["site", "--insecure", "--data", str(tmp_path), "--name", "site-a", "--port", str(launch.free_port())]

    assert main([*base, "--state-dir", str(tmp_path / "open")]) == 0
    out = messages(capsys.readouterr().out)
    warnings = [line for line in out if "approved" in line]
    assert warnings == [
        "fedfreeze site: warning: no --approved-apps: this site runs whatever app a job submitted to the "
        "coordinator brings (give --approved-apps FILE, the hashes `fedfreeze app-hash` prints, to run "
        "approved releases only)"
    ]
    first = started[0]["PATH"].split(":")[0]  # the guards (children end with their parent); no approval runner
    assert (
        first == str(tmp_path / "open" / "guard" / "bin") and not (tmp_path / "open" / approval.RUNNER_FOLDER).exists()
    )

    state = tmp_path / "checked"
    assert main([*base, "--state-dir", str(state), "--approved-apps", str(listed)]) == 0
    out = messages(capsys.readouterr().out)
    bin_dir = state / approval.RUNNER_FOLDER / "bin"
    assert [line for line in out if "approved" in line] == [
        f"fedfreeze site: approved apps only: 1 app hash(es) in {listed} (read again for every job); Flower "
        f"starts each ClientApp through {bin_dir / 'flwr-clientapp'}, which checks the app's hash before any "
        "of its code is unpacked"
    ]
    assert started[1]["PATH"].split(":")[:2] == [str(bin_dir), str(state / "guard" / "bin")]
    assert sorted(p.name for p in bin_dir.iterdir()) == [
        "flwr-agentapp",
        "flwr-clientapp",
        "flwr-connector",
        "flwr-model",
    ]


# ---------------------------------------------------------------------------------------- the check
def test_the_hooks_are_where_flowers_clientapp_code_calls_them():
    """Flower is pinned: its ClientApp process pulls the FAB, installs it, and only then loads the app."""
    from flwr.supernode.runtime import run_clientapp

    assert importlib.metadata.version("flwr") == "1.42.0"
    source = inspect.getsource(run_clientapp.run_clientapp)
    calls = [
        source.index(call) for call in ("= pull_task_input(", "install_from_fab(fab.content", "load_client_app_fn(")
    ]
    assert calls == sorted(calls), calls
    assert source.count("install_from_fab(") == 1 and source.count("= pull_task_input(") == 1
    assert runner.hooked_module() is run_clientapp


def flower_reason(err: Exception) -> str:
    """What Flower's ClientApp process sends for an exception (run_clientapp's own expression)."""
    return str(type(err)) + ":<'" + str(err) + "'>"


def test_the_check_passes_approved_apps_and_refuses_others(tmp_path: Path, caplog):
    listed = tmp_path / "approved-apps.txt"
    approved_fab, other_fab = b"an approved app", b"the approved app, one byte changed"
    listed.write_text(f"{hashlib.sha256(approved_fab).hexdigest()}  # ok\n")
    refused = tmp_path / "refused"
    refused.mkdir()
    guard = runner.Guard(listed, "site-a", refused, run_id=7)
    caplog.set_level(logging.INFO, logger="flwr")

    assert guard.check(approved_fab) == hashlib.sha256(approved_fab).hexdigest()
    assert f"fedfreeze site site-a: run 7: app {hashlib.sha256(approved_fab).hexdigest()} is approved" in caplog.text

    other = hashlib.sha256(other_fab).hexdigest()
    with pytest.raises(runner.AppNotApproved) as err:
        guard.check(other_fab)
    assert str(err.value).startswith(f"site-a refused to run app {other}: its hash is not on the site's list")
    assert (refused / f"{other}.fab").read_bytes() == other_fab  # kept as received, for review
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(logged) == 1 and logged[0].startswith(f"fedfreeze site site-a: run 7: refused app {other}: ")
    assert "nothing of it was unpacked or run" in logged[0] and str(refused / f"{other}.fab") in logged[0]

    # at the coordinator: the refusal is the site's one failure, by name, with the reason
    found = runner.refusal_in(flower_reason(err.value))
    assert found == runner.Refusal("site-a", other, str(err.value))
    grid = LocalGrid(ClientApp(), {1: {}})
    sent = grid.create_message(RecordDict(), "train", 1, "1")
    reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=flower_reason(err.value)), reply_to=sent)
    assert flower_server.error_reason(reply) == str(err.value)
    assert flower_server.reply_site(reply) == "site-a"
    crash = Message(
        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="<class 'ValueError'>:<'x'>"), reply_to=sent
    )
    assert flower_server.error_reason(crash) == "the site failed: <class 'ValueError'>:<'x'>"
    assert flower_server.reply_site(crash) is None

    # a run that states another hash than its FAB's content has, and a list that became unusable
    guard.stated = ("f" * 64, "f" * 64)
    with pytest.raises(runner.AppNotApproved, match="the run states the app hash f{64}, but the app's content"):
        guard.check(approved_fab)
    guard.stated = ()
    listed.write_text("oops\n")
    with pytest.raises(runner.AppNotApproved, match=r"the site's approved-apps list cannot be used \(.*line 1"):
        guard.check(approved_fab)


def test_a_refusal_leaves_no_traceback_in_the_site_log():
    record = logging.LogRecord("flwr", logging.ERROR, __file__, 1, "ClientApp raised an exception", (), None)
    try:
        raise runner.AppNotApproved(f"site-a refused to run app {HASH_A}: no")
    except runner.AppNotApproved:
        record.exc_info = sys.exc_info()
    assert not runner.HideRefusalTraceback().filter(record)
    try:
        raise ValueError("a real crash")
    except ValueError:
        record.exc_info = sys.exc_info()
    assert runner.HideRefusalTraceback().filter(record)


def test_app_hash_is_the_hash_of_flowers_own_bundle(tmp_path: Path, capsys):
    from flwr.cli.build import build_fab_from_disk

    copy = copy_app(tmp_path / "app")
    expected = hashlib.sha256(build_fab_from_disk(launch.APP_DIR)).hexdigest()
    assert main(["app-hash", str(copy)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{expected}  # fedfreeze/fedfreeze 0.1.0 (5 files: pyproject.toml client/__init__.py")
    assert approval.parse_approved(line, Path("x")).lines == {expected: 1}  # a line for the list as it is
    (copy / "notes.txt").write_text("not part of the app")  # files outside fab-include change nothing
    assert runner.app_hash(copy).fab_hash == expected
    assert main(["app-hash", str(tmp_path / "nowhere")]) == 2
    assert (
        capsys.readouterr().err.strip() == f"fedfreeze app-hash: error: {tmp_path / 'nowhere'}: no such folder or file"
    )


# ---------------------------------------------------------------------------------------- on loopback
def copy_app(to: Path) -> Path:
    """The files of this project's Flower app (what its FAB holds: pyproject.toml, server/ and client/)."""
    to.mkdir(parents=True)
    shutil.copy2(launch.APP_DIR / "pyproject.toml", to / "pyproject.toml")
    for part in ("server", "client"):
        (to / part).mkdir()
        for source in (launch.APP_DIR / part).glob("*.py"):
            shutil.copy2(source, to / part / source.name)
    return to


@pytest.mark.process
def test_an_approved_app_runs_and_a_changed_one_is_refused_at_every_site(tracker: Tracker, tmp_path: Path):
    approved_hash = runner.app_hash(launch.APP_DIR).fab_hash
    changed = copy_app(tmp_path / "changed-app")
    assert runner.app_hash(changed).fab_hash == approved_hash  # the same files, anywhere: the same hash
    marker = tmp_path / "imported"
    app_py = changed / "client" / "app.py"
    assert app_py.read_text().count("app = client_app()\n") == 1
    app_py.write_text(
        app_py.read_text().replace("app = client_app()\n", f"app = client_app(); Path({str(marker)!r}).touch()\n")
    )
    changed_hash = runner.app_hash(changed).fab_hash
    assert changed_hash != approved_hash

    listed = tmp_path / "approved-apps.txt"
    listed.write_text(f"# fedfreeze as released\n{runner.app_hash(launch.APP_DIR).line()}\n")
    port = launch.free_port()
    address = f"127.0.0.1:{port}"
    launch.write_flwr_home(Path(tracker.env["FLWR_HOME"]), [launch.Connection(CONNECTION, address)])
    link = launch.Managed(
        "superlink",
        launch.superlink_command(port=port, database=tmp_path / "superlink.db", insecure=True),
        tmp_path / "logs" / "superlink.log",
        tracker.env,
    ).start()
    sites: dict[str, launch.Managed] = {}
    try:
        launch.wait_healthy(address, link)
        for name in ("site-a", "site-b"):
            cmd = [sys.executable, "-m", "fedfreeze", "site", "--insecure", "--name", name, "--superlink", address]
            cmd += ["--data", str(site_folder(tmp_path / name, name)), "--port", str(launch.free_port())]
            cmd += ["--state-dir", str(tmp_path / "state" / name), "--approved-apps", str(listed), "--threads", "1"]
            env = tracker.env_with(OMP_NUM_THREADS="1")
            sites[name] = launch.Managed(name, cmd, tmp_path / "logs" / f"{name}.log", env).start()
        wait_online(CONNECTION, tracker.env, 2, [link, *sites.values()])

        def run(out: Path, *app: str) -> tuple[int, str]:
            args = ["run", "--superlink", address, "--insecure", "--config", str(config), "--out", str(out), *app]
            return run_cli(args, tracker, tmp_path / "logs" / f"{out.name}.log")

        config = tmp_path / "fed.toml"
        config.write_text(ONE_ROUND)
        code, log = run(tmp_path / "approved")
        assert code == 0, log[-3000:]
        check_completed(json.loads((tmp_path / "approved" / "metrics.json").read_text()), rounds=1)

        code, log = run(tmp_path / "refused", "--app", str(changed))
        assert code == 2, log[-3000:]
        metrics = read_metrics(tmp_path / "refused")  # in the partial folder: a failed run publishes nothing
        assert metrics["status"] == "failed" and metrics["completed_rounds"] == 0
        failures = metrics["failed_round"]["failures"]
        assert sorted(f["site"] for f in failures) == ["site-a", "site-b"], failures
        for failure in failures:
            assert failure["reason"] == (
                f"{failure['site']} refused to run app {changed_hash}: its hash is not on the site's list of "
                "approved apps (`fedfreeze app-hash` prints an app's hash; any change to the app changes it)"
            )
            assert failure["reason"] in metrics["reason"]  # the run's reason names each site and why
        assert "fewer than min-sites = 2 (2 failed, 0 rejected): site-" in metrics["reason"]
        assert "site-a: site-a" not in metrics["reason"]  # a refusal names its site once
        assert f"site-a refused to run app {changed_hash}" in log  # the submitter sees it in the stream
        assert "Traceback" not in log and "the federation failed: round 1: 0 valid replies" in log  # one line

        # Flower's own record of the two runs: the hashes fedfreeze app-hash printed
        runs = launch.flwr_json(["ls", CONNECTION], tracker.env)["runs"]
        assert sorted(r["fab-hash"] for r in runs) == sorted([approved_hash, changed_hash]), runs

        for name, site in sites.items():
            assert site.alive(), site.tail(30)
            text = site.log_path.read_text(errors="replace")
            assert (
                f"fedfreeze site {name}: run " in text
                and f": app {approved_hash} is approved ({listed}, line 2)" in text
            )
            refusals = [line for line in text.splitlines() if f"refused app {changed_hash}" in line]
            assert len(refusals) == 1, text[-3000:]  # one message, one refusal, logged with the hash
            assert "ClientApp raised an exception" not in text
            state = tmp_path / "state" / name
            apps = [p.name for p in (state / "flwr-home" / "apps").iterdir()]
            assert any(p.endswith(approved_hash[:8]) for p in apps), apps
            assert not any(p.endswith(changed_hash[:8]) for p in apps), apps  # never unpacked
            kept = state / approval.RUNNER_FOLDER / approval.REFUSED_FOLDER / f"{changed_hash}.fab"
            assert runner.app_hash(kept).fab_hash == changed_hash  # as received, to review and approve
        assert not marker.exists()  # the changed client/app.py was never imported
    finally:
        tracker.running()
        for proc in [*sites.values(), link]:
            proc.stop()
    assert "flwr-clientapp" in tracker.names()

"""Output folders as transactions (fedfreeze/outputs.py): aside, locked, refused, published."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedfreeze.errors import OutputError
from fedfreeze.outputs import output_folder, partial_path


def files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def beside(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir())


def test_a_run_writes_aside_and_appears_only_when_it_finishes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with output_folder(out) as output:
        assert output.final == out.resolve() and output.work == partial_path(out.resolve())
        (output.work / "a.txt").write_text("new")
        assert not out.exists()  # nothing that looks finished while it runs
        assert beside(out) == [".run.lock", ".run.partial"]
    assert files(out) == {"a.txt": "new"}
    assert beside(out) == ["run"]  # no partial folder, no lock left


def test_a_failed_run_leaves_the_previous_folder_untouched(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.json").write_text("old")
    with pytest.raises(RuntimeError), output_folder(out, force=True) as output:
        (output.work / "model.json").write_text("half")
        raise RuntimeError("stopped")
    assert files(out) == {"model.json": "old"} and beside(out) == ["run"]


def test_force_replaces_the_whole_folder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.json").write_text("old")
    (out / "predictions.csv").write_text("stale")
    with output_folder(out, force=True) as output:
        (output.work / "metrics.json").write_text("new")
    assert files(out) == {"metrics.json": "new"}  # nothing of the old run beside the new one


@pytest.mark.parametrize(
    ("setup", "options", "message"),
    [
        (lambda out: out.write_text("x"), {}, r"--out .*run is a file, not a folder"),
        (lambda out: (out.mkdir(), (out / "f").write_text("x")), {}, r"exists and is not empty: give --force"),
        (
            lambda out: (out.mkdir(), (out / "f").write_text("x")),
            {"resumable": True},
            r"give --force to replace it or --resume to continue it",
        ),
        (lambda out: out.mkdir(), {"inputs": {"--init": "SELF"}}, r"--out .*run is the --init folder"),
        (
            lambda out: (out.mkdir(), (out / "m").mkdir()),
            {"inputs": {"--model": "CHILD"}, "force": True},
            r"--out .*run holds the --model .*m: replacing it would delete an input",
        ),
    ],
)
def test_refusals_name_the_option_and_change_nothing(tmp_path: Path, setup, options, message) -> None:
    out = tmp_path / "run"
    setup(out)
    inputs = {k: {"SELF": out, "CHILD": out / "m"}[v] for k, v in options.pop("inputs", {}).items()}
    before = beside(out)
    with pytest.raises(OutputError, match=message), output_folder(out, inputs=inputs, **options):
        pytest.fail("the run must not start")
    assert beside(out) == before


@pytest.mark.process
def test_a_second_run_on_the_same_folder_is_refused_while_the_first_holds_it(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = f"""
import sys, time
from fedfreeze.outputs import output_folder
with output_folder({str(out)!r}) as o:
    (o.work / "mine").write_text("first")
    print("holding", flush=True)
    sys.stdin.readline()
"""
    first = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout is not None and first.stdout.readline().strip() == "holding"
        with pytest.raises(OutputError, match=rf"is being written by another fedfreeze run \(process {first.pid}\)"):
            with output_folder(out, force=True):
                pytest.fail("two runs on one folder")
        assert (partial_path(out.resolve()) / "mine").read_text() == "first"  # its work untouched
    finally:
        first.communicate("\n", timeout=30)
    assert first.returncode == 0 and files(out) == {"mine": "first"}


@pytest.mark.process
def test_a_killed_runs_lock_does_not_block_the_next(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = f"""
import os, signal
from fedfreeze.outputs import output_folder
with output_folder({str(out)!r}) as o:
    (o.work / "half").write_text("x")
    os.kill(os.getpid(), signal.SIGKILL)
"""
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    assert beside(out) == [".run.lock", ".run.partial"]  # what a kill leaves
    with output_folder(out) as output:  # the lock is free, the scrap removed
        assert not any(output.work.iterdir())
        (output.work / "whole").write_text("y")
    assert files(out) == {"whole": "y"} and beside(out) == ["run"]


def test_resume_continues_the_partial_folder_and_a_fresh_run_is_told_about_it(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt), output_folder(out, resumable=True) as output:
        (output.work / "checkpoint").write_text("round 1")
        raise KeyboardInterrupt
    assert not out.exists()
    with pytest.raises(OutputError, match=r"an unfinished run was left in .*\.run\.partial: give --resume"):
        with output_folder(out, resumable=True):
            pytest.fail("would throw the stopped run away")
    with output_folder(out, resume=True, resumable=True) as output:
        assert (output.work / "checkpoint").read_text() == "round 1"
        (output.work / "checkpoint").write_text("round 2")
    assert files(out) == {"checkpoint": "round 2"}


def test_resume_of_a_finished_folder_works_on_a_copy_until_it_finishes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint").write_text("done")
    with pytest.raises(RuntimeError), output_folder(out, resume=True, resumable=True) as output:
        (output.work / "checkpoint").write_text("changed")
        raise RuntimeError
    assert files(out) == {"checkpoint": "done"}


def test_a_folder_set_aside_by_a_killed_publish_comes_back(tmp_path: Path) -> None:
    """A kill between the two renames leaves the previous folder in .NAME.old and none in place: the
    next run puts it back before deciding anything."""
    out = tmp_path / "run"
    old = tmp_path / ".run.old"
    old.mkdir()
    (old / "model.json").write_text("previous")
    with pytest.raises(OutputError, match="exists and is not empty"), output_folder(out):
        pytest.fail("the previous folder is back, so this is refused")
    assert files(out) == {"model.json": "previous"} and beside(out) == ["run"]


@pytest.mark.process
def test_crash_points_kill_only_when_named(tmp_path: Path) -> None:
    code = "from fedfreeze.outputs import crash_point\ncrash_point('staged')\nprint('alive')"
    env = {**os.environ, "FEDFREEZE_CRASH_AT": "swapping"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout == "alive\n"
    env["FEDFREEZE_CRASH_AT"] = "staged"
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == -9


@pytest.mark.process
def test_a_run_told_to_wait_gets_the_folder_when_the_holder_ends(tmp_path: Path) -> None:
    """A restarted coordinator waits for the stopped run's ServerApp, which still holds the folder."""
    out = tmp_path / "run"
    code = f"""
import time
from fedfreeze.outputs import output_folder
with output_folder({str(out)!r}, resumable=True) as o:
    (o.work / "round-1").write_text("kept")
    print("holding", flush=True)
    time.sleep(1.5)
    raise SystemExit(3)
"""
    first = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert first.stdout is not None and first.stdout.readline().strip() == "holding"
    with output_folder(out, resume=True, resumable=True, wait=60) as output:
        assert first.wait(timeout=30) == 3  # it waited for the holder to let go (as it ends)
        assert (output.work / "round-1").read_text() == "kept"  # and continues what it left
    assert files(out) == {"round-1": "kept"}

"""Killing site-train, adapt and simulate never leaves a folder that looks finished but is not.

Each command is killed at several points of a run that replaces (``--force``) a finished folder:
while it works, after ``weights.pt`` was written and before ``model.json`` (site-train, adapt),
with the whole folder written but not in place, and between setting the previous folder aside and
moving the new one in (``FEDFREEZE_CRASH_AT`` names the point; the process SIGKILLs itself there).
After each kill, ``--out`` is the previous finished folder byte for byte, or (between the two
renames) absent, which the next run repairs; ``evaluate`` accepts the folder only when it is the
previous one, and never the partial folder a kill leaves beside it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedfreeze.cli import main
from fedfreeze.outputs import CRASH_VARIABLE, partial_path
from fedfreeze.sample_data import kermany_mini
from tests.shipped import site_folder

pytestmark = [pytest.mark.process, pytest.mark.slow]

TINY = """
[model]
input-size = 32
[train]
probe-epochs = 1
epochs = 0
batch-size = 16
[cv]
folds = 2
"""
FED = """
[model]
input-size = 32
[federation]
rounds = 2
probe-rounds = 2
probe-local-epochs = 1
min-sites = 3
evaluation-sites = ["held-out"]
"""
POINTS = ["working", "weights-written", "staged", "swapping"]


def snapshot(folder: Path) -> dict[str, bytes] | None:
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def start(args: list[str], crash_at: str | None = None) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env.pop(CRASH_VARIABLE, None)
    if crash_at is not None:
        env[CRASH_VARIABLE] = crash_at
    return subprocess.Popen(
        [sys.executable, "-m", "fedfreeze.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def kill_when(process: subprocess.Popen[str], appears: Path, sig: int, timeout: float = 300) -> None:
    """Send ``sig`` as soon as ``appears`` exists (the run is under way), then wait for the end."""
    deadline = time.monotonic() + timeout
    while not appears.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, f"ended before it could be killed:\n{process.communicate()[0][-3000:]}"
    process.send_signal(sig)
    process.communicate(timeout=timeout)


def run(args: list[str], crash_at: str | None = None) -> tuple[int, str]:
    process = start(args, crash_at)
    output, _ = process.communicate(timeout=600)
    return process.returncode, output


def evaluates(model: Path, data: Path) -> bool:
    """Whether ``fedfreeze evaluate`` accepts ``model`` as a finished model folder."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main(["evaluate", "--model", str(model), "--data", str(data), "--bootstrap", "0"]) == 0


def killed(args: list[str], point: str, out: Path, sig: int = signal.SIGKILL) -> None:
    """Run ``args``, killed at ``point``: while working (as soon as the partial folder exists, or
    ``appears``), or at a crash point."""
    if point == "working":
        kill_when(start(args), partial_path(out.resolve()), sig)
    else:
        code, output = run(args, crash_at=point)
        assert code == -signal.SIGKILL, f"not killed at {point} (exit {code}):\n{output[-3000:]}"


def check_after_kill(out: Path, model: Path, data: Path, previous: dict[str, bytes] | None, point: str) -> None:
    now = snapshot(out)
    if point == "swapping" and previous is not None:
        assert now is None  # set aside, the new one not in place: nothing there, nothing accepted
    else:
        assert now == previous, f"killed at {point}: --out changed"
    assert evaluates(model, data) == (now is not None)
    partial = partial_path(out.resolve())
    if partial.exists():
        assert not evaluates(partial / model.relative_to(out), data)  # a partial folder is never a model


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return site_folder(tmp_path_factory.mktemp("kill") / "site", per_class=8)


def test_site_train_killed_anywhere_leaves_the_previous_folder_or_none(tmp_path: Path, site: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text(TINY)
    out = tmp_path / "out"
    args = ["site-train", "--config", str(config), "--data", str(site), "--out", str(out), "--quiet"]
    killed(args, "working", out)  # a first run, killed: no folder at all
    check_after_kill(out, out, site, None, "working")

    code, output = run(args)  # this one finishes (the partial folder of the killed one is scrap)
    assert code == 0, output[-3000:]
    previous = snapshot(out)
    for point in POINTS:
        killed([*args, "--force"], point, out)
        check_after_kill(out, out, site, previous, point)
        code, output = run(args)  # the next run (refused: not --force) first puts a set-aside folder back
        assert code == 2 and "exists and is not empty" in output, output
        assert snapshot(out) == previous


def test_adapt_killed_anywhere_leaves_the_previous_folder_or_none(tmp_path: Path, site: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text(TINY)
    model = tmp_path / "model"
    code, output = run(["site-train", "--config", str(config), "--data", str(site), "--out", str(model), "--quiet"])
    assert code == 0, output[-3000:]
    out = tmp_path / "adapted"
    args = ["adapt", "--model", str(model), "--data", str(site), "--out", str(out), "--quiet",
            "--labels", "ignore", "--bn", "reestimate", "--prevalence", "none"]  # fmt: skip
    code, output = run(args)
    assert code == 0, output[-3000:]
    previous = snapshot(out)
    for point in POINTS:
        killed([*args, "--force"], point, out)
        check_after_kill(out, out, site, previous, point)
        code, output = run(args)
        assert code == 2 and "exists and is not empty" in output, output
        assert snapshot(out) == previous


def test_simulate_killed_anywhere_leaves_the_previous_folder_or_none_and_resumes(tmp_path: Path) -> None:
    config = tmp_path / "fed.toml"
    config.write_text(FED)
    out = tmp_path / "fed"
    model = out / "model"
    test = kermany_mini("test")
    args = ["simulate", "--config", str(config), "--out", str(out), "--evaluation-site", f"held-out={test}"]
    # SIGTERM (as `kill` sends) after round 1's checkpoint: simulate stops Flower's processes and keeps its
    # partial folder for --resume; nothing is published
    kill_when(start(args), partial_path(out.resolve()) / "checkpoint" / "progress.json", signal.SIGTERM)
    check_after_kill(out, model, test, None, "working")
    stopped = json.loads((partial_path(out.resolve()) / "metrics.json").read_text())
    assert stopped["completed_rounds"] >= 1
    code, output = run([*args, "--resume"])
    assert code == 0, output[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    check = metrics["held_out_check"]  # made before the kill, carried to the resumed run's report
    assert check["checked"] and check["how"].startswith("100 evaluation-only image(s) compared with 300")
    done = stopped["completed_rounds"]
    assert metrics["rounds"][:done] == stopped["rounds"][:done]  # continued: the rounds before the kill kept
    previous = snapshot(out)
    for point in ("staged", "swapping"):
        killed([*args, "--force"], point, out)
        check_after_kill(out, model, test, previous, point)
        code, output = run(args)
        assert code == 2 and "exists and is not empty" in output, output
        assert snapshot(out) == previous

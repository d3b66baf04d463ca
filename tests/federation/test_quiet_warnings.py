"""Flower's and Ray's warnings that no user can act on are filtered where fedfreeze starts Flower.

Each check makes the warning visible as Flower's simulation runtime does (deprecation warnings on)
and shows it is gone, and that the same warning without fedfreeze's filter would be printed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fedfreeze.deploy.launch import flower_env

pytestmark = pytest.mark.process

RAY_TIP = (
    "import warnings; warnings.warn_explicit('Tip: In future versions of Ray, Ray will no longer override "
    "accelerator visible devices env var', FutureWarning, 'worker.py', 1, module='ray._private.worker')"
)


def stderr_of(code: str, env: dict[str, str]) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120).stderr


def test_importing_the_flower_adapters_prints_no_typer_deprecation():
    shown = "import warnings; warnings.simplefilter('default'); "  # as Flower's simulation runtime does
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    assert "DeprecationWarning" in stderr_of(shown + "import flwr", env)  # the warning this filter is for
    assert "DeprecationWarning" not in stderr_of(shown + "import fedfreeze.flower.server", env)


def test_processes_flower_starts_drop_rays_accelerator_tip():
    plain = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    assert "FutureWarning" in stderr_of(RAY_TIP, plain)
    assert stderr_of(RAY_TIP, flower_env()) == ""


def test_flowers_notice_of_its_simulation_size_default_is_left_out_of_the_run_log():
    import io

    from fedfreeze.deploy.launch import FLOWER_NOISE, submit

    lines = [
        "INFO    Starting Flower Simulation",
        "WARNING Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.",
        "INFO    Federation `@none/default` (4 simulated SuperNodes)",
        "INFO    To change federation size, use the following command:",
        "INFO    flwr federation simulation-config @none/default <superlink> --num-supernodes <N>",
        "INFO    Successfully started run 42",
    ]
    flower = [sys.executable, "-c", f"print({chr(10).join(lines)!r})"]  # what `flwr run` streams
    console = io.StringIO()
    code, run_id = submit(flower, dict(os.environ), log=console)
    shown = console.getvalue()
    assert code == 0 and run_id == "42"
    assert "4 simulated SuperNodes" in shown and "Starting Flower Simulation" in shown
    assert not any(noise in shown for noise in FLOWER_NOISE), shown

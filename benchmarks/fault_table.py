"""The fault table of process lifetime (docs/deployment.md#reliability-and-security), measured.

Runs the fault tests on a real loopback deployment, each of which adds its timings to a JSON file
(``tests/federation/processes.record_timing``), and keeps them with the command, commit and
machine in ``benchmarks/results/fault-table/``:

    python benchmarks/fault_table.py

A few minutes on 2 cores (every test starts a coordinator and sites, and trains).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, write_run  # noqa: E402

TESTS = [
    "tests/federation/test_lifetime.py",
    "tests/federation/test_coordinator_restart.py",
    "tests/federation/test_service.py::test_every_process_of_a_unit_sigtermed_at_once_ends_well_within_the_stop_timeout",
    "tests/federation/test_operations.py::test_tls_deployment_kill_a_site_mid_round",
]


def main() -> int:
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        timings = Path(tmp) / "timings.json"
        env = {**os.environ, "FEDFREEZE_FAULT_TIMINGS": str(timings), "PYTHONPATH": str(ROOT)}
        began = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", *TESTS], cwd=ROOT, env=env)
        seconds = time.monotonic() - began
        results = json.loads(timings.read_text()) if timings.is_file() else {}
    write_run(
        RESULTS / "fault-table",
        results,
        started,
        extra={"tests": TESTS, "pytest_exit_code": proc.returncode, "pytest_seconds": round(seconds, 1)},
    )
    print(json.dumps(results, indent=1))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())

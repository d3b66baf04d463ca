"""Helpers shared by the benchmarks: real data from ../shared, a peak-memory sampler, and
``write_run``, which every benchmark uses to keep its figures with the command, commit and machine
that produced them (``benchmarks/results/<name>/``: ``results.json`` + ``run.json``)."""

from __future__ import annotations

import csv
import json
import os
import platform
import shlex
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fedfreeze.git_state import git_changes

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED = Path(os.environ.get("FEDFREEZE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
KERMANY = SHARED / "kermany_cxr_224"


def kermany_subset(n: int, out: Path, seed: int = 0) -> Path:
    """A manifest of ``n`` Kermany images (half per class where possible) with absolute paths."""
    manifest = KERMANY / "manifest.csv"
    if not manifest.is_file():
        raise SystemExit(f"benchmark data not found: {manifest} (set FEDFREEZE_SHARED_DATA)")
    rows = list(csv.DictReader(manifest.open()))
    rng = np.random.default_rng(seed)
    picked = []
    for label in ("0", "1"):
        pool = [r for r in rows if r["label"] == label]
        picked += [pool[i] for i in rng.choice(len(pool), size=n // 2, replace=False)]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient_id"])
        for r in picked:
            writer.writerow([str(KERMANY / r["path"]), r["label"], r["patient_id"]])
    return out


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


class PeakRSS:
    """Samples this process's resident memory every few milliseconds; ``peak - start`` is what a block added."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.start = self.peak = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = rss_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())

    @property
    def added_mb(self) -> float:
        return self.peak - self.start


# ------------------------------------------------------------------------------ results and run.json
def command_line(argv: list[str] | None = None) -> str:
    """The command as typed from the repository root: ``python benchmarks/x.py --arg ...``."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]) if argv else Path("?")
    try:
        script = script.resolve().relative_to(ROOT)
    except ValueError:
        pass
    return "python " + " ".join(shlex.quote(a) for a in [str(script), *argv[1:]])


def git_state() -> dict[str, Any]:
    """The checkout's commit, whether a tracked file differs from it, and which (at most 20): the rule of
    ``fedfreeze.git_state``, so a results folder's run.json and a model's provenance mean the same by
    dirty (untracked files do not count). ``dirty`` is None where git cannot tell."""
    commit, changed = git_changes(ROOT)
    return {"commit": commit, "dirty": None if changed is None else bool(changed), "changed": (changed or [])[:20]}


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, load, library versions and GPU of the machine running the benchmark."""
    info: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        kb = next(int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal"))
        info["memory_gb"] = round(kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        info["memory_gb"] = None
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    info["python"] = platform.python_version()
    for name in ("torch", "torchvision", "flwr", "numpy"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing library is recorded, not fatal
            info[name] = None
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["gpu"] = ", ".join(gpus) if gpus else "none"
    except Exception:  # noqa: BLE001
        info["gpu"] = "unknown"
    info["platform"] = platform.platform()
    return info


def json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if hasattr(value, "item"):  # a 0-d tensor
        return value.item()
    if hasattr(value, "__float__"):
        return float(value)
    return str(value)


def write_run(
    out_dir: Path,
    results: dict[str, Any] | None,
    started: float,
    *,
    extra: dict[str, Any] | None = None,
    command: str | None = None,
) -> Path:
    """Write ``out_dir/results.json`` (the figures, as given; skipped when ``results`` is None) and
    ``out_dir/run.json``: the exact command line, git commit and dirty flag, machine, dates and wall
    time since ``started`` (a ``time.perf_counter()`` or ``time.time()`` value taken when the
    benchmark began). ``extra`` adds keys to run.json. Returns ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    # time.time() is seconds since 1970 (> 1e9); perf_counter() counts from an arbitrary, much later origin
    wall = now - started if started > 1e9 else time.perf_counter() - started
    run = {
        "command": command or command_line(),
        "git": git_state(),
        "machine": machine(),
        "started": datetime.fromtimestamp(now - wall, UTC).isoformat(timespec="seconds"),
        "date": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
        "wall_seconds": round(wall, 3),
        "results": "results.json" if results is not None else None,
        **(extra or {}),
    }
    if results is not None:
        (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=json_default) + "\n")
    (out_dir / "run.json").write_text(json.dumps(run, indent=1, default=json_default) + "\n")
    return out_dir

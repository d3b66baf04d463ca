"""Helpers shared by the benchmarks: real data from ../shared and a peak-memory sampler."""

from __future__ import annotations

import csv
import os
import threading
import time
from pathlib import Path

import numpy as np

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

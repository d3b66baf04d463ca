"""Fixtures for federation tests: the shipped sites as data folders and a small, fast configuration."""

from __future__ import annotations

import csv
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fedfreeze.config import ModelConfig, TrainConfig
from fedfreeze.federation.protocol import RoundOrders
from fedfreeze.sample_data import kermany_mini
from tests.federation.processes import Tracker, tracked
from tests.shipped import beside


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return str(value)


def small_config(train: str = "", **federation: Any) -> str:
    """The small, fast TOML the federation tests run (64 px, batch 16, 100 score bins, two sites),
    with ``federation``'s keys (snake_case here, kebab-case in the file) and extra ``train`` lines."""
    keys = {"score_bins": 100, "min_sites": 2} | federation
    lines = [f"{key.replace('_', '-')} = {toml_value(value)}" for key, value in keys.items()]
    return "\n".join(["", "[model]", "input-size = 64", "[train]", "batch-size = 16", *filter(None, [train])]) + (
        "\n[federation]\n" + "\n".join(lines) + "\n"
    )


def fast_config(tmp: Path, *, rounds: int = 3, min_sites: int = 2, extra: str = "", name: str = "fed.toml") -> Path:
    """Probe rounds 1-2 (five local epochs), then layer4 joins (one local epoch); ``extra``: [federation] lines."""
    path = tmp / name
    fast = small_config(
        rounds=rounds,
        probe_rounds=2,
        probe_local_epochs=5,
        local_epochs=1,
        unfreeze={"layer4": 0.0},
        min_sites=min_sites,
    )
    path.write_text(fast + extra + "\n")
    return path


def plain_orders(**changes: Any) -> RoundOrders:
    """Orders for round 1 of a probe on default configs, with ``changes``: a test's own orders, as a
    coordinator might send them."""
    values: dict[str, Any] = {
        "round": 1,
        "stage": "single",
        "parts": frozenset({"head"}),
        "local_epochs": 1,
        "model": ModelConfig(),
        "train": TrainConfig(),
        "adapter_groups": (),
        "bn_policy": "average",
        "bn_stats": "frozen",
        "partial_replies": False,
        "proximal_mu": 0.0,
        "lr_scale": 1.0,
        "val_fraction": 0.25,
        "threshold": 0.5,
        "score_bins": 100,
        "min_cell_count": 5,
        "cell_edges": (),
        "secure_aggregation": False,
        "seed": 0,
        "dp_weight": False,
        "evaluation_sites": (),
    }
    return RoundOrders(**(values | changes))


@pytest.fixture
def tracker(tmp_path: Path) -> Iterator[Tracker]:
    """Every process a test starts carries the tracker's tag; those left running are killed at its end."""
    with tracked(tmp_path) as track:
        yield track


@pytest.fixture(scope="session")
def site_folders(tmp_path_factory) -> dict[str, Path]:
    """site-a, site-b, site-c of the shipped subset, each a folder with its own manifest.csv (naming the
    shipped images through a link in the folder: a site's images lie in its data folder)."""
    root = tmp_path_factory.mktemp("sites")
    manifest = kermany_mini("train")
    rows = list(csv.DictReader(manifest.open()))
    folders = {}
    for site in sorted({r["site"] for r in rows}):
        folder = root / site
        folder.mkdir()
        with (folder / "manifest.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label", "patient_id"])
            for r in rows:
                if r["site"] == site:
                    writer.writerow([beside(folder, r["path"]), r["label"], r["patient_id"]])
        folders[site] = folder
    return folders


def read_metrics(out: Path) -> dict:
    """A federation's metrics.json: in its output folder once it completed, else in the partial folder
    it stopped in (``fedfreeze.outputs``), where ``--resume`` continues it."""
    import json

    from fedfreeze.outputs import partial_path

    path = out / "metrics.json" if (out / "metrics.json").is_file() else partial_path(out.resolve()) / "metrics.json"
    return dict(json.loads(path.read_text()))


def held_out_site(folder: Path, keep: Callable[[str], bool] = lambda patient: True) -> Path:
    """The shipped held-out patients (those ``keep`` accepts) as an evaluation-only site's data folder,
    images copied inside it: a manifest names images in its own folder (``--allow-outside-paths``)."""
    manifest = kermany_mini("test")
    (folder / "images").mkdir(parents=True)
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient_id"])
        for r in csv.DictReader(manifest.open()):
            if keep(r["patient_id"]):
                image = folder / "images" / Path(r["path"]).name
                shutil.copyfile(manifest.parent / r["path"], image)
                writer.writerow([image.relative_to(folder).as_posix(), r["label"], r["patient_id"]])
    return folder


class Lines(logging.Handler):
    """Every message at ``level`` or above that the loggers it is added to write, kept for a test to read."""

    def __init__(self, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

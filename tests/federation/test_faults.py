"""Fault injection, in process: hung and leaving sites, late joiners, poisoned updates, bad local
data (differential privacy: test_dp.py). The real ServerApp loop and ClientApp exchange serialised messages
through ``LocalGrid``; process-level faults (a coordinator restart) are in test_flower_processes.py.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client.app import app as real_client
from fedfreeze.flower.client import handle_evaluate, handle_train
from fedfreeze.flower.federate import run_federation
from fedfreeze.flower.local_grid import LocalGrid
from fedfreeze.model_io import load_model
from tests.federation.conftest import Lines, fast_config, read_metrics
from tests.federation.test_federation_inprocess import node_configs
from tests.shipped import beside

pytestmark = pytest.mark.slow  # each test runs, or shares, a federation or a trained model


class ScriptedGrid(LocalGrid):
    """A LocalGrid whose nodes go silent, leave or join at given rounds."""

    def __init__(
        self, *args, silent: dict[int, set[int]] | None = None, present: dict[int, set[int]] | None = None, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        self.silent = silent or {}  # node -> rounds in which it never answers (hangs)
        self.present = present or {}  # node -> rounds in which it is connected at all
        self.pushed = 0  # rounds sent so far (the final evaluation counts as rounds + 1)

    def get_node_ids(self):
        upcoming = self.pushed + 1
        return [n for n in self.node_configs if upcoming in self.present.get(n, {upcoming})]

    def push_messages(self, messages):
        self.pushed += 1
        return super().push_messages(messages)

    def pull_messages(self, message_ids):
        replies = []
        for message_id in message_ids:
            node = self._pending[message_id].metadata.dst_node_id
            if self.pushed in self.silent.get(node, set()):
                continue  # hangs: stays pending; the coordinator's timeout decides
            replies.append(self._deliver(node, self._pending.pop(message_id)))
        return replies


def run_on(grid: LocalGrid, out: Path, config: Path, resume: bool = False) -> dict:
    run_config = {"config": str(config), "out-dir": str(out), "resume": resume}
    grid.run_config = run_config
    try:
        run_federation(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    except Exception:
        pass
    return read_metrics(out)


def test_a_site_that_hangs_is_timed_out_and_the_round_goes_on(tmp_path, site_folders):
    config = fast_config(tmp_path, extra="round-timeout = 3")
    grid = ScriptedGrid(real_client, node_configs(site_folders, tmp_path / "s"), silent={3: {2}})
    metrics = run_on(grid, tmp_path / "out", config)
    assert metrics["status"] == "completed", metrics["reason"]
    round2 = metrics["rounds"][1]
    assert len(round2["sites"]) == 2
    # one record for the silent node, named from its round-1 reply, with the seconds waited (LocalGrid
    # runs the other sites' training inside its pull, so the wait can run past the timeout here)
    assert [{k: v for k, v in f.items() if k != "seconds"} for f in round2["failures"]] == [
        {"node": 3, "site": "site-c", "reason": "no reply within 3 s"}
    ]
    assert round2["failures"][0]["seconds"] >= 3.0
    assert [len(r["sites"]) for r in metrics["rounds"]] == [3, 2, 3]


def test_too_many_hung_sites_fail_the_run_with_the_reason(tmp_path, site_folders):
    config = fast_config(tmp_path, min_sites=3, extra="round-timeout = 2")
    grid = ScriptedGrid(real_client, node_configs(site_folders, tmp_path / "s"), silent={2: {1}})
    metrics = run_on(grid, tmp_path / "out", config)
    assert metrics["status"] == "failed"
    assert "round 1: 2 valid replies of training sites, fewer than min-sites = 3" in metrics["reason"]
    # no reply has named node 2 yet (round 1): its record says so rather than guessing
    failures = metrics["failed_round"]["failures"]
    assert [{k: v for k, v in f.items() if k != "seconds"} for f in failures] == [
        {"node": 2, "site": None, "reason": "no reply within 2 s"}
    ]
    assert failures[0]["seconds"] >= 2.0


def test_sites_joining_late_and_leaving_early(tmp_path, site_folders):
    config = fast_config(tmp_path)
    # node 3 joins in round 2; node 1 leaves after round 2 (and misses the final evaluation, "round 4")
    grid = ScriptedGrid(real_client, node_configs(site_folders, tmp_path / "s"), present={3: {2, 3, 4}, 1: {1, 2}})
    metrics = run_on(grid, tmp_path / "out", config)
    assert metrics["status"] == "completed", metrics["reason"]
    assert [sorted(s["site"] for s in r["sites"]) for r in metrics["rounds"]] == [
        ["site-a", "site-b"],
        ["site-a", "site-b", "site-c"],
        ["site-b", "site-c"],
    ]


def test_sites_below_min_sites_fail_instead_of_waiting_forever(tmp_path, site_folders):
    config = fast_config(tmp_path, min_sites=3, extra="site-wait = 1")
    grid = ScriptedGrid(real_client, node_configs(site_folders, tmp_path / "s"), present={3: {1}})
    metrics = run_on(grid, tmp_path / "out", config)
    assert metrics["status"] == "failed"
    assert "2 site(s) connected after 1 s; min-sites is 3" in metrics["reason"]
    assert metrics["completed_rounds"] == 1  # round 1 is kept, nothing is lost


def poisoning_client(poisoned: str, scale: float) -> ClientApp:
    """One site scales its update (reply minus received arrays) by ``scale``."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        received = {k: v.numpy().copy() for k, v in msg.content["arrays"].items()}
        reply = handle_train(msg, context)
        if context.node_config["site-name"] == poisoned:
            arrays = reply.content["arrays"]
            for key in list(arrays.keys()):
                trained = arrays[key].numpy()
                arrays[key] = Array((received[key] + scale * (trained - received[key])).astype(trained.dtype))
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context)

    return app


@pytest.fixture(scope="module")
def five_sites(site_folders, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("five")
    extra = {"site-d": "site-a", "site-e": "site-b"}
    return tmp, node_configs(site_folders, tmp / "state", extra)


def head_after(metrics: dict) -> np.ndarray:
    model, _ = load_model(metrics["model"])
    return model.head.fc.weight.detach().numpy().ravel()


@pytest.fixture(scope="module")
def honest_and_naive(five_sites):
    """The honest federation, and plain FedAvg with site-e scaling its update 100-fold."""
    tmp, nodes = five_sites
    config = fast_config(tmp, rounds=2, min_sites=5, name="fedavg.toml")
    clean = run_on(LocalGrid(real_client, nodes), tmp / "clean", config)
    naive = run_on(LocalGrid(poisoning_client("site-e", 100.0), nodes), tmp / "naive", config)
    assert clean["status"] == naive["status"] == "completed"
    return head_after(clean), head_after(naive)


@pytest.mark.parametrize("strategy", ["median", "trimmed-mean"])
def test_robust_aggregation_bounds_a_poisoned_update(five_sites, honest_and_naive, tmp_path, strategy):
    _, nodes = five_sites
    reference, naive_head = honest_and_naive
    config = fast_config(tmp_path, rounds=2, min_sites=5, extra=f'strategy = "{strategy}"')
    robust = run_on(LocalGrid(poisoning_client("site-e", 100.0), nodes), tmp_path / "robust", config)
    assert robust["status"] == "completed", robust["reason"]
    scale = np.linalg.norm(reference)
    robust_gap = np.linalg.norm(head_after(robust) - reference) / scale
    naive_gap = np.linalg.norm(naive_head - reference) / scale
    assert robust_gap < 0.5, robust_gap  # stays near what the honest sites learned
    assert naive_gap > 5 * robust_gap, (naive_gap, robust_gap)  # FedAvg is dragged away


def bad_folder(root: Path, site_folder: Path, kind: str) -> Path:
    rows = list(csv.DictReader((site_folder / "manifest.csv").open()))
    folder = root / kind
    folder.mkdir(parents=True)
    beside(folder, "images")  # the rows name the shipped images through a link, as the site's own folder does
    if kind == "unreadable":
        broken = folder / "broken.png"
        broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
        rows[0]["path"] = broken.name
    elif kind == "wrong-label":
        rows[1]["label"] = "7"
    elif kind == "one-class":
        rows = [r for r in rows if r["label"] == "1"]
    elif kind == "empty":
        rows = []
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    return folder


BAD_DATA = {
    "unreadable": "cannot decode image",
    "wrong-label": "unknown label value '7'",
    "one-class": "needs both classes",
    "empty": "no rows",
}


def test_bad_local_data_is_a_failed_reply_with_a_clear_reason(tmp_path, site_folders):
    site_log = Lines(logging.ERROR)
    logging.getLogger("flwr").addHandler(site_log)
    nodes = node_configs(site_folders, tmp_path / "s")
    for i, kind in enumerate(BAD_DATA, start=len(nodes) + 1):
        nodes[i] = {
            "data-path": str(bad_folder(tmp_path / "bad", site_folders["site-a"], kind)),
            "site-name": f"bad-{kind}",
            "state-dir": str(tmp_path / "s" / kind),
        }
    metrics = run_on(LocalGrid(real_client, nodes), tmp_path / "out", fast_config(tmp_path, rounds=2))
    assert metrics["status"] == "completed", metrics["reason"]
    for record in metrics["rounds"]:
        reasons = " | ".join(f["reason"] for f in record["failures"])
        assert len(record["failures"]) == len(BAD_DATA)
        for expected in BAD_DATA.values():
            assert expected in reasons, (expected, reasons)
    logging.getLogger("flwr").removeHandler(site_log)
    # each site said why in its own log, in one line naming itself
    for kind, expected in BAD_DATA.items():
        assert any(f"site bad-{kind} cannot take part" in line and expected in line for line in site_log.lines), kind

"""The real ServerApp loop and the real ClientApp exchanging real (serialised) messages, in process.

``LocalGrid`` stands in for the SuperLink only; process-level runs are in test_flower_processes.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client.app import app as real_client
from fedfreeze.evaluate import evaluate_model
from fedfreeze.evaluation.cells import ReleasedCells
from fedfreeze.evaluation.pooled import score_bin_edges, snap_threshold
from fedfreeze.federation.config import FederationConfig, load_fed_config
from fedfreeze.federation.site_runtime import SiteRuntime, validation_release
from fedfreeze.flower.client import handle_evaluate, handle_train, orders_from
from fedfreeze.flower.federate import run_federation
from fedfreeze.flower.local_grid import LocalGrid
from fedfreeze.flower.strategies import make_strategy
from fedfreeze.model_io import load_model
from fedfreeze.provenance import DATA_KEYS
from fedfreeze.sample_data import kermany_mini
from fedfreeze.training.engine import predict_scores
from tests.federation.conftest import fast_config, read_metrics
from tests.federation.reference import exact_figures

Tamper = Callable[[Message], None]


def node_configs(site_folders: dict[str, Path], state: Path, extra: dict[str, str] | None = None) -> dict:
    """Nodes 1..3 are the shipped sites; ``extra`` adds nodes that hold a copy of a site's data."""
    nodes = {}
    for i, (name, folder) in enumerate(site_folders.items(), start=1):
        nodes[i] = {"data-path": str(folder), "site-name": name, "state-dir": str(state / name)}
    for j, (name, site) in enumerate((extra or {}).items(), start=len(nodes) + 1):
        nodes[j] = {"data-path": str(site_folders[site]), "site-name": name, "state-dir": str(state / name)}
    return nodes


def tampering_client(tampers: dict[str, Tamper], crash: dict[str, set[int]] | None = None) -> ClientApp:
    """The real ClientApp, except that named sites alter their train replies (or crash in some rounds)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        site = str(context.node_config["site-name"])
        if crash and int(msg.content["config"]["round"]) in crash.get(site, set()):
            raise RuntimeError(f"{site} lost its disk")
        reply = handle_train(msg, context)
        if site in tampers:
            tampers[site](reply)
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context)

    return app


def run(
    out: Path,
    config: Path,
    nodes: dict,
    client: ClientApp = real_client,
    *,
    resume: bool = False,
    audit: list | None = None,
) -> dict:
    run_config = {"config": str(config), "out-dir": str(out), "resume": resume}
    grid = LocalGrid(
        client,
        nodes,
        run_config,
        on_reply=(lambda sent, reply: audit.append((sent, reply))) if audit is not None else None,
    )
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    try:
        run_federation(grid, context)
    except Exception:
        pass  # the outcome is in metrics.json, which the tests read
    return read_metrics(out)


@pytest.fixture(scope="module")
def honest(tmp_path_factory, site_folders):
    """Three sites, 2 probe rounds + 1 layer4 round, every message recorded."""
    tmp = tmp_path_factory.mktemp("honest")
    audit: list = []
    metrics = run(tmp / "out", fast_config(tmp), node_configs(site_folders, tmp / "state"), audit=audit)
    return tmp, metrics, audit


@pytest.mark.slow
def test_federation_completes_with_the_schedule(honest):
    _, metrics, _ = honest
    assert metrics["status"] == "completed", metrics["reason"]
    assert [r["parts"] for r in metrics["rounds"]] == [["head"], ["head"], ["head", "layer4"]]
    assert all(len(r["sites"]) == 3 and not r["rejected"] and not r["failures"] for r in metrics["rounds"])
    final = metrics["final"]["pooled"]["at_threshold_used"]
    assert final["n"] == sum(s["val_n"] for s in metrics["final"]["sites"])


@pytest.mark.slow
def test_federated_model_beats_chance_on_unseen_patients(honest):
    _, metrics, _ = honest
    result = evaluate_model(metrics["model"], kermany_mini("test"))
    assert result["auroc"] > 0.8, result
    assert result["balanced_accuracy"] > 0.6, result
    assert result["threshold"] == pytest.approx(metrics["threshold"])


@pytest.mark.slow
def test_only_the_rounds_trainable_arrays_travel(honest):
    _, metrics, audit = honest
    model, _ = load_model(metrics["model"])
    state = model.state_dict()
    for sent, reply in audit:
        orders = orders_from(sent.content["config"])
        if sent.metadata.message_type != "train":
            assert "arrays" not in reply.content
            continue
        keys = list(reply.content["arrays"].keys())
        assert keys == list(sent.content["arrays"].keys())
        assert {model.part_of_key(k) for k in keys} == set(orders.parts)
        for key in keys:
            assert tuple(reply.content["arrays"][key].shape) == tuple(state[key].shape)
    probe = metrics["rounds"][0]["bytes_up"] / 3
    layer4 = metrics["rounds"][2]["bytes_up"] / 3
    assert probe < 12_000  # 1281 numbers plus the statistics
    assert layer4 / probe > 500


# What a reply may hold in its metrics besides the released cells. The rule for a key here: it is a
# site-level total or a figure over all of a site's training data, never a value that one validation
# case's label or score decides alone: a count over a whole split or the whole data set (including
# per class: the other engineer's data summary, provenance.DATA_KEYS), the manifest's fingerprint,
# seconds, the mean training loss over every batch of every local epoch, the DP weight (always 1).
# A new metric joins one of these sets only if it obeys that rule.
SITE_TOTALS = {"num-examples", "val-n", *DATA_KEYS}
TIMINGS = {"train-seconds", "eval-seconds", "process-seconds"}
TRAINING_FIGURES = {"train-loss", "dp-weight"}
CELLS = {"val-cell-class", "val-cell-start", "val-cell-count"}


def audit_metrics(record: dict, orders) -> list[str]:
    """Why a reply's metrics could single out a validation case (empty: they cannot).

    Every list is either a site-level total (above) or the released cells, and every released cell
    narrower than the whole axis holds 0 or at least ``orders.min_cell_count`` cases of its class
    (the whole-axis cell is the class's total at the site)."""
    problems = []
    unknown = set(record) - SITE_TOTALS - TIMINGS - TRAINING_FIGURES - CELLS
    if unknown:
        problems.append(f"metrics not allowed: {sorted(unknown)}")
    for key, value in record.items():
        if isinstance(value, list) and key not in CELLS and key not in DATA_KEYS:
            problems.append(f"{key} is a list outside the cells and the data summary")
    units = orders.score_bins if orders.model.num_classes == 2 else orders.model.num_classes
    try:
        cells = ReleasedCells(
            units,
            orders.model.num_classes,
            np.array(record["val-cell-class"], dtype=np.int64),
            np.array(record["val-cell-start"], dtype=np.int64),
            np.array(record["val-cell-count"], dtype=np.int64),
        )
    except (KeyError, ValueError) as err:
        return [*problems, f"cells unreadable: {err}"]
    if cells.n != record["val-n"]:
        problems.append(f"cells hold {cells.n} cases, val-n is {record['val-n']}")
    for c in range(cells.classes):
        for start, stop, count in cells.cells_of(c):
            if stop - start < units and 0 < count < orders.min_cell_count:
                problems.append(f"class {c} cell [{start}, {stop}) holds {count} < {orders.min_cell_count} cases")
    return problems


@pytest.mark.slow
def test_no_reply_singles_out_a_validation_case(honest, site_folders):
    """The message audit over a whole run: every reply a site sent (train and evaluate) holds the
    round's model arrays, its name, role and frozen-weight hash, site-level totals and timings, and
    cells of its validation statistics that each hold 0 or at least min-cell-count cases. The same
    audit rejects the exact histograms of these sites' validation cases (what sites sent before the
    rule), so it would fail if the merging were removed."""
    tmp, metrics, audit = honest
    model, _ = load_model(metrics["model"])
    state = model.state_dict()
    assert audit
    for sent, reply in audit:
        orders = orders_from(sent.content["config"])
        assert orders.min_cell_count == FederationConfig().min_cell_count >= 5  # the default rule ran
        content = reply.content
        assert set(content.keys()) <= {"arrays", "metrics", "proof"}
        for key, array in content.get("arrays", ArrayRecord()).items():
            assert key in state and tuple(array.shape) == tuple(state[key].shape)  # model weights only
        record = dict(content["metrics"])
        assert audit_metrics(record, orders) == [], (orders.round, audit_metrics(record, orders))
        proof = content["proof"]
        assert set(proof.keys()) == {"frozen-hash", "site", "role"}
        assert proof["role"] == "train"
        assert re.fullmatch(r"[0-9a-f]{64}", proof["frozen-hash"])
        assert proof["site"] in {"site-a", "site-b", "site-c"}
    # the audit has teeth: the exact histograms (min-cell-count = 1) of these validation cases fail it
    final = [orders_from(s.content["config"]) for s, _ in audit if s.metadata.message_type == "evaluate"][0]
    exact = replace(final, min_cell_count=1)
    singled_out = 0
    for name, folder in site_folders.items():
        _, val = SiteRuntime(folder, name, tmp / "state" / name).datasets(final)
        scores = predict_scores(model, val.images, torch.device("cpu"))
        problems = audit_metrics(validation_release(val.labels.numpy(), scores, exact), final)
        singled_out += sum("holds 1 <" in p for p in problems)
    assert singled_out >= 10, singled_out


@pytest.mark.slow
def test_pooled_figures_hold_sklearn_on_the_concatenated_predictions(honest, site_folders):
    """From cells of at least min-cell-count cases the pooled figures are estimates: the exact figures
    of the concatenated raw scores lie in the ranges the cells fix, and so do the estimates."""
    tmp, metrics, audit = honest
    model, _ = load_model(metrics["model"])
    final = metrics["final"]["pooled"]["at_threshold_used"]
    threshold = final["threshold"]
    assert threshold == snap_threshold(threshold, score_bin_edges(100))
    assert metrics["final"]["pooled"]["cells"] == {"min_cell_count": 5, "allocation": "binormal"}
    evaluate_orders = [
        orders_from(sent.content["config"]) for sent, _ in audit if sent.metadata.message_type == "evaluate"
    ][0]
    labels, scores = [], []
    for name, folder in site_folders.items():
        _, val = SiteRuntime(folder, name, tmp / "state" / name).datasets(evaluate_orders)
        labels.append(val.labels.numpy())
        scores.append(predict_scores(model, val.images, torch.device("cpu")))
    y, p = np.concatenate(labels), np.concatenate(scores)
    exact = exact_figures(y, p, threshold)
    pred = p >= threshold
    assert final["n"] == len(y)
    for key, value in exact.items():
        lo, hi = final["ranges"][key]
        assert lo - 1e-9 <= value <= hi + 1e-9, (key, value, lo, hi)
        assert lo - 1e-9 <= final[key] <= hi + 1e-9, (key, final[key], lo, hi)
    if final["exact"]:  # every site's cells were cut at the threshold: the counts there are exact
        assert final["tp"] == int((pred & (y == 1)).sum()) and final["fp"] == int((pred & (y == 0)).sum())


def _nan(reply: Message) -> None:
    arrays = reply.content["arrays"]
    weight = arrays["head.fc.weight"].numpy().copy()
    weight[0, 0] = np.nan
    arrays["head.fc.weight"] = Array(weight)


def _shape(reply: Message) -> None:
    reply.content["arrays"]["head.fc.bias"] = Array(np.zeros(3, np.float32))


def _dtype(reply: Message) -> None:
    arrays = reply.content["arrays"]
    arrays["head.fc.weight"] = Array(arrays["head.fc.weight"].numpy().astype(np.float64))


def _extra_key(reply: Message) -> None:
    reply.content["arrays"]["groups.stem.0._conv_stem.weight"] = Array(np.zeros((32, 3, 3, 3), np.float32))


def _missing_key(reply: Message) -> None:
    del reply.content["arrays"]["head.fc.bias"]


def _hash(reply: Message) -> None:
    reply.content["proof"]["frozen-hash"] = "0" * 64


def _count(reply: Message) -> None:
    reply.content["metrics"]["num-examples"] = 10**9


def _single_case(reply: Message) -> None:
    """Split one case off a cell: a cell of one case, as the exact histograms hold."""
    metrics = reply.content["metrics"]
    cls, start, count = (list(metrics[f"val-cell-{k}"]) for k in ("class", "start", "count"))
    last = len(cls) - 1
    i = next(
        j
        for j in range(len(cls))
        if count[j] >= 2 and (j == last or cls[j + 1] != cls[j] or start[j + 1] > start[j] + 1)
    )
    cls.insert(i + 1, cls[i])
    start.insert(i + 1, start[i] + 1)
    count[i : i + 1] = [1, count[i] - 1]
    metrics["val-cell-class"], metrics["val-cell-start"], metrics["val-cell-count"] = cls, start, count


def _payload(reply: Message) -> None:
    reply.content["metrics"]["padding"] = [0.0] * 50_000


TAMPERS = {
    "nan": (_nan, "NaN or Inf"),
    "shape": (_shape, "shape (3,)"),
    "dtype": (_dtype, "dtype float64"),
    "extra": (_extra_key, "unexpected keys"),
    "missing": (_missing_key, "missing keys head.fc.bias"),
    "hash": (_hash, "frozen-weight hash"),
    "count": (_count, "num-examples 1000000000"),
    "payload": (_payload, "far larger"),
    "single-case": (_single_case, "holds 1 case(s): fewer than min-cell-count = 5"),
}


@pytest.mark.slow
def test_bad_replies_are_rejected_and_leave_no_trace(tmp_path, site_folders, honest):
    _, honest_metrics, _ = honest
    extra = {f"bad-{kind}": "site-a" for kind in TAMPERS}
    client = tampering_client({f"bad-{kind}": fn for kind, (fn, _) in TAMPERS.items()}, crash={"bad-crash": {1, 2, 3}})
    extra["bad-crash"] = "site-b"
    metrics = run(
        tmp_path / "out", fast_config(tmp_path, min_sites=3), node_configs(site_folders, tmp_path, extra), client
    )
    assert metrics["status"] == "completed", metrics["reason"]
    for record in metrics["rounds"]:
        assert sorted(s["site"] for s in record["sites"]) == ["site-a", "site-b", "site-c"]
        reasons = {r["site"]: " ".join(r["reasons"]) for r in record["rejected"]}
        for kind, (_, expected) in TAMPERS.items():
            assert expected in reasons[f"bad-{kind}"], (kind, reasons[f"bad-{kind}"])
    assert [len(r["failures"]) for r in metrics["rounds"]] == [1, 1, 1]
    assert "lost its disk" in metrics["rounds"][1]["failures"][0]["reason"]
    # nothing of a rejected reply entered the global model: it equals the honest run's (to 1e-4: two
    # identical runs here differ by up to ~1e-5, multi-threaded CPU kernels; a rejected reply that
    # leaked into a 3- or 11-site average would move weights by orders of magnitude more)
    bad, _ = load_model(metrics["model"])
    good, _ = load_model(honest_metrics["model"])
    for key, value in good.state_dict().items():
        assert torch.allclose(bad.state_dict()[key].float(), value.float(), atol=1e-4), key


@pytest.mark.slow
def test_too_few_valid_replies_fail_the_run_and_resume_continues(tmp_path, site_folders):
    config = fast_config(tmp_path, min_sites=3)
    nodes = node_configs(site_folders, tmp_path / "state")
    failed = run(tmp_path / "out", config, nodes, tampering_client({}, crash={"site-c": {2}}))
    assert failed["status"] == "failed"
    assert "fewer than min-sites = 3" in failed["reason"]
    assert failed["completed_rounds"] == 1
    resumed = run(tmp_path / "out", config, nodes, resume=True)
    assert resumed["status"] == "completed", resumed["reason"]
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3]  # nothing lost, nothing counted twice
    assert failed["resumed_after"] is None and resumed["resumed_after"] == 1  # the summary's "rounds 2-3 in this run"


@pytest.mark.slow
def test_fedbn_keeps_batchnorm_at_each_site(tmp_path, site_folders, honest):
    config = fast_config(tmp_path, extra='bn-policy = "local"\nstrategy = "fedprox"\nproximal-mu = 0.1')
    audit: list = []
    metrics = run(tmp_path / "out", config, node_configs(site_folders, tmp_path / "state"), audit=audit)
    assert metrics["status"] == "completed", metrics["reason"]
    layer4_round = [
        reply for sent, reply in audit if sent.content["config"]["round"] == 3 and sent.metadata.message_type == "train"
    ]
    sent_keys = set(layer4_round[0].content["arrays"].keys())
    assert "groups.layer4.0._expand_conv.weight" in sent_keys
    assert not any("_bn" in k for k in sent_keys)
    saved = torch.load(tmp_path / "state" / "site-a" / "local_batchnorm.pt", weights_only=True)
    assert "groups.layer4.0._bn0.weight" in saved
    # with the default policy the same BatchNorm scale travels and is averaged
    _, _, honest_audit = honest
    averaged = [r for s, r in honest_audit if s.content["config"]["round"] == 3 and s.metadata.message_type == "train"]
    assert "groups.layer4.0._bn0.weight" in averaged[0].content["arrays"]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("fedavg", "FedAvg"),
        ("fedprox", "OrderedFedProx"),
        ("fedavgm", "KeyedFedAvgM"),
        ("trimmed-mean", "FedTrimmedAvg"),
        ("median", "FedMedian"),
    ],
)
def test_strategy_choice(name, expected):
    cfg = load_fed_config(None, {"federation.strategy": name, "federation.min-sites": 3})
    strategy = make_strategy(cfg)
    assert type(strategy).__name__ == expected
    assert strategy.min_train_nodes == 3


@pytest.mark.slow
def test_fedavgm_runs_when_the_round_sends_other_arrays(tmp_path, site_folders):
    """Round 3 sends layer4 beside the head: Flower's own FedAvgM fails there (test_fedavgm.py)."""
    config = fast_config(tmp_path, rounds=3, extra='strategy = "fedavgm"\nserver-momentum = 0.5')
    metrics = run(tmp_path / "out", config, node_configs(site_folders, tmp_path / "state"))
    assert metrics["status"] == "completed", metrics["reason"]
    assert metrics["rounds"][2]["parts"] == ["head", "layer4"]


def test_median_strategy_runs(tmp_path, site_folders):
    config = fast_config(tmp_path, rounds=2, extra='strategy = "median"')
    metrics = run(tmp_path / "out", config, node_configs(site_folders, tmp_path / "state"))
    assert metrics["status"] == "completed", metrics["reason"]

"""The real ServerApp loop and the real ClientApp exchanging real (serialised) messages, in process.

``LocalGrid`` stands in for the SuperLink only; process-level runs are in test_flower_processes.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from sklearn.metrics import roc_auc_score

from client.app import app as real_client
from fedfreeze.evaluate import evaluate_model
from fedfreeze.evaluation.pooled import score_bin_edges, snap_threshold
from fedfreeze.federation.config import load_fed_config
from fedfreeze.federation.site_runtime import SiteRuntime
from fedfreeze.flower.client import handle_evaluate, handle_train, orders_from
from fedfreeze.flower.local_grid import LocalGrid
from fedfreeze.flower.server import make_strategy, run_federation
from fedfreeze.model_io import load_model
from fedfreeze.sample_data import kermany_mini
from fedfreeze.training.engine import predict_scores
from tests.federation.conftest import fast_config

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
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def honest(tmp_path_factory, site_folders):
    """Three sites, 2 probe rounds + 1 layer4 round, every message recorded."""
    tmp = tmp_path_factory.mktemp("honest")
    audit: list = []
    metrics = run(tmp / "out", fast_config(tmp), node_configs(site_folders, tmp / "state"), audit=audit)
    return tmp, metrics, audit


def test_federation_completes_with_the_schedule(honest):
    _, metrics, _ = honest
    assert metrics["status"] == "completed", metrics["reason"]
    assert [r["parts"] for r in metrics["rounds"]] == [["head"], ["head"], ["head", "layer4"]]
    assert all(len(r["sites"]) == 3 and not r["rejected"] and not r["failures"] for r in metrics["rounds"])
    final = metrics["final"]["pooled"]["at_threshold_used"]
    assert final["n"] == sum(s["val_n"] for s in metrics["final"]["sites"])


def test_federated_model_beats_chance_on_unseen_patients(honest):
    _, metrics, _ = honest
    result = evaluate_model(metrics["model"], kermany_mini("test"))
    assert result["auroc"] > 0.8, result
    assert result["balanced_accuracy"] > 0.6, result
    assert result["threshold"] == pytest.approx(metrics["threshold"])


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


def test_no_image_label_or_per_case_score_leaves_a_site(honest):
    """Every reply a site sent, train and evaluate, holds only the allowed records and aggregate numbers."""
    _, metrics, audit = honest
    allowed_metrics = {
        "num-examples",
        "train-loss",
        "train-seconds",
        "eval-seconds",
        "process-seconds",
        "val-n",
        "val-auroc",
        "val-balanced-accuracy",
        "val-f1",
        "val-sensitivity",
        "val-specificity",
        "val-tp",
        "val-fp",
        "val-tn",
        "val-fn",
        "val-threshold",
        "val-hist-neg",
        "val-hist-pos",
    }
    model, _ = load_model(metrics["model"])
    state = model.state_dict()
    assert audit
    for _, reply in audit:
        content = reply.content
        assert set(content.keys()) <= {"arrays", "metrics", "proof"}
        for key, array in content.get("arrays", ArrayRecord()).items():
            assert key in state and tuple(array.shape) == tuple(state[key].shape)  # model weights only
        record = content["metrics"]
        assert set(record.keys()) <= allowed_metrics, set(record.keys()) - allowed_metrics
        for key, value in record.items():
            if isinstance(value, list):
                assert key in {"val-hist-neg", "val-hist-pos"} and len(value) == 100  # fixed bins, not cases
            else:
                assert isinstance(value, (int, float))
        assert sum(record["val-hist-neg"]) + sum(record["val-hist-pos"]) == record["val-n"]
        proof = content["proof"]
        assert set(proof.keys()) == {"frozen-hash", "site", "role"}
        assert proof["role"] == "train"
        assert re.fullmatch(r"[0-9a-f]{64}", proof["frozen-hash"])
        assert proof["site"] in {"site-a", "site-b", "site-c"}


def test_pooled_figures_equal_sklearn_on_the_concatenated_predictions(honest, site_folders):
    tmp, metrics, audit = honest
    model, card = load_model(metrics["model"])
    final = metrics["final"]["pooled"]["at_threshold_used"]
    threshold = final["threshold"]
    evaluate_orders = [
        orders_from(sent.content["config"]) for sent, _ in audit if sent.metadata.message_type == "evaluate"
    ][0]
    labels, scores = [], []
    for name, folder in site_folders.items():
        _, val = SiteRuntime(folder, name, tmp / "state" / name).datasets(evaluate_orders)
        labels.append(val.labels.numpy())
        scores.append(predict_scores(model, val.images, torch.device("cpu")))
    y, p = np.concatenate(labels), np.concatenate(scores)
    assert threshold == snap_threshold(threshold, score_bin_edges(100))
    pred = p >= threshold
    assert final["tp"] == int((pred & (y == 1)).sum()) and final["fn"] == int((~pred & (y == 1)).sum())
    assert final["fp"] == int((pred & (y == 0)).sum()) and final["tn"] == int((~pred & (y == 0)).sum())
    assert final["auroc"] == pytest.approx(roc_auc_score(y, p), abs=0.01)


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
}


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
    [("fedavg", "FedAvg"), ("fedprox", "FedProx"), ("trimmed-mean", "FedTrimmedAvg"), ("median", "FedMedian")],
)
def test_strategy_choice(name, expected):
    cfg = load_fed_config(None, {"federation.strategy": name, "federation.min-sites": 3})
    strategy = make_strategy(cfg)
    assert type(strategy).__name__ == expected
    assert strategy.min_train_nodes == 3


def test_median_strategy_runs(tmp_path, site_folders):
    config = fast_config(tmp_path, rounds=2, extra='strategy = "median"')
    metrics = run(tmp_path / "out", config, node_configs(site_folders, tmp_path / "state"))
    assert metrics["status"] == "completed", metrics["reason"]

"""Evaluation-only sites and the best-round export, on the real ServerApp loop and ClientApp in process."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from fedfreeze.data.dataset import load_image_set
from fedfreeze.data.overlap import NOT_CHECKED
from fedfreeze.model_io import load_model
from fedfreeze.sample_data import kermany_mini
from fedfreeze.training.engine import predict_scores
from tests.federation.conftest import fast_config
from tests.federation.test_federation_inprocess import node_configs, run
from tests.shipped import beside

pytestmark = pytest.mark.slow  # each test runs, or shares, a federation or a trained model


@pytest.fixture(scope="module")
def held_out_folder(tmp_path_factory) -> Path:
    """The shipped held-out patients (test.csv) as a site's data folder."""
    folder = tmp_path_factory.mktemp("held-out")
    manifest = kermany_mini("test")
    with manifest.open() as src, (folder / "manifest.csv").open("w", newline="") as dst:
        writer = csv.writer(dst)
        writer.writerow(["path", "label", "patient_id"])
        for row in csv.DictReader(src):
            writer.writerow([beside(folder, row["path"]), row["label"], row["patient_id"]])
    return folder


@pytest.fixture(scope="module")
def with_evaluator(tmp_path_factory, site_folders, held_out_folder):
    """The three shipped sites train; a fourth site holding the held-out patients only evaluates."""
    tmp = tmp_path_factory.mktemp("evaluator")
    nodes = node_configs(site_folders, tmp / "state")
    nodes[len(nodes) + 1] = {
        "data-path": str(held_out_folder),
        "site-name": "held-out",
        "state-dir": str(tmp / "state" / "held-out"),
    }
    # best-max-range = 1: choose on every estimate, however wide its range (the refusal: test_secure_aggregation)
    config = fast_config(tmp, rounds=4, extra='evaluation-sites = ["held-out"]\nexport = "best"\nbest-max-range = 1.0')
    audit: list = []
    metrics = run(tmp / "out", config, nodes, audit=audit)
    return metrics, audit


def test_evaluation_only_site_never_sends_arrays_and_is_reported_every_round(with_evaluator):
    metrics, audit = with_evaluator
    assert metrics["status"] == "completed", metrics["reason"]
    # a coordinator alone (fedfreeze run) sees no images: the report says the data were not compared
    assert metrics["held_out_check"] == NOT_CHECKED
    for sent, reply in audit:
        if reply.content["proof"]["site"] == "held-out":
            assert reply.content["proof"]["role"] == "evaluate"
            assert len(reply.content.array_records.get("arrays", {})) == 0
            assert (
                "num-examples" not in reply.content["metrics"]
                or sent.metadata.message_type == "evaluate"
                or reply.content["metrics"]["num-examples"] == reply.content["metrics"]["val-n"]
            )
        else:
            assert reply.content["proof"]["role"] == "train"
    for record in [*metrics["rounds"], metrics["final"]]:
        evaluators = record["evaluation_sites"]
        assert evaluators["sites"] == ["held-out"]
        assert evaluators["at_threshold_used"]["n"] == 100  # every held-out image, none kept back
        # the training sites' pooled validation does not include the held-out site's cases
        assert record["pooled"]["at_threshold_used"]["n"] == sum(
            s["val_n"] for s in record["sites"] if s["site"] != "held-out"
        )


def test_evaluation_only_figures_are_the_global_models_on_that_data(with_evaluator):
    """The final record's evaluation-only figures hold scikit-learn on the final global model's scores:
    the site sends cells of at least min-cell-count cases like any site, so the exact figures lie in
    the ranges its cells allow, and the estimates are close."""
    metrics, _ = with_evaluator
    final = metrics["final"]
    # the final evaluation scores the last global model; when the exported one is that model, compare directly
    if metrics["exported"]["round"] != metrics["completed_rounds"]:
        pytest.skip("the exported model is an earlier round's; covered by the best-round test")
    model, _ = load_model(metrics["model"])
    data = load_image_set(kermany_mini("test"), image_size=64, channels=3, num_classes=2, progress=False)
    scores = predict_scores(model, data.images, torch.device("cpu"))
    ext = final["evaluation_sites"]["at_threshold_used"]
    y = data.labels.numpy()
    exact_auroc = roc_auc_score(y, scores)
    assert ext["ranges"]["auroc"][0] <= exact_auroc <= ext["ranges"]["auroc"][1]
    assert ext["auroc"] == pytest.approx(exact_auroc, abs=0.03)
    predicted = scores >= ext["threshold"]
    sensitivity = predicted[y == 1].mean()
    assert ext["ranges"]["sensitivity"][0] <= sensitivity <= ext["ranges"]["sensitivity"][1]
    if ext["exact"]:  # the site's cells were cut at the threshold
        assert ext["tp"] == int((predicted & (y == 1)).sum())


def test_best_round_export_equals_that_rounds_weights(with_evaluator):
    metrics, audit = with_evaluator
    records = [*metrics["rounds"], metrics["final"]]
    # record r scored the model after round r - 1; ties go to the later round
    aurocs = [r["pooled"]["at_threshold_used"]["auroc"] for r in records]
    best = max(range(len(records)), key=lambda i: (aurocs[i], i))
    assert metrics["exported"]["round"] == records[best]["round"] - 1
    model, card = load_model(metrics["model"])
    state = model.state_dict()
    assert card.threshold == pytest.approx(records[best]["threshold_next"])
    # the arrays the coordinator sent in the round that scored the best model are that model's weights
    round_number = records[best]["round"]
    kind = "evaluate" if best == len(records) - 1 else "train"
    sent = next(
        s
        for s, _ in audit
        if s.metadata.message_type == kind
        and int(s.content["config"]["round"]) == min(round_number, metrics["completed_rounds"])
    )
    arrays = sent.content["arrays"]
    assert len(arrays) > 0
    for key, array in arrays.items():
        assert np.array_equal(state[key].numpy(), array.numpy()), key


def test_evaluation_only_site_does_not_change_the_training(with_evaluator, tmp_path, site_folders):
    """The same federation without the evaluation-only site trains the same global model, round by round
    (up to floating-point noise: multi-threaded CPU kernels and the replies' arrival order change the last
    bits; a site whose arrays were aggregated would move a tensor by far more than 0.1 %)."""
    metrics, _ = with_evaluator
    config = fast_config(tmp_path, rounds=4, extra='export = "best"\nbest-max-range = 1.0')
    alone = run(tmp_path / "out", config, node_configs(site_folders, tmp_path / "state"))
    assert alone["status"] == "completed", alone["reason"]
    for a, b in zip(alone["rounds"], metrics["rounds"], strict=True):
        assert a["pooled"]["at_threshold_used"] == b["pooled"]["at_threshold_used"]
    assert alone["exported"]["round"] == metrics["exported"]["round"]
    ours, _ = load_model(metrics["model"])
    theirs, _ = load_model(alone["model"])
    for (key, x), y in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        x, y = x.double(), y.double()
        assert torch.linalg.vector_norm(x - y) <= 1e-3 * torch.linalg.vector_norm(y) + 1e-9, key

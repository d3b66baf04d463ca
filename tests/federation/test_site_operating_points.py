"""Site operating points in a federation: at the final evaluation every site fits its own for the final
model and keeps it in its state folder; only sites that chose to share it send it, and the model
folder holds those (an evaluation-only site with a labelled calibration set gets its own)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedfreeze.evaluate import evaluate_model
from fedfreeze.federation.protocol import OPERATING_POINT
from fedfreeze.model_io import load_model, model_sha256
from tests.federation.conftest import fast_config
from tests.federation.test_evaluation_sites import held_out_folder  # noqa: F401 - a fixture
from tests.federation.test_federation_inprocess import node_configs, run


@pytest.fixture(scope="module")
def federation(tmp_path_factory, site_folders, held_out_folder):  # noqa: F811 - the imported fixture
    tmp = tmp_path_factory.mktemp("operating-points")
    nodes = node_configs(site_folders, tmp / "state")
    nodes[1]["share-operating-point"] = True  # site-a shares; site-b and site-c keep theirs
    nodes[len(nodes) + 1] = {
        "data-path": str(held_out_folder),
        "site-name": "held-out",
        "state-dir": str(tmp / "state" / "held-out"),
        "share-operating-point": "true",  # as a SuperNode's --node-config gives it
    }
    config = fast_config(tmp, rounds=3, extra='evaluation-sites = ["held-out"]')
    audit: list = []
    metrics = run(tmp / "out", config, nodes, audit=audit)
    return metrics, audit, tmp, held_out_folder


@pytest.mark.slow
def test_sites_keep_their_operating_point_and_only_sharing_sites_send_it(federation) -> None:
    metrics, audit, tmp, _ = federation
    assert metrics["status"] == "completed", metrics.get("reason")
    model, card = load_model(metrics["model"])
    sha = model_sha256(model)
    senders = set()
    for sent, reply in audit:
        if OPERATING_POINT in reply.content["proof"]:
            assert sent.metadata.message_type == "evaluate"  # the final evaluation only
            senders.add(reply.content["proof"]["site"])
    assert "held-out" in senders and senders <= {"site-a", "held-out"}
    for site in ("site-a", "site-b", "site-c", "held-out"):
        folder = tmp / "state" / site / "operating-points"
        kept, refused = folder / f"{sha[:16]}.json", folder / f"{sha[:16]}.refused.json"
        assert kept.is_file() or refused.is_file(), site  # every site decided, and wrote down why
        if kept.is_file():
            assert json.loads(kept.read_text())["model-sha256"] == sha
    # the held-out site has 88 labelled patients: enough for its own operating point
    held = card.operating_points["held-out"]
    assert held.evidence == "labelled-patients" and held.model_sha256 == sha and held.promise is not None
    assert set(card.operating_points) == senders
    assert card.operating_points.get("site-b") is None and card.operating_points.get("site-c") is None
    assert card.local_site is None  # the federated folder belongs to no site: each names its own


def test_evaluate_uses_the_evaluation_only_sites_own_operating_point(federation) -> None:
    metrics, _, _, held_out = federation
    _, card = load_model(metrics["model"])
    mine = evaluate_model(metrics["model"], held_out, bootstrap=0, site="held-out")
    assert mine["threshold"] == pytest.approx(card.operating_points["held-out"].threshold)
    assert mine["operating_point"]["validated_at_site"] is True
    other = evaluate_model(metrics["model"], held_out, bootstrap=0)
    assert other["threshold"] == pytest.approx(card.threshold) and not other["operating_point"]["validated_at_site"]
    assert "| held-out |" in (Path(metrics["model"]) / "MODEL_CARD.md").read_text()

"""A real in-process federation's model folder says what produced it: the code, the app bundle's
hash as Flower's run reports it, the resolved configuration, each site's data summary (computed at
the site), every round and the threshold rule; MODEL_CARD.md renders it, and evaluate names it."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict
from flwr.supercore.run import Run

from client.app import app as real_client
from fedfreeze.cli import main
from fedfreeze.flower.federate import run_federation
from fedfreeze.flower.local_grid import LocalGrid
from fedfreeze.model_card import CARD_MARKDOWN
from fedfreeze.model_io import read_card
from fedfreeze.provenance import manifest_sha256
from fedfreeze.sample_data import kermany_mini
from tests.federation.conftest import fast_config
from tests.federation.test_federation_inprocess import node_configs

FAB_HASH = "3f" * 32  # what a deployment's Run carries: the SHA-256 of the app bundle it executes


@pytest.fixture(scope="module")
def federation(tmp_path_factory, site_folders):
    """Two training sites and one evaluation-only site, two probe rounds, Youden's threshold, on a
    grid whose Flower run names an app bundle."""
    tmp = tmp_path_factory.mktemp("provenance")
    config = fast_config(tmp, rounds=2, extra='threshold = "youden"\nevaluation-sites = ["site-c"]')
    run_config = {"config": str(config), "out-dir": str(tmp / "out"), "resume": False}
    grid = LocalGrid(real_client, node_configs(site_folders, tmp / "state"), run_config)
    grid.set_run(replace(Run.create_empty(run_id=1), fab_hash=FAB_HASH))
    run_federation(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    metrics = json.loads((tmp / "out" / "metrics.json").read_text())
    assert metrics["status"] == "completed", metrics["reason"]
    return metrics, Path(metrics["model"])


def manifest_rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "manifest.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_provenance_records_code_app_and_the_resolved_config(federation):
    metrics, model = federation
    p = read_card(model).provenance
    assert p is not None and p.source == "federation"
    assert p.app_hash == FAB_HASH  # Flower's Run.fab_hash, passed through as plain data
    assert p.config == metrics["config"]  # the full resolved configuration, every table
    assert p.config["federation"]["threshold"] == "youden"
    assert p.config["federation"]["evaluation-sites"] == ["site-c"]
    assert p.git_commit is None or re.fullmatch(r"[0-9a-f]{40}", p.git_commit)


def test_one_summary_per_site_matches_its_manifest(federation, site_folders):
    _, model = federation
    p = read_card(model).provenance
    assert [s.site for s in p.sites] == ["site-a", "site-b"]
    assert [(s.site, s.role) for s in p.evaluation_sites] == [("site-c", "evaluate")]
    for summary in p.sites + p.evaluation_sites:
        rows = manifest_rows(site_folders[summary.site])
        assert summary.images == len(rows)
        assert summary.patients == len({r["patient_id"] for r in rows})
        assert summary.class_counts == {
            "0": sum(r["label"] == "0" for r in rows),
            "1": sum(r["label"] == "1" for r in rows),
        }
        assert summary.manifest_sha256 == manifest_sha256(site_folders[summary.site] / "manifest.csv")
        assert summary.rounds == 3  # two rounds and the final evaluation


def test_every_round_and_the_threshold_rule_are_recorded(federation):
    metrics, model = federation
    card = read_card(model)
    p = card.provenance
    assert [r["round"] for r in p.rounds] == [1, 2, 3]
    assert [r["final_evaluation"] for r in p.rounds] == [False, False, True]
    for entry, record in zip(p.rounds, [*metrics["rounds"], metrics["final"]], strict=True):
        assert entry["parts"] == record["parts"] == ["head"]
        assert entry["bytes_up"] == record["bytes_up"] > 0 and entry["bytes_down"] == record["bytes_down"] > 0
        assert entry["pooled"] == record["pooled"]["at_threshold_used"]
        assert sorted(entry["sites"]) == ["site-a", "site-b", "site-c"]
    assert p.threshold.rule == "youden"
    assert p.threshold.value == card.threshold == pytest.approx(metrics["threshold"])
    assert p.threshold.interval == metrics["exported"]["threshold_interval"]
    final = metrics["final"]
    assert p.metrics["validation"] == final["pooled"]["at_threshold_next"]
    assert p.metrics["external"]["figures"] == final["evaluation_sites"]["at_threshold_next"]
    assert sorted(s["site"] for s in p.metrics["per_site"]) == ["site-a", "site-b"]  # training sites only


def test_model_card_renders_the_provenance(federation):
    _, model = federation
    card = read_card(model)
    text = (model / CARD_MARKDOWN).read_text()
    for heading in (
        "## Intended use",
        "Not intended for",
        "## Training data",
        "## Training",
        "## Performance",
        "### External validation",
        "## Decision threshold",
        "## Adaptations",
        "## Known limits",
    ):
        assert heading in text, heading
    assert FAB_HASH in text
    for summary in card.provenance.sites + card.provenance.evaluation_sites:
        assert re.search(rf"\| {summary.site} \| [a-z ]+ \| {summary.images} \| {summary.patients} \|", text)
    assert "| 1 | head |" in text and "| 2 | head |" in text and "| final evaluation |" in text
    assert "Evaluation-only sites (site-c)" in text
    assert "rule `youden`" in text and f"**{card.threshold:.4g}**" in text
    assert "None: the model is as training left it." in text


def test_evaluate_prints_the_provenance_line(federation, capsys):
    _, model = federation
    test = str(kermany_mini("test"))
    assert main(["evaluate", "--model", str(model), "--data", test, "--bootstrap", "0"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("model: federation, fedfreeze ")
    assert f"app sha256:{FAB_HASH[:12]}" in first
    assert "2 sites, 2 rounds, 1 evaluation-only" in first and "(rule: youden)" in first
    assert main(["evaluate", "--model", str(model), "--data", test, "--bootstrap", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["provenance"] == first  # --json keeps its contract keys and adds this one

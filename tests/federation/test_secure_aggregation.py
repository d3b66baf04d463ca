"""A federation with ``federation.secure-aggregation = true``, the real ServerApp loop and ClientApp in
process: the coordinator's pooled histograms are the sum of the sites' exact ones, and no site's own
histogram (nor any cell of it) reaches the coordinator, its log or its outputs. Also here: a site's own
figures travel only when it opts in, a site dropping after masking, and export-best refusing to choose
on estimates whose range is too wide. (The protocol alone: test_secagg_protocol.py; Flower's own
processes, simulation and TLS deployment: test_secure_processes.py.)"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from sklearn.metrics import roc_auc_score

from fedfreeze.evaluation.pooled import class_histograms, score_bin_edges
from fedfreeze.federation.site_runtime import SiteRuntime
from fedfreeze.flower import client as client_module
from fedfreeze.flower.secagg import from_wire
from fedfreeze.provenance import DATA_KEYS
from fedfreeze.sample_data import kermany_mini
from tests.federation.conftest import Lines, fast_config, held_out_site
from tests.federation.reference import exact_figures
from tests.federation.test_federation_inprocess import node_configs, run

BINS = 100  # conftest's FAST_FED score-bins
SECURE = 'secure-aggregation = true\nevaluation-sites = ["held-out-1", "held-out-2"]'
# what a reply's metrics may hold when its statistics go into a secure sum: site-level totals, timings,
# training figures; a site's own exact figures travel apart, only from a site that opted in (share-site-figures)
ALLOWED = {"num-examples", "val-n", *DATA_KEYS, "train-seconds", "eval-seconds", "process-seconds", "train-loss"}
OWN = {"own-auroc", "own-balanced-accuracy", "own-f1"}


@pytest.fixture(scope="module")
def held_out_halves(tmp_path_factory) -> dict[str, Path]:
    """The shipped held-out patients split in two by patient: two evaluation-only sites, so that they
    form a group of their own with a sum to hide in."""
    root = tmp_path_factory.mktemp("held-out")
    rows = list(csv.DictReader(kermany_mini("test").open()))
    patients = sorted({r["patient_id"] for r in rows})
    return {
        name: held_out_site(root / name, lambda patient, i=i: patients.index(patient) % 2 == i)
        for i, name in enumerate(("held-out-1", "held-out-2"))
    }


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory, site_folders, held_out_halves) -> Iterator[dict[str, Any]]:
    """3 training sites (site-a shares its own figures), 2 evaluation-only sites, 2 rounds and the final
    evaluation; what each site computed (its exact statistics and raw scores), every message, every log line."""
    tmp = tmp_path_factory.mktemp("secure")
    nodes = node_configs(site_folders, tmp / "state")
    nodes[1]["share-site-figures"] = True  # site-a
    for name, folder in held_out_halves.items():
        nodes[len(nodes) + 1] = {"data-path": str(folder), "site-name": name, "state-dir": str(tmp / "state" / name)}
    computed: list[dict[str, Any]] = []
    release = SiteRuntime._release

    def kept(self: SiteRuntime, labels: np.ndarray, scores: np.ndarray, orders: Any, secure: bool) -> Any:
        metrics, vector, own = release(self, labels, scores, orders, secure)
        computed.append(
            {
                "site": self.site,
                "round": orders.round,
                "secure": secure,
                "labels": labels,
                "scores": scores,
                "vector": vector,
            }
        )
        return metrics, vector, own

    lines = Lines(logging.DEBUG)
    loggers = [logging.getLogger(name) for name in ("fedfreeze", "flwr")]
    audit: list = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SiteRuntime, "_release", kept)
        levels = [logger.level for logger in loggers]
        for logger in loggers:
            logger.addHandler(lines)
            logger.setLevel(logging.DEBUG)
        try:
            metrics = run(tmp / "out", fast_config(tmp, rounds=2, extra=SECURE), nodes, audit=audit)
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.removeHandler(lines)
                logger.setLevel(level)
    yield {"metrics": metrics, "computed": computed, "audit": audit, "lines": lines.lines, "out": tmp / "out"}


def sessions(secure_run: dict[str, Any]) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Each record of metrics.json (rounds, then the final evaluation) with what the five sites computed
    for it (``LocalGrid`` delivers one message at a time, so they come five by five, in order)."""
    metrics, computed = secure_run["metrics"], secure_run["computed"]
    records = [*metrics["rounds"], metrics["final"]]
    assert len(computed) == 5 * len(records)
    return [(record, computed[5 * i : 5 * i + 5]) for i, record in enumerate(records)]


def numeric_lists(value: Any) -> Iterator[list[float]]:
    """Every list of numbers anywhere in a JSON document."""
    if isinstance(value, dict):
        for item in value.values():
            yield from numeric_lists(item)
    elif isinstance(value, list):
        if value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            yield value
        for item in value:
            yield from numeric_lists(item)


def test_pooled_histograms_are_the_sum_of_the_sites(secure_run):
    metrics = secure_run["metrics"]
    assert metrics["status"] == "completed", metrics["reason"]
    for record, computed in sessions(secure_run):
        assert record["secure_sum"]["groups"]["train"] == {"sites": 3, "dropped": [], "threshold": 2}
        assert record["secure_sum"]["groups"]["evaluate"] == {"sites": 2, "dropped": [], "threshold": 2}
        train = [c for c in computed if not c["site"].startswith("held-out")]
        assert sorted(c["site"] for c in train) == ["site-a", "site-b", "site-c"] and all(c["secure"] for c in train)
        total = np.sum([c["vector"] for c in train], axis=0)
        pooled = record["pooled"]["histograms"]
        np.testing.assert_array_equal(np.array(pooled["neg"] + pooled["pos"]), total)
        assert record["pooled"]["cells"]["secure_sum"]["sites"] == ["site-a", "site-b", "site-c"]
        held = [c for c in computed if c["site"].startswith("held-out")]
        assert record["evaluation_sites"]["at_threshold_used"]["n"] == sum(len(c["labels"]) for c in held) == 100


def test_pooled_figures_are_sklearns_on_the_pooled_scores(secure_run):
    """Exact to the histogram's resolution: balanced accuracy, sensitivity and specificity equal, AUROC
    within half the share of pairs sharing a bin (the range the record states)."""
    for record, computed in sessions(secure_run):
        for group, figures in (
            ("train", record["pooled"]["at_threshold_used"]),
            ("evaluate", record["evaluation_sites"]["at_threshold_used"]),
        ):
            mine = [c for c in computed if c["site"].startswith("held-out") == (group == "evaluate")]
            y = np.concatenate([c["labels"] for c in mine])
            p = np.concatenate([c["scores"] for c in mine])
            exact = exact_figures(y, p, figures["threshold"])
            for key in ("balanced_accuracy", "sensitivity", "specificity"):
                assert figures[key] == pytest.approx(exact[key], abs=1e-12), (group, key)
            hist = class_histograms(y, p, score_bin_edges(BINS))
            ties = 0.5 * float(hist[0] @ hist[1]) / (hist[0].sum() * hist[1].sum())
            assert abs(figures["auroc"] - exact["auroc"]) <= ties + 1e-12
            assert figures["exact"] is True


def test_no_site_histogram_reaches_the_coordinator_its_log_or_its_outputs(secure_run):
    vectors = [c["vector"] for c in secure_run["computed"]]
    assert all(v is not None and v.sum() > 0 for v in vectors)
    masked_seen = 0
    for _sent, reply in secure_run["audit"]:
        content = reply.content
        if "metrics" in content:
            record = dict(content["metrics"])
            site = str(content["proof"]["site"])
            assert set(record) <= ALLOWED, (site, sorted(set(record) - ALLOWED))
            assert not any(isinstance(v, list) and k not in DATA_KEYS for k, v in record.items())
            shared = {"site-figures"} if site == "site-a" else set()
            assert set(content.keys()) <= {"arrays", "metrics", "proof", "secure-sum"} | shared
            assert set(dict(content.get("site-figures", {}))) == (OWN if site == "site-a" else set())
        for config in content.config_records.values():
            for value in config.values():
                numbers = value if isinstance(value, list) else [value]
                for v in vectors:
                    assert v.tolist() != numbers
        if "secure-sum" in content and "masked" in content["secure-sum"]:
            masked = from_wire(content["secure-sum"]["masked"], 2 * BINS)
            assert masked.max() > 2**31 and not any(np.array_equal(masked, v) for v in vectors)
            masked_seen += 1
    assert masked_seen == 3 * 5  # 5 sites, 2 rounds and the final evaluation
    log_text = "\n".join(secure_run["lines"])
    assert "val-cell" not in log_text and "[exact: secure sum of 3 sites]" in log_text
    for v in vectors:
        assert str(v.tolist()) not in log_text and str(v.tolist())[1:-1] not in log_text
    documents = [json.loads(p.read_text()) for p in secure_run["out"].rglob("*.json")]
    assert len(documents) >= 3  # metrics.json, the checkpoint's progress.json, the model's model.json
    written = [lst for doc in documents for lst in numeric_lists(doc)]
    assert any(len(lst) == BINS for lst in written)  # the pooled histograms are there ...
    for v in vectors:  # ... and no site's own
        for half in (v[:BINS], v[BINS:]):
            assert not any(len(lst) == BINS and np.allclose(lst, half) for lst in written)


def test_only_a_site_that_opts_in_sends_its_own_exact_figures(secure_run):
    metrics = secure_run["metrics"]
    final_rows = {row["site"]: row for row in metrics["final"]["sites"]}
    mine = [c for c in secure_run["computed"] if c["site"] == "site-a"][-1]  # the final evaluation's
    assert final_rows["site-a"]["val_auroc"] == pytest.approx(roc_auc_score(mine["labels"], mine["scores"]))
    assert final_rows["site-a"]["val_figures_from"] == "site"
    for other in ("site-b", "site-c", "held-out-1"):
        assert "val_auroc" not in final_rows[other]
    assert metrics["final"]["weighted_mean"]["from"] == "exact figures shared by 1 of 3 sites"


def dropping(site: str, stage: str, session: str) -> ClientApp:
    """The shipped ClientApp's handlers, except that ``site`` fails at ``stage`` ("mask": the round's
    message; "unmask") of secure aggregation's ``session`` (e.g. "round 1")."""

    def fails(message: Message, context: Context) -> bool:
        part = message.content.config_records.get("secure-sum") or {}
        return str(context.node_config["site-name"]) == site and part.get("session") == session

    def train(message: Message, context: Context) -> Message:
        if stage == "mask" and fails(message, context):
            raise RuntimeError(f"{site} lost its network before masking")
        return client_module.handle_train(message, context)

    def unmask(message: Message, context: Context) -> Message:
        if stage == "unmask" and fails(message, context):
            raise RuntimeError(f"{site} lost its network after masking")
        return client_module.handle_secagg_unmask(message, context)

    app = ClientApp()
    app.train()(train)
    app.evaluate()(client_module.handle_evaluate)
    app.query("secagg_setup")(client_module.handle_secagg_setup)
    app.query("secagg_share_keys")(client_module.handle_secagg_share_keys)
    app.query("secagg_unmask")(unmask)
    return app


def test_a_site_dropping_after_masking_still_completes_and_stays_in_the_sum(tmp_path, site_folders):
    metrics = run(
        tmp_path / "out",
        fast_config(tmp_path, rounds=2, extra="secure-aggregation = true"),
        node_configs(site_folders, tmp_path / "state"),
        dropping("site-c", "unmask", "round 1"),
    )
    assert metrics["status"] == "completed", metrics["reason"]
    first = metrics["rounds"][0]
    assert first["secure_sum"]["groups"]["train"] == {"sites": 3, "dropped": [], "threshold": 2}
    assert [f["site"] for f in first["failures"]] == ["site-c"] and "unmask" in first["failures"][0]["reason"]
    assert first["pooled"]["at_threshold_used"]["n"] == sum(s["val_n"] for s in first["sites"])


def test_a_site_dropping_before_masking_leaves_the_sum(tmp_path, site_folders):
    metrics = run(
        tmp_path / "out",
        fast_config(tmp_path, rounds=2, extra="secure-aggregation = true"),
        node_configs(site_folders, tmp_path / "state"),
        dropping("site-c", "mask", "round 1"),
    )
    assert metrics["status"] == "completed", metrics["reason"]
    first = metrics["rounds"][0]
    assert first["secure_sum"]["groups"]["train"] == {"sites": 2, "dropped": ["site-c"], "threshold": 2}
    assert first["pooled"]["cells"]["secure_sum"] == {"sites": ["site-a", "site-b"], "dropped": ["site-c"]}


def test_export_best_refuses_to_choose_on_estimates_wider_than_best_max_range(tmp_path, site_folders):
    """From cells of >= 5 cases the demo-sized validation gives AUROC ranges far wider than 0.05: no
    round is chosen, the last one is exported and says why; with ranges allowed up to 1 it chooses."""
    nodes = node_configs(site_folders, tmp_path / "state")
    refused = run(tmp_path / "a", fast_config(tmp_path, rounds=2, extra='export = "best"\npatience = 1'), nodes)
    assert refused["status"] == "completed", refused["reason"]
    widths = [r["pooled"]["at_threshold_used"]["ranges"]["auroc"] for r in refused["rounds"]]
    assert all(hi - lo > 0.05 for lo, hi in widths), widths
    assert refused["completed_rounds"] == 2  # patience counted no round: it did not stop early
    assert refused["exported"]["round"] == 2
    assert refused["exported"]["rule"].startswith("last round: no round's pooled validation AUROC was known")


def test_printed_figures_are_exact_from_a_sum_and_estimates_beside_their_ranges(capsys):
    """``fedfreeze simulate`` / ``run`` print: a secure sum's figures to four decimals, named exact;
    evaluation-only sites' figures from cells to two, beside the ranges their cells allow."""
    from fedfreeze.cli.report import print_federation
    from tests.federation.test_operations import final_metrics

    metrics = final_metrics("0.5", 0.5)
    metrics["exported"]["pooled"]["cells"] = {"min_cell_count": 1, "secure_sum": {"sites": ["a", "b", "c"]}}
    ext = {"threshold": 0.5, "n": 100, "auroc": 0.9959, "balanced_accuracy": 0.92, "sensitivity": 0.84}
    ext |= {"specificity": 1.0, "ranges": {"auroc": [0.9, 1.0], "balanced_accuracy": [0.85, 0.95]}}
    metrics["final"]["evaluation_sites"] = {
        "sites": ["held-out"],
        "at_threshold_used": ext,
        "cells": {"min_cell_count": 5},
    }
    print_federation(metrics, Path("runs/quick"))
    lines = capsys.readouterr().out.splitlines()
    aurocs = [line for line in lines if line.startswith("  auroc")]
    assert aurocs[0].split()[1] == "0.9600" and "cells allow" not in aurocs[0]
    assert any("exact: the coordinator learnt only the sum of the 3 training sites" in line for line in lines)
    assert aurocs[1].split()[1] == "1.00" and aurocs[1].endswith("[cells allow 0.900-1.000]")

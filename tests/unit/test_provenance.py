"""Provenance pieces without a federation: git state, the manifest fingerprint, the data summary a
site sends, the FAB hash from Flower's run, and a folder written before provenance was recorded."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from flwr.clientapp import ClientApp
from flwr.supercore.run import Run
from scipy.stats import binomtest

from fedfreeze import __version__
from fedfreeze.cli import main
from fedfreeze.config import ModelConfig
from fedfreeze.data.dataset import load_image_set
from fedfreeze.flower.federate import run_fab_hash
from fedfreeze.flower.local_grid import LocalGrid
from fedfreeze.git_state import git_changes, git_state, source_root
from fedfreeze.model_card import CARD_MARKDOWN, render_card, wilson
from fedfreeze.model_io import CARD_FILE, load_model, make_card, read_card, save_model
from fedfreeze.models.registry import build_model
from fedfreeze.provenance import (
    DATA_CLASS_COUNTS,
    DATA_IMAGES,
    DATA_MANIFEST,
    DATA_PATIENTS,
    data_summary,
    manifest_sha256,
    provenance_line,
    sha256_to_words,
    site_data_metrics,
    words_to_sha256,
)
from fedfreeze.sample_data import kermany_mini

GIT = shutil.which("git")


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.mark.process
@pytest.mark.skipif(GIT is None, reason="git is not installed")
def test_git_state_names_the_commit_and_a_dirty_tree(tmp_path):
    (tmp_path / "a.txt").write_text("one\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    head = _git(tmp_path, "rev-parse", "HEAD")
    assert git_state(tmp_path) == (head, False)
    (tmp_path / "new.txt").write_text("untracked files do not make it dirty\n")
    assert git_state(tmp_path) == (head, False)
    (tmp_path / "a.txt").write_text("two\n")
    assert git_state(tmp_path) == (head, True)
    assert git_changes(tmp_path) == (head, ["a.txt"])  # the paths its dirty counts (benchmarks' run.json)
    # a folder inside a checkout is not its top: an installed package there must not claim its commit
    (tmp_path / "sub").mkdir()
    assert git_state(tmp_path / "sub") == (None, None)


def test_git_state_is_none_without_git_or_a_checkout(tmp_path, monkeypatch):
    assert git_state(tmp_path) == (None, None)  # not a checkout
    monkeypatch.setenv("PATH", str(tmp_path))  # no git program at all
    assert git_state(source_root()) == (None, None)


def test_manifest_fingerprint_is_of_the_rows_not_the_bytes_or_images(tmp_path):
    rows = "path,label,patient_id\na.png,0,p1\nb.png,1,p2\n"
    plain = tmp_path / "plain.csv"
    plain.write_text(rows)
    crlf = tmp_path / "crlf.csv"
    crlf.write_bytes(b"\xef\xbb\xbf" + rows.replace("\n", "\r\n\r\n").encode())  # BOM, CRLF, blank lines
    assert manifest_sha256(plain) == manifest_sha256(crlf)
    other = tmp_path / "other.csv"
    other.write_text(rows.replace("b.png,1", "b.png,0"))  # one label changed
    assert manifest_sha256(other) != manifest_sha256(plain)
    assert len(manifest_sha256(plain) or "") == 64  # no image exists: none was read


def test_a_sites_data_summary_round_trips_and_bad_ones_are_named():
    train = kermany_mini("train")
    data = load_image_set(train, image_size=16, progress=False)
    half = len(data) // 2
    metrics = site_data_metrics(train, [data.subset(range(half)), data.subset(range(half, len(data)))])
    assert metrics[DATA_IMAGES] == 300 and metrics[DATA_PATIENTS] == 235 and metrics[DATA_CLASS_COUNTS] == [120, 180]
    assert all(isinstance(w, int) and 0 <= w < 2**32 for w in metrics[DATA_MANIFEST])
    summary = data_summary(metrics, 2)
    assert summary == {
        "images": 300,
        "patients": 235,
        "class_counts": [120, 180],
        "manifest_sha256": manifest_sha256(train),
    }
    assert words_to_sha256(sha256_to_words("0f" * 32)) == "0f" * 32
    assert data_summary({"val-n": 3}, 2) is None  # a site of an earlier fedfreeze sends none
    for bad, match in (
        ({**metrics, DATA_CLASS_COUNTS: [120, 181]}, "sum to 301"),
        ({**metrics, DATA_CLASS_COUNTS: [300]}, "2 non-negative counts"),
        ({**metrics, DATA_IMAGES: -1}, "data-images should be a non-negative integer"),
        ({**metrics, DATA_PATIENTS: 301}, "does not fit 300 images"),
        ({**metrics, DATA_MANIFEST: [2**32] * 8}, "32-bit words"),
        ({k: v for k, v in metrics.items() if k != DATA_PATIENTS}, "data-patients"),
    ):
        with pytest.raises(ValueError, match=match):
            data_summary(bad, 2)


def test_run_fab_hash_is_the_string_flower_reports():
    grid = LocalGrid(ClientApp(), {})
    assert run_fab_hash(grid) is None  # an in-process run has no app bundle
    grid.set_run(replace(Run.create_empty(run_id=1), fab_hash="ab" * 32))
    assert run_fab_hash(grid) == "ab" * 32


@pytest.mark.parametrize("k, n", [(41, 41), (24, 29), (0, 7), (3, 10)])
def test_wilson_interval_equals_scipys(k, n):
    expected = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson(k, n) == pytest.approx((expected.low, expected.high), abs=1e-9)


@pytest.fixture(scope="module")
def old_folder(tmp_path_factory) -> Path:
    """A model folder as fedfreeze wrote it before provenance: no ``provenance`` key, no MODEL_CARD.md."""
    cfg = ModelConfig(weights="none", input_size=32)
    model, _ = build_model(cfg, [], 8)
    out = tmp_path_factory.mktemp("old") / "model"
    save_model(out, model, make_card(model, cfg, threshold=0.4))
    card = json.loads((out / CARD_FILE).read_text())
    assert card.pop("provenance") is None
    (out / CARD_FILE).write_text(json.dumps(card))
    (out / CARD_MARKDOWN).unlink()
    return out


def test_an_old_folder_loads_evaluates_and_says_provenance_is_not_recorded(old_folder, capsys):
    model, card = load_model(old_folder)
    assert card.provenance is None
    assert provenance_line(None, 0.4, []).startswith("model: provenance: not recorded")
    code = main(["evaluate", "--model", str(old_folder), "--data", str(kermany_mini("test")), "--bootstrap", "0"])
    first = capsys.readouterr().out.splitlines()[0]
    assert code == 0
    assert first.startswith("model: provenance: not recorded") and "threshold 0.4" in first
    text = render_card(card)
    assert "**not recorded**" in text and "## Known limits" in text and "## Adaptations" in text


def test_save_model_writes_the_card_next_to_model_json(tmp_path):
    cfg = ModelConfig(weights="none", input_size=32)
    model, _ = build_model(cfg, [], 8)
    save_model(tmp_path, model, make_card(model, cfg))
    text = (tmp_path / CARD_MARKDOWN).read_text()
    assert text.startswith("# Model card: efficientnet_lite0")
    assert read_card(tmp_path).fedfreeze_version == __version__


TRAINED = {"source": "site-train", "created_utc": "2025-01-01T00:00:00Z", "threshold": {"value": 0.4, "rule": "number"}}
ADAPTED = {"kind": "prevalence-em", "threshold": {"before": 0.4, "after": 0.35}}
RETRAINED = {"kind": "site-train --init"}  # a retraining: its own provenance sets the threshold


@pytest.mark.parametrize(
    ("threshold", "adaptations", "rule"),
    [
        (0.4, [], "(rule: number)"),
        (0.35, [ADAPTED], "(rule: number, moved by adaptation)"),
        (0.3, [], "(rule: number gave 0.4; changed since without a record)"),  # edited by hand, no adaptation
        (0.3, [ADAPTED], "(rule: number gave 0.35; changed since without a record)"),  # edited after adapting
        (0.4, [ADAPTED, RETRAINED], "(rule: number)"),  # the earlier adaptation no longer decides
        (0.35, [ADAPTED, RETRAINED], "(rule: number gave 0.4; changed since without a record)"),
    ],
)
def test_a_threshold_nobody_recorded_is_called_an_unrecorded_change(threshold, adaptations, rule):
    from fedfreeze.provenance import Provenance

    line = provenance_line(Provenance.model_validate(TRAINED), threshold, adaptations)
    assert f"threshold {threshold:.4g} {rule}" in line, line


def test_without_provenance_a_hand_edit_after_an_adaptation_still_shows():
    assert "(changed from 0.35 without a record)" in provenance_line(None, 0.3, [ADAPTED])
    assert "without a record" not in provenance_line(None, 0.35, [ADAPTED])

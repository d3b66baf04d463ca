"""site-train's model folder records its provenance and card; adapt keeps the provenance and adds
itself to the card; evaluate names what produced the model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fedfreeze.cli import main
from fedfreeze.model_card import CARD_MARKDOWN
from fedfreeze.model_io import read_card
from fedfreeze.provenance import manifest_sha256
from fedfreeze.sample_data import kermany_mini

pytestmark = pytest.mark.slow  # each test runs, or shares, a federation or a trained model

PROBE_ONLY = """
[model]
input-size = 64
[train]
probe-epochs = 3
epochs = 0
[cv]
folds = 2
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("card")
    config = root / "site.toml"
    config.write_text(PROBE_ONLY)
    out = root / "run"
    args = ["site-train", "--config", str(config), "--data", str(kermany_mini("train")), "--out", str(out), "--quiet"]
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def adapted(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adapted") / "model"
    args = ["adapt", "--model", str(trained), "--data", str(kermany_mini("test")), "--out", str(out), "--quiet"]
    assert main([*args, "--calibrate", "temperature", "--threshold-rule", "youden", "--bootstrap", "50"]) == 0
    return out


def test_site_train_records_its_provenance(trained):
    card = read_card(trained)
    p = card.provenance
    report = json.loads((trained / "metrics.json").read_text())
    assert p is not None and p.source == "site-train"
    assert p.app_hash is None and "not a federation" in p.app_hash_note
    assert p.config == report["config"]
    [site] = p.sites
    assert (site.images, site.patients) == (300, 235)  # kermany_mini/ATTRIBUTION.md
    assert site.class_counts == {"normal": 120, "pneumonia": 180}  # named by the manifest's label_name column
    assert site.manifest_sha256 == manifest_sha256(kermany_mini("train"))
    assert p.threshold.rule == "youden-oof" and p.threshold.value == card.threshold
    assert p.rounds == [] and p.metrics["cross_validation"]["summary"] == report["summary"]


def test_site_train_writes_the_card(trained):
    text = (trained / CARD_MARKDOWN).read_text()
    assert "`model: site-train, fedfreeze " in text and "not a federation, 1 site (300 images)" in text
    assert re.search(r"\| train\.csv \| training \| 300 \| 235 \| normal 120, pneumonia 180 \|", text)
    assert "0 = normal, 1 = pneumonia" in text
    assert "### Cross-validation at the site (2 folds" in text
    assert "rule `youden-oof`" in text
    assert "Trained on the Kermany et al. 2018 chest X-rays" in text  # the shipped paediatric data, by its path
    assert "Trained and cross-validated at one site" in text


def test_adapt_keeps_the_provenance_and_adds_itself_to_the_card(trained, adapted):
    before, after = read_card(trained), read_card(adapted)
    assert after.provenance == before.provenance
    [record] = after.adaptations
    assert record["kind"] == "recalibration-temperature+threshold-youden"
    text = (adapted / CARD_MARKDOWN).read_text()
    section = text.split("## Adaptations", 1)[1].split("## Known limits", 1)[0]
    assert "1. **recalibration-temperature+threshold-youden**" in section
    assert str(trained.resolve()) in section and record["source_weights_sha256"][:16] in section
    site = after.operating_points["test"]  # the site is named after test.csv
    assert after.threshold == before.threshold  # the global threshold stays; the site's own is beside it
    assert f"threshold {before.threshold:.4g} -> {site.threshold:.4g} (youden)" in section
    points = text.split("## Site operating points", 1)[1].split("## Adaptations", 1)[0]
    assert f"| test | {site.threshold:.4g} [" in points and "This folder belongs to site **test**" in points
    assert "| train.csv | training | 300 | 235 |" in text  # the training data are still listed


def test_evaluate_prints_where_the_model_came_from(trained, adapted, capsys):
    test = str(kermany_mini("test"))
    assert main(["evaluate", "--model", str(trained), "--data", test, "--bootstrap", "0"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    card = read_card(trained)
    assert first.startswith("model: site-train, fedfreeze ")
    assert f"threshold {card.threshold:.4g} (rule: youden-oof)" in first
    assert main(["evaluate", "--model", str(adapted), "--data", test, "--bootstrap", "0"]) == 0
    first, second = capsys.readouterr().out.splitlines()[:2]
    assert "(rule: youden-oof), then adapted 1x (recalibration-temperature" in first
    assert second.startswith("operating point: site 'test': threshold ")

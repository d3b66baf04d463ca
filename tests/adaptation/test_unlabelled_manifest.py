"""The manifest reader's opt-in for unlabelled images, and that everywhere else a label column stays required."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedfreeze.data.dataset import UNLABELLED, load_image_set
from fedfreeze.errors import DataError
from tests.adaptation.conftest import CLASSES, write_rows


def test_optional_labels_read_a_manifest_without_label_column(test_rows, tmp_path: Path) -> None:
    manifest = write_rows(tmp_path / "u.csv", test_rows[:6], ["path", "patient_id"])
    data = load_image_set(manifest, image_size=32, class_names=CLASSES, progress=False, labels="optional")
    assert not data.has_labels and len(data) == 6
    assert torch.equal(data.labels, torch.full((6,), UNLABELLED))
    assert data.patient_ids == [r["patient_id"] for r in test_rows[:6]]
    assert not data.subset([0, 2]).has_labels
    with pytest.raises(DataError, match="has no labels"):
        data.require_classes(2)


def test_optional_labels_still_read_and_check_a_label_column(test_rows, tmp_path: Path) -> None:
    labelled = write_rows(tmp_path / "l.csv", test_rows[48:52], ["path", "label", "patient_id"])
    data = load_image_set(labelled, image_size=32, class_names=CLASSES, progress=False, labels="optional")
    assert data.has_labels and data.labels.tolist() == [int(r["label"]) for r in test_rows[48:52]]
    bad = write_rows(tmp_path / "bad.csv", [{**test_rows[0], "label": "cat"}], ["path", "label"])
    with pytest.raises(DataError, match=r"line 2: unknown label value 'cat'"):
        load_image_set(bad, image_size=32, class_names=CLASSES, progress=False, labels="optional")


def test_without_the_opt_in_a_missing_label_column_is_still_an_error(test_rows, tmp_path: Path) -> None:
    manifest = write_rows(tmp_path / "u.csv", test_rows[:3], ["path", "patient_id"])
    with pytest.raises(DataError, match=r"line 1: missing required column\(s\) label"):
        load_image_set(manifest, image_size=32, class_names=CLASSES, progress=False)
    no_path = write_rows(tmp_path / "p.csv", test_rows[:3], ["patient_id"])
    with pytest.raises(DataError, match=r"line 1: missing required column\(s\) path"):
        load_image_set(no_path, image_size=32, class_names=CLASSES, progress=False, labels="optional")

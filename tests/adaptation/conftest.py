"""A small real model trained once per session on the shipped Kermany subset, and its test images."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from fedfreeze.config import SiteConfig, parse_config
from fedfreeze.data.dataset import ImageSet, load_image_set
from fedfreeze.model_io import make_card, save_model
from fedfreeze.reference_scores import reference_from_scores
from fedfreeze.sample_data import kermany_mini
from fedfreeze.site import new_model
from fedfreeze.training.engine import extract_features, fit, predict_scores
from tests.shipped import beside

CLASSES = ["normal", "pneumonia"]
SIZE = 96
# A probe on cached features, long enough for the scores to be roughly calibrated: EM reads
# prevalence off calibrated posteriors, and a 5-epoch probe at the default rate is not (on the
# balanced test set it estimated 0.39 instead of 0.5, and 0.04 instead of 0.21).
CONFIG = {"model": {"input-size": SIZE}, "train": {"probe-epochs": 10, "probe-lr": 3e-3, "epochs": 0}}
STORED_THRESHOLD = 0.4  # not 0.5, so that a moved threshold shows


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder: Lite0 (ImageNet weights from the package) with its head probed on kermany_mini/train."""
    cfg = parse_config(CONFIG, SiteConfig, "adaptation test config")
    data = load_image_set(kermany_mini("train"), image_size=SIZE, channels=3, class_names=CLASSES, progress=False)
    model = new_model(cfg, seed=0)
    device = torch.device("cpu")
    feats = extract_features(model, data.images, device)
    fit(model, data.images, data.labels, cfg.train, rng=np.random.default_rng(0), device=device, probe_features=feats)
    # what site-train stores (there from out-of-fold scores; here the probe's own, for speed)
    reference = reference_from_scores(
        data.labels.numpy(), predict_scores(model, data.images, device), 5, "tests: the probe's training scores"
    )
    card = make_card(
        model,
        cfg.model,
        threshold=STORED_THRESHOLD,
        class_names=CLASSES,
        trained_by="tests/adaptation",
        notes={"data": "kermany_mini/train"},
        reference_scores=reference,
    )
    return save_model(tmp_path_factory.mktemp("model") / "m", model, card)


@pytest.fixture(scope="session")
def test_rows() -> list[dict[str, str]]:
    """kermany_mini/test.csv rows (100 images of 88 patients, 50/50) with absolute paths."""
    manifest = kermany_mini("test")
    with manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [{**row, "path": str(manifest.parent / row["path"])} for row in rows]


@pytest.fixture(scope="session")
def test_set() -> ImageSet:
    return load_image_set(kermany_mini("test"), image_size=SIZE, channels=3, class_names=CLASSES, progress=False)


def write_rows(path: Path, rows: Sequence[dict[str, str]], columns: Sequence[str]) -> Path:
    """A manifest with only ``columns`` (e.g. no label column: an unlabelled site)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows([[beside(path.parent, row[c]) if c == "path" else row[c] for c in columns] for row in rows])
    return path


@pytest.fixture(scope="session")
def test_scores(model_dir: Path, test_set: ImageSet) -> np.ndarray:
    """The fixture model's scores on kermany_mini/test.csv, in the order of ``test_set``."""
    from fedfreeze.model_io import load_model, model_scores

    model, card = load_model(model_dir)
    return model_scores(model, card, test_set.images, torch.device("cpu"))

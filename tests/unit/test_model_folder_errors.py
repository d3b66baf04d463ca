"""A model folder whose weights file is corrupt, truncated or foreign: one line naming the file, exit 2."""

from __future__ import annotations

import json
import logging
import pickle
import shutil

import pytest
import torch

from fedfreeze.cli import main
from fedfreeze.config import ModelConfig
from fedfreeze.errors import CheckpointError
from fedfreeze.model_io import CARD_FILE, WEIGHTS_FILE, file_sha256, load_model, make_card, read_card, save_model
from fedfreeze.models.registry import build_model
from fedfreeze.sample_data import kermany_mini


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    cfg = ModelConfig(backbone="lwcnn", weights="none", in_channels=1, input_size=28)
    model, _ = build_model(cfg, [], 8)
    out = tmp_path_factory.mktemp("model")
    save_model(out, model, make_card(model, cfg))
    return out


def without_hash(folder):
    """The folder as fedfreeze wrote it before model.json recorded the weights' SHA-256."""
    card = json.loads((folder / CARD_FILE).read_text())
    del card["weights-sha256"]
    (folder / CARD_FILE).write_text(json.dumps(card))
    return folder


def spoil(folder, tmp_path, how: str):
    """A spoilt weights file in a folder without the hash (so the reader itself meets the bad file)."""
    copy = without_hash(shutil.copytree(folder, tmp_path / "spoilt"))
    weights = copy / WEIGHTS_FILE
    data = weights.read_bytes()
    if how == "corrupt":
        weights.write_bytes(data[:100] + bytes(64) + data[164:])
    elif how == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif how == "foreign":
        weights.write_bytes(pickle.dumps({"not": "a state dict"}))
    elif how == "list":
        torch.save([torch.zeros(2)], weights)
    return copy


@pytest.mark.parametrize("how", ["corrupt", "truncated", "foreign", "list"])
def test_a_bad_weights_file_is_one_line_naming_it(folder, tmp_path, how, capsys):
    copy = spoil(folder, tmp_path, how)
    with pytest.raises(CheckpointError, match=str(copy / WEIGHTS_FILE)):
        load_model(copy)
    code = main(["evaluate", "--model", str(copy), "--data", str(kermany_mini("test"))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("fedfreeze evaluate: error: ") and WEIGHTS_FILE in err[0]


def test_the_intact_folder_loads(folder):
    model, card = load_model(folder)
    assert card.model.backbone == "lwcnn" and sum(p.numel() for p in model.parameters()) > 0


def test_model_json_records_the_weights_hash(folder):
    assert read_card(folder).weights_sha256 == file_sha256(folder / WEIGHTS_FILE)


def test_weights_replaced_after_the_card_was_written_are_refused(folder, tmp_path, capsys):
    copy = shutil.copytree(folder, tmp_path / "replaced")
    state = torch.load(copy / WEIGHTS_FILE, weights_only=True)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, copy / WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match=r"weights\.pt does not match model\.json: its SHA-256 is [0-9a-f]{12}"):
        load_model(copy)


def test_a_folder_from_before_the_hash_loads_with_a_one_line_note(folder, tmp_path, caplog):
    copy = without_hash(shutil.copytree(folder, tmp_path / "older"))
    with caplog.at_level(logging.WARNING, logger="fedfreeze.model_io"):
        model, card = load_model(copy)
    assert card.weights_sha256 is None
    assert [r.getMessage() for r in caplog.records] == [
        f"note: {copy}/{CARD_FILE} records no weights_sha256 (written by an earlier fedfreeze): its weights are "
        "not checked"
    ]

"""A model folder whose weights file is corrupt, truncated or foreign: one line naming the file, exit 2."""

from __future__ import annotations

import pickle
import shutil

import pytest
import torch

from fedfreeze.cli import main
from fedfreeze.config import ModelConfig
from fedfreeze.errors import CheckpointError
from fedfreeze.model_io import WEIGHTS_FILE, load_model, make_card, save_model
from fedfreeze.models.registry import build_model
from fedfreeze.sample_data import kermany_mini


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    cfg = ModelConfig(backbone="lwcnn", weights="none", in_channels=1, input_size=28)
    model, _ = build_model(cfg, [], 8)
    out = tmp_path_factory.mktemp("model")
    save_model(out, model, make_card(model, cfg))
    return out


def spoil(folder, tmp_path, how: str):
    copy = tmp_path / "spoilt"
    shutil.copytree(folder, copy)
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

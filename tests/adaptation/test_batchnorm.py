"""AdaBN: every BatchNorm layer's running statistics, and nothing else, move to the site's images."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from torch.optim.swa_utils import update_bn

from fedfreeze.adaptation.batchnorm import batchnorm_layers, reestimate_all_bn
from fedfreeze.cli import main
from fedfreeze.config import ModelConfig
from fedfreeze.models.registry import build_model
from fedfreeze.training.engine import to_unit
from tests.adaptation.conftest import write_rows

RUNNING = ("running_mean", "running_var", "num_batches_tracked")


def bn_buffer_names(model: torch.nn.Module) -> set[str]:
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            names.update(f"{prefix}.{name}" for name in RUNNING)
    return names


@pytest.fixture
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    net, _ = build_model(ModelConfig(weights="none", input_size=64))
    net.eval()
    return net


@pytest.mark.slow
def test_only_running_statistics_change_and_all_layers_move(model, test_set) -> None:
    images = torch.nn.functional.interpolate(test_set.images.float(), size=64).to(torch.uint8)
    model.frozen = frozenset(list(model.groups)[:3])  # frozen groups too: every layer, whatever trains
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = reestimate_all_bn(model, images, torch.device("cpu"), batch=32)
    after = model.state_dict()
    running = bn_buffer_names(model)
    assert layers == len(batchnorm_layers(model)) > 40
    for key, value in after.items():
        if key in running:
            continue
        assert torch.equal(value, before[key]), f"{key} changed"  # bit-identical parameters and other buffers
    for key in running:
        if key.endswith("running_mean"):
            assert not torch.equal(after[key], before[key]), f"{key} did not move"
    assert not model.training and not any(m.training for m in model.modules())  # modes restored


@pytest.mark.slow
def test_matches_torch_update_bn(model, test_set) -> None:
    images = torch.nn.functional.interpolate(test_set.images.float(), size=64).to(torch.uint8)[:70]
    reference = build_model(ModelConfig(weights="none", input_size=64))[0]
    reference.load_state_dict(model.state_dict())
    reestimate_all_bn(model, images, torch.device("cpu"), batch=32)  # batches of 32, 32 and 6 images
    with torch.no_grad():
        update_bn([to_unit(images[i : i + 32], torch.device("cpu")) for i in (0, 32, 64)], reference)
    ours, theirs = model.state_dict(), reference.state_dict()
    for key in bn_buffer_names(model):
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_adapted_folder_differs_only_in_running_statistics(model_dir: Path, test_rows, tmp_path: Path) -> None:
    data = write_rows(tmp_path / "site.csv", test_rows[::2], ["path", "patient_id"])
    bn_out, keep_out = tmp_path / "bn", tmp_path / "keep"
    assert (
        main(
            [
                "adapt",
                "--model",
                str(model_dir),
                "--data",
                str(data),
                "--out",
                str(bn_out),
                "--quiet",
                "--bn",
                "reestimate",
                "--prevalence",
                "none",
                "--allow-unverified",  # this is about what the folder holds, not whether AdaBN helps
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "adapt",
                "--model",
                str(model_dir),
                "--data",
                str(data),
                "--out",
                str(keep_out),
                "--quiet",
                "--bootstrap",
                "50",
                "--allow-unverified",
            ]
        )
        == 0
    )
    source = torch.load(model_dir / "weights.pt", weights_only=True)
    adapted = torch.load(bn_out / "weights.pt", weights_only=True)
    assert source.keys() == adapted.keys()
    moved = {k for k in source if not torch.equal(source[k], adapted[k])}
    assert moved and all(k.rsplit(".", 1)[1] in RUNNING for k in moved)
    assert sum(k.endswith("running_var") for k in moved) > 40
    # --bn keep: the weights file is the source's, byte for byte
    assert sha256(keep_out / "weights.pt") == sha256(model_dir / "weights.pt")

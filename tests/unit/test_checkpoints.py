"""Pretrained checkpoint loading: the formats, and every mismatch a clear error."""

from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18, resnet50

from fedfreeze.config import ModelConfig
from fedfreeze.errors import CheckpointError, ConfigError
from fedfreeze.models.checkpoints import package_weights_path
from fedfreeze.models.registry import build_model


def save(state: dict, path: Path) -> str:
    torch.save(state, path)
    return str(path)


@pytest.fixture(scope="module")
def tv_resnet18_state():
    torch.manual_seed(1)
    return resnet18(weights=None).state_dict()


def test_torchvision_resnet18_loads_every_weight(tmp_path, tv_resnet18_state):
    path = save(tv_resnet18_state, tmp_path / "r18.pth")
    model, fmt = build_model(ModelConfig(backbone="resnet18", weights=path))
    assert fmt == "torchvision"
    state = model.state_dict()
    assert torch.equal(state["groups.stem.conv1.weight"], tv_resnet18_state["conv1.weight"])
    assert torch.equal(state["groups.layer4.1.bn2.running_var"], tv_resnet18_state["layer4.1.bn2.running_var"])
    assert state["head.fc.weight"].shape == (1, 512)  # the 1000-class fc was dropped


def test_grey_input_sums_the_rgb_stem(tmp_path, tv_resnet18_state):
    path = save(tv_resnet18_state, tmp_path / "r18.pth")
    model, _ = build_model(ModelConfig(backbone="resnet18", weights=path, in_channels=1))
    expected = tv_resnet18_state["conv1.weight"].sum(dim=1, keepdim=True)
    assert torch.allclose(model.state_dict()["groups.stem.conv1.weight"], expected)


def test_torchxrayvision_resnet50_one_channel_18_outputs(tmp_path):
    torch.manual_seed(2)
    net = resnet50(weights=None, num_classes=18)
    net.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    inner = net.state_dict()
    for name, state in {"bare": inner, "wrapped": {f"model.{k}": v for k, v in inner.items()}}.items():
        path = save(state, tmp_path / f"xrv-{name}.pth")
        model, fmt = build_model(ModelConfig(backbone="resnet50", weights=path, in_channels=1))
        assert fmt == "torchxrayvision"
        assert torch.equal(model.state_dict()["groups.layer3.5.conv3.weight"], inner["layer3.5.conv3.weight"])
        # torchxrayvision inputs live in [-1024, 1024]
        assert model.normalize(torch.ones(1, 1, 1, 1)).item() == pytest.approx(1024.0)


def test_missing_key_is_named(tmp_path, tv_resnet18_state):
    state = dict(tv_resnet18_state)
    del state["layer2.0.bn1.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys groups\.layer2\.0\.bn1\.weight"):
        build_model(ModelConfig(backbone="resnet18", weights=save(state, tmp_path / "m.pth")))


def test_unexpected_key_is_named(tmp_path, tv_resnet18_state):
    state = dict(tv_resnet18_state)
    state["layer9.0.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unexpected keys in the torchvision checkpoint: layer9\.0\.weight"):
        build_model(ModelConfig(backbone="resnet18", weights=save(state, tmp_path / "u.pth")))


def test_wrong_shape_is_named(tmp_path, tv_resnet18_state):
    state = dict(tv_resnet18_state)
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    with pytest.raises(
        CheckpointError,
        match=r"groups\.layer1\.0\.conv1\.weight: checkpoint \(64, 64, 1, 1\) vs model \(64, 64, 3, 3\)",
    ):
        build_model(ModelConfig(backbone="resnet18", weights=save(state, tmp_path / "s.pth")))


def test_resnet50_weights_into_resnet18_fail_clearly(tmp_path):
    state = resnet50(weights=None).state_dict()
    with pytest.raises(CheckpointError, match="unexpected keys|shapes do not match"):
        build_model(ModelConfig(backbone="resnet18", weights=save(state, tmp_path / "r50.pth")))


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read as a torch state dict"):
        build_model(ModelConfig(backbone="resnet18", weights=str(path)))
    with pytest.raises(CheckpointError, match="does not exist"):
        build_model(ModelConfig(backbone="resnet18", weights=str(tmp_path / "nope.pth")))


def test_package_weights_only_for_lite0():
    with pytest.raises(ConfigError, match="'package' weights exist only for efficientnet_lite0"):
        build_model(ModelConfig(backbone="resnet50", weights="package"))


def test_lite0_package_weights_load_strictly():
    shipped = torch.load(package_weights_path(), map_location="cpu", weights_only=True)
    model, fmt = build_model(ModelConfig())
    assert fmt == "efficientnet-lite0"
    state = model.state_dict()
    assert torch.equal(state["groups.stem.0._conv_stem.weight"], shipped["_conv_stem.weight"])
    assert torch.equal(state["groups.layer4.5._conv_head.weight"], shipped["_conv_head.weight"])
    assert torch.equal(state["groups.layer3.5._depthwise_conv.weight"], shipped["_blocks.10._depthwise_conv.weight"])
    backbone_keys = [k for k in state if k.startswith("groups.")]
    assert len(backbone_keys) == len([k for k in shipped if not k.startswith("_fc.")])

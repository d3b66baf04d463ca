"""Lean autograd: frozen layers keep no activations, gradients are PyTorch's, memory measured lower, 8-bit storage."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch
from torch import nn

from fedfreeze.config import ModelConfig, TrainConfig
from fedfreeze.models.registry import build_model
from fedfreeze.training.engine import train_phase
from fedfreeze.training.freezing import apply_parts
from fedfreeze.training.saved_activations import (
    LeanActivations,
    SavedTensorMeter,
    dequantize,
    pack_bits,
    quantize,
    unpack_bits,
)

LR = {"head": 1e-3, "layer4": 1e-3, "layer3": 1e-3, "layer2": 1e-3, "layer1": 1e-3, "stem": 1e-3}


def saved_bytes(module: nn.Module, x: torch.Tensor, lean: str | None) -> int:
    """Peak bytes autograd keeps for one forward pass (parameters excluded)."""
    with SavedTensorMeter(module.parameters()) as meter:
        with LeanActivations(lean) if lean else contextlib.nullcontext():
            module(x)
    return meter.peak


def test_frozen_conv_and_batchnorm_keep_nothing_that_pytorch_keeps():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)).eval()
    layer.requires_grad_(False)
    x = torch.randn(2, 8, 16, 16).requires_grad_()
    h = x * 1.0  # an activation inside a network: it needs a gradient, the layer's weights do not
    activation = h.numel() * 4
    per_channel = 8 * 4  # the BatchNorm's scale
    # PyTorch keeps the conv's and the BatchNorm's input (and the BatchNorm's running statistics)
    assert saved_bytes(layer, h, None) == 2 * activation + 2 * per_channel
    assert saved_bytes(layer, h, "fp32") == per_channel
    layer[0].weight.requires_grad_(True)  # a trainable conv keeps its input, in the chosen storage
    assert saved_bytes(layer, h, "fp32") == activation + per_channel
    assert saved_bytes(layer, h, "int8-tensor") == h.numel() + 2 * 4 + per_channel  # codes, minimum, step
    assert saved_bytes(layer, h, "int8-channel") == h.numel() + 2 * per_channel + per_channel
    layer[0].weight.requires_grad_(False)
    layer[1].weight.requires_grad_(True)  # a trainable BatchNorm keeps its input and its statistics
    assert saved_bytes(layer, h, "fp32") == activation + 3 * per_channel


def test_relu_and_max_pooling_keep_a_bit_and_a_byte():
    x = torch.randn(2, 8, 16, 16).requires_grad_()
    h = x * 1.0
    assert saved_bytes(nn.ReLU(), h, None) == h.numel() * 4
    assert saved_bytes(nn.ReLU(), h, "fp32") == h.numel() // 8
    pool = nn.MaxPool2d(3, 2, 1)
    assert saved_bytes(pool, h, None) == h.numel() * 4 + (h.numel() // 4) * 8  # input and int64 indices
    assert saved_bytes(pool, h, "fp32") == h.numel() // 4  # one byte per output


def mixed_freezing(model: nn.Module) -> None:
    apply_parts(model, set(model.parts))
    for i, (name, param) in enumerate(model.named_parameters()):
        if i % 3 == 1 and not name.startswith("head"):
            param.requires_grad_(False)
    model.update_bn_stats = False
    model.train()


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
def test_lean_forward_is_identical_and_gradients_match_pytorch(backbone):
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(backbone=backbone, weights="none", input_size=40), ["layer4"], 4)
    with torch.no_grad():  # adapters start at zero: give them a value so their gradients flow everywhere
        for adapter in model.adapters["layer4"].blocks:
            adapter.up.weight.normal_(0, 0.01)
    mixed_freezing(model)
    x = torch.rand(3, 3, 40, 40).contiguous(memory_format=torch.channels_last)

    def run(storage: str | None):
        m = copy.deepcopy(model)
        torch.manual_seed(1)  # the head's dropout
        with LeanActivations(storage) if storage else contextlib.nullcontext():
            out = m(x)
        out.square().sum().backward()
        return out.detach(), {k: p.grad for k, p in m.named_parameters() if p.grad is not None}

    out_torch, grads_torch = run(None)
    out_lean, grads_lean = run("fp32")
    assert torch.equal(out_torch, out_lean)
    assert grads_torch.keys() == grads_lean.keys() and len(grads_torch) > 10
    for key, grad in grads_torch.items():
        torch.testing.assert_close(grads_lean[key], grad, rtol=1e-4, atol=1e-6 * grad.abs().max().item(), msg=key)
    _, grads_int8 = run("int8-channel")  # 8 bits change weight gradients a little, not input gradients
    worst = max(((grads_int8[k] - g).norm() / g.norm()).item() for k, g in grads_torch.items() if g.norm() > 0)
    assert 0 < worst < 0.05


def test_training_memory_is_measured_lower_with_dynamic_freezing():
    """Peak bytes held for backward during a whole phase (every group trainable), measured.

    BatchNorm statistics stay frozen, as for any pretrained backbone: a BatchNorm layer in training mode must keep
    its input for backward whatever is frozen, so that saving is not what dynamic freezing can remove."""
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1] * 8)
    peaks = {}
    for arm, extra in {
        "full": {},
        "dynamic": {"freezing": "dynamic"},
        "dynamic-int8": {"freezing": "dynamic", "activation_storage": "int8-channel"},
    }.items():
        torch.manual_seed(0)
        model, _ = build_model(ModelConfig(weights="none", input_size=32))
        cfg = TrainConfig(batch_size=8, cutmix_prob=0.0, augment=False, lr=LR, bn_stats="frozen", **extra)
        with SavedTensorMeter(model.parameters()) as meter:
            train_phase(
                model,
                images,
                labels,
                frozenset(model.parts),
                cfg,
                epochs=1,
                rng=np.random.default_rng(0),
                device=torch.device("cpu"),
            )
        peaks[arm] = meter.peak
    assert peaks["dynamic"] * 4 < peaks["full"]
    assert peaks["dynamic-int8"] < peaks["dynamic"] * 0.7


@pytest.mark.parametrize("per_channel", [False, True])
def test_8bit_storage_round_trip_error_is_at_most_half_a_step(per_channel):
    gen = torch.Generator().manual_seed(0)
    scales = torch.logspace(-3, 2, 16).view(1, 16, 1, 1)  # channels of very different ranges
    x = (torch.randn(4, 16, 9, 9, generator=gen) * scales + scales).contiguous(memory_format=torch.channels_last)
    codes, lo, step = quantize(x, per_channel)
    assert codes.dtype == torch.uint8 and codes.is_contiguous(memory_format=torch.channels_last)
    assert step.numel() == (16 if per_channel else 1)
    back = dequantize(codes, lo, step)
    error = (back - x).abs()
    assert bool((error <= step / 2 * (1 + 1e-4) + 1e-6 * x.abs()).all())
    assert error.max() > 0.2 * step.min()  # the bound is not vacuous
    if per_channel:  # per-channel steps follow each channel's range: small channels stay precise
        assert error[:, 0].max() < 1e-4
    constant = torch.full((2, 3, 4, 4), 1.5)
    assert torch.equal(dequantize(*quantize(constant, per_channel)), constant)


def test_bit_packed_masks_round_trip_in_any_memory_layout():
    gen = torch.Generator().manual_seed(0)
    mask = (torch.rand(3, 5, 7, 11, generator=gen) > 0.5).contiguous(memory_format=torch.channels_last)
    packed, order = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    back = unpack_bits(packed, mask.shape, order)
    assert torch.equal(back, mask) and back.stride() == mask.stride()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation", "ceil_mode"),
    [(3, 2, 1, 1, False), (2, 2, 0, 1, True), (3, 1, 1, 2, False)],
)
def test_max_pooling_gradient_matches_pytorch(channels_last, kernel, stride, padding, dilation, ceil_mode):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 13, 11, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    pool = nn.MaxPool2d(kernel, stride, padding, dilation, ceil_mode=ceil_mode)
    weights = torch.randn(pool(x).shape, generator=gen)
    grads = []
    for lean in (None, "fp32"):
        leaf = x.clone().requires_grad_()
        with LeanActivations(lean) if lean else contextlib.nullcontext():
            out = pool(leaf * 1.0)
        (out * weights).sum().backward()
        grads.append((out.detach(), leaf.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[1][1], grads[0][1])

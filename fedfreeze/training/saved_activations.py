"""What a training step keeps for its backward pass, kept as small as the gradients allow.

PyTorch's own autograd keeps the input of every convolution and BatchNorm whose output needs a
gradient, even when the layer's weight is frozen: the input is needed only for the weight's
gradient, but one derivative formula covers input and weight. In a CNN whose frozen layers sit
between trainable ones (dynamic freezing, adapters) that is most of the training memory.

While ``LeanActivations`` (a ``TorchFunctionMode``) is active, these calls run through custom
autograd functions that keep only what their backward needs:

================  ========================================  ================================
call              frozen weight (only the input's gradient)  trainable weight (also keeps)
================  ========================================  ================================
conv2d, linear    nothing (the weight is a parameter)        its input: fp32 or 8 bits
BatchNorm, eval   nothing (per-channel scale)                its input: fp32 or 8 bits
ReLU, ReLU6       1 bit per element (where it passed)
max pooling       1 byte per output (argmax in the window)
global avg pool   nothing (the shape)
================  ========================================  ================================

Forward outputs come from the same ATen kernels as without the mode (bit-identical); the
convolution backward is ATen's ``convolution_backward``, asked only for the gradients needed.
BatchNorm with batch statistics (``bn-stats = "update"`` in a trainable group) is left to PyTorch:
its input gradient needs the normalised input whatever the weight does.

*8-bit storage* keeps a trainable layer's input as affine ``uint8`` codes with a per-tensor or
per-channel minimum and step; it is decoded for the weight gradient only (round-to-nearest, so
each element is off by at most half a step).

``SavedTensorMeter`` measures what autograd holds: the bytes of distinct storages saved for
backward and still alive, parameters excluded, and their peak.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode

Storage = Literal["fp32", "int8-tensor", "int8-channel"]
STORAGES: tuple[str, ...] = ("fp32", "int8-tensor", "int8-channel")
UINT8_LEVELS = 255

# weight, input, output of every conv / linear / BatchNorm call (for memory planning)
LayerObserver = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


# ---------------------------------------------------------------------- 8-bit storage
def quantize(x: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Affine ``uint8`` codes of ``x`` and the ``(minimum, step)`` that decode them.

    ``per_channel`` takes one minimum and step per channel (dimension 1), otherwise one for the
    whole tensor. Decoding ``codes * step + minimum`` is within ``step / 2`` of every element.
    """
    x = x.detach()
    if per_channel and x.dim() >= 2:
        dims = [d for d in range(x.dim()) if d != 1]
        lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    else:
        lo = x.amin().reshape([1] * x.dim())
        hi = x.amax().reshape([1] * x.dim())
    step = ((hi - lo) / UINT8_LEVELS).clamp_min(torch.finfo(x.dtype).tiny)
    codes = (x - lo).div_(step).round_().clamp_(0, UINT8_LEVELS).to(torch.uint8)
    return codes, lo, step


def dequantize(codes: torch.Tensor, lo: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Inverse of ``quantize`` (up to half a step per element), in the codes' memory format."""
    return codes.to(lo.dtype).mul_(step).add_(lo)


def _pack_input(x: torch.Tensor, storage: str) -> tuple[torch.Tensor, ...]:
    if storage == "fp32":
        return (x,)
    return quantize(x, per_channel=storage == "int8-channel")


def _unpack_input(saved: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return saved[0] if len(saved) == 1 else dequantize(*saved)


# ---------------------------------------------------------------------- 1-bit masks
_BIT_VALUES = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def _memory_order(t: torch.Tensor) -> list[int]:
    """Dimensions from outermost to innermost in memory (channels-last tensors included)."""
    return sorted(range(t.dim()), key=lambda d: (-t.stride()[d], d))


def pack_bits(mask: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """A boolean tensor as 8 elements per byte, in memory order, and the dimension order used."""
    order = _memory_order(mask)
    flat = mask.permute(order).reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = flat.view(-1, 8).view(torch.uint8)
    return (bits * _BIT_VALUES.to(bits.device)).sum(1, dtype=torch.uint8), order


def unpack_bits(packed: torch.Tensor, shape: torch.Size, order: list[int]) -> torch.Tensor:
    """Inverse of ``pack_bits``: the boolean tensor with its original shape and strides."""
    numel = 1
    for size in shape:
        numel *= size
    flat = packed.unsqueeze(1).bitwise_and(_BIT_VALUES.to(packed.device)).ne_(0).view(-1)[:numel]
    permuted = flat.view([shape[d] for d in order])
    inverse = [order.index(d) for d in range(len(order))]
    return permuted.permute(inverse)


# ---------------------------------------------------------------------- autograd functions
class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        groups: int,
        storage: str,
    ) -> torch.Tensor:
        out = torch.conv2d(x, weight, bias, stride, padding, dilation, groups)
        keep = _pack_input(x, storage) if weight.requires_grad else ()
        ctx.save_for_backward(weight, *keep)
        ctx.conf = (stride, padding, dilation, groups, x.shape, None if bias is None else [bias.shape[0]])
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weight, *keep = ctx.saved_tensors
        stride, padding, dilation, groups, x_shape, bias_sizes = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        # without a kept input, a zero-stride placeholder gives the shape (torch.nn.grad does the same)
        x = _unpack_input(tuple(keep)) if keep else grad.new_empty(1).expand(x_shape)
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad,
            x,
            weight,
            bias_sizes,
            list(stride),
            list(padding),
            list(dilation),
            False,
            [0, 0],
            groups,
            [need_x, need_w and bool(keep), need_b],
        )
        return gx, gw, gb, None, None, None, None, None


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, storage: str
    ) -> torch.Tensor:
        out = F.linear(x, weight, bias)
        keep = _pack_input(x, storage) if weight.requires_grad else ()
        ctx.save_for_backward(weight, *keep)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weight, *keep = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        flat = grad.reshape(-1, grad.shape[-1])
        gx = grad.matmul(weight) if need_x else None
        gw = None
        if need_w and keep:
            x = _unpack_input(tuple(keep))
            gw = flat.t().matmul(x.reshape(-1, x.shape[-1]))
        gb = flat.sum(0) if need_b else None
        return gx, gw, gb, None


class _BatchNormEval(torch.autograd.Function):
    """BatchNorm normalising with its running statistics: an affine map per channel."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
        storage: str,
    ) -> torch.Tensor:
        out = torch.batch_norm(
            x, weight, bias, running_mean, running_var, False, 0.0, eps, torch.backends.cudnn.enabled
        )
        invstd = (running_var.detach() + eps).rsqrt()
        scale = invstd if weight is None else invstd * weight.detach()
        if weight is not None and weight.requires_grad:  # its gradient needs the normalised input
            ctx.save_for_backward(scale, running_mean.detach().clone(), invstd, *_pack_input(x, storage))
        else:
            ctx.save_for_backward(scale)
        ctx.shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        ctx.dims = [d for d in range(x.dim()) if d != 1]
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        scale, *kept = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        gx = grad * scale.view(ctx.shape) if need_x else None
        gw = None
        if need_w and kept:
            mean, invstd, *keep = kept
            x_hat = _unpack_input(tuple(keep)).sub(mean.view(ctx.shape)).mul_(invstd.view(ctx.shape))
            gw = x_hat.mul_(grad).sum(ctx.dims)
        gb = grad.sum(ctx.dims) if need_b else None
        return gx, None, None, gw, gb, None, None


class _Clamp(torch.autograd.Function):
    """ReLU / ReLU6 / hardtanh: the gradient passes where the output is strictly inside (lo, hi)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, fn: Callable[..., torch.Tensor], lo: float, hi: float | None, inplace: bool
    ) -> torch.Tensor:
        out = fn(x)
        if inplace:
            ctx.mark_dirty(x)
        passed = out > lo
        if hi is not None:
            passed &= out < hi
        packed, order = pack_bits(passed)
        ctx.save_for_backward(packed)
        ctx.meta = (out.shape, order)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (packed,) = ctx.saved_tensors
        passed = unpack_bits(packed, *ctx.meta)
        return grad * passed, None, None, None, None


class _MaxPool2d(torch.autograd.Function):
    """Max pooling that keeps, per output, the position of the maximum inside its window (1 byte).

    Index arithmetic runs in place on the one int64 tensor the pooling returns, so the transient
    memory stays at two output-sized int64 tensors.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        kernel: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        ceil_mode: bool,
    ) -> torch.Tensor:
        out, index = torch.ops.aten.max_pool2d_with_indices(x, kernel, stride, padding, dilation, ceil_mode)
        rows, cols = _window_origins(out.shape, stride, padding, x.device)
        width = x.shape[-1]
        col = index.remainder(width).sub_(cols).div_(dilation[1], rounding_mode="floor")
        offset = index.div_(width, rounding_mode="floor").sub_(rows).div_(dilation[0], rounding_mode="floor")
        offset = offset.mul_(kernel[1]).add_(col).to(torch.uint8)
        ctx.save_for_backward(offset)
        ctx.conf = (x.shape, kernel, stride, padding, dilation, _is_channels_last(x))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (offset,) = ctx.saved_tensors
        (n, c, height, width), kernel, stride, padding, dilation, channels_last = ctx.conf
        rows, cols = _window_origins(grad.shape, stride, padding, grad.device)
        index = offset.to(torch.int64)
        col = index.remainder(kernel[1]).mul_(dilation[1]).add_(cols)
        index = index.div_(kernel[1], rounding_mode="floor").mul_(dilation[0]).add_(rows).mul_(width).add_(col)
        del col
        if channels_last:  # scatter in (n, h * w, c) order: the gradient keeps the input's layout
            gx = grad.new_zeros(n, height * width, c)
            gx.scatter_add_(1, index.permute(0, 2, 3, 1).reshape(n, -1, c), grad.permute(0, 2, 3, 1).reshape(n, -1, c))
            return gx.view(n, height, width, c).permute(0, 3, 1, 2), None, None, None, None, None
        gx = grad.new_zeros(n, c, height * width)
        gx.scatter_add_(2, index.reshape(n, c, -1), grad.reshape(n, c, -1))
        return gx.view(n, c, height, width), None, None, None, None, None


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _window_origins(
    out_shape: torch.Size, stride: tuple[int, int], padding: tuple[int, int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top row and left column of every output's pooling window in the input."""
    rows = torch.arange(out_shape[-2], device=device).view(-1, 1) * stride[0] - padding[0]
    cols = torch.arange(out_shape[-1], device=device).view(1, -1) * stride[1] - padding[1]
    return rows, cols


class _GlobalAvgPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.shape = x.shape
        return F.adaptive_avg_pool2d(x, 1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        area = ctx.shape[-1] * ctx.shape[-2]
        return (grad / area).expand(ctx.shape)


# ---------------------------------------------------------------------- the mode
def _needs_graph(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class LeanActivations(TorchFunctionMode):
    """Run conv, linear, BatchNorm (running statistics), ReLU/ReLU6, max and global average pooling
    through autograd functions that keep only what backward needs (see the module docstring).

    ``storage`` is how a trainable layer keeps its input: ``"fp32"``, or 8-bit codes with one
    scale per tensor (``"int8-tensor"``) or per channel (``"int8-channel"``). ``observer`` is called
    with ``(weight, input, output)`` of every conv / linear / BatchNorm call (memory planning).
    """

    def __init__(self, storage: str = "fp32", observer: LayerObserver | None = None) -> None:
        super().__init__()
        if storage not in STORAGES:
            raise ValueError(f"activation storage should be one of {STORAGES}, got {storage!r}")
        self.storage = storage
        self.observer = observer

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is None:
            return func(*args, **kwargs)
        return handler(self, func, *args, **kwargs)

    def _observe(self, weight: torch.Tensor | None, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.observer is not None and weight is not None:
            self.observer(weight, x, out)
        return out

    # handlers: same signatures as the functions they stand in for
    def _conv2d(
        self,
        func: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
    ) -> torch.Tensor:
        if isinstance(padding, str) or not _needs_graph(x, weight, bias):
            return self._observe(weight, x, func(x, weight, bias, stride, padding, dilation, groups))
        out = _Conv2d.apply(x, weight, bias, _pair(stride), _pair(padding), _pair(dilation), groups, self.storage)
        return self._observe(weight, x, out)

    def _linear(
        self, func: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not _needs_graph(x, weight, bias):
            return self._observe(weight, x, func(x, weight, bias))
        return self._observe(weight, x, _Linear.apply(x, weight, bias, self.storage))

    def _batch_norm(
        self,
        func: Any,
        x: torch.Tensor,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        training: bool = False,
        momentum: float = 0.1,
        eps: float = 1e-5,
    ) -> torch.Tensor:
        plain = training or running_mean is None or running_var is None or not _needs_graph(x, weight, bias)
        if plain:
            out = func(
                x, running_mean, running_var, weight=weight, bias=bias, training=training, momentum=momentum, eps=eps
            )
        else:
            out = _BatchNormEval.apply(x, running_mean, running_var, weight, bias, eps, self.storage)
        return self._observe(weight, x, out)

    def _relu(self, func: Any, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        if not _needs_graph(x):
            return func(x, inplace=inplace)
        fn = torch.relu_ if inplace else torch.relu
        return _Clamp.apply(x, fn, 0.0, None, inplace)

    def _relu_call(self, func: Any, x: torch.Tensor) -> torch.Tensor:  # torch.relu(x), x.relu_() ...
        if not _needs_graph(x):
            return func(x)
        inplace = func in (torch.relu_, torch.Tensor.relu_)
        return _Clamp.apply(x, torch.relu_ if inplace else torch.relu, 0.0, None, inplace)

    def _relu6(self, func: Any, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        return self._hardtanh(F.hardtanh, x, 0.0, 6.0, inplace)

    def _hardtanh(
        self, func: Any, x: torch.Tensor, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False
    ) -> torch.Tensor:
        if not _needs_graph(x) or min_val > max_val:
            return func(x, min_val, max_val, inplace)
        op = torch._C._nn.hardtanh_ if inplace else torch._C._nn.hardtanh

        def fn(t: torch.Tensor) -> torch.Tensor:
            return op(t, min_val, max_val)

        return _Clamp.apply(x, fn, min_val, max_val, inplace)

    def _max_pool2d(
        self,
        func: Any,
        x: torch.Tensor,
        kernel_size: Any,
        stride: Any = None,
        padding: Any = 0,
        dilation: Any = 1,
        ceil_mode: bool = False,
        return_indices: bool = False,
    ) -> Any:
        kernel = _pair(kernel_size)
        if return_indices or not _needs_graph(x) or x.dim() != 4 or kernel[0] * kernel[1] > 256:
            return func(x, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=return_indices)
        stride = kernel if stride is None or stride == [] else _pair(stride)
        return _MaxPool2d.apply(x, kernel, stride, _pair(padding), _pair(dilation), ceil_mode)

    def _adaptive_avg_pool2d(self, func: Any, x: torch.Tensor, output_size: Any) -> torch.Tensor:
        if _pair(output_size) != (1, 1) or not _needs_graph(x) or x.dim() != 4:
            return func(x, output_size)
        return _GlobalAvgPool.apply(x)


_HANDLERS: dict[Any, Callable[..., Any]] = {
    torch.conv2d: LeanActivations._conv2d,
    F.linear: LeanActivations._linear,
    F.batch_norm: LeanActivations._batch_norm,
    F.relu: LeanActivations._relu,
    torch.relu: LeanActivations._relu_call,
    torch.relu_: LeanActivations._relu_call,
    torch.Tensor.relu: LeanActivations._relu_call,
    torch.Tensor.relu_: LeanActivations._relu_call,
    F.relu6: LeanActivations._relu6,
    F.hardtanh: LeanActivations._hardtanh,
    F.max_pool2d: LeanActivations._max_pool2d,
    F.adaptive_avg_pool2d: LeanActivations._adaptive_avg_pool2d,
}


# ---------------------------------------------------------------------- measuring
@contextlib.contextmanager
def untouched(model: torch.nn.Module) -> Iterator[None]:
    """Restore RNG, buffers (BatchNorm statistics), gradients and ``requires_grad`` after a measuring pass."""
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    devices = sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for key, value in model.named_buffers():
                    value.copy_(buffers[key])
            for key, param in model.named_parameters():
                param.requires_grad_(flags[key])
                param.grad = None


def layer_inputs(model: torch.nn.Module, example: torch.Tensor) -> tuple[dict[int, float], float]:
    """Input elements per image of every conv / linear / BatchNorm call, keyed by ``id`` of the weight
    in the order of the calls, and the largest activation in bytes per image: one forward pass of
    ``example`` without autograd, leaving the model as it was."""
    inputs: dict[int, float] = {}
    largest = 0.0

    def observe(weight: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> None:
        nonlocal largest
        inputs[id(weight)] = inputs.get(id(weight), 0.0) + x.numel() / len(example)
        largest = max(largest, x.numel() * x.element_size(), out.numel() * out.element_size())

    with untouched(model), torch.no_grad(), LeanActivations("fp32", observe):
        model(example)
    return inputs, largest / len(example)


class SavedTensorMeter:
    """Bytes autograd holds for backward: distinct storages saved and still alive, parameters excluded.

    Use as a context manager around forward passes; ``peak`` is the largest total seen, ``current``
    what is alive now. A storage saved by several operations counts once.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._refs: dict[int, int] = {}
        self._sizes: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    def reset_peak(self) -> None:
        self.peak = self.current

    def _pack(self, t: torch.Tensor) -> Any:
        ptr = t.untyped_storage().data_ptr()
        if ptr in self._excluded:
            return t
        return _Held(self, t, ptr)

    @staticmethod
    def _unpack(held: Any) -> torch.Tensor:
        return held.tensor if isinstance(held, _Held) else held

    def _add(self, ptr: int, nbytes: int) -> None:
        count = self._refs.get(ptr, 0)
        self._refs[ptr] = count + 1
        if count == 0:
            self._sizes[ptr] = nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)

    def _remove(self, ptr: int) -> None:
        count = self._refs.pop(ptr) - 1
        if count:
            self._refs[ptr] = count
        else:
            self.current -= self._sizes.pop(ptr)


class _Held:
    """A saved tensor that tells its meter when autograd lets go of it."""

    __slots__ = ("meter", "tensor", "ptr")

    def __init__(self, meter: SavedTensorMeter, tensor: torch.Tensor, ptr: int) -> None:
        self.meter, self.tensor, self.ptr = meter, tensor, ptr
        meter._add(ptr, tensor.untyped_storage().nbytes())

    def __del__(self) -> None:
        self.meter._remove(self.ptr)

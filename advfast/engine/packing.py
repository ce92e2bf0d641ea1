"""Convolution weights laid out for oneDNN once per attack call, on the CPU (``pack_weights``).

Eager PyTorch hands oneDNN each convolution weight in its plain layout, and oneDNN lays it out
again (a reorder) on every call, forward and backward: on one CPU thread that is a fixed cost
per call of the model, the same at every batch size (ResNet-18 at 3x32x32: ~40 % of a call at
batch 16; bench/batch_cost.py --onednn).  An attack's weights never change, so
:func:`weights_packed` replaces, for the duration of a call, the forward of each plain
``nn.Conv2d`` with one that uses two layouts made once from the weight: one for the forward
convolution and one for the input gradient, which is the transposed convolution of the output
gradient with the same weight (``mkldnn._convolution_transpose_pointwise``).  Only the input
gradient exists: the weights are frozen (:func:`advfast.engine.core.frozen`).

Where a convolution has one output position for its input (:func:`single_window`: ResNet's
last stage on 32x32 images, where a 3x3 kernel meets a 1x1 or 2x2 map) the taps outside the
input read only zero padding, and the convolution is one matrix product of the window its
other taps read (no pack): oneDNN would run all nine taps and stream the weight once per
image there (ResNet-18 at 3x32x32, batch 16, bf16: 3.5 ms for one 512x512 3x3 convolution,
0.15 ms for the product; ONEDNN_VERBOSE shows both).

The maths is the same convolution; the rounding is oneDNN's packed kernels' instead of eager
PyTorch's choice (which is not oneDNN at every shape), so results agree with the plain model to
float32 rounding, not bit for bit (tests/test_packed_weights.py: within 1e-5 of float64 truth).
Under bf16 autocast the packs hold the weights in bfloat16 and the input is cast as autocast
would cast it, on CPUs where oneDNN has bf16 convolutions (:func:`bf16_packs_supported`);
elsewhere bf16 convolutions run the plain way.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from advfast.engine.rows import memory_format_of
from advfast.errors import InvalidValue

_mkldnn = torch.ops.mkldnn
PACKED_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def bf16_packs_supported() -> bool:
    """Whether oneDNN lays out and runs bf16 convolution weights on this CPU (AVX-512 BW, VL
    and DQ, or AVX-NE-CONVERT; torch's own test): elsewhere its reorder refuses bf16 (an
    AVX2-only AMD EPYC), and bf16 itself runs emulated."""
    return bool(_mkldnn._is_mkldnn_bf16_supported())


def check_packable(device: torch.device, amp: str | None, compile: str | None) -> None:
    """One-line InvalidValue where ``pack_weights`` cannot apply: it is for eager calls of a
    model on the CPU with oneDNN, in float32 or under bf16 autocast where oneDNN has bf16
    convolutions."""
    if device.type != "cpu":
        raise InvalidValue(f"pack_weights is for models on the CPU (oneDNN), this one is on "
                           f"{device.type}")
    if not torch.backends.mkldnn.is_available():
        raise InvalidValue("pack_weights needs PyTorch built with oneDNN (mkldnn); this one "
                           "is not")
    if compile is not None:
        raise InvalidValue("pack_weights is for eager calls; with compile, inductor lays the "
                           "weights out itself")
    if amp not in (None, "bf16"):
        raise InvalidValue(f"pack_weights runs in float32 or bf16, not under amp={amp!r}")
    if amp == "bf16" and not bf16_packs_supported():
        raise InvalidValue("pack_weights under bf16 needs oneDNN's bf16 convolutions (a CPU "
                           "with AVX-512 BW/VL/DQ or AVX-NE-CONVERT), which this CPU lacks: "
                           "pack in float32, or run bf16 unpacked")


class _PackedConvolution(torch.autograd.Function):
    """y = conv2d(x, W) + b with W in its forward pack; dL/dx = conv_transpose2d(dL/dy, W) with
    W in its transposed pack and the output padding that gives back x's size."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pack: _Layouts) -> torch.Tensor:  # type: ignore[override]
        ctx.pack, ctx.input_size = pack, x.shape[2:]
        conv = pack.conv
        return _mkldnn._convolution_pointwise(x, pack.forward_weight(x), pack.bias,
                                              conv.padding, conv.stride, conv.dilation,
                                              conv.groups, "none", [], "")

    @staticmethod
    @torch.autograd.function.once_differentiable  # oneDNN's ops have no derivative: say so
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        pack, conv = ctx.pack, ctx.pack.conv
        padding = output_padding(conv, ctx.input_size, grad.shape[2:])
        weight = pack.transposed_weight(grad, padding)
        grad = grad.contiguous(memory_format=memory_format_of(grad))
        x_grad = _mkldnn._convolution_transpose_pointwise(
            grad, weight, None, conv.padding, padding, conv.stride, conv.dilation, conv.groups,
            "none", [], "")
        return x_grad, None


def output_padding(conv: nn.Conv2d, input_size: torch.Size,
                   output_size: torch.Size) -> list[int]:
    """The transposed convolution's output padding that maps ``output_size`` back to
    ``input_size`` (a strided convolution drops the last rows that no window reaches)."""
    return [input_size[i] - ((output_size[i] - 1) * conv.stride[i] - 2 * conv.padding[i]
                             + conv.dilation[i] * (conv.kernel_size[i] - 1) + 1)
            for i in range(2)]


def single_window(conv: nn.Conv2d, size: torch.Size) -> tuple[int, int] | None:
    """(rows, columns) of the input window that the convolution's one output position reads,
    where it has one and the window is the input's first rows and columns (no groups, no
    dilation, padding under the kernel): ResNet's last stage on 32x32 images, a 3x3 kernel
    on a 1x1 or 2x2 input.  The kernel's other taps read only padding, so there the
    convolution is a linear map of that window, taps [p, p + rows) x [q, q + columns)."""
    if conv.groups != 1 or tuple(conv.dilation) != (1, 1):
        return None
    window = []
    for i in range(2):
        k, s, p, n = conv.kernel_size[i], conv.stride[i], conv.padding[i], size[i]
        if not 0 <= n + 2 * p - k < s or p >= k:  # not one output position, or no tap inside
            return None
        window.append(min(n, k - p))
    return window[0], window[1]


class _Layouts:
    """One convolution's two weight layouts in one dtype, made at their first use from the
    shapes seen there, its matrices for the windows met (window_map), and its bias in that
    dtype: autocast's casts, made once.  oneDNN takes the layouts at any batch size with the
    same bits, but where its kernel for another batch size wants another blocking it lays the
    pack out again on that call (ResNet-18's 256x256 3x3 weights at 14 rows against a pack
    made at 16: ONEDNN_VERBOSE shows the reorder)."""

    def __init__(self, conv: nn.Conv2d, dtype: torch.dtype) -> None:
        self.conv, self.dtype = conv, dtype
        self.bias = None if conv.bias is None else conv.bias.detach().to(dtype)
        self._forward: torch.Tensor | None = None
        self._transposed: torch.Tensor | None = None
        self._windows: dict[tuple[tuple[int, int], bool], torch.Tensor] = {}

    def forward_weight(self, x: torch.Tensor) -> torch.Tensor:
        if self._forward is None:
            c = self.conv
            self._forward = _mkldnn._reorder_convolution_weight(
                self._weight(), c.padding, c.stride, c.dilation, c.groups, x.shape)
        return self._forward

    def transposed_weight(self, grad: torch.Tensor, padding: list[int]) -> torch.Tensor:
        if self._transposed is None:
            c = self.conv
            self._transposed = _mkldnn._reorder_convolution_transpose_weight(
                self._weight(), c.padding, padding, c.stride, c.dilation, c.groups, grad.shape)
        return self._transposed

    def window_map(self, x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
        """The convolution where its one output position reads ``window`` (single_window):
        y[b, o] = sum over (channel, row, column) of x[b, c, row, column] W[o, c, p + row,
        q + column] + bias, one matrix product [B, C*rows*columns] x [.., O]; y [B, O, 1, 1].
        The window is flattened in x's memory order (a view where it is all of x) and its
        gradient comes back in x's layout: a channels_last gradient into a contiguous model
        sends every layer before it down oneDNN's converting paths (ResNet-18 3x32x32 in
        float32, batch 1: a call 2.3x slower in a probe)."""
        last = memory_format_of(x) == torch.channels_last
        matrix = self._windows.get((window, last))
        if matrix is None:
            (p, q), (rows, columns) = self.conv.padding, window
            taps = self._weight()[:, :, p:p + rows, q:q + columns]
            matrix = _flat(taps, last).contiguous()
            self._windows[(window, last)] = matrix
        if tuple(x.shape[2:]) == window:
            patch = _flat(x, last)
        else:  # slicing's own backward would give a contiguous gradient
            patch = _Window.apply(x, window, last)
        return F.linear(patch, matrix, self.bias)[:, :, None, None]

    def _weight(self) -> torch.Tensor:
        return self.conv.weight.detach().to(self.dtype)


def _flat(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """[N, C, H, W] -> [N, C*H*W], in (H, W, C) order for channels_last, else (C, H, W)."""
    return (t.permute(0, 2, 3, 1) if channels_last else t).reshape(len(t), -1)


class _Window(torch.autograd.Function):
    """The first (rows, columns) of x [N, C, H, W] flattened as :func:`_flat` does; its
    gradient is zero outside the window and in x's memory format."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, window: tuple[int, int],  # type: ignore[override]
                channels_last: bool) -> torch.Tensor:
        ctx.shape, ctx.layout, ctx.window = x.shape, memory_format_of(x), window
        ctx.channels_last = channels_last
        return _flat(x[:, :, :window[0], :window[1]], channels_last)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (n, c), (rows, columns) = ctx.shape[:2], ctx.window
        part = (grad.reshape(n, rows, columns, c).permute(0, 3, 1, 2) if ctx.channels_last
                else grad.reshape(n, c, rows, columns))
        x_grad = grad.new_zeros(ctx.shape).contiguous(memory_format=ctx.layout)
        x_grad[:, :, :rows, :columns] = part
        return x_grad, None, None


class _Pack:
    """The packed forward of one convolution: it computes in the dtype the plain one would,
    autocast's where autocast is on (the input cast as autocast casts it), else the weight's,
    with that dtype's layouts (one set per dtype met)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        self.conv = conv
        self._layouts: dict[torch.dtype, _Layouts] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        autocasting = torch.is_autocast_enabled("cpu")
        dtype = torch.get_autocast_dtype("cpu") if autocasting else self.conv.weight.dtype
        # what the packs are not for goes the plain way, which treats (or refuses) it as
        # before: an unbatched image, another input dtype than the float32 autocast casts or
        # the one the convolution computes in, bf16 where oneDNN has no bf16 convolutions
        if (x.dim() != 4 or x.dtype not in ((torch.float32, dtype) if autocasting else (dtype,))
                or (dtype == torch.bfloat16 and not bf16_packs_supported())):
            return nn.Conv2d.forward(self.conv, x)
        layouts = self._layouts.get(dtype)
        if layouts is None:
            layouts = self._layouts[dtype] = _Layouts(self.conv, dtype)
        window = single_window(self.conv, x.shape[2:])
        if window is not None:
            return layouts.window_map(x.to(dtype), window)
        return _PackedConvolution.apply(x.to(dtype), layouts)


def packable(module: nn.Module) -> bool:
    """A plain ``nn.Conv2d`` (not a subclass, nor one with a forward of its own: either may
    differ) with zero padding given as numbers, frozen weights in a packed dtype, on the CPU."""
    return (type(module) is nn.Conv2d and "forward" not in module.__dict__
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str) and module.weight.device.type == "cpu"
            and module.weight.dtype in PACKED_DTYPES and not module.weight.requires_grad)


@contextmanager
def weights_packed(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """For the duration, every :func:`packable` convolution of ``model`` runs with its weight
    laid out for oneDNN once (at its first call) instead of on every call; yields how many
    convolutions that is.  Enter inside :func:`advfast.engine.core.frozen` (and
    ``weights_cast_once``): the packs copy the weights as they are then.  Each module's own
    forward is back afterwards."""
    replaced = [m for m in model.modules() if packable(m)] if enabled else []
    for module in replaced:
        module.forward = _Pack(module)
    try:
        yield len(replaced)
    finally:
        for module in replaced:
            del module.forward

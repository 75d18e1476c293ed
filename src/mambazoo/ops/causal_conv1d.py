"""Depthwise causal 1-D convolution in the channels-last layout (the short conv in front of every Mamba scan)."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native
from .capabilities import resolve_backend
from .fused import eager_call_is_plain

__all__ = ["causal_conv1d", "causal_conv1d_torch"]

_ACTIVATIONS = (None, "silu")


def causal_conv1d_torch(
        x: Tensor,
        weight: Tensor,
        bias: Optional[Tensor] = None,
        activation: Optional[str] = "silu",
        reverse: bool = False,
) -> Tensor:
    """Pure-PyTorch causal depthwise conv; arguments as :func:`causal_conv1d`.

    The K - 1 zeros in front of the sequence are padded explicitly, so they multiply the weights in every dtype and
    on every device (PyTorch's implicit padding skips them in some kernels, which changes how an infinite weight
    propagates).
    """
    length, kernel_size = x.shape[1], weight.shape[1]
    if length == 0:
        return x.clone()  # empty, but part of the autograd graph
    channels_first = x.transpose(1, 2)
    if reverse:
        channels_first = channels_first.flip(-1)
    padded = F.pad(channels_first, (kernel_size - 1, 0))
    y = F.conv1d(padded, weight.unsqueeze(1), bias, groups=weight.shape[0])
    if reverse:
        y = y.flip(-1)
    if activation == "silu":
        y = F.silu(y)
    return y.transpose(1, 2)


@torch.library.custom_op("mambazoo::causal_conv1d_native", mutates_args=())
def _causal_conv1d_native_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool, reverse: bool) -> Tensor:
    return native.conv_forward(x, weight, bias, silu, reverse)


@_causal_conv1d_native_op.register_fake
def _causal_conv1d_native_fake(x, weight, bias, silu, reverse):
    return x.new_empty(x.shape)


@torch.library.custom_op("mambazoo::causal_conv1d_native_bwd", mutates_args=())
def _causal_conv1d_native_bwd_op(grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool,
                                 reverse: bool) -> tuple[Tensor, Tensor, Tensor]:
    return native.conv_backward(grad_y, x, weight, bias, silu, reverse)


@_causal_conv1d_native_bwd_op.register_fake
def _causal_conv1d_native_bwd_fake(grad_y, x, weight, bias, silu, reverse):
    dbias = x.new_empty((0,)) if bias is None else bias.new_empty(bias.shape)
    return x.new_empty(x.shape), weight.new_empty(weight.shape), dbias


def _conv_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, silu, reverse = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.options = (silu, reverse)
    ctx.has_bias = bias is not None


def _conv_backward(ctx, grad_y: Tensor):
    x, weight, bias = ctx.saved_tensors
    dx, dweight, dbias = _causal_conv1d_native_bwd_op(grad_y.contiguous(), x, weight, bias, *ctx.options)
    return dx, dweight, dbias if ctx.has_bias else None, None, None


_causal_conv1d_native_op.register_autograd(_conv_backward, setup_context=_conv_setup_context)


def causal_conv1d(
        x: Tensor,
        weight: Tensor,
        bias: Optional[Tensor] = None,
        activation: Optional[str] = "silu",
        reverse: bool = False,
        backend: str = "auto",
) -> Tensor:
    """Depthwise causal convolution: y_t[d] = act(bias[d] + sum_k weight[d, k] * x_{t-K+1+k}[d]), x_{<0} = 0.

    Args:
        x: Input, (batch, length, dim).
        weight: Per-channel kernel, (dim, kernel_size) (an ``nn.Conv1d`` weight with its middle axis squeezed).
        bias: Optional bias, (dim,).
        activation: ``"silu"`` or None.
        reverse: Anti-causal: the convolution runs from the end of the sequence, i.e.
            ``flip(causal_conv1d(flip(x)))`` along length (the backward branch of a bidirectional block).
        backend: ``"auto"`` (native on CPU when built and the kernel size fits, else torch; see
            :mod:`mambazoo.ops.capabilities`), ``"torch"`` or ``"native"``.

    Returns:
        y, (batch, length, dim), in x's dtype.
    """
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[2]:
        raise ValueError(f"x must be (batch, length, dim) and weight (dim, kernel_size); got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (x.shape[2],):
        raise ValueError(f"bias must have shape ({x.shape[2]},), got {tuple(bias.shape)}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    name = resolve_backend("causal_conv1d", backend, x.device, x.dtype, kernel_size=weight.shape[1])
    if name == "native":
        if eager_call_is_plain(x, weight, bias):  # nothing observes the custom op: skip its dispatch
            return native.conv_forward(x, weight, bias, activation == "silu", reverse)
        return _causal_conv1d_native_op(x, weight, bias, activation == "silu", reverse)
    return causal_conv1d_torch(x, weight, bias, activation, reverse)

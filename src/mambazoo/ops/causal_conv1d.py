"""Depthwise causal 1-D convolution in the channels-last layout (the short conv in front of every Mamba scan)."""
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .capabilities import kernel_module, resolve_backend
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


def _compiled_conv_op(name: str, forward: Callable, backward: Callable) -> Callable:
    """A compiled conv kernel as the custom op ``mambazoo::causal_conv1d_<name>`` with its autograd formula.

    ``forward(x, weight, bias, silu, reverse)`` returns y; ``backward(grad_y, x, weight, bias, silu, reverse)``
    returns (dx, dweight, dbias) with an empty dbias when there is no bias.
    """
    @torch.library.custom_op(f"mambazoo::causal_conv1d_{name}", mutates_args=())
    def conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool, reverse: bool) -> Tensor:
        return forward(x, weight, bias, silu, reverse)

    @conv.register_fake
    def _(x, weight, bias, silu, reverse):
        return x.new_empty(x.shape)

    @torch.library.custom_op(f"mambazoo::causal_conv1d_{name}_bwd", mutates_args=())
    def conv_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool,
                 reverse: bool) -> tuple[Tensor, Tensor, Tensor]:
        return backward(grad_y, x, weight, bias, silu, reverse)

    @conv_bwd.register_fake
    def _(grad_y, x, weight, bias, silu, reverse):
        dbias = x.new_empty((0,)) if bias is None else bias.new_empty(bias.shape)
        return x.new_empty(x.shape), weight.new_empty(weight.shape), dbias

    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, silu, reverse = inputs
        ctx.save_for_backward(x, weight, bias)
        ctx.options = (silu, reverse)
        ctx.has_bias = bias is not None

    def conv_backward(ctx, grad_y: Tensor):
        x, weight, bias = ctx.saved_tensors
        dx, dweight, dbias = conv_bwd(grad_y.contiguous(), x, weight, bias, *ctx.options)
        return dx, dweight, dbias if ctx.has_bias else None, None, None

    conv.register_autograd(conv_backward, setup_context=setup_context)
    return conv


def _kernel_function(name: str, function: str) -> Callable:
    """``function`` of backend ``name``'s kernel module, looked up when called (the module loads on first use)."""
    def call(*args):
        return getattr(kernel_module("causal_conv1d", name), function)(*args)

    return call


_COMPILED_OPS = {
    name: _compiled_conv_op(name, _kernel_function(name, "conv_forward"), _kernel_function(name, "conv_backward"))
    for name in ("native", "triton")
}


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
        backend: ``"auto"`` (Triton on CUDA, native on CPU when built, each within its kernel-size limit, else
            torch; see :mod:`mambazoo.ops.capabilities`), ``"torch"``, ``"native"`` or ``"triton"``.

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
    if name in _COMPILED_OPS:
        silu = activation == "silu"
        if eager_call_is_plain(x, weight, bias):  # nothing observes the custom op: skip its dispatch
            return kernel_module("causal_conv1d", name).conv_forward(x, weight, bias, silu, reverse)
        return _COMPILED_OPS[name](x, weight, bias, silu, reverse)
    return causal_conv1d_torch(x, weight, bias, activation, reverse)

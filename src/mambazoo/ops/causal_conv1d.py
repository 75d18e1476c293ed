"""Depthwise causal 1-D convolution in the channels-last layout (the short conv in front of every Mamba scan)."""
from typing import Optional

import torch.nn.functional as F
from torch import Tensor

__all__ = ["causal_conv1d", "causal_conv1d_torch"]

_ACTIVATIONS = (None, "silu")


def causal_conv1d_torch(
        x: Tensor,
        weight: Tensor,
        bias: Optional[Tensor] = None,
        activation: Optional[str] = "silu",
        reverse: bool = False,
) -> Tensor:
    """Pure-PyTorch causal depthwise conv; arguments as :func:`causal_conv1d`."""
    length = x.shape[1]
    kernel_size = weight.shape[1]
    channels_first = x.transpose(1, 2)
    if reverse:
        channels_first = channels_first.flip(-1)
    y = F.conv1d(channels_first, weight.unsqueeze(1), bias, padding=kernel_size - 1, groups=weight.shape[0])
    y = y[..., :length]
    if reverse:
        y = y.flip(-1)
    if activation == "silu":
        y = F.silu(y)
    return y.transpose(1, 2)


def causal_conv1d(
        x: Tensor,
        weight: Tensor,
        bias: Optional[Tensor] = None,
        activation: Optional[str] = "silu",
        reverse: bool = False,
        backend: str = "auto",
) -> Tensor:
    """Depthwise causal convolution: y_t[d] = act(bias[d] + sum_k weight[d, k] * x_{t-K+1+k}[d]).

    Args:
        x: Input, (batch, length, dim).
        weight: Per-channel kernel, (dim, kernel_size) (an ``nn.Conv1d`` weight with its middle axis squeezed).
        bias: Optional bias, (dim,).
        activation: ``"silu"`` or None.
        reverse: Anti-causal: the convolution runs from the end of the sequence, i.e.
            ``flip(causal_conv1d(flip(x)))`` along length (the backward branch of a bidirectional block).
        backend: ``"auto"`` or ``"torch"``.

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
    if backend not in ("auto", "torch"):
        raise ValueError(f"backend must be 'auto' or 'torch', got {backend!r}")
    return causal_conv1d_torch(x, weight, bias, activation, reverse)

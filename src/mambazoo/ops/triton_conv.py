"""Triton causal depthwise conv1d (channels-last, forward and backward, ``reverse``, SiLU) for CUDA tensors.

One program per (batch row, block of steps, block of channels) computes act(bias + Σ_k w_k·x_{t-K+1+k}) from K
shifted loads of its x tile (the overlap comes from L1/L2), so the conv reads x and writes y once: it is memory bound
(docs/triton.md). The backward recomputes the pre-activation for each of the K shifts instead of storing it; weight
and bias gradients are per-program partial sums reduced afterwards in a fixed order (deterministic). The conv is a
separate kernel rather than folded into the scan's input load because its output ``xc`` is needed twice outside the
scan (x_proj computes Δ, B and C from it) — see docs/triton.md.
"""
from typing import Optional

import torch
from torch import Tensor

from .triton_scan import AVAILABLE, INTERPRETER, UNAVAILABLE_REASON, _device_guard

__all__ = ["AVAILABLE", "UNAVAILABLE_REASON", "MAX_KERNEL", "conv_forward", "conv_backward"]

MAX_KERNEL = 4  # kernel sizes are unrolled at compile time; the backward loads K² shifted tiles
# Steps per program (forward, backward) and channels per program; 32-step backward tiles keep it free of spills.
BLOCK_L, BACKWARD_BLOCK_L, BLOCK_D, NUM_WARPS = 64, 32, 64, 4

if AVAILABLE:
    import triton

    from . import triton_kernels as kernels


def _prepare(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _blocks(backward: bool) -> tuple[int, int]:
    """(steps, channels) per program; small tiles under the interpreter (numpy per op)."""
    return (16, 16) if INTERPRETER else (BACKWARD_BLOCK_L if backward else BLOCK_L, BLOCK_D)


def _launch(kernel, grid_tensor: Tensor, backward: bool, *arguments, **constants) -> None:
    batch, length, dim = grid_tensor.shape
    block_l, block_d = _blocks(backward)
    grid = (batch, triton.cdiv(length, block_l), triton.cdiv(dim, block_d))
    with _device_guard(grid_tensor):
        kernel[grid](*arguments, BLOCK_L=block_l, BLOCK_D=block_d, FAST=not INTERPRETER,
                     num_warps=1 if INTERPRETER else NUM_WARPS, **constants)


def conv_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool, reverse: bool) -> Tensor:
    """y = act(bias + causal depthwise conv(x)) in x's dtype; x (batch, length, dim), weight (dim, kernel_size)."""
    x = _prepare(x)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if y.numel():
        weight = weight.contiguous()
        _launch(kernels._conv_fwd_kernel, x, False, x, weight, weight if bias is None else bias.contiguous(), y,
                x.shape[1], x.shape[2], x.stride(0), x.stride(1), KERNEL_SIZE=weight.shape[1],
                HAS_BIAS=bias is not None, SILU=silu, REVERSE=reverse)
    return y


def conv_backward(grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool,
                  reverse: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dx, dweight, dbias) of :func:`conv_forward`; dbias is empty without a bias."""
    x, grad_y, weight = _prepare(x), grad_y.contiguous(), weight.contiguous()
    batch, length, dim = x.shape
    kernel_size = weight.shape[1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    parts = batch * triton.cdiv(length, _blocks(True)[0]) if x.numel() else 0
    dweight_part = torch.zeros((parts, dim, kernel_size), dtype=torch.float32, device=x.device)
    dbias_part = torch.zeros((parts, dim), dtype=torch.float32, device=x.device)
    if x.numel():
        _launch(kernels._conv_bwd_kernel, x, True, grad_y, x, weight, weight if bias is None else bias.contiguous(), dx,
                dweight_part, dbias_part, length, dim, x.stride(0), x.stride(1), KERNEL_SIZE=kernel_size,
                HAS_BIAS=bias is not None, SILU=silu, REVERSE=reverse)
    dbias = dbias_part.sum(0).to(bias.dtype) if bias is not None else x.new_empty((0,))
    return dx, dweight_part.sum(0).to(weight.dtype), dbias

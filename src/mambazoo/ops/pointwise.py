"""Pointwise epilogues of the Mamba blocks: RMSNorm and the gate of the bidirectional mixer.

Each is a chain of small PyTorch ops whose dispatch and temporaries cost more than its arithmetic at the sizes of the
vision models (at Vim-Ti's 224 px sizes the composites take about twice the native kernels' time;
benchmarks/results/native_cpu.md, docs/native.md). The native backend runs each as one kernel, for plain eager
inference only (no autograd, tracing, compilation or dispatch mode: it has no backward and no custom op); every other
call, and every call ``auto`` does not give to it, runs the PyTorch composite, which autograd, ``torch.compile`` and
export see as usual.
"""
from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from .capabilities import kernel_module, resolve_backend
from .fused import eager_call_is_plain

__all__ = ["gated_sum", "rms_norm"]


def _native_allowed(op: str, backend: str, tensors: tuple[Optional[Tensor], ...]) -> bool:
    """Whether the call runs the native kernel; an explicit ``"native"`` the call cannot use raises a ValueError."""
    first = tensors[0]
    if resolve_backend(op, backend, first.device, first.dtype) != "native":
        return False
    if eager_call_is_plain(*tensors) and all(t is None or t.dtype == first.dtype for t in tensors):
        return True
    if backend == "native":
        raise ValueError(f"the native {op} runs plain eager inference on tensors of one dtype only (no autograd, "
                         "tracing, compilation or dispatch mode); use backend='auto' or 'torch'")
    return False


def rms_norm(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-5, backend: str = "auto") -> Tensor:
    """RMSNorm over the last dimension: ``x / sqrt(mean(x^2) + eps) * weight`` (``F.rms_norm``'s formula).

    Args:
        x: Input, (..., dim).
        weight: Optional per-channel weight, (dim,).
        eps: Added to the mean square.
        backend: ``"auto"`` (native for plain eager float32 CPU calls when built, else torch), ``"native"`` or
            ``"torch"`` (see :mod:`mambazoo.ops.capabilities`).

    Returns:
        The normalised tensor, x's shape and dtype.
    """
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the normalised one), got a 0-dim tensor")
    if weight is not None and tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(f"weight must have shape (dim,) for x of shape (..., dim); got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if _native_allowed("rms_norm", backend, (x, weight)):
        return kernel_module("rms_norm", "native").rms_norm_forward(x, weight, eps)
    return F.rms_norm(x, x.shape[-1:], weight, eps)


def gated_sum(a: Tensor, b: Optional[Tensor], z: Tensor, scale: float = 1.0, backend: str = "auto") -> Tensor:
    """``((a + b) * silu(z)) * scale``: the two directions of a bidirectional scan summed, gated and scaled.

    Args:
        a: First summand.
        b: Second summand of a's shape, or None (then ``a * silu(z) * scale``).
        z: Gate pre-activation of a's shape.
        scale: Factor applied last (``0.5`` averages the two directions).
        backend: ``"auto"`` (native for plain eager float32 CPU calls when built, else torch), ``"native"`` or
            ``"torch"``.

    Returns:
        A new tensor of a's shape and dtype.
    """
    for name, tensor in (("b", b), ("z", z)):
        if tensor is not None and tensor.shape != a.shape:
            raise ValueError(f"{name} must have a's shape {tuple(a.shape)}, got {tuple(tensor.shape)}")
    if _native_allowed("gated_sum", backend, (a, b, z)):
        return kernel_module("gated_sum", "native").gated_sum_forward(a, b, z, scale)
    gated = (a if b is None else a + b) * F.silu(z)
    return gated if scale == 1.0 else gated * scale

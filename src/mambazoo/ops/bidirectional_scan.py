"""Bidirectional selective scan: Vision Mamba's two scan directions, summed, gated and scaled, as one op.

Each direction is a selective scan in Mamba's parametrisation: step sizes ``softplus(dt_low_rank @ dt_weight^T +
dt_bias)`` and ``A = -exp(A_log)``; the backward direction runs from the last step to the first. The result is
``((y_forward + y_backward) * SiLU(z)) * scale``.

The native backend runs all of it as one kernel in plain eager float32 CPU inference (no autograd, tracing,
compilation or dispatch mode: it has no backward and no custom op). Compared with the composite it saves two
projections, the (length, dim) step-size tensors, the backward direction's output and four kernel calls per block
(docs/native.md, "Bidirectional inference scan"). Every other call runs the composite -- two
:func:`~mambazoo.ops.selective_scan` calls and :func:`~mambazoo.ops.gated_sum` -- which autograd, ``torch.compile``,
export and the FLOP counter see as usual.
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .capabilities import kernel_module, resolve_backend
from .fused import eager_call_is_plain
from .pointwise import gated_sum
from .selective_scan import selective_scan

__all__ = ["ScanDirection", "at_least_fp32", "bidirectional_scan"]


class ScanDirection(NamedTuple):
    """One direction of :func:`bidirectional_scan`.

    Attributes:
        u: Input sequence, (batch, length, dim).
        dt_low_rank: Low-rank step input, (batch, length, dt_rank) (the first columns of Mamba's ``x_proj``).
        dt_weight: Step projection weight, (dim, dt_rank) (``dt_proj.weight``).
        dt_bias: Step bias added before the softplus, (dim,), or None.
        A_log: Log of the negated state matrix, (dim, d_state): A = -exp(A_log).
        B: Input projection, (batch, length, d_state).
        C: Output projection, (batch, length, d_state).
        D: Skip connection, (dim,), or None.
    """

    u: Tensor
    dt_low_rank: Tensor
    dt_weight: Tensor
    dt_bias: Optional[Tensor]
    A_log: Tensor
    B: Tensor
    C: Tensor
    D: Optional[Tensor]


def at_least_fp32(tensor: Tensor) -> Tensor:
    """``tensor`` in float32, or unchanged if it is float64 (state and residual precision of the Mamba blocks)."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def _check_direction(name: str, direction: ScanDirection, shape: torch.Size) -> None:
    """A ValueError naming the first tensor of ``direction`` whose shape does not fit a (batch, length, dim) scan."""
    if not isinstance(direction, ScanDirection):
        raise TypeError(f"{name} must be a ScanDirection, got {type(direction).__name__}")
    batch, length, dim = shape
    rank, d_state = direction.dt_weight.shape[-1], direction.A_log.shape[-1]
    expected = dict(u=(batch, length, dim), dt_low_rank=(batch, length, rank), dt_weight=(dim, rank),
                    dt_bias=(dim,), A_log=(dim, d_state), B=(batch, length, d_state), C=(batch, length, d_state),
                    D=(dim,))
    for field, tensor in zip(ScanDirection._fields, direction):
        if tensor is not None and tuple(tensor.shape) != expected[field]:
            raise ValueError(f"{name}.{field} must have shape {expected[field]} for z of shape {tuple(shape)}, got "
                             f"{tuple(tensor.shape)}")


def _optional_fp32(tensor: Optional[Tensor]) -> Optional[Tensor]:
    return None if tensor is None else at_least_fp32(tensor)


def _scan(direction: ScanDirection, reverse: bool, backend: str) -> Tensor:
    """One direction through :func:`selective_scan` (the composite's step)."""
    delta = F.linear(direction.dt_low_rank, direction.dt_weight)  # the bias is added inside the scan
    return selective_scan(direction.u, delta, -torch.exp(at_least_fp32(direction.A_log)), direction.B, direction.C,
                          _optional_fp32(direction.D), delta_bias=_optional_fp32(direction.dt_bias),
                          delta_softplus=True, reverse=reverse, backend=backend)


def _native_runs(forward: ScanDirection, backward: ScanDirection, z: Tensor, backend: str) -> bool:
    if backend not in ("auto", "native"):
        return False
    features = dict(d_state=forward.A_log.shape[-1], dt_rank=forward.dt_weight.shape[-1])
    if resolve_backend("bidirectional_scan", "auto", z.device, z.dtype, **features) != "native":
        return False
    tensors = (z, *forward, *backward)
    return eager_call_is_plain(*tensors) and all(t is None or t.dtype == torch.float32 for t in tensors)


def bidirectional_scan(forward: ScanDirection, backward: ScanDirection, z: Tensor, scale: float = 1.0,
                       backend: str = "auto") -> Tensor:
    """``((scan(forward) + scan(backward, reversed)) * SiLU(z)) * scale`` (see the module docstring).

    Args:
        forward: The direction scanned from the first step to the last.
        backward: The direction scanned from the last step to the first; same sizes as ``forward``.
        z: Gate pre-activation, (batch, length, dim).
        scale: Factor applied last (``0.5`` averages the directions).
        backend: Scan backend (as :func:`~mambazoo.ops.selective_scan`'s). ``"auto"`` and ``"native"`` run the
            native kernel for plain eager float32 CPU calls within its limits (``d_state`` <= 16, ``dt_rank`` <= 64);
            otherwise, and for any other backend, the composite runs with that scan backend (and PyTorch's gate for
            ``"reference"``/``"torch"``).

    Returns:
        A (batch, length, dim) tensor in the dtype of ``forward.u``.
    """
    if z.dim() != 3:
        raise ValueError(f"z must be (batch, length, dim), got shape {tuple(z.shape)}")
    _check_direction("forward", forward, z.shape)
    _check_direction("backward", backward, z.shape)
    if backward.dt_weight.shape != forward.dt_weight.shape or backward.A_log.shape != forward.A_log.shape:
        raise ValueError(f"the directions must have one dt_rank and d_state, got dt_weight "
                         f"{tuple(forward.dt_weight.shape)} / {tuple(backward.dt_weight.shape)} and A_log "
                         f"{tuple(forward.A_log.shape)} / {tuple(backward.A_log.shape)}")
    if _native_runs(forward, backward, z, backend):
        return kernel_module("bidirectional_scan", "native").bidirectional_scan_forward(forward, backward, z, scale)
    gate_backend = "torch" if backend in ("reference", "torch") else "auto"
    return gated_sum(_scan(forward, False, backend), _scan(backward, True, backend), z, scale, gate_backend)

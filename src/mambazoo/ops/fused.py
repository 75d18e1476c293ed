"""The fused-kernel selective scan as a ``torch.library`` custom op.

Compiled kernels (the native CPU kernel, the Triton GPU kernels) plug in here with :func:`register_kernel`. They all
share one contract, so one custom op (``mambazoo::selective_scan_fused``), one fake implementation and one autograd
formula serve them, and ``torch.compile`` / ``torch.export`` see a single opaque op instead of a graph break.

Kernel contract (all tensors in the op's channels-last layout, see :func:`mambazoo.ops.selective_scan`):

* ``forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)`` returns ``(y, last_state, chunk_states)``:
  y like u (same dtype), last_state (batch, dim, d_state) float32, and chunk_states (batch, n_chunks, dim, d_state)
  float32 holding the state *entering* each chunk of ``chunk_size`` steps in scan order (chunk 0 is all zeros),
  where ``n_chunks = ceil(length / chunk_size)``; the backward recomputes the inside of each chunk from them. A kernel
  whose threads own channels rather than states may declare ``states_first`` and use (batch, n_chunks, d_state, dim).
* ``backward(grad_y, grad_last_state, u, delta, A, B, C, D, z, delta_bias, chunk_states, delta_softplus, reverse)``
  returns the gradients of (u, delta, A, B, C, D, z, delta_bias), each shaped and typed like its input; for an absent
  optional input it returns an empty tensor. ``grad_last_state`` may be None.
"""
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from . import capabilities

__all__ = ["FusedKernel", "register_kernel", "registered_kernels", "selective_scan_fused"]


@dataclass(frozen=True)
class FusedKernel:
    """A compiled selective-scan implementation (see the module docstring for the contract)."""

    forward: Callable[..., tuple[Tensor, Tensor, Tensor]]
    backward: Callable[..., tuple[Tensor, ...]]
    chunk_size: int
    states_first: bool = False

    def chunk_states_shape(self, batch: int, length: int, dim: int, d_state: int) -> tuple[int, int, int, int]:
        """Shape of the ``chunk_states`` this kernel's forward returns."""
        n_chunks = (length + self.chunk_size - 1) // self.chunk_size
        return (batch, n_chunks, d_state, dim) if self.states_first else (batch, n_chunks, dim, d_state)


_KERNELS: dict[str, FusedKernel] = {}


def register_kernel(name: str, kernel: FusedKernel) -> None:
    """Make ``kernel`` callable through the custom op as ``kernel=name``."""
    _KERNELS[name] = kernel


def registered_kernels() -> tuple[str, ...]:
    """Names of the kernels registered so far."""
    return tuple(_KERNELS)


def _kernel(name: str) -> FusedKernel:
    if name not in _KERNELS and name in capabilities.backend_names("selective_scan"):
        capabilities.kernel_module("selective_scan", name)  # importing a kernel module registers its kernel
    if name not in _KERNELS:
        raise ValueError(f"unknown fused scan kernel {name!r}; registered: {registered_kernels()}")
    return _KERNELS[name]


@torch.library.custom_op("mambazoo::selective_scan_fused", mutates_args=())
def _selective_scan_fused_op(
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Optional[Tensor],
        z: Optional[Tensor],
        delta_bias: Optional[Tensor],
        delta_softplus: bool,
        reverse: bool,
        kernel: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return _kernel(kernel).forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)


@_selective_scan_fused_op.register_fake
def _selective_scan_fused_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, kernel):
    batch, length, dim = u.shape
    d_state = A.shape[1]
    return (
        u.new_empty(u.shape),
        u.new_empty((batch, dim, d_state), dtype=torch.float32),
        u.new_empty(_kernel(kernel).chunk_states_shape(batch, length, dim, d_state), dtype=torch.float32),
    )


@torch.library.custom_op("mambazoo::selective_scan_fused_bwd", mutates_args=())
def _selective_scan_fused_bwd_op(
        grad_y: Tensor,
        grad_last_state: Optional[Tensor],
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Optional[Tensor],
        z: Optional[Tensor],
        delta_bias: Optional[Tensor],
        chunk_states: Tensor,
        delta_softplus: bool,
        reverse: bool,
        kernel: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(_kernel(kernel).backward(
        grad_y, grad_last_state, u, delta, A, B, C, D, z, delta_bias, chunk_states, delta_softplus, reverse))


@_selective_scan_fused_bwd_op.register_fake
def _selective_scan_fused_bwd_fake(grad_y, grad_last_state, u, delta, A, B, C, D, z, delta_bias, chunk_states,
                                   delta_softplus, reverse, kernel):
    def like(t: Optional[Tensor]) -> Tensor:
        return u.new_empty((0,)) if t is None else torch.empty_like(t)

    return tuple(like(t) for t in (u, delta, A, B, C, D, z, delta_bias))


def _setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, kernel = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2])
    ctx.options = (delta_softplus, reverse, kernel)
    ctx.has_optional = (D is not None, z is not None, delta_bias is not None)
    ctx.mark_non_differentiable(output[2])


def _backward(ctx, grad_y: Tensor, grad_last_state: Optional[Tensor], _grad_chunk_states: Optional[Tensor]):
    grads = _selective_scan_fused_bwd_op(grad_y.contiguous(), grad_last_state, *ctx.saved_tensors, *ctx.options)
    required = grads[:5]
    optional = tuple(g if present else None for g, present in zip(grads[5:], ctx.has_optional))
    return (*required, *optional, None, None, None)


_selective_scan_fused_op.register_autograd(_backward, setup_context=_setup_context)


def selective_scan_fused(
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Optional[Tensor],
        z: Optional[Tensor],
        delta_bias: Optional[Tensor],
        delta_softplus: bool,
        reverse: bool,
        kernel: str,
) -> tuple[Tensor, Tensor]:
    """Run a registered kernel through the custom op; returns (y, last_state)."""
    y, last_state, _ = _selective_scan_fused_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, kernel)
    return y, last_state

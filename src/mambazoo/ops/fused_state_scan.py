"""The all-states scan as a ``torch.library`` custom op (``mambazoo::state_scan_fused``) that kernels plug into.

Compiled kernels (native CPU, Triton) register with :func:`register_state_kernel`; they share one contract, so one
custom op, one fake implementation and one autograd formula serve them all, and ``torch.compile`` / ``torch.export``
see a single opaque op. The op returns every state, so the backward needs no recomputation: h_{t-1} is read from the
saved output.

Kernel contract (channels-last layout, see :func:`mambazoo.ops.state_scan`):

* ``forward(u, delta, A, B, delta_bias, delta_softplus, reverse)`` returns the states (batch, length, dim), float32
  (float64 for float64 inputs if the kernel says so: ``float64_states``).
* ``backward(grad_states, states, u, delta, A, B, delta_bias, delta_softplus, reverse)`` returns the gradients of
  (u, delta, A, B, delta_bias), each shaped and typed like its input (an empty tensor for an absent ``delta_bias``).
"""
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from .fused import KernelRegistry, contiguous_gradient, eager_call_is_plain, states_dtype

__all__ = ["StateKernel", "register_state_kernel", "registered_state_kernels", "state_scan_fused"]


@dataclass(frozen=True)
class StateKernel:
    """An all-states scan implementation (see the module docstring for the contract).

    Attributes:
        forward: Computes the states.
        backward: Computes the input gradients from the states.
        float64_states: Whether it computes (and returns states) in float64 for float64 inputs.
    """

    forward: Callable[..., Tensor]
    backward: Callable[..., tuple[Tensor, ...]]
    float64_states: bool = False

_KERNELS: KernelRegistry[StateKernel] = KernelRegistry("state_scan", "state scan")
register_state_kernel = _KERNELS.register
registered_state_kernels = _KERNELS.names
_kernel = _KERNELS.get


@torch.library.custom_op("mambazoo::state_scan_fused", mutates_args=())
def _state_scan_op(
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        delta_bias: Optional[Tensor],
        delta_softplus: bool,
        reverse: bool,
        kernel: str,
) -> Tensor:
    return _kernel(kernel).forward(u, delta, A, B, delta_bias, delta_softplus, reverse)


@_state_scan_op.register_fake
def _state_scan_fake(u, delta, A, B, delta_bias, delta_softplus, reverse, kernel):
    return u.new_empty(u.shape, dtype=states_dtype(u.dtype, _kernel(kernel).float64_states))


@torch.library.custom_op("mambazoo::state_scan_fused_bwd", mutates_args=())
def _state_scan_bwd_op(
        grad_states: Tensor,
        states: Tensor,
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        delta_bias: Optional[Tensor],
        delta_softplus: bool,
        reverse: bool,
        kernel: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(grad.contiguous() for grad in _kernel(kernel).backward(
        grad_states, states, u, delta, A, B, delta_bias, delta_softplus, reverse))


@_state_scan_bwd_op.register_fake
def _state_scan_bwd_fake(grad_states, states, u, delta, A, B, delta_bias, delta_softplus, reverse, kernel):
    return tuple(contiguous_gradient(u, t) for t in (u, delta, A, B, delta_bias))


def _setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, delta_bias, delta_softplus, reverse, kernel = inputs
    ctx.save_for_backward(output, u, delta, A, B, delta_bias)
    ctx.options = (delta_softplus, reverse, kernel)
    ctx.has_bias = delta_bias is not None


def _backward(ctx, grad_states: Tensor):
    du, ddelta, dA, dB, dbias = _state_scan_bwd_op(grad_states.contiguous(), *ctx.saved_tensors, *ctx.options)
    return du, ddelta, dA, dB, dbias if ctx.has_bias else None, None, None, None


_state_scan_op.register_autograd(_backward, setup_context=_setup_context)


def state_scan_fused(
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        delta_bias: Optional[Tensor],
        delta_softplus: bool,
        reverse: bool,
        kernel: str,
) -> Tensor:
    """Run a registered kernel through the custom op (directly when :func:`eager_call_is_plain`); the states."""
    if eager_call_is_plain(u, delta, A, B, delta_bias):
        return _kernel(kernel).forward(u, delta, A, B, delta_bias, delta_softplus, reverse)
    return _state_scan_op(u, delta, A, B, delta_bias, delta_softplus, reverse, kernel)

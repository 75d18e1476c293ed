"""The all-states scan: a selective scan with a one-dimensional state (N = 1) that returns every state.

Spatial-Mamba fuses the hidden states of neighbouring tokens before reading them out, so it needs h_t for every t
rather than y_t = C_t·h_t. With Δ' = softplus(delta + delta_bias) (each part optional) and h_{-1} = 0::

    h_t = exp(Δ'_t A) * h_{t-1} + Δ'_t * B_t * u_t        (per channel)

The backends are the same four as for :func:`mambazoo.ops.selective_scan` and are chosen by the ``state_scan`` rows
of :mod:`mambazoo.ops.capabilities`: a sequential float64-capable ``reference``, a pure-PyTorch ``torch`` backend
(the always-stable chunked linear recurrence :func:`mambazoo.ops.torch_scan.linear_scan` with its adjoint backward),
and the compiled ``native`` (CPU) and ``triton`` (GPU) kernels behind the custom op of
:mod:`mambazoo.ops.fused_state_scan`.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .capabilities import backend_names, resolve_backend
from .fused import check_A_sign, check_scan_tensor
from .fused_state_scan import StateKernel, register_state_kernel, state_scan_fused
from .selective_scan import routing_through_custom_op
from .torch_scan import DEFAULT_CHUNK_SIZE, linear_scan

__all__ = ["STATE_SCAN_BACKENDS", "state_scan", "state_scan_reference", "state_scan_torch"]

STATE_SCAN_BACKENDS = backend_names("state_scan")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _step_sizes(delta: Tensor, delta_bias: Optional[Tensor], delta_softplus: bool) -> Tensor:
    """Δ' = softplus(delta + delta_bias) with torch's passthrough above 20 (each part optional)."""
    if delta_bias is not None:
        delta = delta + delta_bias.to(delta.dtype)
    return F.softplus(delta) if delta_softplus else delta


def state_scan_reference(
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        delta_bias: Optional[Tensor] = None,
        delta_softplus: bool = True,
        reverse: bool = False,
) -> Tensor:
    """The all-states scan by its definition, one step at a time (the oracle; arguments as :func:`state_scan`).

    Returns:
        The states, (batch, length, dim), float64 for float64 inputs and float32 otherwise.
    """
    compute = _compute_dtype(u.dtype)
    u, delta, A, B = (t.to(compute) for t in (u, delta, A, B))
    step = _step_sizes(delta, delta_bias, delta_softplus)
    decay_rate = A[:, 0]
    if u.shape[1] == 0:
        return torch.exp(step * decay_rate) * (step * u) * B  # empty, but connected to every input
    state = u.new_zeros(u.shape[0], u.shape[2])
    # Per-step views via unbind: indexing x[:, t] under autograd would make the backward O(L^2).
    step_t, u_t, B_t = step.unbind(1), u.unbind(1), B.unbind(1)
    states = [None] * u.shape[1]
    for t in (range(u.shape[1] - 1, -1, -1) if reverse else range(u.shape[1])):
        state = torch.exp(step_t[t] * decay_rate) * state + (step_t[t] * u_t[t]) * B_t[t]
        states[t] = state
    return torch.stack(states, dim=1)


def state_scan_torch(
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        delta_bias: Optional[Tensor] = None,
        delta_softplus: bool = True,
        reverse: bool = False,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """The all-states scan in pure PyTorch (arguments as :func:`state_scan`); any device, any step size, autograd.

    The recurrence runs through :func:`mambazoo.ops.torch_scan.linear_scan`, whose every factor is an exponential of
    a non-positive number (no overflow whatever the step size) and whose backward is the adjoint scan. It starts
    from an explicit zero state, so a NaN decay at the first step poisons the states as in the reference.

    Returns:
        The states, (batch, length, dim), float64 for float64 inputs and float32 otherwise.
    """
    compute = _compute_dtype(u.dtype)
    u, delta, A, B = (t.to(compute) for t in (u, delta, A, B))
    step = _step_sizes(delta, delta_bias, delta_softplus)
    log_decay = step * A[:, 0]
    increment = (step * u) * B
    if u.shape[1] == 0:
        return log_decay.exp() * increment  # empty, but connected to every input
    if reverse:
        log_decay, increment = log_decay.flip(1), increment.flip(1)
    states = linear_scan(log_decay, increment, u.new_zeros(u.shape[0], u.shape[2]), chunk_size)
    return states.flip(1) if reverse else states


def _torch_kernel_forward(u, delta, A, B, delta_bias, delta_softplus, reverse):
    return state_scan_torch(u, delta, A, B, delta_bias, delta_softplus, reverse)


def _torch_kernel_backward(grad_states, states, u, delta, A, B, delta_bias, delta_softplus, reverse):
    inputs = [t for t in (u, delta, A, B, delta_bias) if t is not None]

    def forward(*tensors: Tensor) -> Tensor:
        bias = tensors[4] if delta_bias is not None else None
        return state_scan_torch(*tensors[:4], bias, delta_softplus, reverse)

    _, vjp = torch.func.vjp(forward, *inputs)
    grads = vjp(grad_states.to(states.dtype))
    return (*grads[:4], grads[4] if delta_bias is not None else u.new_empty((0,)))


# The pure-PyTorch scan as a custom-op kernel, used only under route_through_custom_op() (FLOP counting sees one op
# per call); its backward recomputes the forward under torch.func.vjp.
register_state_kernel("torch", StateKernel(_torch_kernel_forward, _torch_kernel_backward, float64_states=True))


def _check_arguments(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, delta_bias: Optional[Tensor]) -> None:
    if not isinstance(u, Tensor) or u.dim() != 3:
        raise ValueError(f"u must be a (batch, length, dim) tensor, got {getattr(u, 'shape', type(u).__name__)}")
    batch, length, dim = u.shape
    check_scan_tensor("u", u, (batch, length, dim), u.device)
    check_scan_tensor("delta", delta, (batch, length, dim), u.device)
    check_scan_tensor("A", A, (dim, 1), u.device)
    check_scan_tensor("B", B, (batch, length, 1), u.device)
    if delta_bias is not None:
        check_scan_tensor("delta_bias", delta_bias, (dim,), u.device)
    for name, tensor in (("delta", delta), ("B", B)):
        if tensor.dtype != u.dtype:
            raise TypeError(f"{name} has dtype {tensor.dtype} but u has {u.dtype}; cast them to one dtype")


def state_scan(
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        delta_bias: Optional[Tensor] = None,
        delta_softplus: bool = True,
        reverse: bool = False,
        backend: str = "auto",
) -> Tensor:
    """All states of a selective scan with a one-dimensional state (N = 1, no C, no D), channels-last.

    With Δ' = softplus(delta + delta_bias) (each part optional; softplus passes arguments above 20 through, as
    ``F.softplus``) and h_{-1} = 0::

        h_t = exp(Δ'_t A) * h_{t-1} + Δ'_t * B_t * u_t

    Layout: ``u`` and ``delta`` are (batch, length, dim) and ``B`` is (batch, length, 1) — what Linear layers produce
    — ``A`` is (dim, 1) with A <= 0 (checked for CPU tensors, by the native kernel itself) and ``delta_bias`` is
    (dim,). The states come back in the same channels-last (batch, length, dim) layout: the kernels vectorise over
    channels, and for an H×W image ``states.view(batch, H, W, dim).permute(0, 3, 1, 2)`` is an NCHW view in the
    ``channels_last`` memory format that ``conv2d`` consumes without a copy, while the LayerNorm, gating and
    projections after the state fusion work on channels-last tensors (see ``docs/spatialmamba.md`` for the
    measurement). Any batch or length strides are accepted (e.g. ``expand``-ed views); a non-contiguous last
    dimension is copied.

    States are float32 whatever the input dtype (float64 for float64 inputs on the ``reference`` and ``torch``
    backends). NaN and Inf propagate as in the sequential definition; batch 0 or length 0 give empty states.

    Args:
        u: Input sequence.
        delta: Step size before bias and softplus.
        A: Decay rate per channel (non-positive).
        B: Input-dependent input projection.
        delta_bias: Optional step bias, added once.
        delta_softplus: Apply softplus to the biased step.
        reverse: Scan from the last step to the first (equals flipping the inputs and the states along length).
        backend: ``"auto"`` (the first backend of the ``state_scan`` rows of
            :data:`mambazoo.ops.capabilities.CAPABILITIES` that supports the call: Triton on CUDA, native on CPU,
            else torch), ``"reference"``, ``"torch"``, ``"native"`` or ``"triton"``.

    Returns:
        The states h, (batch, length, dim).
    """
    _check_arguments(u, delta, A, B, delta_bias)
    name = resolve_backend("state_scan", backend, u.device, u.dtype)
    check_A_sign(A, name)
    if name in ("reference", "torch") and routing_through_custom_op():
        return state_scan_fused(u, delta, A, B, delta_bias, delta_softplus, reverse, "torch")
    if name == "reference":
        return state_scan_reference(u, delta, A, B, delta_bias, delta_softplus, reverse)
    if name == "torch":
        return state_scan_torch(u, delta, A, B, delta_bias, delta_softplus, reverse)
    return state_scan_fused(u, delta, A, B, delta_bias, delta_softplus, reverse, name)

"""Public selective-scan entry point: argument checks and backend dispatch."""
import contextlib
import sys
from typing import Iterator, Optional

import torch
from torch import Tensor

from . import capabilities
from .capabilities import backend_names, resolve_backend
from .fused import FusedKernel, check_A_sign, check_scan_tensor, register_kernel, selective_scan_fused
from .reference import selective_scan_reference
from .torch_scan import selective_scan_torch

__all__ = ["selective_scan", "available_backends", "backend_status", "route_through_custom_op",
           "routing_through_custom_op", "BACKENDS"]

BACKENDS = backend_names("selective_scan")
_route_through_custom_op = False


def backend_status() -> dict[str, str]:
    """Every scan backend with ``"available"`` or the reason it is not (e.g. no compiler at install time)."""
    return capabilities.backend_status("selective_scan")


def available_backends() -> tuple[str, ...]:
    """Names of the scan backends usable in this installation."""
    return tuple(name for name, status in backend_status().items() if status == "available")


def _check_arguments(u, delta, A, B, C, D, z, delta_bias) -> None:
    if not isinstance(u, Tensor) or u.dim() != 3:
        raise ValueError(f"u must be a (batch, length, dim) tensor, got {getattr(u, 'shape', type(u).__name__)}")
    if not isinstance(A, Tensor) or A.dim() != 2:
        raise ValueError(f"A must be a (dim, d_state) tensor, got {getattr(A, 'shape', type(A).__name__)}")
    batch, length, dim = u.shape
    d_state = A.shape[1]
    device = u.device
    check_scan_tensor("u", u, (batch, length, dim), device)
    check_scan_tensor("delta", delta, (batch, length, dim), device)
    check_scan_tensor("A", A, (dim, d_state), device)
    check_scan_tensor("B", B, (batch, length, d_state), device)
    check_scan_tensor("C", C, (batch, length, d_state), device)
    for name, tensor in (("D", D), ("delta_bias", delta_bias)):
        if tensor is not None:
            check_scan_tensor(name, tensor, (dim,), device)
    if z is not None:
        check_scan_tensor("z", z, (batch, length, dim), device)
    for name, tensor in (("delta", delta), ("B", B), ("C", C), ("z", z)):
        if tensor is not None and tensor.dtype != u.dtype:
            raise TypeError(f"{name} has dtype {tensor.dtype} but u has {u.dtype}; cast them to one dtype")
    if d_state == 0:
        raise ValueError("A has d_state 0: the scan needs at least one state per channel")


def _resolve_backend(backend: str, u: Tensor, d_state: int) -> str:
    return resolve_backend("selective_scan", backend, u.device, u.dtype, d_state=d_state)


def _torch_kernel_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
    y, last_state = selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
    last_state = last_state.clone(memory_format=torch.contiguous_format)  # a view of all states: own storage
    return y, last_state, last_state.new_zeros((u.shape[0], 1) + tuple(last_state.shape[1:]))


def _torch_kernel_backward(grad_y, grad_last_state, u, delta, A, B, C, D, z, delta_bias, chunk_states,
                           delta_softplus, reverse):
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
        y, last_state = selective_scan_torch(*leaves, delta_softplus, reverse)
        outputs, output_grads = [y], [grad_y.to(y.dtype)]
        if grad_last_state is not None:
            outputs.append(last_state)
            output_grads.append(grad_last_state.to(last_state.dtype))
        grads = iter(torch.autograd.grad(outputs, [t for t in leaves if t is not None], output_grads,
                                         allow_unused=True, materialize_grads=True))
    return tuple(u.new_empty((0,)) if t is None else next(grads) for t in inputs)


# The pure-PyTorch scan as a fused-op kernel: one chunk; its backward recomputes the forward with autograd, so it
# runs in the op's autograd formula instead of a backward op. It is used only under route_through_custom_op(), so
# that tools that intercept ops (FLOP counters) see one op per scan call.
register_kernel("torch", FusedKernel(_torch_kernel_forward, _torch_kernel_backward, chunk_size=sys.maxsize,
                                     float64_states=True, backward_uses_autograd=True))


@contextlib.contextmanager
def route_through_custom_op() -> Iterator[None]:
    """Within this context every scan runs as one custom-op call (``torch.ops.mambazoo.selective_scan_fused``, and
    ``torch.ops.mambazoo.state_scan_fused`` for :func:`mambazoo.ops.state_scan`).

    The op runs the pure-PyTorch implementation, whatever backend was requested (so the context also works on the
    ``meta`` device, and the requested backend is not checked). ``mambazoo.flops`` uses it to count each scan call
    once, and :mod:`mambazoo.export` to export every scan as one op with an ONNX translation.
    """
    global _route_through_custom_op
    previous, _route_through_custom_op = _route_through_custom_op, True
    try:
        yield
    finally:
        _route_through_custom_op = previous


def routing_through_custom_op() -> bool:
    """Whether a :func:`route_through_custom_op` context is active."""
    return _route_through_custom_op


def selective_scan(
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Optional[Tensor] = None,
        z: Optional[Tensor] = None,
        delta_bias: Optional[Tensor] = None,
        delta_softplus: bool = True,
        reverse: bool = False,
        return_last_state: bool = False,
        backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan (Mamba's S6) in the channels-last layout.

    With Δ' = softplus(delta + delta_bias) (each part optional) and h_{-1} = 0::

        h_t = exp(Δ'_t A) * h_{t-1} + Δ'_t * B_t * u_t        (per channel d and state n)
        y_t = sum_n C_t[n] * h_t[:, n] + D * u_t,   then   y_t *= SiLU(z_t)

    Layout: ``u``, ``delta`` and ``z`` are (batch, length, dim) — the layout a Linear layer produces, so no
    transposes are needed; ``B`` and ``C`` are (batch, length, d_state); ``A`` is (dim, d_state) with A <= 0
    (checked for CPU tensors, by the native kernel itself; on accelerators the check would cost a host sync);
    ``D`` and ``delta_bias`` are (dim,). Independent scans (e.g. several scan paths) are batched along the batch
    dimension; inputs they share may be ``expand``-ed views. State and accumulation are float32 (float64 for float64
    inputs on the ``reference``/``torch`` backends); float16/bfloat16 inputs are accepted and y has u's dtype.

    Args:
        u: Input sequence.
        delta: Step size before bias and softplus.
        A: State matrix (non-positive).
        B: Input-dependent input projection.
        C: Input-dependent output projection.
        D: Optional skip connection.
        z: Optional gate.
        delta_bias: Optional step bias (models with a doubled dt bias pass the bias here *and* inside delta).
        delta_softplus: Apply softplus to the biased step.
        reverse: Scan from the last step to the first (equals flipping every input and the output along length).
        return_last_state: Also return the final state, (batch, dim, d_state) float32 (float64 for float64 inputs).
        backend: ``"auto"`` (the first backend of :data:`mambazoo.ops.capabilities.CAPABILITIES` that supports
            the call: Triton on CUDA, native on CPU, else torch), ``"reference"``, ``"torch"``, ``"native"`` or
            ``"triton"``.

    Returns:
        y (batch, length, dim), or (y, last_state) when ``return_last_state``.
    """
    _check_arguments(u, delta, A, B, C, D, z, delta_bias)
    name = "torch_custom_op" if _route_through_custom_op else _resolve_backend(backend, u, A.shape[1])
    check_A_sign(A, name)
    if name == "reference":
        y, last_state = selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
    elif name == "torch":
        y, last_state = selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
    elif name == "torch_custom_op":
        y, last_state = selective_scan_fused(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, "torch")
    else:
        y, last_state = selective_scan_fused(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, name)
    return (y, last_state) if return_last_state else y

"""Pure-PyTorch selective scan: any device, any step size, autograd, traceable.

Algorithm (chunk-parallel recurrence). The state recurrence h_t = a_t * h_{t-1} + x_t with a_t = exp(Δ_t A) is split
into chunks of ``chunk_size`` steps. A first sequential pass runs every chunk from a zero state, one vectorised step
for all chunks at once, and keeps only the chunk ends; these form a shorter recurrence of the same kind (decay = the
product of the chunk's decays), solved recursively, which gives the state entering every chunk; a second pass re-runs
the chunks from their entering states and writes every state. Every factor is an exponential of a non-positive
number, so nothing can overflow whatever the step size (unlike the factored closed form
exp(cumsum) * cumsum(exp(-cumsum)), see ``docs/scan_operation.md``). The Python loop runs ``chunk_size`` steps per
recursion level instead of one per time step.

The backward is the adjoint recurrence g_t = grad_t + a_{t+1} g_{t+1}, i.e. the same scan run in reverse, so autograd
never records per-step operations and the backward costs about one more scan.

The (batch, length, dim, d_state) temporaries are built one block of time steps at a time (about ``BLOCK_ELEMENTS``
elements each, the state carried between blocks): small temporaries stay in cache and are recycled by the allocator,
where full-length ones would cost a page fault per page on every call.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_CHUNK_SIZE = 16
BLOCK_ELEMENTS = 1 << 20


def _run_steps(decay: Tensor, increment: Tensor, initial: Optional[Tensor], dim: int, keep_all: bool) -> Tensor:
    """Run h_t = decay_t * h_{t-1} + increment_t along ``dim`` from ``initial`` (None = zero state).

    Returns every state (shaped like ``increment``) if ``keep_all``, else the last one. Eagerly the states are written
    into one preallocated tensor; under torch.compile (which rejects strided ``out=``) they are stacked.
    """
    write_in_place = keep_all and not torch.compiler.is_compiling()
    states = torch.empty_like(increment) if write_in_place else []
    state = initial
    for step, (decay_t, increment_t) in enumerate(zip(decay.unbind(dim), increment.unbind(dim))):
        destination = states.select(dim, step) if write_in_place else None
        if state is None:
            state = increment_t if destination is None else destination.copy_(increment_t)
        else:
            state = torch.addcmul(increment_t, decay_t, state, out=destination)
        if keep_all and not write_in_place:
            states.append(state)
    if not keep_all:
        return state
    return states if write_in_place else torch.stack(states, dim)


def _pad_steps(tensor: Tensor, before: int, after: int) -> Tensor:
    """Zero-pad dim 1 of a (batch, length, ...) tensor."""
    return F.pad(tensor, (0, 0) * (tensor.dim() - 2) + (before, after))


def _scan_states(log_decay: Tensor, increment: Tensor, initial: Optional[Tensor], chunk_size: int) -> Tensor:
    """Every state of the recurrence along dim 1 (no autograd); see the module docstring."""
    length = log_decay.shape[1]
    if length <= chunk_size:
        return _run_steps(log_decay.exp(), increment, initial, dim=1, keep_all=True)
    pad = (-length) % chunk_size  # padded steps carry decay 1 and no input: they only extend the last chunk
    log_decay, increment = _pad_steps(log_decay, 0, pad), _pad_steps(increment, 0, pad)
    batch, padded, *rest = increment.shape
    chunked = (batch, padded // chunk_size, chunk_size, *rest)
    log_decay, increment = log_decay.reshape(chunked), increment.reshape(chunked)
    decay = log_decay.exp()

    local_ends = _run_steps(decay, increment, None, dim=2, keep_all=False)
    chunk_ends = _scan_states(log_decay.sum(2), local_ends, initial, chunk_size)
    if initial is None:
        entering = _pad_steps(chunk_ends[:, :-1], 1, 0)
    else:
        entering = torch.cat([initial.unsqueeze(1), chunk_ends[:, :-1]], dim=1)
    states = _run_steps(decay, increment, entering, dim=2, keep_all=True)
    return states.reshape(batch, padded, *rest)[:, :length]


class _LinearScan(torch.autograd.Function):
    """Autograd wrapper: the backward is the adjoint recurrence, itself a (reversed) linear scan."""

    @staticmethod
    def forward(log_decay: Tensor, increment: Tensor, initial: Optional[Tensor], chunk_size: int) -> Tensor:
        return _scan_states(log_decay, increment, initial, chunk_size)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # separate from forward so that torch.func transforms work
        log_decay, _, initial, chunk_size = inputs
        ctx.save_for_backward(log_decay, output, initial)
        ctx.chunk_size = chunk_size

    @staticmethod
    def backward(ctx, grad_states: Tensor):
        log_decay, states, initial = ctx.saved_tensors
        next_log_decay = _pad_steps(log_decay[:, 1:], 0, 1)
        adjoint = _scan_states(next_log_decay.flip(1), grad_states.flip(1), None, ctx.chunk_size).flip(1)
        previous = torch.cat([initial.unsqueeze(1), states[:, :-1]], 1) if initial is not None else _pad_steps(
            states[:, :-1], 1, 0)
        decay_times_adjoint = adjoint * log_decay.exp()
        grad_initial = decay_times_adjoint[:, 0] if initial is not None else None
        return decay_times_adjoint * previous, adjoint, grad_initial, None


def linear_scan(
        log_decay: Tensor,
        increment: Tensor,
        initial: Optional[Tensor] = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """All states of h_t = exp(log_decay_t) * h_{t-1} + increment_t along dim 1, differentiable.

    Args:
        log_decay: Non-positive log decays, (batch, length, ...).
        increment: Additive inputs, same shape.
        initial: State before the first step, (batch, ...); None means zeros.
        chunk_size: Steps run sequentially per recursion level.

    Returns:
        The states, same shape as ``increment``.
    """
    return _LinearScan.apply(log_decay, increment, initial, chunk_size)


def selective_scan_torch(
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
        chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """Selective scan in pure PyTorch; arguments as :func:`mambazoo.ops.selective_scan`.

    Computes in float64 for float64 inputs and in float32 otherwise.

    Returns:
        y in u's dtype, (batch, length, dim), and the final state, (batch, dim, d_state), in the compute dtype.
    """
    out_dtype = u.dtype
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, A, B, C = (t.to(compute) for t in (u, delta, A, B, C))
    if reverse:
        u, delta, B, C = (t.flip(1) for t in (u, delta, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)
    if delta_softplus:
        delta = F.softplus(delta)
    y, last_state = _blocked_scan(delta, delta * u, A, B, C, chunk_size)
    if D is not None:
        y = y + u * D.to(compute)
    if reverse:
        y = y.flip(1)
    if z is not None:
        y = y * F.silu(z.to(compute))
    return y.to(out_dtype), last_state


def _blocked_scan(delta: Tensor, delta_u: Tensor, A: Tensor, B: Tensor, C: Tensor,
                  chunk_size: int) -> tuple[Tensor, Tensor]:
    """Scan without D/z, one block of time steps at a time; returns y (without skip or gate) and the last state."""
    batch, length, dim = delta.shape
    if delta.numel() == 0:  # empty batch or sequence: no steps, the state stays zero
        return delta.new_zeros((batch, length, dim)), delta.new_zeros((batch, dim, A.shape[1]))
    steps_per_block = max(1, BLOCK_ELEMENTS // (batch * dim * A.shape[1]))
    steps_per_block = -(-steps_per_block // chunk_size) * chunk_size
    outputs = []
    state = None
    for start in range(0, length, steps_per_block):
        block = slice(start, start + steps_per_block)
        log_decay = delta[:, block].unsqueeze(-1) * A
        increment = delta_u[:, block].unsqueeze(-1) * B[:, block].unsqueeze(2)
        states = linear_scan(log_decay, increment, state, chunk_size)
        outputs.append(torch.einsum("bldn,bln->bld", states, C[:, block]))
        state = states[:, -1]
    return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0], state

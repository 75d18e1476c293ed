"""Triton kernels of the all-states scan (forward and backward) behind its custom op, registered as ``"triton"``.

Chunked design with the helpers of :mod:`mambazoo.ops.triton_kernels` (step size, loads): one program
per (batch row, block of ``BLOCK_D`` channels) walks the sequence in chunks of ``CHUNK_SIZE`` steps; inside a chunk
the pairs (exp(Δ'A), Δ'·B·u) are combined with ``tl.associative_scan``, the state entering the chunk folded into its
first step, and every state is stored. The backward reads h_{t-1} from the stored states (no recomputation), gets
the state adjoints g_t = dL/dh_t + exp(Δ'_{t+1}A)·g_{t+1} with a reverse associative scan per chunk and carries the
adjoint leaving a chunk's first step to the previous chunk. Reductions are deterministic: dA and d(delta_bias) are
written per batch row, dB per channel block ((channel blocks, batch, length) float32, 1/BLOCK_D of the states), and
summed afterwards. Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (slowly; used by the tests).
"""
from typing import Optional

import torch
from torch import Tensor

from .fused_state_scan import StateKernel, register_state_kernel
from .triton_scan import AVAILABLE, INTERPRETER, UNAVAILABLE_REASON, _device_guard

__all__ = ["AVAILABLE", "UNAVAILABLE_REASON", "CHUNK_SIZE", "state_scan_triton_forward", "state_scan_triton_backward"]

CHUNK_SIZE = 64

if AVAILABLE:
    import triton
    import triton.language as tl

    from .triton_kernels import LOG2E, _load_parameter, _row, _step_size

    @triton.jit
    def _combine(decay_left, value_left, decay_right, value_right):
        """Compose two steps of h -> a·h + b (left first)."""
        return decay_left * decay_right, value_left * decay_right + value_right

    @triton.jit
    def _load_tiles(u_ptr, delta_ptr, B_ptr, batch, rows, channels, seq_ok, row_ok,
                    stride_u_b, stride_u_l, stride_delta_b, stride_delta_l, stride_B_b, stride_B_l):
        """A chunk's (steps, channels) tiles of delta and u and its (steps,) B, in float32."""
        delta = tl.load(delta_ptr + batch * stride_delta_b + rows[:, None] * stride_delta_l + channels[None, :],
                        mask=seq_ok, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + batch * stride_u_b + rows[:, None] * stride_u_l + channels[None, :],
                    mask=seq_ok, other=0.0).to(tl.float32)
        B = tl.load(B_ptr + batch * stride_B_b + rows * stride_B_l, mask=row_ok, other=0.0).to(tl.float32)
        return delta, u, B

    @triton.jit
    def _state_scan_fwd_kernel(
            u_ptr, delta_ptr, A_ptr, B_ptr, bias_ptr, states_ptr,
            length, dim, n_chunks,
            stride_u_b, stride_u_l, stride_delta_b, stride_delta_l, stride_B_b, stride_B_l,
            HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, CHUNK: tl.constexpr,
            BLOCK_D: tl.constexpr, FAST: tl.constexpr,
    ):
        batch = tl.program_id(0).to(tl.int64)
        channels = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        steps = tl.arange(0, CHUNK)
        channel_ok = channels < dim
        A2 = tl.load(A_ptr + channels, mask=channel_ok, other=0.0).to(tl.float32) * LOG2E
        bias = _load_parameter(bias_ptr, channels, channel_ok, HAS_BIAS, BLOCK_D)
        state = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for chunk in range(n_chunks):
            scan_index = chunk * CHUNK + steps
            row_ok = scan_index < length
            rows = _row(scan_index, length, REVERSE)
            seq_ok = row_ok[:, None] & channel_ok[None, :]
            delta, u, B = _load_tiles(u_ptr, delta_ptr, B_ptr, batch, rows, channels, seq_ok, row_ok,
                                      stride_u_b, stride_u_l, stride_delta_b, stride_delta_l, stride_B_b, stride_B_l)
            step, _ = _step_size(delta, bias, HAS_BIAS, SOFTPLUS, FAST)
            step = tl.where(seq_ok, step, 0.0)
            decay = tl.exp2(step * A2[None, :])
            inject = (step * u) * B[:, None]
            inject = tl.where(steps[:, None] == 0, decay * state[None, :] + inject, inject)
            _, h = tl.associative_scan((decay, inject), 0, _combine)
            tl.store(states_ptr + (batch * length + rows[:, None]) * dim + channels[None, :], h, mask=seq_ok)
            state = tl.sum(tl.where(steps[:, None] == CHUNK - 1, h, 0.0), axis=0)

    @triton.jit
    def _state_scan_bwd_kernel(
            grad_ptr, states_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, bias_ptr,
            du_ptr, ddelta_ptr, dA_part_ptr, dB_part_ptr, dbias_part_ptr,
            batch_size, length, dim, n_chunks,
            stride_u_b, stride_u_l, stride_delta_b, stride_delta_l, stride_B_b, stride_B_l,
            HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, CHUNK: tl.constexpr,
            BLOCK_D: tl.constexpr, FAST: tl.constexpr,
    ):
        batch = tl.program_id(0).to(tl.int64)
        block = tl.program_id(1)
        channels = block * BLOCK_D + tl.arange(0, BLOCK_D)
        steps = tl.arange(0, CHUNK)
        channel_ok = channels < dim
        A = tl.load(A_ptr + channels, mask=channel_ok, other=0.0).to(tl.float32)
        A2 = A * LOG2E
        bias = _load_parameter(bias_ptr, channels, channel_ok, HAS_BIAS, BLOCK_D)
        carry = tl.zeros((BLOCK_D,), dtype=tl.float32)
        dA_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        sequence_base = batch * length * dim
        for back in range(n_chunks):
            chunk = n_chunks - 1 - back
            scan_index = chunk * CHUNK + steps
            row_ok = scan_index < length
            rows = _row(scan_index, length, REVERSE)
            seq_ok = row_ok[:, None] & channel_ok[None, :]
            seq_offsets = rows[:, None] * dim + channels[None, :]
            delta, u, B = _load_tiles(u_ptr, delta_ptr, B_ptr, batch, rows, channels, seq_ok, row_ok,
                                      stride_u_b, stride_u_l, stride_delta_b, stride_delta_l, stride_B_b, stride_B_l)
            step, slope = _step_size(delta, bias, HAS_BIAS, SOFTPLUS, FAST)
            step = tl.where(seq_ok, step, 0.0)
            decay = tl.where(seq_ok, tl.exp2(step * A2[None, :]), 1.0)  # padded steps: no 0 * inf, even if A = -inf
            # The previous state in scan order (zero before the first step) and the next step's decay.
            previous_ok = (scan_index >= 1)[:, None] & seq_ok
            previous_rows = _row(scan_index - 1, length, REVERSE)
            previous = tl.load(states_ptr + sequence_base + previous_rows[:, None] * dim + channels[None, :],
                               mask=previous_ok, other=0.0)
            next_ok = ((scan_index + 1 < length) & (steps < CHUNK - 1))[:, None] & channel_ok[None, :]
            next_rows = _row(scan_index + 1, length, REVERSE)
            delta_next = tl.load(delta_ptr + batch * stride_delta_b + next_rows[:, None] * stride_delta_l
                                 + channels[None, :], mask=next_ok, other=0.0).to(tl.float32)
            step_next, _ = _step_size(delta_next, bias, HAS_BIAS, SOFTPLUS, FAST)
            decay_next = tl.where(next_ok, tl.exp2(step_next * A2[None, :]), 1.0)
            grad = tl.load(grad_ptr + sequence_base + seq_offsets, mask=seq_ok, other=0.0).to(tl.float32)
            grad = tl.where(steps[:, None] == CHUNK - 1, grad + carry[None, :], grad)
            _, adjoint = tl.associative_scan((decay_next, grad), 0, _combine, reverse=True)
            adjoint = tl.where(seq_ok, adjoint, 0.0)
            d_log_decay = adjoint * previous * decay
            dstep = (adjoint * u * B[:, None] + d_log_decay * A[None, :]) * slope
            dstep = tl.where(seq_ok, dstep, 0.0)
            dA_acc += tl.sum(d_log_decay * step, axis=0)
            dbias_acc += tl.sum(dstep, axis=0)
            tl.store(du_ptr + sequence_base + seq_offsets, adjoint * step * B[:, None], mask=seq_ok)
            tl.store(ddelta_ptr + sequence_base + seq_offsets, dstep, mask=seq_ok)
            tl.store(dB_part_ptr + (block * batch_size + batch) * length + rows, tl.sum(adjoint * step * u, axis=1),
                     mask=row_ok)
            carry = tl.sum(tl.where(steps[:, None] == 0, decay * adjoint, 0.0), axis=0)
        tl.store(dA_part_ptr + batch * dim + channels, dA_acc, mask=channel_ok)
        tl.store(dbias_part_ptr + batch * dim + channels, dbias_acc, mask=channel_ok)


def _block_d() -> int:
    return 8 if INTERPRETER else 32  # the interpreter runs the scans element by element in Python: small tiles


def _rowwise(tensor: Tensor) -> Tensor:
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _strides(tensor: Tensor) -> tuple[int, int]:
    return tensor.stride(0), tensor.stride(1)


def _prepare(u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
             delta_bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Inputs as the kernels read them: rows contiguous, A flat, B without its unit state axis, a stand-in bias."""
    if not AVAILABLE:
        raise RuntimeError(f"the triton state scan backend is unavailable: {UNAVAILABLE_REASON}")
    if u.device.type != "cuda" and not INTERPRETER:
        raise ValueError(f"the triton state scan backend needs CUDA tensors (or TRITON_INTERPRET=1), got {u.device}")
    A = A.reshape(-1).contiguous()
    bias = A if delta_bias is None else delta_bias.contiguous()
    return _rowwise(u), _rowwise(delta), A, B[..., 0], bias


def state_scan_triton_forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, delta_bias: Optional[Tensor],
                              delta_softplus: bool, reverse: bool) -> Tensor:
    """Forward launch following the ``fused_state_scan`` contract: float32 states."""
    batch, length, dim = u.shape
    states = torch.empty((batch, length, dim), dtype=torch.float32, device=u.device)
    if not states.numel():
        return states
    u, delta, A, B, bias = _prepare(u, delta, A, B, delta_bias)
    block_d = _block_d()
    with _device_guard(u):
        _state_scan_fwd_kernel[(batch, triton.cdiv(dim, block_d))](
            u, delta, A, B, bias, states, length, dim, triton.cdiv(length, CHUNK_SIZE),
            *_strides(u), *_strides(delta), *_strides(B),
            HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus, REVERSE=reverse, CHUNK=CHUNK_SIZE,
            BLOCK_D=block_d, FAST=not INTERPRETER, num_warps=1 if INTERPRETER else 4,
        )
    return states


def state_scan_triton_backward(grad_states: Tensor, states: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
                               delta_bias: Optional[Tensor], delta_softplus: bool,
                               reverse: bool) -> tuple[Tensor, ...]:
    """Backward launch following the ``fused_state_scan`` contract: gradients of (u, delta, A, B, delta_bias)."""
    batch, length, dim = u.shape
    block_d = _block_d()
    n_blocks = triton.cdiv(dim, block_d)
    device = u.device
    du, ddelta = torch.zeros_like(u), torch.zeros_like(delta)
    dA_part = torch.zeros((batch, dim), dtype=torch.float32, device=device)
    dbias_part = torch.zeros((batch, dim), dtype=torch.float32, device=device)
    dB_part = torch.zeros((n_blocks, batch, length), dtype=torch.float32, device=device)
    if u.numel():
        grad_states, states = grad_states.contiguous(), states.contiguous()
        u_rows, delta_rows, A_flat, B_rows, bias = _prepare(u, delta, A, B, delta_bias)
        with _device_guard(u):
            _state_scan_bwd_kernel[(batch, n_blocks)](
                grad_states, states, u_rows, delta_rows, A_flat, B_rows, bias,
                du, ddelta, dA_part, dB_part, dbias_part,
                batch, length, dim, triton.cdiv(length, CHUNK_SIZE),
                *_strides(u_rows), *_strides(delta_rows), *_strides(B_rows),
                HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus, REVERSE=reverse, CHUNK=CHUNK_SIZE,
                BLOCK_D=block_d, FAST=not INTERPRETER, num_warps=1 if INTERPRETER else 8,
            )
    dbias = dbias_part.sum(0).to(delta_bias.dtype) if delta_bias is not None else u.new_empty((0,))
    return du, ddelta, dA_part.sum(0).view(A.shape).to(A.dtype), dB_part.sum(0).unsqueeze(-1).to(B.dtype), dbias


if AVAILABLE:
    register_state_kernel("triton", StateKernel(state_scan_triton_forward, state_scan_triton_backward))

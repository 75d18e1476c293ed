"""Triton selective-scan kernels (forward and backward) behind the fused custom op, registered as ``"triton"``.

Design (after mamba_ssm's CUDA kernel, ``scan.md`` §7):

* One program per (batch row, block of ``BLOCK_D`` channels). It walks the sequence in chunks of ``CHUNK_SIZE``
  steps; a chunk's inputs are loaded as whole (steps, channels) tiles straight from the channels-last layout (any
  batch/length strides, last dim contiguous, so ``expand``-ed stride-0 batch views cost nothing).
* Inside a chunk all steps run in parallel: the pairs (exp(Δ'A), Δ'·B·u) of the (steps, channels, d_state) tile are
  combined with ``tl.associative_scan`` using (a₁, b₁)∘(a₂, b₂) = (a₁a₂, b₁a₂ + b₂); the state entering the chunk is
  folded into the first step, so the chunk's last state is the prefix carried on-chip to the next chunk.
* Only the state entering each chunk is written to memory (the contract's ``chunk_states``). The backward walks the
  chunks in reverse, recomputes the chunk's states from that saved state, and gets the state adjoints with a reverse
  associative scan; the adjoint leaving the chunk's first step is carried to the previous chunk.
* Parallelism comes from batch × channel blocks (Vim-Ti: D = 384 gives 24 blocks per sequence) and from the steps
  of a chunk. The chunks of one sequence run sequentially: a chunk-parallel two-pass scheme would only help when
  batch × channel blocks cannot fill the device (batch 1 with few channels) and would double the state traffic.
* Every exponential is ``exp2`` of a non-positive argument (log2(e) folded into A; SiLU and softplus use exp(-|x|)),
  so nothing can overflow whatever the step size. State and accumulation are float32 for every input dtype.
* Reductions are deterministic: dA, dD and d(delta_bias) are written per batch row and summed afterwards; dB and dC
  per channel block ((channel blocks, batch, length, d_state) float32 partials, the size of one float32 (batch,
  length, dim) tensor for d_state = 16 and ``BLOCK_D`` = 16), then summed.

Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (slowly; used by the tests).
"""
import os
from contextlib import nullcontext
from typing import ContextManager, Optional

import torch
from torch import Tensor

from .fused import FusedKernel, register_kernel

__all__ = ["AVAILABLE", "UNAVAILABLE_REASON", "CHUNK_SIZE", "INTERPRETER", "selective_scan_triton_forward",
           "selective_scan_triton_backward"]

CHUNK_SIZE = 32
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton
    import triton.language as tl
except ImportError as error:  # pragma: no cover - triton ships with the default PyTorch build
    triton = None
    _IMPORT_ERROR: Optional[str] = f"triton is not importable: {error}"
else:
    _IMPORT_ERROR = None


def _unavailable_reason() -> Optional[str]:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if not (INTERPRETER or torch.cuda.is_available()):
        return "no CUDA device (set TRITON_INTERPRET=1 before importing to run the kernels on CPU, slowly)"
    return None


UNAVAILABLE_REASON = _unavailable_reason()
AVAILABLE = UNAVAILABLE_REASON is None


if triton is not None:
    _LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x·log2(e))

    @triton.jit
    def _combine(decay_left, value_left, decay_right, value_right):
        """Compose two steps of h -> a·h + b (left first)."""
        return decay_left * decay_right, value_left * decay_right + value_right

    @triton.jit
    def _sigmoid(x):
        """Sigmoid through exp2 of a non-positive argument."""
        e = tl.exp2(-tl.abs(x) * _LOG2E)
        return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))

    @triton.jit
    def _log1p_small(x):
        """log(1 + x) for 0 <= x <= 1, accurate for tiny x: log(w)·x/(w - 1) with w = fl(1 + x) (Goldberg)."""
        w = 1.0 + x
        exact = w == 1.0
        return tl.where(exact, x, tl.log(w) * x / tl.where(exact, 1.0, w - 1.0))

    @triton.jit
    def _step_size(delta, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
        """Δ' = softplus(Δ + bias) (torch's threshold of 20) and the biased Δ."""
        if HAS_BIAS:
            delta = delta + bias[None, :]
        step = delta
        if SOFTPLUS:
            soft = tl.maximum(delta, 0.0) + _log1p_small(tl.exp2(-tl.abs(delta) * _LOG2E))
            step = tl.where(delta > 20.0, delta, soft)
        return step, delta

    @triton.jit
    def _load_channels(ptr, channels, channel_ok, PRESENT: tl.constexpr, BLOCK_D: tl.constexpr):
        """A per-channel parameter as float32, zeros when absent."""
        if PRESENT:
            return tl.load(ptr + channels, mask=channel_ok, other=0.0).to(tl.float32)
        return tl.zeros((BLOCK_D,), dtype=tl.float32)

    @triton.jit
    def _rows(scan_index, length, REVERSE: tl.constexpr):
        """Memory position of each scan-order step."""
        if REVERSE:
            return length - 1 - scan_index
        return scan_index

    @triton.jit
    def _load_chunk(u_ptr, delta_ptr, B_ptr, C_ptr, batch, rows, channels, states, seq_ok, proj_ok,
                    stride_u_b, stride_u_l, stride_delta_b, stride_delta_l, stride_B_b, stride_B_l,
                    stride_C_b, stride_C_l):
        """A chunk's (steps, channels) tiles of delta and u and (steps, states) tiles of B and C, in float32."""
        delta = tl.load(delta_ptr + batch * stride_delta_b + rows[:, None] * stride_delta_l + channels[None, :],
                        mask=seq_ok, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + batch * stride_u_b + rows[:, None] * stride_u_l + channels[None, :],
                    mask=seq_ok, other=0.0).to(tl.float32)
        B = tl.load(B_ptr + batch * stride_B_b + rows[:, None] * stride_B_l + states[None, :],
                    mask=proj_ok, other=0.0).to(tl.float32)
        C = tl.load(C_ptr + batch * stride_C_b + rows[:, None] * stride_C_l + states[None, :],
                    mask=proj_ok, other=0.0).to(tl.float32)
        return delta, u, B, C

    @triton.jit
    def _selective_scan_fwd_kernel(
            u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
            y_ptr, last_state_ptr, chunk_states_ptr,
            length, dim, d_state, n_chunks,
            stride_u_b, stride_u_l, stride_delta_b, stride_delta_l, stride_B_b, stride_B_l,
            stride_C_b, stride_C_l, stride_z_b, stride_z_l,
            HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
            REVERSE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        batch = tl.program_id(0).to(tl.int64)
        channels = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        states = tl.arange(0, BLOCK_N)
        steps = tl.arange(0, CHUNK)
        channel_ok = channels < dim
        state_ok = states < d_state
        tile_ok = channel_ok[:, None] & state_ok[None, :]
        state_offsets = channels[:, None] * d_state + states[None, :]
        A = tl.load(A_ptr + state_offsets, mask=tile_ok, other=0.0).to(tl.float32) * _LOG2E
        bias = _load_channels(bias_ptr, channels, channel_ok, HAS_BIAS, BLOCK_D)
        skip = _load_channels(D_ptr, channels, channel_ok, HAS_D, BLOCK_D)
        state = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        for chunk in range(n_chunks):
            chunk_base = (batch * n_chunks + chunk) * dim * d_state
            tl.store(chunk_states_ptr + chunk_base + state_offsets, state, mask=tile_ok)
            scan_index = chunk * CHUNK + steps
            row_ok = scan_index < length
            rows = _rows(scan_index, length, REVERSE)
            seq_ok = row_ok[:, None] & channel_ok[None, :]
            proj_ok = row_ok[:, None] & state_ok[None, :]
            delta, u, B, C = _load_chunk(u_ptr, delta_ptr, B_ptr, C_ptr, batch, rows, channels, states, seq_ok,
                                         proj_ok, stride_u_b, stride_u_l, stride_delta_b, stride_delta_l,
                                         stride_B_b, stride_B_l, stride_C_b, stride_C_l)
            step, _ = _step_size(delta, bias, HAS_BIAS, SOFTPLUS)
            step = tl.where(seq_ok, step, 0.0)
            decay = tl.where(seq_ok[:, :, None], tl.exp2(step[:, :, None] * A[None, :, :]), 1.0)  # pads: even A=-inf
            inject = (step * u)[:, :, None] * B[:, None, :]
            inject = tl.where(steps[:, None, None] == 0, inject + decay * state[None, :, :], inject)
            _, h = tl.associative_scan((decay, inject), 0, _combine)
            y = tl.sum(h * C[:, None, :], axis=2)
            if HAS_D:
                y += skip[None, :] * u
            if HAS_Z:
                z = tl.load(z_ptr + batch * stride_z_b + rows[:, None] * stride_z_l + channels[None, :],
                            mask=seq_ok, other=0.0).to(tl.float32)
                y *= z * _sigmoid(z)
            tl.store(y_ptr + (batch * length + rows[:, None]) * dim + channels[None, :], y, mask=seq_ok)
            state = tl.sum(tl.where(steps[:, None, None] == CHUNK - 1, h, 0.0), axis=0)
        tl.store(last_state_ptr + batch * dim * d_state + state_offsets, state, mask=tile_ok)

    @triton.jit
    def _selective_scan_bwd_kernel(
            grad_y_ptr, grad_last_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
            chunk_states_ptr,
            du_ptr, ddelta_ptr, dz_ptr, dA_part_ptr, dB_part_ptr, dC_part_ptr, dD_part_ptr, dbias_part_ptr,
            batch_size, length, dim, d_state, n_chunks,
            stride_u_b, stride_u_l, stride_delta_b, stride_delta_l, stride_B_b, stride_B_l,
            stride_C_b, stride_C_l, stride_z_b, stride_z_l,
            HAS_GRAD_LAST: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
            SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_N: tl.constexpr,
    ):
        batch = tl.program_id(0).to(tl.int64)
        block = tl.program_id(1)
        channels = block * BLOCK_D + tl.arange(0, BLOCK_D)
        states = tl.arange(0, BLOCK_N)
        steps = tl.arange(0, CHUNK)
        channel_ok = channels < dim
        state_ok = states < d_state
        tile_ok = channel_ok[:, None] & state_ok[None, :]
        state_offsets = channels[:, None] * d_state + states[None, :]
        A = tl.load(A_ptr + state_offsets, mask=tile_ok, other=0.0).to(tl.float32)
        A2 = A * _LOG2E
        bias = _load_channels(bias_ptr, channels, channel_ok, HAS_BIAS, BLOCK_D)
        skip = _load_channels(D_ptr, channels, channel_ok, HAS_D, BLOCK_D)
        carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        if HAS_GRAD_LAST:
            carry = tl.load(grad_last_ptr + batch * dim * d_state + state_offsets, mask=tile_ok, other=0.0)
            carry = carry.to(tl.float32)
        dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        part_base = (block * batch_size + batch) * length * d_state
        for back in range(n_chunks):
            chunk = n_chunks - 1 - back
            state_in = tl.load(chunk_states_ptr + (batch * n_chunks + chunk) * dim * d_state + state_offsets,
                               mask=tile_ok, other=0.0)
            scan_index = chunk * CHUNK + steps
            row_ok = scan_index < length
            rows = _rows(scan_index, length, REVERSE)
            seq_ok = row_ok[:, None] & channel_ok[None, :]
            proj_ok = row_ok[:, None] & state_ok[None, :]
            seq_offsets = rows[:, None] * dim + channels[None, :]
            delta, u, B, C = _load_chunk(u_ptr, delta_ptr, B_ptr, C_ptr, batch, rows, channels, states, seq_ok,
                                         proj_ok, stride_u_b, stride_u_l, stride_delta_b, stride_delta_l,
                                         stride_B_b, stride_B_l, stride_C_b, stride_C_l)
            grad_y = tl.load(grad_y_ptr + batch * length * dim + seq_offsets, mask=seq_ok, other=0.0).to(tl.float32)
            step, biased = _step_size(delta, bias, HAS_BIAS, SOFTPLUS)
            step = tl.where(seq_ok, step, 0.0)
            # Recompute the chunk's states from the saved entering state.
            decay = tl.exp2(step[:, :, None] * A2[None, :, :])
            inject = (step * u)[:, :, None] * B[:, None, :]
            first = steps[:, None, None] == 0
            _, h = tl.associative_scan((decay, tl.where(first, inject + decay * state_in[None, :, :], inject)),
                                       0, _combine)
            gate_grad = grad_y
            if HAS_Z:
                z = tl.load(z_ptr + batch * stride_z_b + rows[:, None] * stride_z_l + channels[None, :],
                            mask=seq_ok, other=0.0).to(tl.float32)
                sig = _sigmoid(z)
                y_pre = tl.sum(h * C[:, None, :], axis=2) + skip[None, :] * u
                dz = grad_y * y_pre * sig * (1.0 + z * (1.0 - sig))
                tl.store(dz_ptr + batch * length * dim + seq_offsets, dz, mask=seq_ok)
                gate_grad = grad_y * z * sig
            tl.store(dC_part_ptr + part_base + rows[:, None] * d_state + states[None, :],
                     tl.sum(gate_grad[:, :, None] * h, axis=1), mask=proj_ok)
            # State adjoints: dh_t = C_t·g_t + exp(Δ'_{t+1}A)·dh_{t+1}; the next step's decay comes from a shifted load.
            next_index = scan_index + 1
            next_ok = (next_index < length) & (steps < CHUNK - 1)
            next_rows = _rows(next_index, length, REVERSE)
            next_mask = next_ok[:, None] & channel_ok[None, :]
            delta_next = tl.load(delta_ptr + batch * stride_delta_b + next_rows[:, None] * stride_delta_l
                                 + channels[None, :], mask=next_mask, other=0.0).to(tl.float32)
            step_next, _ = _step_size(delta_next, bias, HAS_BIAS, SOFTPLUS)
            decay_next = tl.where(next_mask[:, :, None], tl.exp2(step_next[:, :, None] * A2[None, :, :]), 1.0)
            adjoint = C[:, None, :] * gate_grad[:, :, None]
            adjoint = tl.where(steps[:, None, None] == CHUNK - 1, adjoint + carry[None, :, :], adjoint)
            _, dh = tl.associative_scan((decay_next, adjoint), 0, _combine, reverse=True)
            # Gradients of the step's inputs: x_t = Δ'·u·B and a_t·h_{t-1} = h_t - x_t.
            dh_B = tl.sum(dh * B[:, None, :], axis=2)
            decay_term = tl.where(seq_ok[:, :, None], dh * (h - inject), 0.0)
            dstep = dh_B * u + tl.sum(decay_term * A[None, :, :], axis=2)
            dA_acc += tl.sum(decay_term * step[:, :, None], axis=0)
            tl.store(dB_part_ptr + part_base + rows[:, None] * d_state + states[None, :],
                     tl.sum(dh * (step * u)[:, :, None], axis=1), mask=proj_ok)
            du = dh_B * step
            if HAS_D:
                du += skip[None, :] * gate_grad
                dD_acc += tl.sum(tl.where(seq_ok, gate_grad * u, 0.0), axis=0)
            ddelta = dstep
            if SOFTPLUS:
                ddelta = tl.where(biased > 20.0, dstep, dstep * _sigmoid(biased))
            ddelta = tl.where(seq_ok, ddelta, 0.0)
            dbias_acc += tl.sum(ddelta, axis=0)
            tl.store(du_ptr + batch * length * dim + seq_offsets, du, mask=seq_ok)
            tl.store(ddelta_ptr + batch * length * dim + seq_offsets, ddelta, mask=seq_ok)
            carry = tl.sum(tl.where(first, decay * dh, 0.0), axis=0)
        tl.store(dA_part_ptr + batch * dim * d_state + state_offsets, dA_acc, mask=tile_ok)
        tl.store(dD_part_ptr + batch * dim + channels, dD_acc, mask=channel_ok)
        tl.store(dbias_part_ptr + batch * dim + channels, dbias_acc, mask=channel_ok)


def _launch_config(d_state: int, backward: bool) -> dict:
    """Block sizes and warps: channel blocks of 16 (a 32-byte row of bf16), all states padded to a power of 2."""
    block_n = triton.next_power_of_2(d_state)
    if INTERPRETER:  # the interpreter scans element by element in Python: keep the tiles small
        return dict(BLOCK_D=8, BLOCK_N=block_n, num_warps=1)
    block_d = 16 if block_n <= 16 else 8
    warps = 8 if backward else 4
    return dict(BLOCK_D=block_d, BLOCK_N=block_n, num_warps=warps)


def _rowwise(tensor: Optional[Tensor]) -> Optional[Tensor]:
    """The tensor with a contiguous last dim (batch/length strides are passed to the kernel as they are)."""
    if tensor is None or tensor.stride(-1) == 1:
        return tensor
    return tensor.contiguous()


def _strides(tensor: Optional[Tensor]) -> tuple[int, int]:
    return (0, 0) if tensor is None else (tensor.stride(0), tensor.stride(1))


def _check_device(u: Tensor) -> None:
    if not AVAILABLE:
        raise RuntimeError(f"the triton scan backend is unavailable: {UNAVAILABLE_REASON}")
    if u.device.type != "cuda" and not INTERPRETER:
        raise ValueError(f"the triton scan backend needs CUDA tensors (or TRITON_INTERPRET=1), got {u.device}")


def _device_guard(u: Tensor) -> ContextManager:
    return torch.cuda.device(u.device) if u.device.type == "cuda" else nullcontext()


def selective_scan_triton_forward(
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
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward kernel launch following the ``fused.py`` contract; returns (y, last_state, chunk_states)."""
    _check_device(u)
    u, delta, B, C, z = (_rowwise(t) for t in (u, delta, B, C, z))
    A = A.contiguous()
    batch, length, dim = u.shape
    d_state = A.shape[1]
    n_chunks = triton.cdiv(length, CHUNK_SIZE)
    y = torch.empty((batch, length, dim), dtype=u.dtype, device=u.device)
    last_state = torch.empty((batch, dim, d_state), dtype=torch.float32, device=u.device)
    chunk_states = torch.empty((batch, n_chunks, dim, d_state), dtype=torch.float32, device=u.device)
    config = _launch_config(d_state, backward=False)
    grid = (batch, triton.cdiv(dim, config["BLOCK_D"]))
    if batch == 0 or dim == 0:  # nothing to launch: every output is empty
        return y, last_state, chunk_states
    with _device_guard(u):
        _selective_scan_fwd_kernel[grid](
            u, delta, A, B, C, u if D is None else D.contiguous(), u if z is None else z,
            u if delta_bias is None else delta_bias.contiguous(),
            y, last_state, chunk_states,
            length, dim, d_state, n_chunks,
            *_strides(u), *_strides(delta), *_strides(B), *_strides(C), *_strides(z),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
            REVERSE=reverse, CHUNK=CHUNK_SIZE, **config,
        )
    return y, last_state, chunk_states


def selective_scan_triton_backward(
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
) -> tuple[Tensor, ...]:
    """Backward kernel launch following the ``fused.py`` contract; returns the 8 input gradients."""
    _check_device(u)
    u, delta, B, C, z = (_rowwise(t) for t in (u, delta, B, C, z))
    grad_y = grad_y.contiguous()
    A = A.contiguous()
    batch, length, dim = u.shape
    d_state = A.shape[1]
    n_chunks = chunk_states.shape[1]
    config = _launch_config(d_state, backward=True)
    n_blocks = triton.cdiv(dim, config["BLOCK_D"])
    device = u.device

    def fp32(*shape: int) -> Tensor:
        return torch.empty(shape, dtype=torch.float32, device=device)

    du = torch.empty((batch, length, dim), dtype=u.dtype, device=device)
    ddelta = torch.empty((batch, length, dim), dtype=delta.dtype, device=device)
    dz = torch.empty((batch, length, dim), dtype=z.dtype, device=device) if z is not None else None
    dA_part, dD_part, dbias_part = fp32(batch, dim, d_state), fp32(batch, dim), fp32(batch, dim)
    dB_part, dC_part = fp32(n_blocks, batch, length, d_state), fp32(n_blocks, batch, length, d_state)
    grad_last = None if grad_last_state is None else grad_last_state.contiguous()
    if batch > 0 and dim > 0:  # otherwise every partial sum is empty and its reduction gives zeros
        with _device_guard(u):
            _selective_scan_bwd_kernel[(batch, n_blocks)](
                grad_y, grad_y if grad_last is None else grad_last, u, delta, A, B, C,
                u if D is None else D.contiguous(), u if z is None else z,
                u if delta_bias is None else delta_bias.contiguous(), chunk_states,
                du, ddelta, du if dz is None else dz, dA_part, dB_part, dC_part, dD_part, dbias_part,
                batch, length, dim, d_state, n_chunks,
                *_strides(u), *_strides(delta), *_strides(B), *_strides(C), *_strides(z),
                HAS_GRAD_LAST=grad_last is not None, HAS_D=D is not None, HAS_Z=z is not None,
                HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus, REVERSE=reverse, CHUNK=CHUNK_SIZE, **config,
            )
    def empty() -> Tensor:  # a fresh one per absent input: custom-op outputs must not alias each other
        return u.new_empty((0,))

    return (
        du,
        ddelta,
        dA_part.sum(0).to(A.dtype),
        dB_part.sum(0).to(B.dtype),
        dC_part.sum(0).to(C.dtype),
        dD_part.sum(0).to(D.dtype) if D is not None else empty(),
        dz if dz is not None else empty(),
        dbias_part.sum(0).to(delta_bias.dtype) if delta_bias is not None else empty(),
    )


if AVAILABLE:
    register_kernel("triton", FusedKernel(selective_scan_triton_forward, selective_scan_triton_backward, CHUNK_SIZE))

"""Triton selective-scan backend: launches the kernels of :mod:`mambazoo.ops.triton_kernels`, registered as
``"triton"`` with the fused custom op (:mod:`mambazoo.ops.fused`).

The kernels walk the sequence step by step with the state in registers, store only the state entering every
:data:`CHUNK_SIZE`-step chunk, split long sequences into segments when batch × channel blocks cannot fill the GPU,
and recompute chunks in the backward (design and roofline in ``docs/triton.md``). float16/bfloat16 inputs are read
and y and the sequence gradients are written in their dtype; state and accumulation are float32. Gradients are
deterministic (per-program partial sums reduced afterwards in a fixed order).

Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (slowly; used by the tests).
"""
import functools
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ContextManager, Optional

import torch
from torch import Tensor

from .fused import FusedKernel, register_kernel

__all__ = ["AVAILABLE", "UNAVAILABLE_REASON", "CHUNK_SIZE", "INTERPRETER", "LaunchConfig", "launch_config",
           "selective_scan_triton_forward", "selective_scan_triton_backward"]

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Steps per checkpoint; 8 under the interpreter, so that short test sequences cross several chunks and segments.
CHUNK_SIZE = 8 if INTERPRETER else 64

try:
    import triton

    from . import triton_kernels as kernels
except ImportError as error:  # pragma: no cover - triton ships with the default PyTorch build
    triton = kernels = None
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


@dataclass(frozen=True)
class LaunchConfig:
    """How a scan call is cut into programs.

    Attributes:
        block_d: Channels per program (one warp: lanes own channels).
        num_warps: Warps per program.
        num_stages: Software-pipelining depth of the per-step loads (1: none).
        seg_len: Steps per segment (a multiple of :data:`CHUNK_SIZE`); the length when the sequence is not split.
        n_seg: Number of segments.
    """

    block_d: int
    num_warps: int
    num_stages: int
    seg_len: int
    n_seg: int


# Registers per thread the compiler may use: one-warp programs are not occupancy-limited by registers at these grid
# sizes, and an explicit limit keeps ptxas from spilling at its default target (docs/triton.md).
MAX_REGISTERS = 255

# Tuning knobs, chosen by reasoning (docs/triton.md) until measured; benchmarks/gpu_check.sh sweeps them.
TUNING = dict(
    forward_block_d=32,
    backward_block_d=32,
    num_warps=1,
    forward_stages=3,
    backward_stages=1,
    split_below_programs_per_sm=2,  # split the sequence when fewer programs than this per SM would run
    target_programs_per_sm=8,  # ... into enough segments for about this many
    force_segments=None,  # tests: a fixed number of segments (also under the interpreter)
)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _segments(programs: int, length: int, device: torch.device) -> tuple[int, int]:
    """(seg_len, n_seg): one segment unless ``programs`` cannot fill the device."""
    wanted = TUNING["force_segments"]
    if wanted is None:
        wanted = 1
        if device.type == "cuda":
            sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
            if programs < TUNING["split_below_programs_per_sm"] * sms:
                wanted = triton.cdiv(TUNING["target_programs_per_sm"] * sms, programs)
    wanted = max(1, min(wanted, triton.cdiv(length, CHUNK_SIZE)))
    seg_len = triton.cdiv(triton.cdiv(length, wanted), CHUNK_SIZE) * CHUNK_SIZE
    return seg_len, triton.cdiv(length, seg_len)


def launch_config(batch: int, length: int, dim: int, device: torch.device, backward: bool) -> LaunchConfig:
    """The launch configuration of a forward or backward call (see :data:`TUNING`)."""
    block_d = TUNING["backward_block_d" if backward else "forward_block_d"]
    if INTERPRETER:  # numpy per op: small tiles are faster, pipelining means nothing
        block_d = min(block_d, triton.next_power_of_2(max(dim, 1)))
    seg_len, n_seg = _segments(batch * triton.cdiv(dim, block_d), length, device)
    stages = 1 if INTERPRETER else TUNING["backward_stages" if backward else "forward_stages"]
    return LaunchConfig(block_d, TUNING["num_warps"], stages, seg_len, n_seg)


def _rowwise(tensor: Optional[Tensor]) -> Optional[Tensor]:
    """The tensor with a contiguous last dim (batch/length strides are passed to the kernel as they are)."""
    if tensor is None or tensor.stride(-1) == 1 or tensor.shape[-1] == 1:
        return tensor
    return tensor.contiguous()


def _strides(tensor: Optional[Tensor]) -> tuple[int, int]:
    return (0, 0) if tensor is None else (tensor.stride(0), tensor.stride(1))


def _vector_width(tensor: Tensor, d_state: int, block_n: int) -> int:
    """Elements per vector load of a (batch, length, d_state) row: every stride and the address must be multiples."""
    if block_n != d_state or tensor.data_ptr() % 16:
        return 1
    width = min(16 // tensor.element_size(), block_n)
    while width > 1 and any(stride % width for stride in _strides(tensor)):
        width //= 2
    return width


def _state_strides(tensor: Tensor, width: int) -> tuple[int, int]:
    return tuple(stride // width for stride in _strides(tensor))


def _check_device(u: Tensor) -> None:
    if not AVAILABLE:
        raise RuntimeError(f"the triton scan backend is unavailable: {UNAVAILABLE_REASON}")
    if u.device.type != "cuda" and not INTERPRETER:
        raise ValueError(f"the triton scan backend needs CUDA tensors (or TRITON_INTERPRET=1), got {u.device}")


def _device_guard(u: Tensor) -> ContextManager:
    return torch.cuda.device(u.device) if u.device.type == "cuda" else nullcontext()


def _common_constants(d_state: int, config: LaunchConfig, B: Tensor, C: Tensor, D, z, delta_bias, delta_softplus,
                      reverse) -> dict:
    block_n = triton.next_power_of_2(d_state)
    return dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
                REVERSE=reverse, CHUNK=CHUNK_SIZE, BLOCK_D=config.block_d, BLOCK_N=block_n,
                PAD_N=block_n != d_state, VEC_B=_vector_width(B, d_state, block_n),
                VEC_C=_vector_width(C, d_state, block_n), NUM_STAGES=config.num_stages, FAST=not INTERPRETER,
                num_warps=config.num_warps, maxnreg=MAX_REGISTERS)


def _sequence_strides(u, delta, B, C, z, constants: dict) -> tuple[int, ...]:
    return (*_strides(u), *_strides(delta), *_state_strides(B, constants["VEC_B"]),
            *_state_strides(C, constants["VEC_C"]), *_strides(z))


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
    """Forward launch following the ``fused.py`` contract; returns (y, last_state, chunk_states (B, chunks, N, D))."""
    _check_device(u)
    u, delta, B, C, z = (_rowwise(t) for t in (u, delta, B, C, z))
    A = A.contiguous()
    batch, length, dim = u.shape
    d_state = A.shape[1]
    n_chunks = triton.cdiv(length, CHUNK_SIZE)
    y = torch.empty((batch, length, dim), dtype=u.dtype, device=u.device)
    chunk_states = torch.empty((batch, n_chunks, d_state, dim), dtype=torch.float32, device=u.device)
    if y.numel() == 0:
        return y, torch.zeros((batch, dim, d_state), dtype=torch.float32, device=u.device), chunk_states
    last_state = torch.empty((batch, dim, d_state), dtype=torch.float32, device=u.device)
    config = launch_config(batch, length, dim, u.device, backward=False)
    constants = _common_constants(d_state, config, B, C, D, z, delta_bias, delta_softplus, reverse)
    n_blocks = triton.cdiv(dim, config.block_d)
    seg_state = torch.empty((batch, config.n_seg, d_state, dim), dtype=torch.float32, device=u.device)
    seg_step = torch.empty((batch, config.n_seg, 2, dim), dtype=torch.float32, device=u.device)
    arguments = (u, delta, A, B, C, u if D is None else D.contiguous(), u if z is None else z,
                 u if delta_bias is None else delta_bias.contiguous(), y, last_state, chunk_states, seg_state, seg_step,
                 length, dim, d_state, config.seg_len, config.n_seg, n_chunks,
                 *_sequence_strides(u, delta, B, C, z, constants))
    with _device_guard(u):
        if config.n_seg > 1:
            kernels._scan_fwd_kernel[(batch, n_blocks, config.n_seg - 1)](*arguments, LOCAL=True, **constants)
        kernels._scan_fwd_kernel[(batch, n_blocks, config.n_seg)](*arguments, LOCAL=False, **constants)
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
    """Backward launch following the ``fused.py`` contract; returns the 8 input gradients."""
    _check_device(u)
    u, delta, B, C, z = (_rowwise(t) for t in (u, delta, B, C, z))
    grad_y = grad_y.contiguous()
    A = A.contiguous()
    batch, length, dim = u.shape
    d_state = A.shape[1]
    device = u.device
    config = launch_config(batch, max(length, 1), dim, device, backward=True)
    n_blocks = triton.cdiv(dim, config.block_d)

    def fp32(*shape: int) -> Tensor:  # every element is written by the kernel unless nothing runs
        return (torch.empty if batch * length * dim else torch.zeros)(shape, dtype=torch.float32, device=device)

    du = torch.empty((batch, length, dim), dtype=u.dtype, device=device)
    ddelta = torch.empty((batch, length, dim), dtype=delta.dtype, device=device)
    dz = torch.empty((batch, length, dim), dtype=z.dtype, device=device) if z is not None else None
    items = batch * config.n_seg
    dA_part, dD_part, dbias_part = fp32(items, dim, d_state), fp32(items, dim), fp32(items, dim)
    dB_part, dC_part = fp32(n_blocks, batch, length, d_state), fp32(n_blocks, batch, length, d_state)
    if du.numel():
        constants = _common_constants(d_state, config, B, C, D, z, delta_bias, delta_softplus, reverse)
        seg_adj = torch.empty((batch, config.n_seg, d_state, dim), dtype=torch.float32, device=device)
        seg_step = torch.empty((batch, config.n_seg, 2, dim), dtype=torch.float32, device=device)
        scratch = torch.empty((batch * n_blocks * config.n_seg, CHUNK_SIZE, config.block_d), dtype=torch.float32,
                              device=device)
        grad_last = None if grad_last_state is None else grad_last_state.contiguous()
        arguments = (grad_y, grad_y if grad_last is None else grad_last, u, delta, A, B, C,
                     u if D is None else D.contiguous(), u if z is None else z,
                     u if delta_bias is None else delta_bias.contiguous(), chunk_states, seg_adj, seg_step, scratch,
                     du, ddelta, du if dz is None else dz, dA_part, dB_part, dC_part, dD_part, dbias_part,
                     batch, length, dim, d_state, config.seg_len, config.n_seg, chunk_states.shape[1],
                     *_sequence_strides(u, delta, B, C, z, constants))
        constants.update(HAS_GRAD_LAST=grad_last is not None, PAD_D=dim % config.block_d != 0)
        with _device_guard(u):
            if config.n_seg > 1:
                kernels._scan_bwd_kernel[(batch, n_blocks, config.n_seg - 1)](*arguments, LOCAL=True, **constants)
            kernels._scan_bwd_kernel[(batch, n_blocks, config.n_seg)](*arguments, LOCAL=False, **constants)

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
    register_kernel("triton", FusedKernel(selective_scan_triton_forward, selective_scan_triton_backward, CHUNK_SIZE,
                                          states_first=True))

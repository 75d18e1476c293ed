"""Triton kernels of the selective scan (forward and backward) and of the causal depthwise conv1d.

Pure Triton (this module imports no torch), so the kernels can be compiled for a GPU target on a machine without one;
the launchers are :mod:`mambazoo.ops.triton_scan` and :mod:`mambazoo.ops.triton_conv`. The design, the instruction
counts and the roofline are in ``docs/triton.md``. In short:

* **Layout.** A program owns one batch row, ``BLOCK_D`` channels and one segment of the sequence; the state is a
  (``BLOCK_N`` states, ``BLOCK_D`` channels) float32 register tile. In the forward the channels lie across the lanes
  of a warp and all states of a channel in one thread, so the per-step contraction over the states needs no shuffles
  and the per-channel work (softplus, gate) is done once per channel; every 1-D load of a step (``u``, ``delta``,
  ``z``) is one coalesced row of the channels-last layout. The backward reduces over states and over channels every
  step, and uses a 4 (states) × 8 (channels) lane split instead (fewer shuffles).
* **Forward.** The program walks its steps one at a time, ``h = exp2(Δ'·A·log2 e)·h + Δ'·u·B``, with the per-step
  loads software-pipelined by the compiler (``tl.range(num_stages=...)``). It stores only the state entering every
  ``CHUNK``-step chunk (the backward's checkpoints). When batch × channel blocks cannot fill the device the sequence
  is split into segments: a first pass gives each segment's local end state (from a zero state) and step statistics,
  the second pass folds the preceding segments' results into its entering state and runs the segment for real.
* **Backward.** Chunks are processed from the last to the first, each step's loads prefetched one step ahead. For
  each chunk the forward is recomputed from its checkpoint; that sweep also gives dz and dC (they need the states) and dA, from the chunk's tangent
  M_t = ∂h_t/∂A = a_t·(M_{t-1} + Δ'_t·h_{t-1}). A reverse sweep then gives the state adjoints and the remaining
  gradients. The step gradient through the decays needs a state and an adjoint at the same step; instead of storing
  the chunk's states it uses the identity (per channel and state, within the chunk; ℓ = Δ'·A, E = the adjoint
  entering from the right ⊙ the chunk's end state)

      dℓ_t = E + Σ_{τ≥t} q_τ ⊙ a_τh_{τ-1} − Σ_{s≥t} x_s ⊙ a_{s+1}dh_{s+1},

  whose first sum, contracted with A, reaches the reverse sweep as one float32 per (step, channel) in a scratch
  buffer. The identity needs finite states: a chunk whose end state is not finite (NaN/Inf inputs) is swept again
  exactly, recomputing each step's previous state from the checkpoint, so NaN and Inf propagate as in a step-by-step
  scan.
* **Determinism.** No atomics: dA, dD and d(delta_bias) are written per program and dB, dC per channel block, and
  summed afterwards in a fixed order.
* **Numerics.** State and accumulation in float32 for every input dtype; every exponential is ``exp2`` of a
  non-positive argument; softplus uses log1p(e) = 2·atanh(e / (2 + e)) (no cancellation for small e).
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
INF = tl.constexpr(float("inf"))


# ----------------------------------------------------------------------------------------------------------------------
# Elementwise helpers
# ----------------------------------------------------------------------------------------------------------------------

@triton.jit
def _rcp(x, FAST: tl.constexpr):
    """1 / x: the GPU's approximate reciprocal (1 ulp) when FAST, an IEEE division otherwise (interpreter)."""
    if FAST:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return 1.0 / x


@triton.jit
def _sigmoid(x, FAST: tl.constexpr):
    """Sigmoid from exp2 of a non-positive argument."""
    e = tl.exp2(-tl.abs(x) * LOG2E)
    r = _rcp(1.0 + e, FAST)
    return tl.where(x >= 0, r, e * r)


@triton.jit
def _step_size(delta, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, FAST: tl.constexpr):
    """Δ' = softplus(delta + bias) with torch's threshold of 20, and dΔ'/d(delta)."""
    if HAS_BIAS:
        delta = delta + bias
    if SOFTPLUS:
        e = tl.exp2(-tl.abs(delta) * LOG2E)
        s = e * _rcp(2.0 + e, FAST)  # log1p(e) = 2·atanh(s), s <= 1/3: the series below is exact to float32
        s2 = s * s
        series = 1.0 / 13.0
        series = series * s2 + 1.0 / 11.0
        series = series * s2 + 1.0 / 9.0
        series = series * s2 + 1.0 / 7.0
        series = series * s2 + 1.0 / 5.0
        series = series * s2 + 1.0 / 3.0
        series = series * s2 + 1.0
        large = delta > 20.0
        step = tl.where(large, delta, tl.maximum(delta, 0.0) + 2.0 * s * series)
        r = _rcp(1.0 + e, FAST)
        slope = tl.where(large, 1.0, tl.where(delta >= 0, r, e * r))
    else:
        step = delta
        slope = tl.full(delta.shape, 1.0, tl.float32)
    return step, slope


@triton.jit
def _sum_states(x, state_ok, PAD_N: tl.constexpr):
    """Sum a (states, channels) tile over the states, ignoring padded states (they may hold NaN from Inf inputs)."""
    if PAD_N:
        x = tl.where(state_ok[:, None], x, 0.0)
    return tl.sum(x, axis=0)


@triton.jit
def _carry_across(h, step_sum, step_max, local, A2):
    """The state after a segment from the state before it: exp2(A2·ΣΔ')·h + (the segment's state from zero).

    As in a step-by-step scan an infinite state stays infinite unless a step of the segment has a zero decay (then
    inf·0 = NaN); the product of the segment's decays may underflow to zero without any single decay being zero.
    """
    decayed = tl.exp2(step_sum[None, :] * A2) * h
    zeroed = tl.exp2(step_max[None, :] * A2) == 0.0
    return tl.where(zeroed, decayed, tl.where(tl.abs(h) == INF, h, decayed)) + local


# ----------------------------------------------------------------------------------------------------------------------
# Loads
# ----------------------------------------------------------------------------------------------------------------------

@triton.jit
def _row(index, length, REVERSE: tl.constexpr):
    """Memory position of scan step ``index``."""
    if REVERSE:
        return length - 1 - index
    return index


@triton.jit
def _load_channels(ptr, row, stride_l, channels, channel_ok):
    """One step's row of a (length, dim) tensor (the program's batch item) for the program's channels, as float32."""
    return tl.load(ptr + row * stride_l + channels, mask=channel_ok, other=0.0).to(tl.float32)


@triton.jit
def _load_states(ptr, row, stride_l, states, state_ok, PAD_N: tl.constexpr, VEC: tl.constexpr):
    """One step's row of a (length, d_state) tensor as float32; the stride is in units of VEC elements."""
    offset = row * stride_l * VEC + states
    if PAD_N:
        return tl.load(ptr + offset, mask=state_ok, other=0.0).to(tl.float32)
    return tl.load(ptr + offset).to(tl.float32)


@triton.jit
def _load_parameter(ptr, channels, channel_ok, PRESENT: tl.constexpr, BLOCK_D: tl.constexpr):
    """A per-channel parameter as float32 (zeros when absent)."""
    if PRESENT:
        return tl.load(ptr + channels, mask=channel_ok, other=0.0).to(tl.float32)
    return tl.zeros((BLOCK_D,), dtype=tl.float32)


@triton.jit
def _load_rows(ptr, state_stride, channel_stride, channels, channel_ok, d_state, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """A (states, channels) float32 tile from memory, one state (a row over the channels) at a time.

    Together with :func:`_store_rows` this keeps every memory access of the forward's state one-dimensional, so the
    compiler lays the tile out for the per-step arithmetic (channels across lanes, all states in one thread) instead
    of adopting a vectorised 2-D access layout that would need a shared-memory conversion every step.
    """
    states = tl.arange(0, BLOCK_N)
    tile = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for n in tl.static_range(BLOCK_N):
        row = tl.load(ptr + n * state_stride + channels * channel_stride, mask=channel_ok & (n < d_state), other=0.0)
        tile = tl.where(states[:, None] == n, row.to(tl.float32)[None, :], tile)
    return tile


@triton.jit
def _store_rows(ptr, tile, state_stride, channel_stride, channels, channel_ok, d_state, BLOCK_N: tl.constexpr):
    """Store a (states, channels) tile one state at a time (see :func:`_load_rows`); -0.0 is the neutral element
    that lets the compiler reduce the row extraction to a register read."""
    states = tl.arange(0, BLOCK_N)
    for n in tl.static_range(BLOCK_N):
        row = tl.sum(tl.where(states[:, None] == n, tile, -0.0), axis=0)
        tl.store(ptr + n * state_stride + channels * channel_stride, row, mask=channel_ok & (n < d_state))


@triton.jit
def _load_A2(A_ptr, channels, channel_ok, d_state, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """A·log2(e) as a (states, channels) tile (A is (dim, d_state) in memory)."""
    return _load_rows(A_ptr, 1, d_state, channels, channel_ok, d_state, BLOCK_N, BLOCK_D) * LOG2E


# ----------------------------------------------------------------------------------------------------------------------
# Selective scan, forward
# ----------------------------------------------------------------------------------------------------------------------

@triton.jit
def _scan_fwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
        y_ptr, last_state_ptr, chunk_states_ptr, seg_state_ptr, seg_step_ptr,
        length, dim, d_state, seg_len, n_seg, n_chunks,
        stride_u_b, stride_u_l, stride_delta_b, stride_delta_l, stride_B_b, stride_B_l, stride_C_b, stride_C_l,
        stride_z_b, stride_z_l,
        LOCAL: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
        SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr, PAD_N: tl.constexpr, VEC_B: tl.constexpr, VEC_C: tl.constexpr,
        NUM_STAGES: tl.constexpr, FAST: tl.constexpr,
):
    """Grid (batch, channel blocks, segments). LOCAL: the segment-statistics pass (segments 0 .. n_seg - 2)."""
    batch = tl.program_id(0).to(tl.int64)
    u_ptr += batch * stride_u_b
    delta_ptr += batch * stride_delta_b
    B_ptr += batch * stride_B_b * VEC_B
    C_ptr += batch * stride_C_b * VEC_C
    z_ptr += batch * stride_z_b
    y_ptr += batch * length * dim
    channels = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    segment = tl.program_id(2)
    states = tl.arange(0, BLOCK_N)
    channel_ok = channels < dim
    state_ok = states < d_state
    A2 = _load_A2(A_ptr, channels, channel_ok, d_state, BLOCK_N, BLOCK_D)
    bias = _load_parameter(bias_ptr, channels, channel_ok, HAS_BIAS, BLOCK_D)
    start = segment * seg_len
    end = tl.minimum(start + seg_len, length)
    h = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    if LOCAL:
        step_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
        step_max = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for index in tl.range(start, end, num_stages=NUM_STAGES):
            row = _row(index, length, REVERSE)
            delta = _load_channels(delta_ptr, row, stride_delta_l, channels, channel_ok)
            u = _load_channels(u_ptr, row, stride_u_l, channels, channel_ok)
            B = _load_states(B_ptr, row, stride_B_l, states, state_ok, PAD_N, VEC_B)
            step, _ = _step_size(delta, bias, HAS_BIAS, SOFTPLUS, FAST)
            h = tl.exp2(step[None, :] * A2) * h + B[:, None] * (step * u)[None, :]
            step_sum += step
            step_max = tl.maximum(step_max, step)
        item = batch * n_seg + segment
        _store_rows(seg_state_ptr + item * d_state * dim, h, dim, 1, channels, channel_ok, d_state, BLOCK_N)
        tl.store(seg_step_ptr + 2 * item * dim + channels, step_sum, mask=channel_ok)
        tl.store(seg_step_ptr + (2 * item + 1) * dim + channels, step_max, mask=channel_ok)
    else:
        skip = _load_parameter(D_ptr, channels, channel_ok, HAS_D, BLOCK_D)
        for previous in range(segment):
            item = batch * n_seg + previous
            local = _load_rows(seg_state_ptr + item * d_state * dim, dim, 1, channels, channel_ok, d_state, BLOCK_N,
                               BLOCK_D)
            step_sum = tl.load(seg_step_ptr + 2 * item * dim + channels, mask=channel_ok, other=0.0)
            step_max = tl.load(seg_step_ptr + (2 * item + 1) * dim + channels, mask=channel_ok, other=0.0)
            h = _carry_across(h, step_sum, step_max, local, A2)
        for chunk in range(start // CHUNK, tl.cdiv(end, CHUNK)):
            _store_rows(chunk_states_ptr + (batch * n_chunks + chunk) * d_state * dim, h, dim, 1, channels,
                        channel_ok, d_state, BLOCK_N)
            for index in tl.range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, end), num_stages=NUM_STAGES):
                row = _row(index, length, REVERSE)
                delta = _load_channels(delta_ptr, row, stride_delta_l, channels, channel_ok)
                u = _load_channels(u_ptr, row, stride_u_l, channels, channel_ok)
                B = _load_states(B_ptr, row, stride_B_l, states, state_ok, PAD_N, VEC_B)
                C = _load_states(C_ptr, row, stride_C_l, states, state_ok, PAD_N, VEC_C)
                step, _ = _step_size(delta, bias, HAS_BIAS, SOFTPLUS, FAST)
                h = tl.exp2(step[None, :] * A2) * h + B[:, None] * (step * u)[None, :]
                y = _sum_states(h * C[:, None], state_ok, PAD_N)
                if HAS_D:
                    y += skip * u
                if HAS_Z:
                    z = _load_channels(z_ptr, row, stride_z_l, channels, channel_ok)
                    y *= z * _sigmoid(z, FAST)
                tl.store(y_ptr + row * dim + channels, y.to(y_ptr.dtype.element_ty), mask=channel_ok)
        if end == length:
            _store_rows(last_state_ptr + batch * dim * d_state, h, 1, d_state, channels, channel_ok, d_state, BLOCK_N)


# ----------------------------------------------------------------------------------------------------------------------
# Selective scan, backward
# ----------------------------------------------------------------------------------------------------------------------

@triton.jit
def _bwd_loads(index, length, channels, channel_ok, states, state_ok, u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr,
               grad_y_ptr, stride_u_l, stride_delta_l, stride_B_l, stride_C_l, stride_z_l, stride_grad_l,
               HAS_Z: tl.constexpr, REVERSE: tl.constexpr, PAD_N: tl.constexpr, VEC_B: tl.constexpr,
               VEC_C: tl.constexpr):
    """One step's loads of the backward: row, delta, u, B, C, grad_y and z (u again when there is no z).

    The sweeps issue them one step ahead (software prefetch through the loop-carried values), so their latency
    overlaps a whole step of arithmetic.
    """
    row = _row(index, length, REVERSE)
    delta = _load_channels(delta_ptr, row, stride_delta_l, channels, channel_ok)
    u = _load_channels(u_ptr, row, stride_u_l, channels, channel_ok)
    B = _load_states(B_ptr, row, stride_B_l, states, state_ok, PAD_N, VEC_B)
    C = _load_states(C_ptr, row, stride_C_l, states, state_ok, PAD_N, VEC_C)
    grad_y = _load_channels(grad_y_ptr, row, stride_grad_l, channels, channel_ok)
    z = _load_channels(z_ptr, row, stride_z_l, channels, channel_ok) if HAS_Z else u
    return row, delta, u, B, C, grad_y, z


@triton.jit
def _bwd_values(delta, z, grad_y, bias, A2, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                FAST: tl.constexpr):
    """One step's shared values of the backward: Δ', dΔ'/d(delta), the decays (states, channels),
    g = grad_y·SiLU(z) (the gradient of the pre-gate output) and grad_y·SiLU'(z) (dz per unit of pre-gate output)."""
    step, slope = _step_size(delta, bias, HAS_BIAS, SOFTPLUS, FAST)
    decay = tl.exp2(step[None, :] * A2)
    if HAS_Z:
        sig = _sigmoid(z, FAST)
        g = grad_y * z * sig
        gate_slope = grad_y * sig * (1.0 + z * (1.0 - sig))
    else:
        g = grad_y
        gate_slope = grad_y
    return step, slope, decay, g, gate_slope


@triton.jit
def _sum_channels(x, channel_ok, PAD_D: tl.constexpr):
    """Sum a (states, channels) tile over the program's channels, ignoring padded channels."""
    if PAD_D:
        x = tl.where(channel_ok[None, :], x, 0.0)
    return tl.sum(x, axis=1)


@triton.jit
def _bwd_outputs(row, u, B, step, slope, g, dh, decay_grad, skip, dD_acc, dbias_acc, du_ptr, ddelta_ptr, dB_ptr,
                 dim, d_state, channels, channel_ok, states, state_ok,
                 HAS_D: tl.constexpr, PAD_N: tl.constexpr, PAD_D: tl.constexpr):
    """Store one step's du, ddelta and dB partial from the state adjoint dh; returns the updated dD, d(bias) sums.

    ``decay_grad`` is Σ_n A·dℓ_t, the gradient reaching Δ' through the decays.
    """
    sum_dh_B = _sum_states(dh * B[:, None], state_ok, PAD_N)
    du = step * sum_dh_B
    if HAS_D:
        du += skip * g
        dD_acc += g * u
    ddelta = (u * sum_dh_B + decay_grad) * slope
    dbias_acc += ddelta
    tl.store(du_ptr + row * dim + channels, du.to(du_ptr.dtype.element_ty), mask=channel_ok)
    tl.store(ddelta_ptr + row * dim + channels, ddelta.to(ddelta_ptr.dtype.element_ty), mask=channel_ok)
    tl.store(dB_ptr + row * d_state + states, _sum_channels(dh * (step * u)[None, :], channel_ok, PAD_D),
             mask=state_ok)
    return dD_acc, dbias_acc


@triton.jit
def _state_before(index, chunk_start, h, length, channels, channel_ok, states, state_ok, bias, A2,
                  u_ptr, delta_ptr, B_ptr, stride_u_l, stride_delta_l, stride_B_l,
                  HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, PAD_N: tl.constexpr,
                  VEC_B: tl.constexpr, FAST: tl.constexpr):
    """The state before step ``index``, recomputed from ``h``, the state entering the chunk at ``chunk_start``."""
    for previous in range(chunk_start, index):
        row = _row(previous, length, REVERSE)
        delta = _load_channels(delta_ptr, row, stride_delta_l, channels, channel_ok)
        u = _load_channels(u_ptr, row, stride_u_l, channels, channel_ok)
        B = _load_states(B_ptr, row, stride_B_l, states, state_ok, PAD_N, VEC_B)
        step, _ = _step_size(delta, bias, HAS_BIAS, SOFTPLUS, FAST)
        h = tl.exp2(step[None, :] * A2) * h + B[:, None] * (step * u)[None, :]
    return h


@triton.jit
def _scan_bwd_kernel(
        grad_y_ptr, grad_last_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
        chunk_states_ptr, seg_adj_ptr, seg_step_ptr, scratch_ptr,
        du_ptr, ddelta_ptr, dz_ptr, dA_part_ptr, dB_part_ptr, dC_part_ptr, dD_part_ptr, dbias_part_ptr,
        batch_size, length, dim, d_state, seg_len, n_seg, n_chunks,
        stride_u_b, stride_u_l, stride_delta_b, stride_delta_l, stride_B_b, stride_B_l, stride_C_b, stride_C_l,
        stride_z_b, stride_z_l,
        LOCAL: tl.constexpr, HAS_GRAD_LAST: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, CHUNK: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAD_N: tl.constexpr, PAD_D: tl.constexpr,
        VEC_B: tl.constexpr, VEC_C: tl.constexpr, NUM_STAGES: tl.constexpr, FAST: tl.constexpr,
):
    """Grid (batch, channel blocks, segments). LOCAL: the adjoint-statistics pass (segments 1 .. n_seg - 1)."""
    batch = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    segment = tl.program_id(2)
    if LOCAL:
        segment += 1
    u_ptr += batch * stride_u_b
    delta_ptr += batch * stride_delta_b
    B_ptr += batch * stride_B_b * VEC_B
    C_ptr += batch * stride_C_b * VEC_C
    z_ptr += batch * stride_z_b
    grad_y_ptr += batch * length * dim
    channels = block * BLOCK_D + tl.arange(0, BLOCK_D)
    states = tl.arange(0, BLOCK_N)
    channel_ok = channels < dim
    state_ok = states < d_state
    tile_ok = state_ok[:, None] & channel_ok[None, :]
    tile = states[:, None] * dim + channels[None, :]
    A2 = _load_A2(A_ptr, channels, channel_ok, d_state, BLOCK_N, BLOCK_D)
    bias = _load_parameter(bias_ptr, channels, channel_ok, HAS_BIAS, BLOCK_D)
    skip = _load_parameter(D_ptr, channels, channel_ok, HAS_D, BLOCK_D)
    start = segment * seg_len
    end = tl.minimum(start + seg_len, length)
    if LOCAL:
        carry = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        step_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
        step_max = tl.zeros((BLOCK_D,), dtype=tl.float32)
        row_next, delta_next, u_next, B_next, C_next, grad_next, z_next = _bwd_loads(
            end - 1, length, channels, channel_ok, states, state_ok, u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, grad_y_ptr,
            stride_u_l, stride_delta_l, stride_B_l, stride_C_l, stride_z_l, dim, HAS_Z, REVERSE, PAD_N, VEC_B, VEC_C)
        for back in tl.range(0, end - start, num_stages=NUM_STAGES):
            delta, C, grad_y, z = delta_next, C_next, grad_next, z_next
            row_next, delta_next, u_next, B_next, C_next, grad_next, z_next = _bwd_loads(
                tl.maximum(end - 2 - back, start), length, channels, channel_ok, states, state_ok, u_ptr, delta_ptr,
                B_ptr, C_ptr, z_ptr, grad_y_ptr, stride_u_l, stride_delta_l, stride_B_l, stride_C_l, stride_z_l, dim,
                HAS_Z, REVERSE, PAD_N, VEC_B, VEC_C)
            step, _, decay, g, _ = _bwd_values(delta, z, grad_y, bias, A2, HAS_Z, HAS_BIAS, SOFTPLUS, FAST)
            carry = decay * (C[:, None] * g[None, :] + carry)
            step_sum += step
            step_max = tl.maximum(step_max, step)
        item = batch * n_seg + segment
        tl.store(seg_adj_ptr + item * d_state * dim + tile, carry, mask=tile_ok)
        tl.store(seg_step_ptr + 2 * item * dim + channels, step_sum, mask=channel_ok)
        tl.store(seg_step_ptr + (2 * item + 1) * dim + channels, step_max, mask=channel_ok)
    else:
        du_ptr += batch * length * dim
        ddelta_ptr += batch * length * dim
        dz_ptr += batch * length * dim
        dB_ptr = dB_part_ptr + (block * batch_size + batch) * length * d_state
        dC_ptr = dC_part_ptr + (block * batch_size + batch) * length * d_state
        # The adjoint entering the segment from the right: the final-state gradient carried across later segments.
        if HAS_GRAD_LAST:
            last = batch * dim * d_state + channels[None, :] * d_state + states[:, None]
            carry = tl.load(grad_last_ptr + last, mask=tile_ok, other=0.0).to(tl.float32)
        else:
            carry = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for later in range(n_seg - 1 - segment):
            item = batch * n_seg + n_seg - 1 - later
            local = tl.load(seg_adj_ptr + item * d_state * dim + tile, mask=tile_ok, other=0.0)
            step_sum = tl.load(seg_step_ptr + 2 * item * dim + channels, mask=channel_ok, other=0.0)
            step_max = tl.load(seg_step_ptr + (2 * item + 1) * dim + channels, mask=channel_ok, other=0.0)
            carry = _carry_across(carry, step_sum, step_max, local, A2)
        program = (batch * tl.num_programs(1) + block) * n_seg + segment
        scratch = scratch_ptr + program * CHUNK * BLOCK_D + tl.arange(0, BLOCK_D)
        dA_acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        first_chunk = start // CHUNK
        last_chunk = tl.cdiv(end, CHUNK)
        for back_chunk in range(last_chunk - first_chunk):
            chunk = last_chunk - 1 - back_chunk
            chunk_start = chunk * CHUNK
            chunk_end = tl.minimum(chunk_start + CHUNK, end)
            checkpoint = chunk_states_ptr + (batch * n_chunks + chunk) * d_state * dim + tile
            # Sweep 1, forward: the states, dz, dC, dA (from the tangent ∂h_t/∂A restricted to the chunk, which
            # follows M_t = a_t·(M_{t-1} + Δ'_t·h_{t-1}): no cancellation) and the forward half of the identity.
            # This vectorised 2-D load gives the backward its register layout (4 lanes along states × 8 along
            # channels), which balances the per-step reductions over states and over channels.
            h = tl.load(checkpoint, mask=tile_ok, other=0.0)
            tangent = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
            dA_chunk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
            row_n, delta_n, u_n, B_n, C_n, grad_n, z_n = _bwd_loads(
                chunk_start, length, channels, channel_ok, states, state_ok, u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr,
                grad_y_ptr, stride_u_l, stride_delta_l, stride_B_l, stride_C_l, stride_z_l, dim, HAS_Z, REVERSE, PAD_N,
                VEC_B, VEC_C)
            for index in tl.range(chunk_start, chunk_end, num_stages=NUM_STAGES):
                row, delta, u, B, C, grad_y, z = row_n, delta_n, u_n, B_n, C_n, grad_n, z_n
                row_n, delta_n, u_n, B_n, C_n, grad_n, z_n = _bwd_loads(
                    tl.minimum(index + 1, chunk_end - 1), length, channels, channel_ok, states, state_ok, u_ptr,
                    delta_ptr, B_ptr, C_ptr, z_ptr, grad_y_ptr, stride_u_l, stride_delta_l, stride_B_l, stride_C_l,
                    stride_z_l, dim, HAS_Z, REVERSE, PAD_N, VEC_B, VEC_C)
                step, _, decay, g, gate_slope = _bwd_values(delta, z, grad_y, bias, A2, HAS_Z, HAS_BIAS, SOFTPLUS,
                                                            FAST)
                tangent = decay * (tangent + step[None, :] * h)
                decayed = decay * h
                h = decayed + B[:, None] * (step * u)[None, :]
                if HAS_Z:
                    y_pre = _sum_states(h * C[:, None], state_ok, PAD_N) + skip * u
                    tl.store(dz_ptr + row * dim + channels, (gate_slope * y_pre).to(dz_ptr.dtype.element_ty),
                             mask=channel_ok)
                tl.store(dC_ptr + row * d_state + states, _sum_channels(h * g[None, :], channel_ok, PAD_D),
                         mask=state_ok)
                # q_t ⊙ a_t h_{t-1} with q = C·g (g factored out of the per-element work), summed against A.
                tl.store(scratch + (index - chunk_start) * BLOCK_D,
                         g * _sum_states(A2 * (C[:, None] * decayed), state_ok, PAD_N))
                dA_chunk += g[None, :] * (C[:, None] * tangent)
            n_bad = tl.sum(tl.sum(tl.where(tile_ok, tl.where(tl.abs(h) < INF, 0, 1), 0), axis=1), axis=0)
            if n_bad == 0:
                # Sweep 2, reverse, with the identity (see the module docstring).
                # The adjoint entering from the right acts on the chunk's last state.
                dA_acc += dA_chunk + carry * tangent
                decay_sum = _sum_states(A2 * (carry * h), state_ok, PAD_N)
                reverse_term = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
                row_n, delta_n, u_n, B_n, C_n, grad_n, z_n = _bwd_loads(
                    chunk_end - 1, length, channels, channel_ok, states, state_ok, u_ptr, delta_ptr, B_ptr, C_ptr,
                    z_ptr, grad_y_ptr, stride_u_l, stride_delta_l, stride_B_l, stride_C_l, stride_z_l, dim, HAS_Z,
                    REVERSE, PAD_N, VEC_B, VEC_C)
                for back in tl.range(0, chunk_end - chunk_start, num_stages=NUM_STAGES):
                    index = chunk_end - 1 - back
                    row, delta, u, B, C, grad_y, z = row_n, delta_n, u_n, B_n, C_n, grad_n, z_n
                    row_n, delta_n, u_n, B_n, C_n, grad_n, z_n = _bwd_loads(
                        tl.maximum(index - 1, chunk_start), length, channels, channel_ok, states, state_ok, u_ptr,
                        delta_ptr, B_ptr, C_ptr, z_ptr, grad_y_ptr, stride_u_l, stride_delta_l, stride_B_l, stride_C_l,
                        stride_z_l, dim, HAS_Z, REVERSE, PAD_N, VEC_B, VEC_C)
                    step, slope, decay, g, _ = _bwd_values(delta, z, grad_y, bias, A2, HAS_Z, HAS_BIAS, SOFTPLUS,
                                                           FAST)
                    reverse_term += (B[:, None] * (step * u)[None, :]) * carry
                    decay_sum += tl.load(scratch + (index - chunk_start) * BLOCK_D)
                    decay_grad = LN2 * (decay_sum - _sum_states(A2 * reverse_term, state_ok, PAD_N))
                    dh = C[:, None] * g[None, :] + carry
                    dD_acc, dbias_acc = _bwd_outputs(
                        row, u, B, step, slope, g, dh, decay_grad, skip, dD_acc, dbias_acc, du_ptr, ddelta_ptr,
                        dB_ptr, dim, d_state, channels, channel_ok, states, state_ok, HAS_D, PAD_N, PAD_D)
                    carry = decay * dh
            else:
                # Sweep 2, reverse, exact: each step's previous state is recomputed from the checkpoint, and dA is
                # summed step by step (the tangent's regrouping would mix infinities differently).
                for back in range(0, chunk_end - chunk_start):
                    index = chunk_end - 1 - back
                    row, delta, u, B, C, grad_y, z = _bwd_loads(
                        index, length, channels, channel_ok, states, state_ok, u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr,
                        grad_y_ptr, stride_u_l, stride_delta_l, stride_B_l, stride_C_l, stride_z_l, dim, HAS_Z,
                        REVERSE, PAD_N, VEC_B, VEC_C)
                    step, slope, decay, g, _ = _bwd_values(delta, z, grad_y, bias, A2, HAS_Z, HAS_BIAS, SOFTPLUS,
                                                           FAST)
                    before = _state_before(
                        index, chunk_start, tl.load(checkpoint, mask=tile_ok, other=0.0), length, channels,
                        channel_ok, states, state_ok, bias, A2, u_ptr, delta_ptr, B_ptr, stride_u_l, stride_delta_l,
                        stride_B_l, HAS_BIAS, SOFTPLUS, REVERSE, PAD_N, VEC_B, FAST)
                    dh = C[:, None] * g[None, :] + carry
                    log_decay_grad = dh * decay * before
                    decay_grad = LN2 * _sum_states(A2 * log_decay_grad, state_ok, PAD_N)
                    dA_acc += step[None, :] * log_decay_grad
                    dD_acc, dbias_acc = _bwd_outputs(
                        row, u, B, step, slope, g, dh, decay_grad, skip, dD_acc, dbias_acc, du_ptr, ddelta_ptr,
                        dB_ptr, dim, d_state, channels, channel_ok, states, state_ok, HAS_D, PAD_N, PAD_D)
                    carry = decay * dh
        item = batch * n_seg + segment
        dA = item * dim * d_state + channels[None, :] * d_state + states[:, None]
        tl.store(dA_part_ptr + dA, dA_acc, mask=tile_ok)
        tl.store(dD_part_ptr + item * dim + channels, dD_acc, mask=channel_ok)
        tl.store(dbias_part_ptr + item * dim + channels, dbias_acc, mask=channel_ok)


# ----------------------------------------------------------------------------------------------------------------------
# Causal depthwise conv1d (channels-last), forward and backward
# ----------------------------------------------------------------------------------------------------------------------

@triton.jit
def _conv_rows(steps, length, REVERSE: tl.constexpr):
    """Memory rows of (conv-order) steps and whether they exist; a reverse conv runs from the end of the sequence."""
    ok = (steps >= 0) & (steps < length)
    if REVERSE:
        return tl.where(ok, length - 1 - steps, 0), ok
    return tl.where(ok, steps, 0), ok


@triton.jit
def _conv_load(x_ptr, steps, length, stride_x_l, channels, channel_ok, REVERSE: tl.constexpr):
    """(steps, channels) tile of x as float32; steps outside the sequence read as zero (the causal padding)."""
    rows, ok = _conv_rows(steps, length, REVERSE)
    mask = ok[:, None] & channel_ok[None, :]
    return tl.load(x_ptr + rows[:, None] * stride_x_l + channels[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _conv_pre(x_ptr, steps, length, stride_x_l, channels, channel_ok, weight_ptr, bias, KERNEL_SIZE: tl.constexpr,
              REVERSE: tl.constexpr):
    """Pre-activation bias + Σ_k w_k·x_{t-K+1+k} of a tile of steps."""
    pre = tl.zeros((steps.shape[0], channels.shape[0]), dtype=tl.float32) + bias[None, :]
    for k in tl.static_range(KERNEL_SIZE):
        w = tl.load(weight_ptr + channels * KERNEL_SIZE + k, mask=channel_ok, other=0.0).to(tl.float32)
        pre += w[None, :] * _conv_load(x_ptr, steps - (KERNEL_SIZE - 1 - k), length, stride_x_l, channels, channel_ok,
                                       REVERSE)
    return pre


@triton.jit
def _conv_fwd_kernel(x_ptr, weight_ptr, bias_ptr, y_ptr, length, dim, stride_x_b, stride_x_l,
                     KERNEL_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, REVERSE: tl.constexpr,
                     BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, FAST: tl.constexpr):
    """Grid (batch, step blocks, channel blocks): y = act(bias + causal depthwise conv of x), y contiguous."""
    batch = tl.program_id(0).to(tl.int64)
    steps = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    channels = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    channel_ok = channels < dim
    bias = _load_parameter(bias_ptr, channels, channel_ok, HAS_BIAS, BLOCK_D)
    pre = _conv_pre(x_ptr + batch * stride_x_b, steps, length, stride_x_l, channels, channel_ok, weight_ptr, bias,
                    KERNEL_SIZE, REVERSE)
    if SILU:
        pre = pre * _sigmoid(pre, FAST)
    rows, ok = _conv_rows(steps, length, REVERSE)
    tl.store(y_ptr + (batch * length + rows[:, None]) * dim + channels[None, :], pre.to(y_ptr.dtype.element_ty),
             mask=ok[:, None] & channel_ok[None, :])


@triton.jit
def _conv_bwd_kernel(grad_y_ptr, x_ptr, weight_ptr, bias_ptr, dx_ptr, dweight_part_ptr, dbias_part_ptr,
                     length, dim, stride_x_b, stride_x_l,
                     KERNEL_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, REVERSE: tl.constexpr,
                     BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, FAST: tl.constexpr):
    """Grid as the forward. dx_s = Σ_j w_{K-1-j}·dpre_{s+j} with dpre = grad_y·act'(pre) recomputed per shift; the
    weight and bias gradients of the program's tile go to per-program partial sums (reduced afterwards)."""
    batch = tl.program_id(0).to(tl.int64)
    steps = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    channels = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    channel_ok = channels < dim
    bias = _load_parameter(bias_ptr, channels, channel_ok, HAS_BIAS, BLOCK_D)
    x_ptr += batch * stride_x_b
    grad_y_ptr += batch * length * dim
    dx = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for shift in tl.static_range(KERNEL_SIZE):
        later = steps + shift
        dpre = _conv_load(grad_y_ptr, later, length, dim, channels, channel_ok, REVERSE)
        if SILU:
            pre = _conv_pre(x_ptr, later, length, stride_x_l, channels, channel_ok, weight_ptr, bias, KERNEL_SIZE,
                            REVERSE)
            sig = _sigmoid(pre, FAST)
            dpre *= sig * (1.0 + pre * (1.0 - sig))
        w = tl.load(weight_ptr + channels * KERNEL_SIZE + KERNEL_SIZE - 1 - shift, mask=channel_ok, other=0.0)
        dx += w.to(tl.float32)[None, :] * dpre
        if shift == 0:  # the tile's own dpre: weight and bias gradients
            part = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
            for k in tl.static_range(KERNEL_SIZE):
                x = _conv_load(x_ptr, steps - (KERNEL_SIZE - 1 - k), length, stride_x_l, channels, channel_ok,
                               REVERSE)
                tl.store(dweight_part_ptr + (part * dim + channels) * KERNEL_SIZE + k, tl.sum(dpre * x, axis=0),
                         mask=channel_ok)
            tl.store(dbias_part_ptr + part * dim + channels, tl.sum(dpre, axis=0), mask=channel_ok)
    rows, ok = _conv_rows(steps, length, REVERSE)
    tl.store(dx_ptr + (batch * length + rows[:, None]) * dim + channels[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=ok[:, None] & channel_ok[None, :])

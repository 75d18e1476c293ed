"""Sequential reference of the selective scan: the oracle every other backend is tested against.

It follows the definition in the docs line by line and makes no attempt at speed. It computes in float64 when given
float64 tensors and in float32 otherwise.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def selective_scan_reference(
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
) -> tuple[Tensor, Tensor]:
    """Selective scan by its definition, one time step at a time.

    Args:
        u: Input, (batch, length, dim).
        delta: Step before bias and softplus, (batch, length, dim).
        A: State matrix, (dim, d_state), non-positive.
        B: Input projection, (batch, length, d_state).
        C: Output projection, (batch, length, d_state).
        D: Optional skip, (dim,).
        z: Optional gate, (batch, length, dim); the output is multiplied by SiLU(z).
        delta_bias: Optional bias added to delta, (dim,).
        delta_softplus: Apply softplus to delta (after the bias).
        reverse: Scan from the last step to the first.

    Returns:
        y in u's dtype, (batch, length, dim), and the final state, (batch, dim, d_state), in the compute dtype.
    """
    out_dtype = u.dtype
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, A, B, C = (t.to(compute) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)
    if delta_softplus:
        delta = F.softplus(delta)
    batch, length, dim = u.shape
    state = u.new_zeros(batch, dim, A.shape[1])
    # Per-step views via unbind: indexing x[:, t] under autograd would make the backward O(L^2)
    # (docs/scan_operation.md, autograd pitfall).
    delta_t, u_t, B_t, C_t = (t.unbind(1) for t in (delta, u, B, C))
    outputs = [None] * length
    for t in (range(length - 1, -1, -1) if reverse else range(length)):
        decay = torch.exp(delta_t[t][:, :, None] * A)
        state = decay * state + (delta_t[t] * u_t[t])[:, :, None] * B_t[t][:, None, :]
        outputs[t] = (state * C_t[t][:, None, :]).sum(-1)
    y = torch.stack(outputs, dim=1) if length else u.new_zeros((batch, 0, dim))
    if D is not None:
        y = y + u * D.to(compute)
    if z is not None:
        y = y * F.silu(z.to(compute))
    return y.to(out_dtype), state

"""Input generators for selective-scan tests, (Mamba-init-like and 'stress' distributions, docs/scan_operation.md)."""
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class ScanInputs:
    """One set of selective-scan arguments (channels-last layout)."""

    u: Tensor
    delta: Tensor
    A: Tensor
    B: Tensor
    C: Tensor
    D: Optional[Tensor]
    z: Optional[Tensor]
    delta_bias: Optional[Tensor]

    def tensors(self) -> tuple[Optional[Tensor], ...]:
        return self.u, self.delta, self.A, self.B, self.C, self.D, self.z, self.delta_bias

    def to(self, dtype: torch.dtype) -> "ScanInputs":
        """Sequence tensors to ``dtype``; parameters (A, D, delta_bias) stay as they are."""
        cast = {name: (t.to(dtype) if t is not None else None) for name, t in vars(self).items()}
        for name in ("A", "D", "delta_bias"):
            cast[name] = getattr(self, name)
        return ScanInputs(**cast)

    def detached_leaves(self, dtype: Optional[torch.dtype] = None) -> "ScanInputs":
        """Fresh leaf copies (optionally cast) that require grad."""
        def leaf(t: Optional[Tensor]) -> Optional[Tensor]:
            if t is None:
                return None
            return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)

        return ScanInputs(**{name: leaf(t) for name, t in vars(self).items()})


def inverse_softplus(x: Tensor) -> Tensor:
    return x + torch.log(-torch.expm1(-x))


def make_scan_inputs(
        batch: int,
        length: int,
        dim: int,
        d_state: int,
        *,
        stress: bool = False,
        with_D: bool = True,
        with_z: bool = True,
        with_bias: bool = True,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
) -> ScanInputs:
    """Random scan inputs; the step after bias + softplus is log-uniform in [1e-3, 1e-1] (x30 and A x2 if stress)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    log_step = torch.rand(dim, generator=generator, dtype=torch.float64) * (math.log(0.1) - math.log(1e-3))
    step = torch.exp(log_step + math.log(1e-3)) * (30.0 if stress else 1.0)
    bias = inverse_softplus(step)
    delta = 0.5 * randn(batch, length, dim)
    if not with_bias:
        delta = delta + bias
    A = -torch.arange(1, d_state + 1, dtype=torch.float64).repeat(dim, 1) * (2.0 if stress else 1.0)
    A = A * torch.exp(0.1 * randn(dim, d_state))
    inputs = ScanInputs(
        u=randn(batch, length, dim),
        delta=delta,
        A=A,
        B=randn(batch, length, d_state),
        C=randn(batch, length, d_state),
        D=randn(dim) if with_D else None,
        z=randn(batch, length, dim) if with_z else None,
        delta_bias=bias if with_bias else None,
    )
    return ScanInputs(**{name: (t.to(dtype) if t is not None else None) for name, t in vars(inputs).items()})

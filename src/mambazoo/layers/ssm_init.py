"""Mamba's initialisation of the step projection, shared by the families that train it from scratch."""
import math

import torch
from torch import Tensor, nn

__all__ = ["init_step_projection_"]


@torch.no_grad()
def init_step_projection_(weight: Tensor, bias: Tensor, dt_min: float = 1e-3, dt_max: float = 0.1,
                          dt_floor: float = 1e-4) -> None:
    """Mamba's step (Δ) projection init, in place: weight U(±rank^-0.5), bias = softplus⁻¹ of log-uniform steps.

    Args:
        weight: (inner, rank) projection weight.
        bias: (inner,) bias, so that softplus(bias) is log-uniform in [dt_min, dt_max] (clamped below at dt_floor).
        dt_min: Smallest initial step.
        dt_max: Largest initial step.
        dt_floor: Lower clamp of the initial step.
    """
    rank = weight.shape[-1]
    nn.init.uniform_(weight, -rank ** -0.5, rank ** -0.5)
    log_dt = torch.rand_like(bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    dt = log_dt.exp().clamp(min=dt_floor)
    bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

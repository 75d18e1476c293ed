"""Bidirectional Mamba mixer (Vision Mamba's "v2" bimamba) over a (batch, length, dim) token sequence.

Both directions share the input and output projections; each has its own depthwise causal conv, ``x_proj``,
``dt_proj``, ``A`` and ``D``. The backward direction runs the anti-causal conv and a ``reverse=True`` scan on the
original token order (no flipped copies); both directions gate with the same SiLU(z), so the gate is applied once to
their sum, which is averaged before ``out_proj``. Parameter names and shapes follow the official checkpoints
(``nn.Conv1d`` weights (E, 1, K)).
"""
import math
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import ScanDirection, bidirectional_scan, capabilities, causal_conv1d
from .ssm_init import init_step_projection_

__all__ = ["BidirectionalMamba"]


class BidirectionalMamba(nn.Module):
    """Vim's bidirectional selective-scan mixer.

    Args:
        dim: Model width D.
        d_state: SSM state size N.
        d_conv: Depthwise causal conv kernel size K.
        expand: Inner width factor (E = expand * D).
        dt_rank: Rank of the step projection; ``"auto"`` gives ceil(D / 16).
        dt_min: Smallest initial step.
        dt_max: Largest initial step.
        dt_init_floor: Lower clamp of the initial step.
        conv_bias: Bias on the depthwise convs.
        bias: Bias on the input/output projections.
        num_layers: Depth of the enclosing network; ``out_proj`` is initialised with 1 / sqrt(num_layers) scaling.
        divide_out: Average (rather than sum) the two directions.
        scan_backend: Selective-scan backend (see :func:`mambazoo.ops.selective_scan`); with ``"reference"`` or
            ``"torch"`` the convs and the gate use the PyTorch implementation too.
    """

    def __init__(
            self,
            dim: int,
            d_state: int = 16,
            d_conv: int = 4,
            expand: int = 2,
            dt_rank: Union[int, str] = "auto",
            dt_min: float = 0.001,
            dt_max: float = 0.1,
            dt_init_floor: float = 1e-4,
            conv_bias: bool = True,
            bias: bool = False,
            num_layers: int = 1,
            divide_out: bool = True,
            scan_backend: str = "auto",
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.dim = dim
        self.d_state = d_state
        self.d_inner = expand * dim
        self.dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank)
        self.divide_out = divide_out
        self.scan_backend = scan_backend
        self.conv_backend = "torch" if scan_backend in ("reference", "torch") else "auto"
        self._dt_range = (dt_min, dt_max, dt_init_floor)
        self._num_layers = num_layers
        inner, rank = self.d_inner, self.dt_rank

        self.in_proj = nn.Linear(dim, 2 * inner, bias=bias, **dd)
        self.conv1d = nn.Conv1d(inner, inner, d_conv, groups=inner, padding=d_conv - 1, bias=conv_bias, **dd)
        self.x_proj = nn.Linear(inner, rank + 2 * d_state, bias=False, **dd)
        self.dt_proj = nn.Linear(rank, inner, bias=True, **dd)
        self.A_log = nn.Parameter(torch.empty(inner, d_state, device=device, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(inner, device=device, dtype=torch.float32))
        self.conv1d_b = nn.Conv1d(inner, inner, d_conv, groups=inner, padding=d_conv - 1, bias=conv_bias, **dd)
        self.x_proj_b = nn.Linear(inner, rank + 2 * d_state, bias=False, **dd)
        self.dt_proj_b = nn.Linear(rank, inner, bias=True, **dd)
        self.A_b_log = nn.Parameter(torch.empty(inner, d_state, device=device, dtype=torch.float32))
        self.D_b = nn.Parameter(torch.empty(inner, device=device, dtype=torch.float32))
        self.out_proj = nn.Linear(inner, dim, bias=bias, **dd)
        self.reset_parameters()
        for op in ("selective_scan", "causal_conv1d", "gated_sum", "bidirectional_scan"):
            capabilities.preload(op)  # now, not on the first call (which may be inside torch.compile)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba's initialisation as used by the official Vim models, including its backward-branch quirk.

        The forward ``dt_proj`` gets U(±rank^-0.5) weights and a bias giving log-uniform steps in [dt_min, dt_max];
        the backward ``dt_proj_b`` keeps PyTorch's default weight init and a zero bias (upstream zeroes every Linear
        bias not flagged ``_no_reinit``). A = -(1..N) per channel, D = 1, ``out_proj`` is Kaiming-uniform scaled by
        1 / sqrt(num_layers); everything else keeps PyTorch's defaults.
        """
        if self.A_log.device.type == "meta":
            return
        init_step_projection_(self.dt_proj.weight, self.dt_proj.bias, *self._dt_range)
        self.dt_proj_b.reset_parameters()
        nn.init.zeros_(self.dt_proj_b.bias)
        s4d_real = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device).log()
        for a_log, skip in ((self.A_log, self.D), (self.A_b_log, self.D_b)):
            a_log.copy_(s4d_real.expand_as(a_log))
            nn.init.ones_(skip)
        nn.init.kaiming_uniform_(self.out_proj.weight, a=math.sqrt(5))
        self.out_proj.weight.div_(math.sqrt(self._num_layers))

    def _conv(self, x: Tensor, conv: nn.Conv1d, reverse: bool) -> Tensor:
        return causal_conv1d(x, conv.weight.squeeze(1), conv.bias, activation="silu", reverse=reverse,
                             backend=self.conv_backend)

    def _direction(self, xc: Tensor, x_proj: nn.Linear, dt_proj: nn.Linear, A_log: Tensor, skip: Tensor) -> ScanDirection:
        dt_low_rank, B, C = x_proj(xc).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return ScanDirection(xc, dt_low_rank, dt_proj.weight, dt_proj.bias, A_log, B, C, skip)

    def forward(self, u: Tensor) -> Tensor:
        """Mix a (batch, length, dim) sequence in both directions; returns the same shape.

        Both directions are gated by the same SiLU(z), so the gate is applied once to their sum, with the average's
        1/2 (:func:`mambazoo.ops.bidirectional_scan`: one native kernel for both scans and the gate in CPU
        inference). The x and z halves of ``in_proj`` are computed separately and every (length, inner) temporary is
        dropped as soon as it is consumed.
        """
        w_x, w_z = self.in_proj.weight.chunk(2)
        b_x, b_z = self.in_proj.bias.chunk(2) if self.in_proj.bias is not None else (None, None)
        x = F.linear(u, w_x, b_x)
        xc, xc_b = self._conv(x, self.conv1d, reverse=False), self._conv(x, self.conv1d_b, reverse=True)
        del x
        forward = self._direction(xc, self.x_proj, self.dt_proj, self.A_log, self.D)
        backward = self._direction(xc_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b)
        del xc, xc_b
        z = F.linear(u, w_z, b_z)
        if not self.divide_out or self.out_proj.bias is None:  # exact: 1/2 commutes with a projection without bias
            scale = 0.5 if self.divide_out else 1.0
            return self.out_proj(bidirectional_scan(forward, backward, z, scale, self.scan_backend))
        return self.out_proj(bidirectional_scan(forward, backward, z, backend=self.scan_backend)).mul_(0.5)

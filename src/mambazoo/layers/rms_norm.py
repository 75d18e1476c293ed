"""RMSNorm with a weight and no bias (Mamba's norm): one native kernel in CPU inference, else ``F.rms_norm``."""
import torch
from torch import Tensor, nn

from ..ops import capabilities, rms_norm

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dimension.

    Args:
        dim: Size of the normalised (last) dimension.
        eps: Added to the mean square.
    """

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        capabilities.preload("rms_norm")  # now, not on the first call (which may be inside torch.compile)

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"

"""The selective scan and its companions: one public API over reference, PyTorch, native CPU and Triton backends."""
from .causal_conv1d import causal_conv1d
from . import capabilities
from .selective_scan import BACKENDS, available_backends, backend_status, selective_scan
from .state_scan import state_scan

__all__ = ["BACKENDS", "available_backends", "backend_status", "capabilities", "causal_conv1d", "selective_scan",
           "state_scan"]

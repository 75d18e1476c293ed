"""The selective scan and its companions: one public API over reference, PyTorch, native CPU and Triton backends."""
from .bidirectional_scan import ScanDirection, bidirectional_scan
from .causal_conv1d import causal_conv1d
from . import capabilities
from .pointwise import gated_sum, rms_norm
from .selective_scan import BACKENDS, available_backends, backend_status, selective_scan
from .state_scan import state_scan

__all__ = ["BACKENDS", "ScanDirection", "available_backends", "backend_status", "bidirectional_scan", "capabilities",
           "causal_conv1d", "gated_sum", "rms_norm", "selective_scan", "state_scan"]

"""mambazoo: visual state-space-model backbones for timm, with fused CPU and Triton selective scans."""
from . import models, ops
from .ops import available_backends, selective_scan

__version__ = "0.1.0"
__all__ = ["available_backends", "models", "ops", "selective_scan", "__version__"]

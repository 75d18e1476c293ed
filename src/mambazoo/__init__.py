"""mambazoo: visual state-space-model backbones for timm, with fused CPU and Triton selective scans."""
from . import models, ops
from .ops import available_backends, selective_scan, state_scan
from .zoo import create_model, list_models

__version__ = "0.1.0"
__all__ = ["available_backends", "create_model", "list_models", "models", "ops", "selective_scan", "state_scan",
           "__version__"]

"""mambazoo: visual state-space-model backbones for timm, with fused CPU and Triton selective scans.

``import mambazoo`` is cheap: it imports neither torch nor timm. Its models are registered in timm's registry as soon
as timm is imported (see :mod:`mambazoo._registration`); the attributes below load their modules on first access.
"""
import importlib
from typing import Any

from ._registration import register_models_with_timm

__version__ = "0.1.0"

_LAZY_ATTRIBUTES = {
    "available_backends": "mambazoo.ops",
    "selective_scan": "mambazoo.ops",
    "state_scan": "mambazoo.ops",
    "create_model": "mambazoo.zoo",
    "list_models": "mambazoo.zoo",
}
_SUBMODULES = ("bench", "checkpoint", "cli", "export", "flops", "layers", "models", "ops", "zoo")
__all__ = ["available_backends", "create_model", "list_models", "models", "ops", "selective_scan", "state_scan",
           "__version__"]

register_models_with_timm()


def __getattr__(name: str) -> Any:
    if name in _LAZY_ATTRIBUTES:
        return getattr(importlib.import_module(_LAZY_ATTRIBUTES[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_ATTRIBUTES) | set(_SUBMODULES))

"""One table of what every kernel can run; the backend choice of every op in :mod:`mambazoo.ops` is made here.

Each op lists its backends in order of preference. ``backend="auto"`` picks the first one that is available in this
installation and supports the call (device, dtype and size limits such as ``d_state`` or the conv kernel size); an
explicitly requested backend that cannot run the call raises a ValueError naming the reason. Adding a backend means
adding a row here (and the kernel module the row names); nothing else decides dispatch.

Compiled backends live in their own modules, imported only when a call first considers them (so ``import
mambazoo.ops`` loads neither the native library nor Triton, and a CPU call never imports Triton). Such a module
exposes ``AVAILABLE`` and ``UNAVAILABLE_REASON`` (e.g. no C compiler at install time, no CUDA device) and the
attributes a row refers to by name (limits known only once the library is loaded, such as the native kernel's largest
``d_state``). :func:`kernel_module` returns a loaded row's module to the op that runs it.
"""
import importlib
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch

__all__ = ["Backend", "CAPABILITIES", "backend_names", "backend_status", "kernel_module", "preload", "resolve_backend",
           "unsupported_reason"]

ALL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SINGLE_AND_HALF = (torch.float16, torch.bfloat16, torch.float32)

Limit = Union[int, str]  # an int, or the name of an attribute of the backend's module holding it


@dataclass(frozen=True)
class Backend:
    """One row of the table: a kernel of an op and the calls it supports.

    Attributes:
        name: Backend name as users pass it (``backend="native"``).
        devices: Device types it runs on (None: any device, meta included).
        dtypes: Input dtypes it accepts (it may compute in float32 and cast back).
        auto_devices: Device types on which ``auto`` may pick it (default: ``devices``).
        auto_dtypes: Input dtypes for which ``auto`` may pick it (default: ``dtypes``); e.g. float64 goes to a
            backend that computes in float64.
        limits: Largest supported value of each size feature of a call (``{"d_state": 16}``).
        module: Kernel module imported on first use; it reports ``AVAILABLE`` / ``UNAVAILABLE_REASON``.
        disable_env: Environment variable that switches the backend off when set to anything but ``""``/``"0"``.
        auto: Whether ``auto`` may pick it at all (False for slow oracles).
    """

    name: str
    devices: Optional[tuple[str, ...]] = None
    dtypes: tuple[torch.dtype, ...] = ALL_FLOATS
    auto_devices: Optional[tuple[str, ...]] = None
    auto_dtypes: Optional[tuple[torch.dtype, ...]] = None
    limits: tuple[tuple[str, Limit], ...] = ()
    module: Optional[str] = None
    disable_env: Optional[str] = None
    auto: bool = True


_NATIVE = dict(devices=("cpu",), module="mambazoo.ops.native", disable_env="MAMBAZOO_DISABLE_NATIVE",
               auto_dtypes=SINGLE_AND_HALF)
# On CPU tensors only under TRITON_INTERPRET=1 (the modules check); auto picks them on CUDA only.
_TRITON = dict(devices=("cuda", "cpu"), auto_devices=("cuda",), dtypes=SINGLE_AND_HALF,
               disable_env="MAMBAZOO_DISABLE_TRITON")

CAPABILITIES: dict[str, tuple[Backend, ...]] = {
    "selective_scan": (
        Backend("triton", module="mambazoo.ops.triton_scan", **_TRITON),
        Backend("native", limits=(("d_state", "MAX_STATE"),), **_NATIVE),
        Backend("torch"),
        Backend("reference", auto=False),
    ),
    "causal_conv1d": (
        Backend("triton", limits=(("kernel_size", "MAX_KERNEL"),), module="mambazoo.ops.triton_conv", **_TRITON),
        Backend("native", limits=(("kernel_size", "MAX_KERNEL"),), **_NATIVE),
        Backend("torch"),
    ),
    "state_scan": (
        Backend("triton", **dict(_TRITON, module="mambazoo.ops.triton_state_scan")),
        Backend("native", **_NATIVE),
        Backend("torch"),
        Backend("reference", auto=False),
    ),
    # Forward-only inference kernels (mambazoo.ops.bidirectional_scan, mambazoo.ops.pointwise): native for plain
    # eager float32 calls; "torch" is the composite of the ops above.
    "bidirectional_scan": (
        Backend("native", limits=(("d_state", "MAX_STATE"), ("dt_rank", "MAX_RANK")),
                **dict(_NATIVE, dtypes=(torch.float32,), auto_dtypes=None)),
        Backend("torch"),
    ),
    "rms_norm": (
        Backend("native", **dict(_NATIVE, dtypes=(torch.float32,), auto_dtypes=None)),
        Backend("torch"),
    ),
    "gated_sum": (
        Backend("native", **dict(_NATIVE, dtypes=(torch.float32,), auto_dtypes=None)),
        Backend("torch"),
    ),
}

# Filled once per (op, backend) on first use; plain dict lookups afterwards, so torch.compile traces dispatch.
_status: dict[tuple[str, str], str] = {}
_limits: dict[tuple[str, str], dict[str, int]] = {}
_modules: dict[tuple[str, str], object] = {}
# Successful resolutions, by (op, requested, device type, dtype, features): every scan and conv call resolves its
# backend, and the table walk costs more than a small kernel call.
_resolved: dict[tuple, str] = {}


def backend_names(op: str) -> tuple[str, ...]:
    """The backends of ``op`` in order of preference."""
    return tuple(row.name for row in _rows(op))


def _rows(op: str) -> tuple[Backend, ...]:
    if op not in CAPABILITIES:
        raise ValueError(f"unknown op {op!r}; ops: {sorted(CAPABILITIES)}")
    return CAPABILITIES[op]


def _row(op: str, name: str) -> Backend:
    for row in _rows(op):
        if row.name == name:
            return row
    raise ValueError(f"{op} backend must be 'auto' or one of {backend_names(op)}, got {name!r}")


def _load(row: Backend) -> tuple[str, dict[str, int], object]:
    """Import the row's kernel module: its status, its resolved limits and the module (None if not loaded)."""
    if row.disable_env and os.environ.get(row.disable_env, "0") not in ("", "0"):
        return f"disabled by {row.disable_env}", {}, None
    module = None
    if row.module is not None:
        try:
            module = importlib.import_module(row.module)
        except ImportError as error:
            return f"not importable: {error}", {}, None
        if not module.AVAILABLE:
            return module.UNAVAILABLE_REASON, {}, None
    limits = {feature: getattr(module, value) if isinstance(value, str) else value for feature, value in row.limits}
    return "available", limits, module


def _status_of(op: str, row: Backend) -> str:
    """The row's status, loading its kernel module on the first call."""
    key = (op, row.name)
    if key not in _status:
        _status[key], _limits[key], _modules[key] = _load(row)
    return _status[key]


def backend_status(op: str = "selective_scan") -> dict[str, str]:
    """Every backend of ``op`` with ``"available"`` or the reason it is not (loading compiled backends once)."""
    return {row.name: _status_of(op, row) for row in _rows(op)}


def preload(op: str) -> None:
    """Load the kernel modules that ``auto`` may pick for ``op`` on this machine's device types.

    Layers call this when they are built, so that the first call of the op inside ``torch.compile`` finds its
    backends loaded (importing a kernel module cannot happen in a traced function). A CUDA backend is loaded only when
    CUDA is available.
    """
    device_types = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    for row in _rows(op):
        devices = row.auto_devices if row.auto_devices is not None else row.devices
        if row.auto and (devices is None or any(device in devices for device in device_types)):
            _status_of(op, row)


def kernel_module(op: str, name: str):
    """The loaded kernel module of backend ``name`` of ``op``; a RuntimeError if that backend is not available."""
    status = _status_of(op, _row(op, name))
    if status != "available" or _modules[op, name] is None:
        raise RuntimeError(f"{op} backend {name!r} is not available: {status}")
    return _modules[op, name]


def unsupported_reason(op: str, name: str, device: torch.device, dtype: torch.dtype, **features: int) -> Optional[str]:
    """Why backend ``name`` of ``op`` cannot run a call with these properties, or None if it can."""
    row = _row(op, name)
    status = _status_of(op, row)
    if status != "available":
        return status
    if row.devices is not None and device.type not in row.devices:
        return f"it runs on {'/'.join(row.devices)} tensors, got {device.type}"
    if dtype not in row.dtypes:
        return f"it accepts {', '.join(str(d).removeprefix('torch.') for d in row.dtypes)} inputs, got {dtype}"
    for feature, maximum in _limits[op, name].items():
        if feature in features and not 1 <= features[feature] <= maximum:
            return f"it supports {feature} 1..{maximum}, got {features[feature]}"
    return None


def _auto_allows(row: Backend, device: torch.device, dtype: torch.dtype) -> bool:
    devices = row.auto_devices if row.auto_devices is not None else row.devices
    dtypes = row.auto_dtypes if row.auto_dtypes is not None else row.dtypes
    return row.auto and (devices is None or device.type in devices) and dtype in dtypes


def resolve_backend(op: str, requested: str, device: torch.device, dtype: torch.dtype, **features: int) -> str:
    """The backend that runs a call of ``op``: the requested one if it can, else a ValueError saying why not.

    ``"auto"`` gives the first backend in the table's order that is available, allowed for ``auto`` on this device
    and dtype, and within its limits (the pure-PyTorch backend of every op accepts everything).
    """
    key = (op, requested, device.type, dtype, *features.items())
    if key in _resolved:
        return _resolved[key]
    if requested == "auto":
        for row in _rows(op):
            if _auto_allows(row, device, dtype) and unsupported_reason(op, row.name, device, dtype, **features) is None:
                _resolved[key] = row.name
                return row.name
        raise ValueError(f"no {op} backend supports {device.type} {dtype} inputs with {features}")
    reason = unsupported_reason(op, requested, device, dtype, **features)
    if reason is not None:
        raise ValueError(f"{op} backend {requested!r} cannot run this call: {reason}")
    _resolved[key] = requested
    return requested

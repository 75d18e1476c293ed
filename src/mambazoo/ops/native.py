"""Native CPU kernels (``csrc/``): the fused selective scan, the all-states scan and the causal depthwise conv1d, loaded
with ctypes.

The shared library is built by ``setup.py`` as an optional extension (plain C + OpenMP, no PyTorch headers). torch is
imported before it is loaded, so its ``libgomp.so.1`` dependency resolves to the OpenMP runtime torch already loaded
(one thread pool, no oversubscription); every call passes ``torch.get_num_threads()`` as its thread count.

``AVAILABLE`` tells whether the library loaded; ``UNAVAILABLE_REASON`` says why not (no compiler at install time,
``MAMBAZOO_DISABLE_NATIVE=1``, ...). When it loads, the scan kernels are registered as ``"native"`` with
:func:`mambazoo.ops.fused.register_kernel` and :func:`mambazoo.ops.fused_state_scan.register_state_kernel`.
float16/bfloat16 (and float64) inputs are computed in float32; outputs and gradients come back in the dtype of the
corresponding input (the all-states scan returns float32 states).
"""
import ctypes
import importlib.util
import os
from typing import Optional

import torch
from torch import Tensor

from .fused import FusedKernel, register_kernel
from .fused_state_scan import StateKernel, register_state_kernel

__all__ = ["AVAILABLE", "UNAVAILABLE_REASON", "CHUNK_SIZE", "MAX_STATE", "MAX_KERNEL", "scan_forward", "scan_backward",
           "conv_forward", "conv_backward", "state_scan_forward", "state_scan_backward"]

CHUNK_SIZE = 64
_DISABLE_ENV = "MAMBAZOO_DISABLE_NATIVE"
_int64, _int32, _ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p


class _ScanArgs(ctypes.Structure):
    _fields_ = [
        ("batch", _int64), ("length", _int64), ("dim", _int64), ("d_state", _int64), ("chunk_size", _int64),
        ("u", _ptr), ("u_batch_stride", _int64), ("u_length_stride", _int64),
        ("delta", _ptr), ("delta_batch_stride", _int64), ("delta_length_stride", _int64),
        ("A", _ptr),
        ("B", _ptr), ("B_batch_stride", _int64), ("B_length_stride", _int64),
        ("C", _ptr), ("C_batch_stride", _int64), ("C_length_stride", _int64),
        ("D", _ptr),
        ("z", _ptr), ("z_batch_stride", _int64), ("z_length_stride", _int64),
        ("delta_bias", _ptr),
        ("delta_softplus", _int32), ("reverse", _int32), ("n_threads", _int32),
    ]


class _ScanGrads(ctypes.Structure):
    _fields_ = [(name, _ptr) for name in ("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias")]


class _StateScanArgs(ctypes.Structure):
    _fields_ = [
        ("batch", _int64), ("length", _int64), ("dim", _int64),
        ("u", _ptr), ("u_batch_stride", _int64), ("u_length_stride", _int64),
        ("delta", _ptr), ("delta_batch_stride", _int64), ("delta_length_stride", _int64),
        ("A", _ptr),
        ("B", _ptr), ("B_batch_stride", _int64), ("B_length_stride", _int64),
        ("delta_bias", _ptr),
        ("delta_softplus", _int32), ("reverse", _int32), ("n_threads", _int32),
    ]


class _StateScanGrads(ctypes.Structure):
    _fields_ = [(name, _ptr) for name in ("du", "ddelta", "dA", "dB", "ddelta_bias")]


class _ConvArgs(ctypes.Structure):
    _fields_ = [
        ("batch", _int64), ("length", _int64), ("dim", _int64), ("kernel_size", _int64),
        ("x", _ptr), ("x_batch_stride", _int64), ("x_length_stride", _int64),
        ("weight", _ptr), ("bias", _ptr),
        ("silu", _int32), ("reverse", _int32), ("n_threads", _int32),
    ]


def _load_library() -> tuple[Optional[ctypes.CDLL], str]:
    if os.environ.get(_DISABLE_ENV, "0") not in ("", "0"):
        return None, f"disabled by {_DISABLE_ENV}"
    spec = importlib.util.find_spec("mambazoo._native")
    if spec is None or not spec.origin:
        return None, ("native extension not built (no working C compiler at install time?); "
                      "reinstall with `pip install -e .` to build csrc/")
    try:
        library = ctypes.CDLL(spec.origin)
    except OSError as error:
        return None, f"native extension {spec.origin} failed to load: {error}"
    scan_args, conv_args, scan_grads = (ctypes.POINTER(_ScanArgs), ctypes.POINTER(_ConvArgs),
                                        ctypes.POINTER(_ScanGrads))
    state_args, state_grads = ctypes.POINTER(_StateScanArgs), ctypes.POINTER(_StateScanGrads)
    for name, argtypes in (
            ("mz_scan_forward", [scan_args, _ptr, _ptr, _ptr]),
            ("mz_scan_backward", [scan_args, _ptr, _ptr, _ptr, scan_grads]),
            ("mz_state_scan_forward", [state_args, _ptr]),
            ("mz_state_scan_backward", [state_args, _ptr, _ptr, state_grads]),
            ("mz_conv_forward", [conv_args, _ptr]),
            ("mz_conv_backward", [conv_args, _ptr, _ptr, _ptr, _ptr]),
            ("mz_scan_max_state", []),
            ("mz_conv_max_kernel", []),
    ):
        function = getattr(library, name, None)
        if function is None:
            return None, (f"native extension {spec.origin} is out of date (no {name}); "
                          "rebuild it with `pip install -e .`")
        function.argtypes, function.restype = argtypes, ctypes.c_int
    return library, ""


_LIBRARY, UNAVAILABLE_REASON = _load_library()
AVAILABLE = _LIBRARY is not None
MAX_STATE = _LIBRARY.mz_scan_max_state() if AVAILABLE else 0
MAX_KERNEL = _LIBRARY.mz_conv_max_kernel() if AVAILABLE else 0


def _prepare(tensor: Optional[Tensor], name: str) -> Optional[Tensor]:
    """float32 CPU tensor whose last dimension is contiguous (other strides are passed to the kernel)."""
    if tensor is None:
        return None
    if tensor.device.type != "cpu":
        raise ValueError(f"{name} is on {tensor.device}; the native backend runs on CPU tensors only")
    tensor = tensor.detach().to(torch.float32)
    if tensor.dim() and tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
        tensor = tensor.contiguous()
    return tensor


def _address(tensor: Optional[Tensor]) -> Optional[int]:
    return None if tensor is None else tensor.data_ptr()


def _strides(tensor: Optional[Tensor]) -> tuple[int, int]:
    return (0, 0) if tensor is None else (tensor.stride(0), tensor.stride(1))


def _check(status: int, function: str) -> None:
    if status == -2:
        raise MemoryError(f"native {function}: out of memory for scratch buffers")
    if status != 0:
        raise ValueError(f"native {function}: invalid sizes (status {status})")


def _scan_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, reverse: bool) -> tuple[_ScanArgs, tuple]:
    """Kernel arguments plus the float32 tensors they point into (the caller keeps those alive during the call)."""
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    u, delta, A, B, C, D, z, delta_bias = (_prepare(t, n) for t, n in zip((u, delta, A, B, C, D, z, delta_bias), names))
    A, D, delta_bias = (None if t is None else t.contiguous() for t in (A, D, delta_bias))
    batch, length, dim = u.shape
    if not 1 <= A.shape[1] <= MAX_STATE:
        raise ValueError(f"the native scan supports d_state 1..{MAX_STATE}, got A with d_state {A.shape[1]}")
    args = _ScanArgs(
        batch, length, dim, A.shape[1], CHUNK_SIZE,
        _address(u), *_strides(u), _address(delta), *_strides(delta), _address(A),
        _address(B), *_strides(B), _address(C), *_strides(C), _address(D),
        _address(z), *_strides(z), _address(delta_bias),
        int(delta_softplus), int(reverse), torch.get_num_threads(),
    )
    return args, (u, delta, A, B, C, D, z, delta_bias)


def scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, reverse: bool):
    """Fused-kernel forward (see :mod:`mambazoo.ops.fused` for the contract): (y, last_state, chunk_states)."""
    args, _alive = _scan_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
    batch, length, dim = u.shape
    n_chunks = -(-length // CHUNK_SIZE)
    y = torch.empty((batch, length, dim), dtype=torch.float32)
    last_state = torch.empty((batch, dim, A.shape[1]), dtype=torch.float32)
    chunk_states = torch.empty((batch, n_chunks, dim, A.shape[1]), dtype=torch.float32)
    _check(_LIBRARY.mz_scan_forward(ctypes.byref(args), y.data_ptr(), last_state.data_ptr(),
                                    chunk_states.data_ptr()), "scan forward")
    return y.to(u.dtype), last_state, chunk_states


def scan_backward(grad_y, grad_last_state, u, delta, A, B, C, D, z, delta_bias, chunk_states, delta_softplus: bool,
                  reverse: bool):
    """Fused-kernel backward: gradients of (u, delta, A, B, C, D, z, delta_bias), empty for absent inputs."""
    args, _alive = _scan_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
    grad_y = _prepare(grad_y, "grad_y").contiguous()
    grad_last_state = None if grad_last_state is None else _prepare(grad_last_state, "grad_last_state").contiguous()
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    grads = [None if t is None else torch.empty(t.shape, dtype=torch.float32) for t in inputs]
    pointers = _ScanGrads(*(_address(g) for g in grads))
    _check(_LIBRARY.mz_scan_backward(ctypes.byref(args), chunk_states.contiguous().data_ptr(), grad_y.data_ptr(),
                                     _address(grad_last_state), ctypes.byref(pointers)), "scan backward")
    return tuple(u.new_empty((0,)) if g is None else g.to(t.dtype) for g, t in zip(grads, inputs))


def _state_scan_args(u, delta, A, B, delta_bias, delta_softplus: bool, reverse: bool) -> tuple[_StateScanArgs, tuple]:
    """Kernel arguments plus the float32 tensors they point into (the caller keeps those alive during the call)."""
    u, delta, B = _prepare(u, "u"), _prepare(delta, "delta"), _prepare(B, "B")
    A, delta_bias = _prepare(A, "A").contiguous(), _prepare(delta_bias, "delta_bias")
    delta_bias = None if delta_bias is None else delta_bias.contiguous()
    args = _StateScanArgs(
        *u.shape, _address(u), *_strides(u), _address(delta), *_strides(delta), _address(A),
        _address(B), *_strides(B), _address(delta_bias), int(delta_softplus), int(reverse), torch.get_num_threads(),
    )
    return args, (u, delta, A, B, delta_bias)


def state_scan_forward(u, delta, A, B, delta_bias, delta_softplus: bool, reverse: bool) -> Tensor:
    """All-states scan forward (see :mod:`mambazoo.ops.fused_state_scan` for the contract): float32 states."""
    states = torch.zeros(u.shape, dtype=torch.float32)
    if states.numel():
        args, _alive = _state_scan_args(u, delta, A, B, delta_bias, delta_softplus, reverse)
        _check(_LIBRARY.mz_state_scan_forward(ctypes.byref(args), states.data_ptr()), "state scan forward")
    return states


def state_scan_backward(grad_states, states, u, delta, A, B, delta_bias, delta_softplus: bool,
                        reverse: bool) -> tuple[Tensor, ...]:
    """All-states scan backward: gradients of (u, delta, A, B, delta_bias), empty for an absent bias."""
    inputs = (u, delta, A, B, delta_bias)
    grads = [None if t is None else torch.zeros(t.shape, dtype=torch.float32) for t in inputs]
    if u.numel():
        args, _alive = _state_scan_args(u, delta, A, B, delta_bias, delta_softplus, reverse)
        grad_states = _prepare(grad_states, "grad_states").contiguous()
        pointers = _StateScanGrads(*(_address(g) for g in grads))
        _check(_LIBRARY.mz_state_scan_backward(ctypes.byref(args), states.contiguous().data_ptr(),
                                               grad_states.data_ptr(), ctypes.byref(pointers)), "state scan backward")
    return tuple(u.new_empty((0,)) if g is None else g.to(t.dtype) for g, t in zip(grads, inputs))


def _conv_args(x, weight, bias, silu: bool, reverse: bool) -> tuple[_ConvArgs, tuple]:
    x, weight, bias = _prepare(x, "x"), _prepare(weight, "weight").contiguous(), _prepare(bias, "bias")
    if not 1 <= weight.shape[1] <= MAX_KERNEL:
        raise ValueError(f"the native conv1d supports kernel sizes 1..{MAX_KERNEL}, got weight {tuple(weight.shape)}")
    batch, length, dim = x.shape
    args = _ConvArgs(batch, length, dim, weight.shape[1], _address(x), *_strides(x), _address(weight),
                     _address(bias), int(silu), int(reverse), torch.get_num_threads())
    return args, (x, weight, bias)


def conv_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool, reverse: bool) -> Tensor:
    """Causal depthwise conv1d, channels-last; y in x's dtype."""
    args, _alive = _conv_args(x, weight, bias, silu, reverse)
    y = torch.empty(x.shape, dtype=torch.float32)
    _check(_LIBRARY.mz_conv_forward(ctypes.byref(args), y.data_ptr()), "conv1d forward")
    return y.to(x.dtype)


def conv_backward(grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool,
                  reverse: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of (x, weight, bias) of :func:`conv_forward` (empty for an absent bias)."""
    args, _alive = _conv_args(x, weight, bias, silu, reverse)
    grad_y = _prepare(grad_y, "grad_y").contiguous()
    dx = torch.empty(x.shape, dtype=torch.float32)
    dweight = torch.empty(weight.shape, dtype=torch.float32)
    dbias = None if bias is None else torch.empty(bias.shape, dtype=torch.float32)
    _check(_LIBRARY.mz_conv_backward(ctypes.byref(args), grad_y.data_ptr(), dx.data_ptr(), dweight.data_ptr(),
                                     _address(dbias)), "conv1d backward")
    return dx.to(x.dtype), dweight.to(weight.dtype), x.new_empty((0,)) if dbias is None else dbias.to(bias.dtype)


if AVAILABLE:
    register_kernel("native", FusedKernel(scan_forward, scan_backward, CHUNK_SIZE))
    register_state_kernel("native", StateKernel(state_scan_forward, state_scan_backward))

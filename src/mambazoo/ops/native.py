"""Native CPU kernels (``csrc/``): the fused selective scan, the all-states scan, the causal depthwise conv1d, and
for inference the bidirectional scan and two epilogues (RMSNorm, the bidirectional gate), loaded with ctypes.

The shared library ``libmambazoo_native.so`` is built by ``setup.py`` (plain C + OpenMP, no Python or PyTorch
headers). It holds every kernel once per instruction set -- ``avx512``, ``avx2`` (with FMA) and ``portable`` on
x86-64, ``portable`` elsewhere -- and this module binds the best variant the CPU supports, or the one named by
``MAMBAZOO_NATIVE_ISA`` (``avx512``, ``avx2`` or ``portable``; for tests and benchmarks). :data:`ISA` is that choice,
:func:`use_isa` switches variants temporarily (benchmarks compare them in one process), :func:`describe` says
everything about the build. ``MAMBAZOO_NATIVE_LIBRARY`` loads another build of the library (CI uses it to test a
clang build next to the installed GCC one). See docs/native.md.

torch is imported before the library is loaded, so a GCC build's ``libgomp.so.1`` dependency resolves to the OpenMP
runtime torch already loaded (one thread pool, no oversubscription); every call passes ``torch.get_num_threads()`` as
its thread count.

``AVAILABLE`` tells whether the library loaded; ``UNAVAILABLE_REASON`` says why not (no compiler at install time,
``MAMBAZOO_DISABLE_NATIVE=1``, an ISA the CPU lacks, ...). When it loads, the scan kernels are registered as
``"native"`` with :func:`mambazoo.ops.fused.register_kernel` and
:func:`mambazoo.ops.fused_state_scan.register_state_kernel`. float16/bfloat16 (and float64) inputs are computed in
float32; outputs and gradients come back in the dtype of the corresponding input (the all-states scan returns float32
states).
"""
import contextlib
import ctypes
import functools
import os
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import Tensor

from .fused import A_SIGN_ERROR, FusedKernel, register_kernel
from .fused_state_scan import StateKernel, register_state_kernel

__all__ = ["AVAILABLE", "UNAVAILABLE_REASON", "ISA", "ISAS", "COMPILED_ISAS", "RUNNABLE_ISAS", "LIBRARY_PATH",
           "CHUNK_SIZE", "MAX_STATE", "MAX_KERNEL", "MAX_RANK", "active_isa", "describe", "use_isa", "scan_forward",
           "scan_backward", "bidirectional_scan_forward", "conv_forward", "conv_backward", "state_scan_forward",
           "state_scan_backward", "rms_norm_forward", "gated_sum_forward"]

CHUNK_SIZE = 64
ISAS = ("avx512", "avx2", "portable")  # best first
LIBRARY_NAME = "libmambazoo_native.so"
_DISABLE_ENV = "MAMBAZOO_DISABLE_NATIVE"
_ISA_ENV = "MAMBAZOO_NATIVE_ISA"
_LIBRARY_ENV = "MAMBAZOO_NATIVE_LIBRARY"
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


class _ScanDirection(ctypes.Structure):
    _fields_ = [
        ("u", _ptr), ("u_batch_stride", _int64), ("u_length_stride", _int64),
        ("dt_low_rank", _ptr), ("dt_batch_stride", _int64), ("dt_length_stride", _int64),
        ("dt_weight", _ptr), ("dt_bias", _ptr), ("A_log", _ptr),
        ("B", _ptr), ("B_batch_stride", _int64), ("B_length_stride", _int64),
        ("C", _ptr), ("C_batch_stride", _int64), ("C_length_stride", _int64),
        ("D", _ptr),
    ]


class _BidirectionalScanArgs(ctypes.Structure):
    _fields_ = [
        ("batch", _int64), ("length", _int64), ("dim", _int64), ("d_state", _int64), ("dt_rank", _int64),
        ("forward", _ScanDirection), ("backward", _ScanDirection),
        ("z", _ptr), ("z_batch_stride", _int64), ("z_length_stride", _int64),
        ("scale", ctypes.c_float), ("n_threads", _int32),
    ]


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


class _RmsNormArgs(ctypes.Structure):
    _fields_ = [("rows", _int64), ("dim", _int64), ("x", _ptr), ("weight", _ptr), ("eps", ctypes.c_float),
                ("n_threads", _int32)]


class _GatedSumArgs(ctypes.Structure):
    _fields_ = [("numel", _int64), ("a", _ptr), ("b", _ptr), ("z", _ptr), ("scale", ctypes.c_float),
                ("n_threads", _int32)]


_SCAN_ARGS, _SCAN_GRADS, _BIDIRECTIONAL_ARGS, _STATE_ARGS, _STATE_GRADS, _CONV_ARGS, _RMS_ARGS, _GATE_ARGS = (
    ctypes.POINTER(s) for s in (_ScanArgs, _ScanGrads, _BidirectionalScanArgs, _StateScanArgs, _StateScanGrads,
                                _ConvArgs, _RmsNormArgs, _GatedSumArgs))
_KERNELS = {  # entry point (without the ISA suffix) -> argument types; each returns an int
    "mz_scan_forward": [_SCAN_ARGS, _ptr, _ptr, _ptr],
    "mz_scan_backward": [_SCAN_ARGS, _ptr, _ptr, _ptr, _SCAN_GRADS],
    "mz_scan_bidirectional": [_BIDIRECTIONAL_ARGS, _ptr],
    "mz_state_scan_forward": [_STATE_ARGS, _ptr],
    "mz_state_scan_backward": [_STATE_ARGS, _ptr, _ptr, _STATE_GRADS],
    "mz_conv_forward": [_CONV_ARGS, _ptr],
    "mz_conv_backward": [_CONV_ARGS, _ptr, _ptr, _ptr, _ptr],
    "mz_rms_norm": [_RMS_ARGS, _ptr],
    "mz_gated_sum": [_GATE_ARGS, _ptr],
    "mz_scan_max_state": [],
    "mz_scan_max_rank": [],
    "mz_conv_max_kernel": [],
}


def _library_path() -> Path:
    override = os.environ.get(_LIBRARY_ENV)
    return Path(override) if override else Path(__file__).resolve().parent.parent / LIBRARY_NAME


def _open(path: Path) -> tuple[Optional[ctypes.CDLL], str]:
    if not path.exists():
        return None, (f"native library {path} not built (no working C compiler at install time?); reinstall with "
                      "`pip install -e .` (or run `python setup.py build_ext --inplace`) to build csrc/")
    try:
        library = ctypes.CDLL(str(path))
    except OSError as error:
        return None, f"native library {path} failed to load: {error}"
    try:
        for name, restype in (("mz_cpu_supports", ctypes.c_int), ("mz_compiled_isas", ctypes.c_char_p),
                              ("mz_build_info", ctypes.c_char_p)):
            getattr(library, name).restype = restype
    except AttributeError as error:
        return None, f"{path} is not a mambazoo native library of this version ({error}); rebuild it"
    library.mz_cpu_supports.argtypes = [ctypes.c_char_p]
    return library, ""


def _choose_isa(compiled: tuple[str, ...], runnable: tuple[str, ...]) -> tuple[Optional[str], str]:
    forced = os.environ.get(_ISA_ENV, "").strip()
    if not forced:
        return (runnable[0], "") if runnable else (None, f"this CPU runs none of the compiled ISAs {compiled}")
    if forced not in ISAS:
        return None, f"{_ISA_ENV}={forced!r} is not one of {ISAS}"
    if forced not in compiled:
        return None, f"{_ISA_ENV}={forced} but the library was built with {' '.join(compiled)} only"
    if forced not in runnable:
        return None, f"{_ISA_ENV}={forced} but this CPU does not support it (it runs {' '.join(runnable)})"
    return forced, ""


@functools.lru_cache(maxsize=None)
def _bind(library: ctypes.CDLL, isa: str) -> dict:
    """The entry points of one ISA variant (bound once per variant)."""
    functions = {}
    for name, argtypes in _KERNELS.items():
        function = getattr(library, f"{name}_{isa}")
        function.argtypes, function.restype = argtypes, ctypes.c_int
        functions[name] = function
    return functions


def _load() -> tuple[Optional[ctypes.CDLL], str, tuple[str, ...], tuple[str, ...], Optional[str], str]:
    """(library, reason if unavailable, compiled ISAs, runnable ISAs, chosen ISA, build info)."""
    if os.environ.get(_DISABLE_ENV, "0") not in ("", "0"):
        return None, f"disabled by {_DISABLE_ENV}", (), (), None, ""
    library, reason = _open(_library_path())
    if library is None:
        return None, reason, (), (), None, ""
    compiled = tuple(library.mz_compiled_isas().decode().split())
    runnable = tuple(isa for isa in compiled if library.mz_cpu_supports(isa.encode()))
    info = library.mz_build_info().decode()
    isa, reason = _choose_isa(compiled, runnable)
    if isa is not None:
        try:
            _bind(library, isa)
        except AttributeError as error:  # a library built from other kernel sources
            isa, reason = None, f"native library {_library_path()} is stale ({error}); rebuild it"
    return (library if isa else None), reason, compiled, runnable, isa, info


_LIBRARY, UNAVAILABLE_REASON, COMPILED_ISAS, RUNNABLE_ISAS, ISA, BUILD_INFO = _load()
AVAILABLE = _LIBRARY is not None
LIBRARY_PATH = _library_path()
_FUNCTIONS = _bind(_LIBRARY, ISA) if AVAILABLE else {}
_active_isa = ISA
MAX_STATE = _FUNCTIONS["mz_scan_max_state"]() if AVAILABLE else 0
MAX_KERNEL = _FUNCTIONS["mz_conv_max_kernel"]() if AVAILABLE else 0
MAX_RANK = _FUNCTIONS["mz_scan_max_rank"]() if AVAILABLE else 0


def active_isa() -> Optional[str]:
    """The ISA variant the kernels run now: :data:`ISA`, unless inside :func:`use_isa`."""
    return _active_isa


@contextlib.contextmanager
def use_isa(isa: str) -> Iterator[None]:
    """Run the kernels of another compiled ISA variant within this context (benchmarks and tests compare them)."""
    global _FUNCTIONS, _active_isa
    if not AVAILABLE:
        raise RuntimeError(f"the native backend is unavailable: {UNAVAILABLE_REASON}")
    if isa not in RUNNABLE_ISAS:
        raise ValueError(f"ISA {isa!r} is not runnable here; compiled: {COMPILED_ISAS}, runnable: {RUNNABLE_ISAS}")
    previous = _FUNCTIONS, _active_isa
    _FUNCTIONS, _active_isa = _bind(_LIBRARY, isa), isa
    try:
        yield
    finally:
        _FUNCTIONS, _active_isa = previous


def describe() -> dict[str, object]:
    """The native build as facts: availability (or why not), library path, ISA in use, compiled and runnable ISAs,
    compiler and OpenMP runtime."""
    return dict(available=AVAILABLE, reason=UNAVAILABLE_REASON or None, library=str(LIBRARY_PATH),
                isa=active_isa(), compiled_isas=list(COMPILED_ISAS), runnable_isas=list(RUNNABLE_ISAS),
                build=BUILD_INFO or None)


def _prepare(tensor: Optional[Tensor]) -> Optional[Tensor]:
    """float32 tensor whose last dimension is contiguous (other strides are passed to the kernel)."""
    if tensor is None:
        return None
    if tensor.dtype != torch.float32:
        tensor = tensor.to(torch.float32)
    if tensor.stride()[-1] != 1 and tensor.shape[-1] > 1:
        tensor = tensor.contiguous()
    return tensor


def _contiguous(tensor: Optional[Tensor]) -> Optional[Tensor]:
    return None if tensor is None else _prepare(tensor).contiguous()


def _pointer_and_strides(tensor: Optional[Tensor]) -> tuple[Optional[int], int, int]:
    """Address, batch stride and length stride of a (batch, length, ...) tensor (None, 0, 0 when absent)."""
    if tensor is None:
        return None, 0, 0
    strides = tensor.stride()
    return tensor.data_ptr(), strides[0], strides[1]


def _address(tensor: Optional[Tensor]) -> Optional[int]:
    return None if tensor is None else tensor.data_ptr()


def _check(status: int, function: str) -> None:
    if status == -2:
        raise MemoryError(f"native {function}: out of memory for scratch buffers")
    if status == -3:
        raise ValueError(A_SIGN_ERROR)
    if status != 0:
        raise ValueError(f"native {function}: invalid sizes (status {status})")


def _check_cpu(tensor: Tensor, name: str) -> None:
    if tensor.device.type != "cpu":
        raise ValueError(f"{name} is on {tensor.device}; the native backend runs on CPU tensors only")


def _scan_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, reverse: bool) -> tuple[_ScanArgs, tuple]:
    """Kernel arguments plus the float32 tensors they point into (the caller keeps those alive during the call)."""
    _check_cpu(u, "u")
    u, delta, B, C, z = (_prepare(t) for t in (u, delta, B, C, z))
    A, D, delta_bias = (_contiguous(t) for t in (A, D, delta_bias))
    batch, length, dim = u.shape
    if not 1 <= A.shape[1] <= MAX_STATE:
        raise ValueError(f"the native scan supports d_state 1..{MAX_STATE}, got A with d_state {A.shape[1]}")
    args = _ScanArgs(
        batch, length, dim, A.shape[1], CHUNK_SIZE,
        *_pointer_and_strides(u), *_pointer_and_strides(delta), A.data_ptr(),
        *_pointer_and_strides(B), *_pointer_and_strides(C), _address(D),
        *_pointer_and_strides(z), _address(delta_bias),
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
    _check(_FUNCTIONS["mz_scan_forward"](ctypes.byref(args), y.data_ptr(), last_state.data_ptr(),
                                         chunk_states.data_ptr()), "scan forward")
    return y.to(u.dtype), last_state, chunk_states


def scan_backward(grad_y, grad_last_state, u, delta, A, B, C, D, z, delta_bias, chunk_states, delta_softplus: bool,
                  reverse: bool):
    """Fused-kernel backward: gradients of (u, delta, A, B, C, D, z, delta_bias), empty for absent inputs."""
    args, _alive = _scan_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
    grad_y, grad_last_state = _contiguous(grad_y), _contiguous(grad_last_state)
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    grads = [None if t is None else torch.empty(t.shape, dtype=torch.float32) for t in inputs]
    pointers = _ScanGrads(*(_address(g) for g in grads))
    _check(_FUNCTIONS["mz_scan_backward"](ctypes.byref(args), chunk_states.contiguous().data_ptr(),
                                          grad_y.data_ptr(), _address(grad_last_state), ctypes.byref(pointers)),
           "scan backward")
    return tuple(u.new_empty((0,)) if g is None else g.to(t.dtype) for g, t in zip(grads, inputs))


def _direction(direction) -> tuple[_ScanDirection, tuple]:
    """Kernel view of a :class:`mambazoo.ops.bidirectional_scan.ScanDirection` plus the tensors it points into."""
    u, dt_low_rank, B, C = (_prepare(t) for t in (direction.u, direction.dt_low_rank, direction.B, direction.C))
    dt_weight, dt_bias, A_log, D = (_contiguous(t) for t in (direction.dt_weight, direction.dt_bias, direction.A_log,
                                                             direction.D))
    view = _ScanDirection(*_pointer_and_strides(u), *_pointer_and_strides(dt_low_rank), dt_weight.data_ptr(),
                          _address(dt_bias), A_log.data_ptr(), *_pointer_and_strides(B), *_pointer_and_strides(C),
                          _address(D))
    return view, (u, dt_low_rank, B, C, dt_weight, dt_bias, A_log, D)


def bidirectional_scan_forward(forward, backward, z: Tensor, scale: float) -> Tensor:
    """((scan(forward) + scan(backward, reversed)) * SiLU(z)) * scale of float32 CPU directions (forward only)."""
    _check_cpu(z, "z")
    views = [_direction(direction) for direction in (forward, backward)]  # (view, tensors kept alive) each
    z = _prepare(z)
    batch, length, dim = z.shape
    args = _BidirectionalScanArgs(batch, length, dim, forward.A_log.shape[1], forward.dt_weight.shape[1],
                                  views[0][0], views[1][0], *_pointer_and_strides(z), scale, torch.get_num_threads())
    y = torch.empty((batch, length, dim), dtype=torch.float32)
    _check(_FUNCTIONS["mz_scan_bidirectional"](ctypes.byref(args), y.data_ptr()), "bidirectional scan")
    return y


def _state_scan_args(u, delta, A, B, delta_bias, delta_softplus: bool, reverse: bool) -> tuple[_StateScanArgs, tuple]:
    """Kernel arguments plus the float32 tensors they point into (the caller keeps those alive during the call)."""
    _check_cpu(u, "u")
    u, delta, B = (_prepare(t) for t in (u, delta, B))
    A, delta_bias = _contiguous(A), _contiguous(delta_bias)
    args = _StateScanArgs(
        *u.shape, *_pointer_and_strides(u), *_pointer_and_strides(delta), A.data_ptr(), *_pointer_and_strides(B),
        _address(delta_bias), int(delta_softplus), int(reverse), torch.get_num_threads(),
    )
    return args, (u, delta, A, B, delta_bias)


def state_scan_forward(u, delta, A, B, delta_bias, delta_softplus: bool, reverse: bool) -> Tensor:
    """All-states scan forward (see :mod:`mambazoo.ops.fused_state_scan` for the contract): float32 states."""
    args, _alive = _state_scan_args(u, delta, A, B, delta_bias, delta_softplus, reverse)
    states = torch.empty(u.shape, dtype=torch.float32)
    _check(_FUNCTIONS["mz_state_scan_forward"](ctypes.byref(args), states.data_ptr()), "state scan forward")
    return states


def state_scan_backward(grad_states, states, u, delta, A, B, delta_bias, delta_softplus: bool,
                        reverse: bool) -> tuple[Tensor, ...]:
    """All-states scan backward: gradients of (u, delta, A, B, delta_bias), empty for an absent bias."""
    args, _alive = _state_scan_args(u, delta, A, B, delta_bias, delta_softplus, reverse)
    grad_states = _contiguous(grad_states)
    inputs = (u, delta, A, B, delta_bias)
    grads = [None if t is None else torch.empty(t.shape, dtype=torch.float32) for t in inputs]
    pointers = _StateScanGrads(*(_address(g) for g in grads))
    _check(_FUNCTIONS["mz_state_scan_backward"](ctypes.byref(args), _contiguous(states).data_ptr(),
                                                grad_states.data_ptr(), ctypes.byref(pointers)), "state scan backward")
    return tuple(u.new_empty((0,)) if g is None else g.to(t.dtype) for g, t in zip(grads, inputs))


def _conv_args(x, weight, bias, silu: bool, reverse: bool) -> tuple[_ConvArgs, tuple]:
    _check_cpu(x, "x")
    x, weight, bias = _prepare(x), _contiguous(weight), _contiguous(bias)
    if not 1 <= weight.shape[1] <= MAX_KERNEL:
        raise ValueError(f"the native conv1d supports kernel sizes 1..{MAX_KERNEL}, got weight {tuple(weight.shape)}")
    batch, length, dim = x.shape
    args = _ConvArgs(batch, length, dim, weight.shape[1], *_pointer_and_strides(x), weight.data_ptr(),
                     _address(bias), int(silu), int(reverse), torch.get_num_threads())
    return args, (x, weight, bias)


def conv_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool, reverse: bool) -> Tensor:
    """Causal depthwise conv1d, channels-last; y in x's dtype."""
    args, _alive = _conv_args(x, weight, bias, silu, reverse)
    y = torch.empty(x.shape, dtype=torch.float32)
    _check(_FUNCTIONS["mz_conv_forward"](ctypes.byref(args), y.data_ptr()), "conv1d forward")
    return y.to(x.dtype)


def conv_backward(grad_y: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool,
                  reverse: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of (x, weight, bias) of :func:`conv_forward` (empty for an absent bias)."""
    args, _alive = _conv_args(x, weight, bias, silu, reverse)
    grad_y = _contiguous(grad_y)
    dx = torch.empty(x.shape, dtype=torch.float32)
    dweight = torch.empty(weight.shape, dtype=torch.float32)
    dbias = None if bias is None else torch.empty(bias.shape, dtype=torch.float32)
    _check(_FUNCTIONS["mz_conv_backward"](ctypes.byref(args), grad_y.data_ptr(), dx.data_ptr(), dweight.data_ptr(),
                                          _address(dbias)), "conv1d backward")
    return dx.to(x.dtype), dweight.to(weight.dtype), x.new_empty((0,)) if dbias is None else dbias.to(bias.dtype)


def rms_norm_forward(x: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    """RMSNorm over the last dimension of a float32 CPU tensor (forward only); same shape and dtype."""
    _check_cpu(x, "x")
    x, weight = _contiguous(x), _contiguous(weight)
    dim = x.shape[-1]
    args = _RmsNormArgs(x.numel() // dim if dim else 0, dim, x.data_ptr(), _address(weight), eps,
                        torch.get_num_threads())
    out = torch.empty_like(x)
    _check(_FUNCTIONS["mz_rms_norm"](ctypes.byref(args), out.data_ptr()), "rms_norm")
    return out


def gated_sum_forward(a: Tensor, b: Optional[Tensor], z: Tensor, scale: float) -> Tensor:
    """((a + b) * silu(z)) * scale for float32 CPU tensors of one shape (forward only)."""
    _check_cpu(a, "a")
    a, b, z = (_contiguous(t) for t in (a, b, z))
    args = _GatedSumArgs(a.numel(), a.data_ptr(), _address(b), z.data_ptr(), scale, torch.get_num_threads())
    out = torch.empty_like(a)
    _check(_FUNCTIONS["mz_gated_sum"](ctypes.byref(args), out.data_ptr()), "gated_sum")
    return out


if AVAILABLE:
    register_kernel("native", FusedKernel(scan_forward, scan_backward, CHUNK_SIZE))
    register_state_kernel("native", StateKernel(state_scan_forward, state_scan_backward))


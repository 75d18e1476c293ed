"""The fused-kernel selective scan as a ``torch.library`` custom op.

Compiled kernels (the native CPU kernel, the Triton GPU kernels) plug in here with :func:`register_kernel`. They all
share one contract, so one custom op (``mambazoo::selective_scan_fused``), one fake implementation and one autograd
formula serve them, and ``torch.compile`` / ``torch.export`` see a single opaque op instead of a graph break.

Kernel contract (all tensors in the op's channels-last layout, see :func:`mambazoo.ops.selective_scan`):

* ``forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)`` returns ``(y, last_state, chunk_states)``:
  y like u (same dtype), last_state (batch, dim, d_state) float32, and chunk_states (batch, n_chunks, dim, d_state)
  float32 holding the state *entering* each chunk of ``chunk_size`` steps in scan order (chunk 0 is all zeros),
  where ``n_chunks = ceil(length / chunk_size)``; the backward recomputes the inside of each chunk from them. A kernel
  whose threads own channels rather than states may declare ``states_first`` and use (batch, n_chunks, d_state, dim).
  The states are float64 instead for float64 inputs if the kernel says so (``float64_states``). Outputs are fresh
  contiguous tensors (no views), like the fake implementation's.
* ``backward(grad_y, grad_last_state, u, delta, A, B, C, D, z, delta_bias, chunk_states, delta_softplus, reverse)``
  returns the gradients of (u, delta, A, B, C, D, z, delta_bias), each shaped and typed like its input; for an absent
  optional input it returns an empty tensor. ``grad_last_state`` may be None. It runs as the backward custom op
  (``mambazoo::selective_scan_fused_bwd``), or directly in the autograd formula for a kernel whose backward needs
  autograd itself (``backward_uses_autograd``: the pure-PyTorch kernel).
"""
from dataclasses import dataclass
from typing import Callable, Generic, Optional, TypeVar

import torch
from torch import Tensor

from . import capabilities

__all__ = ["A_SIGN_ERROR", "FusedKernel", "KernelRegistry", "check_A_sign", "contiguous_gradient", "eager_call_is_plain", "register_kernel",
           "registered_kernels", "selective_scan_fused", "states_dtype"]

A_SIGN_ERROR = "A has positive entries; the scan needs A <= 0 (models pass A = -exp(A_log))"


def states_dtype(input_dtype: torch.dtype, float64_states: bool) -> torch.dtype:
    """dtype of the states a kernel returns: float64 for float64 inputs if it computes in float64, else float32."""
    return torch.float64 if float64_states and input_dtype == torch.float64 else torch.float32


def check_A_sign(A: Tensor, backend: str) -> None:
    """A <= 0, checked for CPU tensors (on accelerators it would cost a host sync; the native kernels check it)."""
    if A.device.type == "cpu" and backend != "native" and not torch.compiler.is_compiling():
        if bool((A.detach() > 0).any()):
            raise ValueError(A_SIGN_ERROR)


SCAN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_scan_tensor(name: str, tensor: Tensor, shape: tuple, device: torch.device) -> None:
    """A scan input is a floating tensor of ``shape`` on ``device``; otherwise an error naming it."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in SCAN_DTYPES:
        raise TypeError(f"{name} must be a float16, bfloat16, float32 or float64 tensor, got {tensor.dtype}")
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but u is on {device}")


KernelT = TypeVar("KernelT")


class KernelRegistry(Generic[KernelT]):
    """The kernels behind one custom op, by backend name; a kernel module registers its kernel when imported.

    Args:
        op: The op's name in :data:`mambazoo.ops.capabilities.CAPABILITIES` (its rows name the kernel modules).
        label: What the kernels compute, for error messages.
    """

    def __init__(self, op: str, label: str) -> None:
        self.op, self.label = op, label
        self._kernels: dict[str, KernelT] = {}

    def register(self, name: str, kernel: KernelT) -> None:
        """Make ``kernel`` callable through the op as ``kernel=name``."""
        self._kernels[name] = kernel

    def names(self) -> tuple[str, ...]:
        """Names of the kernels registered so far."""
        return tuple(self._kernels)

    def get(self, name: str) -> KernelT:
        """The kernel registered as ``name``, importing the backend's kernel module on first use."""
        if name not in self._kernels and name in capabilities.backend_names(self.op):
            capabilities.kernel_module(self.op, name)  # importing a kernel module registers its kernel
        if name not in self._kernels:
            raise ValueError(f"unknown {self.label} kernel {name!r}; registered: {self.names()}")
        return self._kernels[name]


@dataclass(frozen=True)
class FusedKernel:
    """A compiled selective-scan implementation (see the module docstring for the contract)."""

    forward: Callable[..., tuple[Tensor, Tensor, Tensor]]
    backward: Callable[..., tuple[Tensor, ...]]
    chunk_size: int
    states_first: bool = False
    float64_states: bool = False
    backward_uses_autograd: bool = False

    def chunk_states_shape(self, batch: int, length: int, dim: int, d_state: int) -> tuple[int, int, int, int]:
        """Shape of the ``chunk_states`` this kernel's forward returns."""
        n_chunks = (length + self.chunk_size - 1) // self.chunk_size
        return (batch, n_chunks, d_state, dim) if self.states_first else (batch, n_chunks, dim, d_state)


_KERNELS: KernelRegistry[FusedKernel] = KernelRegistry("selective_scan", "fused scan")
register_kernel = _KERNELS.register
registered_kernels = _KERNELS.names
_kernel = _KERNELS.get


_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def eager_call_is_plain(*tensors: Optional[Tensor]) -> bool:
    """Whether a compiled kernel may run without its custom op: nothing would observe the op.

    The custom op is what autograd, ``torch.compile``/``export``, ``torch.jit.trace``, dispatch modes (FLOP counters,
    fake tensors), tensor subclasses and ``torch.func`` transforms see; its dispatch also costs tens of microseconds
    per call once the CPU caches are cold (inside a model: a few percent of Vim-Ti's time at 224 px). A call made in
    plain eager inference -- no gradient to record, no tracing, no mode, plain tensors -- can skip it.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    return (not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and torch._C._len_torch_dispatch_stack() == 0 and not torch._C._is_torch_function_mode_enabled()
            and torch._C._functorch.peek_interpreter_stack() is None
            and torch.autograd.forward_ad._current_level < 0
            and all(t is None or type(t) in _PLAIN_TYPES for t in tensors))


@torch.library.custom_op("mambazoo::selective_scan_fused", mutates_args=())
def _selective_scan_fused_op(
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Optional[Tensor],
        z: Optional[Tensor],
        delta_bias: Optional[Tensor],
        delta_softplus: bool,
        reverse: bool,
        kernel: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return _kernel(kernel).forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)


@_selective_scan_fused_op.register_fake
def _selective_scan_fused_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, kernel):
    batch, length, dim = u.shape
    d_state = A.shape[1]
    kernel_spec = _kernel(kernel)
    state_dtype = states_dtype(u.dtype, kernel_spec.float64_states)
    return (
        u.new_empty(u.shape),
        u.new_empty((batch, dim, d_state), dtype=state_dtype),
        u.new_empty(kernel_spec.chunk_states_shape(batch, length, dim, d_state), dtype=state_dtype),
    )


@torch.library.custom_op("mambazoo::selective_scan_fused_bwd", mutates_args=())
def _selective_scan_fused_bwd_op(
        grad_y: Tensor,
        grad_last_state: Optional[Tensor],
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Optional[Tensor],
        z: Optional[Tensor],
        delta_bias: Optional[Tensor],
        chunk_states: Tensor,
        delta_softplus: bool,
        reverse: bool,
        kernel: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(grad.contiguous() for grad in _kernel(kernel).backward(
        grad_y, grad_last_state, u, delta, A, B, C, D, z, delta_bias, chunk_states, delta_softplus, reverse))


def contiguous_gradient(reference: Tensor, tensor: Optional[Tensor]) -> Tensor:
    """A fake gradient: contiguous, shaped and typed like ``tensor`` (an empty tensor for an absent input).

    The backward ops return contiguous gradients whatever the inputs' strides (a transposed view's gradient too), and
    their fakes must say so: ``torch.compile`` checks the real outputs' strides against them.
    """
    return reference.new_empty((0,)) if tensor is None else tensor.new_empty(tensor.shape)


@_selective_scan_fused_bwd_op.register_fake
def _selective_scan_fused_bwd_fake(grad_y, grad_last_state, u, delta, A, B, C, D, z, delta_bias, chunk_states,
                                   delta_softplus, reverse, kernel):
    return tuple(contiguous_gradient(u, t) for t in (u, delta, A, B, C, D, z, delta_bias))


def _setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, kernel = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2])
    ctx.options = (delta_softplus, reverse, kernel)
    ctx.has_optional = (D is not None, z is not None, delta_bias is not None)
    ctx.mark_non_differentiable(output[2])


def _backward(ctx, grad_y: Tensor, grad_last_state: Optional[Tensor], _grad_chunk_states: Optional[Tensor]):
    kernel = _kernel(ctx.options[2])
    if kernel.backward_uses_autograd:
        grads = kernel.backward(grad_y, grad_last_state, *ctx.saved_tensors, *ctx.options[:2])
    else:
        grads = _selective_scan_fused_bwd_op(grad_y.contiguous(), grad_last_state, *ctx.saved_tensors, *ctx.options)
    required = grads[:5]
    optional = tuple(g if present else None for g, present in zip(grads[5:], ctx.has_optional))
    return (*required, *optional, None, None, None)


_selective_scan_fused_op.register_autograd(_backward, setup_context=_setup_context)


def selective_scan_fused(
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Optional[Tensor],
        z: Optional[Tensor],
        delta_bias: Optional[Tensor],
        delta_softplus: bool,
        reverse: bool,
        kernel: str,
) -> tuple[Tensor, Tensor]:
    """Run a registered kernel through the custom op (directly when :func:`eager_call_is_plain`); (y, last_state)."""
    if eager_call_is_plain(u, delta, A, B, C, D, z, delta_bias):
        y, last_state, _ = _kernel(kernel).forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
        return y, last_state
    y, last_state, _ = _selective_scan_fused_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, kernel)
    return y, last_state

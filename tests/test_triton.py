"""Triton kernels (selective scan, causal conv1d) against float64 references: values, last state, gradients, options,
layouts, split sequences, NaN/Inf propagation and empty inputs.

Without a GPU the kernels run in Triton's interpreter on CPU tensors at small sizes: ``TRITON_INTERPRET`` must be set
before triton is imported, so ``test_kernels_under_the_interpreter`` re-runs this file in a subprocess with
``TRITON_INTERPRET=1`` (the interpreter checkpoints every 8 steps, so short sequences cross several chunks). On a
CUDA machine the same checks run natively at real sizes (plus a ~67k-token sequence, determinism and
``torch.compile``), and the interpreter run still happens.
"""
import contextlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mambazoo.ops import backend_status, causal_conv1d, selective_scan
from mambazoo.ops.causal_conv1d import causal_conv1d_torch
from scan_inputs import ScanInputs, make_scan_inputs

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
MODE = "interpreter" if INTERPRETER else "cuda" if torch.cuda.is_available() else None
DEVICE = "cuda" if MODE == "cuda" else "cpu"
GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
needs_kernels = pytest.mark.skipif(
    MODE is None, reason="no CUDA device: these checks run in the TRITON_INTERPRET=1 subprocess of "
                         "test_kernels_under_the_interpreter")
needs_cuda = pytest.mark.skipif(MODE != "cuda", reason="needs a CUDA device (real sizes, compiled kernels)")


def _patch_interpreter_device_calls() -> None:
    """Make the interpreter patch ``triton.language`` once per module instead of at every device-function call.

    Triton's interpreter re-patches the language module (an ``inspect.getmembers`` walk) each time a ``@triton.jit``
    helper is called, which dominates the run time of step-by-step kernels; the patches it makes are never undone
    inside a launch, so patching each module's globals once is equivalent. ``test_unpatched_interpreter_agrees``
    checks it on a small case.
    """
    from triton.runtime import interpreter

    patched = set()

    def call(self, *args, **kwargs):
        if id(self.fn.__globals__) not in patched:
            interpreter._patch_lang(self.fn)
            patched.add(id(self.fn.__globals__))
        try:
            return self.rewrite()(*args, **kwargs)
        except Exception as error:
            raise interpreter.InterpreterError(repr(error)) from error

    interpreter.InterpretedFunction.original_call = interpreter.InterpretedFunction.__call__
    interpreter.InterpretedFunction.__call__ = call


if INTERPRETER:
    _patch_interpreter_device_calls()


def relative_error(actual: torch.Tensor, expected: torch.Tensor, scale: float = 0.0) -> float:
    """Max abs error relative to the largest magnitude of the expected tensor, or to ``scale`` if that is larger.

    ``scale`` keeps a gradient that is ~0 by construction (e.g. dA of a one-step scan, whose float64 reference is
    ~1e-12 while float32 gives exactly 0) from turning rounding noise into a 100% error: it is compared at the scale
    of the call's other gradients instead.
    """
    if expected.numel() == 0:
        return 0.0
    expected = expected.double()
    denominator = max(expected.abs().max().item(), scale, 1e-30)
    return (actual.double() - expected).abs().max().item() / denominator


def on_device(inputs: ScanInputs) -> ScanInputs:
    return ScanInputs(**{name: (t.to(DEVICE) if t is not None else None) for name, t in vars(inputs).items()})


@contextlib.contextmanager
def segments(count):
    """Force the Triton scan to split every sequence into ``count`` segments (None: its own choice)."""
    from mambazoo.ops import triton_scan

    previous = triton_scan.TUNING["force_segments"]
    triton_scan.TUNING["force_segments"] = count
    try:
        yield
    finally:
        triton_scan.TUNING["force_segments"] = previous


def values_and_gradients(inputs: ScanInputs, backend: str, dtype, grad_y: torch.Tensor, grad_state: torch.Tensor,
                         **options) -> tuple[torch.Tensor, torch.Tensor, list]:
    """y, last state and the gradients of <y, grad_y> + <state, grad_state> w.r.t. every present input."""
    leaves = inputs.detached_leaves(dtype)
    y, state = selective_scan(*leaves.tensors(), backend=backend, return_last_state=True, **options)
    loss = (y.double() * grad_y).sum() + (state.double() * grad_state).sum()
    present = [t for t in leaves.tensors() if t is not None]
    grads = iter(torch.autograd.grad(loss, present))
    return y, state, [next(grads) if t is not None else None for t in leaves.tensors()]


def cotangents(inputs: ScanInputs) -> tuple[torch.Tensor, torch.Tensor]:
    batch, length, dim = inputs.u.shape
    generator = torch.Generator().manual_seed(length)
    grad_y = torch.randn(batch, length, dim, generator=generator, dtype=torch.float64).to(DEVICE)
    grad_state = torch.randn(batch, dim, inputs.A.shape[1], generator=generator, dtype=torch.float64).to(DEVICE)
    return grad_y, grad_state


def assert_matches_reference(inputs: ScanInputs, dtype: torch.dtype = torch.float32, value_tol: float = 2e-5,
                             grad_tol: float = 1e-4, **options) -> None:
    """Triton vs float64 reference on the same (already rounded) inputs: y, last state and all gradients.

    Sequences longer than 2000 steps are checked against the float64 ``torch`` backend (itself tested against the
    reference in test_scan.py): the step-by-step reference launches a few GPU ops per step.
    """
    inputs = on_device(inputs)
    grad_y, grad_state = cotangents(inputs)
    rounded = inputs.to(dtype)
    reference = "torch" if inputs.u.shape[1] > 2000 else "reference"
    y_ref, state_ref, grads_ref = values_and_gradients(rounded, reference, torch.float64, grad_y, grad_state,
                                                       **options)
    y, state, grads = values_and_gradients(rounded, "triton", None, grad_y, grad_state, **options)
    assert y.dtype == dtype and state.dtype == torch.float32
    assert torch.isfinite(y).all() and torch.isfinite(state).all()
    assert relative_error(y, y_ref) < value_tol
    assert relative_error(state, state_ref) < value_tol
    scale = 1e-3 * max(g.abs().max().item() for g in grads_ref if g is not None)
    for name, grad, grad_ref, leaf in zip(GRAD_NAMES, grads, grads_ref, rounded.tensors()):
        if leaf is None:
            continue
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape, name
        assert torch.isfinite(grad).all(), name
        assert relative_error(grad, grad_ref, scale) < grad_tol, name


def scan_case(shape, options: dict) -> tuple[ScanInputs, dict]:
    """Inputs and scan options for (batch, length, dim, d_state) and a mix of input and scan options."""
    options = dict(options)
    scan_options = {key: options.pop(key) for key in ("reverse", "delta_softplus") if key in options}
    inputs = make_scan_inputs(*shape, seed=sum(shape), **options)
    if not scan_options.get("delta_softplus", True):  # the caller supplies the final, positive step
        inputs.delta = torch.nn.functional.softplus(inputs.delta)
    return inputs, scan_options


OPTIONS = [
    dict(),
    dict(reverse=True),
    dict(with_D=False, with_z=False, with_bias=False),
    dict(with_z=False, with_bias=False, delta_softplus=False, reverse=True),
    dict(stress=True, reverse=True),
]
# (batch, length, dim, d_state) and options. The interpreter gets a curated list (it runs ~10^4 Triton ops per
# second): several chunks, one step, padded states and channels, N = 1 and 8, stress steps, every option once.
CASES = {
    "interpreter": [
        ((2, 21, 6, 16), OPTIONS[0]),
        ((1, 21, 6, 16), OPTIONS[1]),
        ((1, 1, 3, 16), OPTIONS[1]),
        ((1, 19, 5, 5), OPTIONS[3]),
        ((1, 20, 3, 1), OPTIONS[2]),
        ((2, 17, 4, 8), OPTIONS[4]),
    ],
    "cuda": [
        ((2, 1025, 384, 16), OPTIONS[0]),
        ((2, 1025, 384, 16), OPTIONS[1]),
        ((1, 1, 40, 16), OPTIONS[1]),
        ((3, 197, 160, 8), OPTIONS[2]),
        ((3, 197, 160, 8), OPTIONS[3]),
        ((2, 3136, 128, 1), OPTIONS[2]),
        ((64, 197, 384, 16), OPTIONS[0]),
        ((64, 197, 384, 16), OPTIONS[4]),
    ],
}


@needs_kernels
@pytest.mark.parametrize("shape,options", CASES.get(MODE, []), ids=str)
def test_values_and_gradients_match_reference(shape, options):
    inputs, scan_options = scan_case(shape, options)
    assert_matches_reference(inputs, **scan_options)


@needs_kernels
@pytest.mark.parametrize("reverse", [False, True])
def test_split_sequence_matches_reference(reverse):
    # Segments scanned in parallel, then stitched: states, checkpoints and adjoints cross segment boundaries.
    shape, count = ((1, 37, 6, 8), 3) if MODE == "interpreter" else ((2, 6085, 384, 16), 7)
    inputs = make_scan_inputs(*shape, stress=reverse, seed=21)
    with segments(count):
        assert_matches_reference(inputs, reverse=reverse)


@needs_cuda
def test_automatic_split_at_batch_one_matches_reference():
    # Batch 1 cannot fill the GPU: the launcher splits the 6085 steps into segments by itself.
    from mambazoo.ops.triton_scan import launch_config

    assert launch_config(1, 6085, 384, torch.device("cuda"), backward=False).n_seg > 1
    assert_matches_reference(make_scan_inputs(1, 6085, 384, 16, seed=22), reverse=True)


@needs_kernels
@pytest.mark.parametrize("reverse", [False, True])
def test_stress_steps_stay_finite_and_exact(reverse):
    length = 29 if MODE == "interpreter" else 6085
    inputs = make_scan_inputs(1, length, 4 if MODE == "interpreter" else 64, 16, stress=True, seed=11)
    inputs.delta = inputs.delta * 20  # per-step |ΔA| in the thousands: far beyond any closed form's safe range
    assert_matches_reference(inputs, reverse=reverse)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    shape = (2, 20, 6, 16) if MODE == "interpreter" else (4, 1025, 384, 16)
    # The reference sees the same rounded inputs, so only the rounding of outputs and gradients remains.
    assert_matches_reference(make_scan_inputs(*shape, seed=6), dtype=dtype, value_tol=1e-2, grad_tol=2e-2,
                             reverse=dtype == torch.bfloat16)


@needs_kernels
def test_batched_paths_with_stride_zero_views():
    # Four scan paths in one call: u and B differ per path, delta/C/z are shared expand-ed (stride-0) views.
    paths, length, dim = 4, (9 if MODE == "interpreter" else 1025), (6 if MODE == "interpreter" else 192)
    base = make_scan_inputs(1, length, dim, 16, seed=8)
    other = make_scan_inputs(paths, length, dim, 16, seed=9)
    inputs = ScanInputs(other.u, base.delta.expand(paths, -1, -1), base.A, other.B, base.C.expand(paths, -1, -1),
                        base.D, base.z.expand(paths, -1, -1), base.delta_bias)
    assert inputs.delta.stride(0) == 0
    assert_matches_reference(inputs)


@needs_kernels
def test_non_contiguous_last_dim_and_sliced_projections():
    # u with a non-unit last stride, B and C as column slices of one projection (as Vim's x_proj output).
    inputs = make_scan_inputs(2, 17, 5, 8, seed=4)
    inputs.u = inputs.u.transpose(1, 2).contiguous().transpose(1, 2)
    projection = torch.cat([torch.randn(2, 17, 3, dtype=torch.float64), inputs.B, inputs.C], dim=-1)
    inputs.B, inputs.C = projection[..., 3:11], projection[..., 11:]
    assert inputs.u.stride(-1) != 1 and inputs.B.stride(1) == 19
    assert_matches_reference(inputs, reverse=True)


@needs_kernels
def test_chunk_states_hold_the_state_entering_each_chunk():
    from mambazoo.ops.triton_scan import CHUNK_SIZE, selective_scan_triton_forward

    length = 2 * CHUNK_SIZE + 5
    inputs = on_device(make_scan_inputs(2, length, 5, 8, seed=12))
    for reverse in (False, True):
        _, _, chunk_states = selective_scan_triton_forward(*inputs.to(torch.float32).tensors(), True, reverse)
        assert chunk_states.shape == (2, 3, 8, 5)  # (batch, chunks, d_state, dim): the kernel's layout
        assert not chunk_states[:, 0].any()
        for chunk in (1, 2):
            steps = slice(length - chunk * CHUNK_SIZE, None) if reverse else slice(0, chunk * CHUNK_SIZE)
            prefix = ScanInputs(**{name: (t[:, steps] if t is not None and t.dim() == 3 else t)
                                   for name, t in vars(inputs).items()})
            _, state = selective_scan(*prefix.tensors(), reverse=reverse, return_last_state=True, backend="reference")
            assert relative_error(chunk_states[:, chunk].transpose(1, 2), state) < 2e-5


@needs_kernels
def test_custom_op_passes_opcheck():
    inputs = on_device(make_scan_inputs(1, 11, 4, 8, seed=13)).to(torch.float32).detached_leaves()
    arguments = (*inputs.tensors(), True, True, "triton")
    torch.library.opcheck(torch.ops.mambazoo.selective_scan_fused.default, arguments,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@needs_kernels
@settings(max_examples=2 if MODE == "interpreter" else 10, deadline=None)
@given(
    batch=st.integers(1, 2),
    length=st.integers(1, 18 if MODE == "interpreter" else 300),
    dim=st.integers(1, 12),
    d_state=st.sampled_from([1, 2, 5, 8, 16]),
    reverse=st.booleans(),
    flags=st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_reference(batch, length, dim, d_state, reverse, flags, seed):
    with_D, with_z, with_bias, stress = flags
    inputs = make_scan_inputs(batch, length, dim, d_state, with_D=with_D, with_z=with_z, with_bias=with_bias,
                              stress=stress, seed=seed)
    assert_matches_reference(inputs, reverse=reverse)


# One non-finite entry at step 6 of 12 (inside the first 8-step chunk under the interpreter), channel 1, state 1.
NON_FINITE = [("u", math.nan), ("u", math.inf), ("delta", math.nan), ("A", math.nan), ("B", -math.inf),
              ("C", math.nan), ("D", math.nan), ("z", math.nan), ("delta_bias", math.nan)]


def _non_finite_pattern(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.isnan(tensor), torch.isposinf(tensor), torch.isneginf(tensor)


@needs_kernels
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("name,value", NON_FINITE, ids=lambda v: str(v))
def test_nan_and_inf_propagate_as_in_the_reference(name, value):
    shape = (1, 12, 3, 4) if MODE == "interpreter" else (2, 300, 40, 16)
    inputs = make_scan_inputs(*shape, seed=23)
    target = getattr(inputs, name)
    index = {3: (0, shape[1] // 2, 1), 2: (1, 1), 1: (1,)}[target.dim()]
    target[index] = value
    inputs = on_device(inputs).to(torch.float32)
    grad_y, grad_state = cotangents(inputs)
    expected = values_and_gradients(inputs, "reference", torch.float64, grad_y, grad_state)
    for count in ((None, 2) if MODE == "interpreter" else (None, 3)):
        with segments(count):
            actual = values_and_gradients(inputs, "triton", None, grad_y, grad_state)
        outputs = [actual[0], actual[1], *actual[2]]
        for label, got, want in zip(("y", "last_state", *GRAD_NAMES), outputs, [expected[0], expected[1],
                                                                                *expected[2]]):
            for got_mask, want_mask in zip(_non_finite_pattern(got), _non_finite_pattern(want)):
                assert torch.equal(got_mask, want_mask), (label, count)
            finite = torch.isfinite(want)
            assert relative_error(got[finite], want[finite], 1e-3) < 1e-3, (label, count)


@needs_kernels
def test_empty_batch_and_empty_sequence_give_empty_results():
    op = torch.ops.mambazoo.selective_scan_fused
    for batch, length in ((0, 9), (2, 0)):
        inputs = on_device(make_scan_inputs(max(batch, 1), max(length, 1), 3, 4, seed=24)).to(torch.float32)
        sliced = ScanInputs(**{name: (t[:batch, :length] if t is not None and t.dim() == 3 else t)
                               for name, t in vars(inputs).items()}).detached_leaves()
        y, last_state, _ = op(*sliced.tensors(), True, False, "triton")
        assert y.shape == (batch, length, 3) and last_state.shape == (batch, 3, 4)
        assert not last_state.any()
        (y.sum() + last_state.sum()).backward()
        for name, leaf in zip(GRAD_NAMES, sliced.tensors()):
            assert leaf.grad.shape == leaf.shape and not leaf.grad.any(), name


@pytest.mark.skipif(not INTERPRETER, reason="checks the interpreter patch of this file")
def test_unpatched_interpreter_agrees():
    from triton.runtime import interpreter

    patched = interpreter.InterpretedFunction.__call__
    interpreter.InterpretedFunction.__call__ = interpreter.InterpretedFunction.original_call
    try:
        assert_matches_reference(make_scan_inputs(1, 9, 2, 2, seed=14), reverse=True)
    finally:
        interpreter.InterpretedFunction.__call__ = patched


# ----------------------------------------------------------------------------------------------------------------------
# Causal conv1d
# ----------------------------------------------------------------------------------------------------------------------

def assert_conv_matches_reference(batch, length, dim, kernel_size, with_bias, activation, reverse,
                                  dtype=torch.float32, tol=1e-5):
    """Triton conv vs the PyTorch conv in float64 on the same rounded inputs: y and the three gradients."""
    generator = torch.Generator().manual_seed(length + dim)
    x = torch.randn(batch, length, dim, generator=generator, dtype=torch.float64).to(dtype).to(DEVICE)
    weight = torch.randn(dim, kernel_size, generator=generator, dtype=torch.float64).to(DEVICE)
    bias = torch.randn(dim, generator=generator, dtype=torch.float64).to(DEVICE) if with_bias else None
    grad_y = torch.randn(batch, length, dim, generator=generator, dtype=torch.float64).to(DEVICE)
    results = []
    for backend, compute in (("torch", torch.float64), ("triton", None)):
        leaves = [t.detach().to(compute or t.dtype).requires_grad_() if t is not None else None
                  for t in (x, weight.float() if compute is None else weight, None if bias is None else
                            (bias.float() if compute is None else bias))]
        y = causal_conv1d(*leaves, activation=activation, reverse=reverse, backend=backend)
        present = [t for t in leaves if t is not None]
        results.append((y, torch.autograd.grad((y.double() * grad_y).sum(), present)))
    (y_ref, grads_ref), (y, grads) = results
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert relative_error(y, y_ref) < tol
    for grad, grad_ref in zip(grads, grads_ref):
        assert relative_error(grad, grad_ref) < tol


@needs_kernels
@pytest.mark.parametrize("kernel_size,with_bias,activation,reverse",
                         [(4, True, "silu", False), (4, True, "silu", True), (3, False, None, True),
                          (1, True, "silu", False)], ids=str)
def test_conv_matches_reference(kernel_size, with_bias, activation, reverse):
    shape = (2, 19, 10) if MODE == "interpreter" else (3, 1025, 384)
    assert_conv_matches_reference(*shape, kernel_size, with_bias, activation, reverse)


@needs_kernels
def test_conv_half_precision_and_strided_input():
    shape = (1, 21, 6) if MODE == "interpreter" else (8, 197, 384)
    assert_conv_matches_reference(*shape, 4, True, "silu", True, dtype=torch.bfloat16, tol=1e-2)
    x = torch.randn(2, 3 * shape[2], shape[1], device=DEVICE).transpose(1, 2)[..., :shape[2]]  # last-dim stride L
    weight = torch.randn(shape[2], 4, device=DEVICE)
    torch.testing.assert_close(causal_conv1d(x, weight, backend="triton"),
                               causal_conv1d_torch(x.double(), weight.double()).float(), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_capability_table_routes_cuda_convs_to_triton_within_its_kernel_limit():
    from mambazoo.ops import triton_conv
    from mambazoo.ops.capabilities import resolve_backend

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_backend("causal_conv1d", "auto", cuda, torch.bfloat16, kernel_size=4) == "triton"
    assert resolve_backend("causal_conv1d", "auto", cuda, torch.float32,
                           kernel_size=triton_conv.MAX_KERNEL + 1) == "torch"
    assert resolve_backend("causal_conv1d", "auto", cpu, torch.float32, kernel_size=4) != "triton"
    assert resolve_backend("causal_conv1d", "auto", cuda, torch.float64, kernel_size=4) == "torch"


@needs_kernels
def test_conv_custom_op_passes_opcheck_and_accepts_an_empty_batch():
    x = torch.randn(2, 9, 5, device=DEVICE, requires_grad=True)
    weight, bias = torch.randn(5, 4, device=DEVICE, requires_grad=True), torch.randn(5, device=DEVICE)
    torch.library.opcheck(torch.ops.mambazoo.causal_conv1d_triton.default, (x, weight, bias.requires_grad_(), True,
                                                                           True))
    empty = torch.randn(0, 9, 5, device=DEVICE, requires_grad=True)
    y = causal_conv1d(empty, weight, bias, backend="triton")
    y.sum().backward()
    assert y.shape == (0, 9, 5) and not weight.grad.any()


# ----------------------------------------------------------------------------------------------------------------------
# CUDA only
# ----------------------------------------------------------------------------------------------------------------------

@needs_cuda
def test_spatial_mamba_length_sequence():
    # ~67k tokens (Spatial-Mamba at detection resolution), N = 1, all states via C = ones; fp64 torch reference.
    inputs = on_device(make_scan_inputs(1, 67_000, 64, 1, with_D=False, with_z=False, seed=15)).to(torch.float32)
    inputs.C = torch.ones_like(inputs.C)
    expected = selective_scan(*inputs.to(torch.float64).tensors(), backend="torch")
    leaves = inputs.detached_leaves()
    y = selective_scan(*leaves.tensors(), backend="triton")
    assert relative_error(y, expected) < 2e-5
    y.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves.tensors() if t is not None)


@needs_cuda
def test_gradients_are_deterministic():
    for shape in ((1, 6085, 384, 16), (8, 1025, 384, 16)):
        inputs = on_device(make_scan_inputs(*shape, seed=25)).to(torch.bfloat16)
        grad_y, grad_state = cotangents(inputs)
        first, second = (values_and_gradients(inputs, "triton", None, grad_y, grad_state, reverse=True)
                         for _ in range(2))
        for a, b in zip(first[2], second[2]):
            assert torch.equal(a, b)


@needs_cuda
def test_torch_compile_fullgraph_matches_eager():
    inputs = on_device(make_scan_inputs(2, 300, 64, 16, seed=16)).to(torch.float32)
    weight = torch.randn(64, 4, device=DEVICE)

    def conv_then_scan(u, delta, A, B, C, D, z, delta_bias):
        x = causal_conv1d(u * 2, weight, reverse=True, backend="triton")
        return selective_scan(x, delta, A, B, C, D, z, delta_bias, reverse=True, backend="triton").sum(-1)

    leaves = inputs.detached_leaves()
    compiled = torch.compile(conv_then_scan, fullgraph=True)
    out = compiled(*leaves.tensors())
    torch.testing.assert_close(out, conv_then_scan(*inputs.tensors()), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert torch.isfinite(leaves.u.grad).all()


@pytest.mark.skipif(MODE is not None, reason="only meaningful without CUDA and without the interpreter")
def test_backend_reports_why_it_is_unavailable():
    assert "no CUDA device" in backend_status()["triton"]
    with pytest.raises(ValueError, match="selective_scan backend 'triton' cannot run this call: no CUDA device"):
        selective_scan(torch.zeros(1, 2, 1), torch.zeros(1, 2, 1), -torch.ones(1, 1), torch.zeros(1, 2, 1),
                       torch.zeros(1, 2, 1), backend="triton")
    with pytest.raises(ValueError, match="causal_conv1d backend 'triton' cannot run this call: no CUDA device"):
        causal_conv1d(torch.zeros(1, 3, 2), torch.zeros(2, 4), backend="triton")


@pytest.mark.skipif(INTERPRETER, reason="this is the interpreter run")
def test_kernels_under_the_interpreter():
    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve())]
    result = subprocess.run(command, cwd=root, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True,
                            text=True, timeout=900)
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    assert " passed" in result.stdout and " failed" not in result.stdout, report

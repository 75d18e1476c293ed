"""Triton scan kernels against the float64 sequential reference: values, last state, gradients, options, layouts.

Without a GPU the kernels run in Triton's interpreter on CPU tensors at small sizes: ``TRITON_INTERPRET`` must be set
before triton is imported, so ``test_kernels_under_the_interpreter`` re-runs this file in a subprocess with
``TRITON_INTERPRET=1``. On a CUDA machine the same checks run natively at real sizes (plus a ~67k-token sequence and
``torch.compile``), and the interpreter run still happens.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mambazoo.ops import backend_status, selective_scan
from scan_inputs import ScanInputs, make_scan_inputs

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
MODE = "interpreter" if INTERPRETER else "cuda" if torch.cuda.is_available() else None
DEVICE = "cuda" if MODE == "cuda" else "cpu"
GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
needs_kernels = pytest.mark.skipif(
    MODE is None, reason="no CUDA device: these checks run in the TRITON_INTERPRET=1 subprocess of "
                         "test_kernels_under_the_interpreter")
needs_cuda = pytest.mark.skipif(MODE != "cuda", reason="needs a CUDA device (real sizes, compiled kernels)")


def _vectorised_interpreter_scan() -> None:
    """Make the interpreter's generic ``tl.associative_scan`` loop over the scan axis only.

    Triton's interpreter calls the combine function once per *element* in Python (minutes for these tests). This
    applies the same combine function in the same order, one whole slice of the scan axis at a time; the kernels are
    unchanged. ``test_unpatched_interpreter_scan_agrees`` checks the two agree.
    """
    import numpy as np
    from triton.runtime import interpreter

    def generic_scan(self, inputs):
        slices = [np.moveaxis(arg.handle.data, self.axis, 0) for arg in inputs]
        outputs = [np.empty_like(data) for data in slices]
        carry = tuple(self.to_tensor(data[0], arg.dtype) for data, arg in zip(slices, inputs))
        for index in range(slices[0].shape[0]):
            if index:
                step = tuple(self.to_tensor(data[index], arg.dtype) for data, arg in zip(slices, inputs))
                carry = self.combine_fn.fn(*carry, *step)
            for output, value in zip(outputs, carry):
                output[index] = value.handle.data
        return [self.to_tensor(np.moveaxis(output, 0, self.axis), arg.dtype) for output, arg in zip(outputs, inputs)]

    interpreter.ScanOps.original_generic_scan = interpreter.ScanOps.generic_scan
    interpreter.ScanOps.generic_scan = generic_scan


if INTERPRETER:
    _vectorised_interpreter_scan()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max abs error relative to the largest magnitude of the expected tensor."""
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def on_device(inputs: ScanInputs) -> ScanInputs:
    return ScanInputs(**{name: (t.to(DEVICE) if t is not None else None) for name, t in vars(inputs).items()})


def values_and_gradients(inputs: ScanInputs, backend: str, dtype: torch.dtype, grad_y: torch.Tensor,
                         grad_state: torch.Tensor, **options) -> tuple[torch.Tensor, torch.Tensor, list]:
    """y, last state and the gradients of <y, grad_y> + <state, grad_state> w.r.t. every present input."""
    leaves = inputs.detached_leaves(dtype)
    y, state = selective_scan(*leaves.tensors(), backend=backend, return_last_state=True, **options)
    loss = (y.double() * grad_y).sum() + (state.double() * grad_state).sum()
    present = [t for t in leaves.tensors() if t is not None]
    grads = iter(torch.autograd.grad(loss, present))
    return y, state, [next(grads) if t is not None else None for t in leaves.tensors()]


def assert_matches_reference(inputs: ScanInputs, dtype: torch.dtype = torch.float32, value_tol: float = 2e-5,
                             grad_tol: float = 1e-4, **options) -> None:
    """Triton vs float64 reference on the same (already rounded) inputs: y, last state and all gradients."""
    inputs = on_device(inputs)
    batch, length, dim = inputs.u.shape
    generator = torch.Generator().manual_seed(length)
    grad_y = torch.randn(batch, length, dim, generator=generator, dtype=torch.float64).to(DEVICE)
    grad_state = torch.randn(batch, dim, inputs.A.shape[1], generator=generator, dtype=torch.float64).to(DEVICE)
    rounded = inputs.to(dtype)
    y_ref, state_ref, grads_ref = values_and_gradients(rounded, "reference", torch.float64, grad_y, grad_state,
                                                       **options)
    y, state, grads = values_and_gradients(rounded, "triton", None, grad_y, grad_state, **options)
    assert y.dtype == dtype and state.dtype == torch.float32
    assert torch.isfinite(y).all() and torch.isfinite(state).all()
    assert relative_error(y, y_ref) < value_tol
    assert relative_error(state, state_ref) < value_tol
    for name, grad, grad_ref, leaf in zip(GRAD_NAMES, grads, grads_ref, rounded.tensors()):
        if leaf is None:
            continue
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape, name
        assert torch.isfinite(grad).all(), name
        assert relative_error(grad, grad_ref) < grad_tol, name


# (batch, length, dim, d_state): odd lengths, one step, several chunks of 32, channel counts off the block size.
SHAPES = {
    "interpreter": [(2, 67, 6, 16), (1, 1, 3, 16), (2, 33, 9, 8), (1, 70, 5, 1)],
    "cuda": [(2, 1025, 384, 16), (1, 1, 40, 16), (3, 197, 160, 8), (2, 3136, 128, 1), (64, 197, 384, 16)],
}
OPTIONS = [
    dict(),
    dict(reverse=True),
    dict(with_D=False, with_z=False, with_bias=False),
    dict(with_z=False, with_bias=False, delta_softplus=False, reverse=True),
    dict(stress=True, reverse=True),
]


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES.get(MODE, [None]), ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "all-inputs")
def test_values_and_gradients_match_reference(shape, options):
    options = dict(options)
    scan_options = {key: options.pop(key) for key in ("reverse", "delta_softplus") if key in options}
    inputs = make_scan_inputs(*shape, seed=sum(shape), **options)
    if not scan_options.get("delta_softplus", True):  # the caller supplies the final, positive step
        inputs.delta = torch.nn.functional.softplus(inputs.delta)
    assert_matches_reference(inputs, **scan_options)


@needs_kernels
@pytest.mark.parametrize("reverse", [False, True])
def test_stress_steps_stay_finite_and_exact(reverse):
    length = 97 if MODE == "interpreter" else 6085
    inputs = make_scan_inputs(1, length, 4 if MODE == "interpreter" else 64, 16, stress=True, seed=11)
    inputs.delta = inputs.delta * 20  # per-step |ΔA| in the thousands: far beyond any closed form's safe range
    assert_matches_reference(inputs, reverse=reverse)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    shape = (2, 40, 6, 16) if MODE == "interpreter" else (4, 1025, 384, 16)
    # The reference sees the same rounded inputs, so only the rounding of outputs and gradients remains.
    assert_matches_reference(make_scan_inputs(*shape, seed=6), dtype=dtype, value_tol=1e-2, grad_tol=2e-2,
                             reverse=dtype == torch.bfloat16)


@needs_kernels
def test_batched_paths_with_stride_zero_views():
    # Four scan paths in one call: u and B differ per path, delta/C/z are shared expand-ed (stride-0) views.
    paths, length, dim = 4, (45 if MODE == "interpreter" else 1025), (6 if MODE == "interpreter" else 192)
    base = make_scan_inputs(1, length, dim, 16, seed=8)
    other = make_scan_inputs(paths, length, dim, 16, seed=9)
    inputs = ScanInputs(other.u, base.delta.expand(paths, -1, -1), base.A, other.B, base.C.expand(paths, -1, -1),
                        base.D, base.z.expand(paths, -1, -1), base.delta_bias)
    assert inputs.delta.stride(0) == 0
    assert_matches_reference(inputs)


@needs_kernels
def test_non_contiguous_last_dim_is_accepted():
    inputs = make_scan_inputs(2, 37, 5, 8, seed=4)
    inputs.u = inputs.u.transpose(1, 2).contiguous().transpose(1, 2)
    inputs.B = inputs.B[:, :, :].transpose(1, 2).contiguous().transpose(1, 2)
    assert inputs.u.stride(-1) != 1
    assert_matches_reference(inputs, reverse=True)


@needs_kernels
def test_chunk_states_hold_the_state_entering_each_chunk():
    from mambazoo.ops.triton_scan import CHUNK_SIZE, selective_scan_triton_forward

    length = 2 * CHUNK_SIZE + 5
    inputs = on_device(make_scan_inputs(2, length, 5, 8, seed=12))
    for reverse in (False, True):
        _, _, chunk_states = selective_scan_triton_forward(*inputs.to(torch.float32).tensors(), True, reverse)
        assert chunk_states.shape == (2, 3, 5, 8)
        assert not chunk_states[:, 0].any()
        for chunk in (1, 2):
            steps = slice(length - chunk * CHUNK_SIZE, None) if reverse else slice(0, chunk * CHUNK_SIZE)
            prefix = ScanInputs(**{name: (t[:, steps] if t is not None and t.dim() == 3 else t)
                                   for name, t in vars(inputs).items()})
            _, state = selective_scan(*prefix.tensors(), reverse=reverse, return_last_state=True, backend="reference")
            assert relative_error(chunk_states[:, chunk], state) < 2e-5


@needs_kernels
def test_custom_op_passes_opcheck():
    inputs = on_device(make_scan_inputs(2, 35, 4, 8, seed=13)).to(torch.float32).detached_leaves()
    arguments = (*inputs.tensors(), True, True, "triton")
    torch.library.opcheck(torch.ops.mambazoo.selective_scan_fused.default, arguments,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@needs_kernels
@settings(max_examples=4 if MODE == "interpreter" else 30, deadline=None)
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 80),
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


@pytest.mark.skipif(not INTERPRETER, reason="checks the interpreter's own scan emulation")
def test_unpatched_interpreter_scan_agrees():
    from triton.runtime import interpreter

    inputs = make_scan_inputs(1, 35, 2, 2, seed=14)
    vectorised = interpreter.ScanOps.generic_scan
    interpreter.ScanOps.generic_scan = interpreter.ScanOps.original_generic_scan
    try:
        assert_matches_reference(inputs, reverse=True)
    finally:
        interpreter.ScanOps.generic_scan = vectorised


@needs_cuda
def test_spatial_mamba_length_sequence():
    # ~67k tokens (Spatial-Mamba at detection resolution), N = 1, all states via C = ones; fp32 reference on GPU.
    inputs = on_device(make_scan_inputs(1, 67_000, 64, 1, with_D=False, with_z=False, seed=15)).to(torch.float32)
    inputs.C = torch.ones_like(inputs.C)
    expected = selective_scan(*inputs.to(torch.float64).tensors(), backend="torch")
    leaves = inputs.detached_leaves()
    y = selective_scan(*leaves.tensors(), backend="triton")
    assert relative_error(y, expected) < 2e-5
    y.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves.tensors() if t is not None)


@needs_cuda
def test_torch_compile_fullgraph_matches_eager():
    inputs = on_device(make_scan_inputs(2, 300, 64, 16, seed=16)).to(torch.float32)

    def gated_scan(u, delta, A, B, C, D, z, delta_bias):
        return selective_scan(u * 2, delta, A, B, C, D, z, delta_bias, reverse=True, backend="triton").sum(-1)

    leaves = inputs.detached_leaves()
    compiled = torch.compile(gated_scan, fullgraph=True)
    out = compiled(*leaves.tensors())
    torch.testing.assert_close(out, gated_scan(*inputs.tensors()), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert torch.isfinite(leaves.u.grad).all()


@pytest.mark.skipif(MODE is not None, reason="only meaningful without CUDA and without the interpreter")
def test_backend_reports_why_it_is_unavailable():
    assert "no CUDA device" in backend_status()["triton"]
    with pytest.raises(ValueError, match="selective_scan backend 'triton' cannot run this call: no CUDA device"):
        selective_scan(torch.zeros(1, 2, 1), torch.zeros(1, 2, 1), -torch.ones(1, 1), torch.zeros(1, 2, 1),
                       torch.zeros(1, 2, 1), backend="triton")


@pytest.mark.skipif(INTERPRETER, reason="this is the interpreter run")
def test_kernels_under_the_interpreter():
    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve())]
    result = subprocess.run(command, cwd=root, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True,
                            text=True, timeout=900)
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    assert " passed" in result.stdout and " failed" not in result.stdout, report

"""Every selective-scan backend against the float64 sequential reference: values, gradients, options, bad input."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from mambazoo.ops import available_backends, backend_status, selective_scan
from scan_inputs import ScanInputs, make_scan_inputs

# Backends under test: every usable one on this machine except the oracle itself (native only where it compiled).
BACKENDS = [name for name in available_backends() if name in ("torch", "native")]
GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max abs error relative to the largest magnitude of the expected tensor."""
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def scan(inputs: ScanInputs, backend: str, **options):
    return selective_scan(*inputs.tensors(), backend=backend, **options)


def reference(inputs: ScanInputs, **options):
    return scan(inputs.to(torch.float64), "reference", **options)


def backend_dtype(backend: str) -> torch.dtype:
    """float64 where the backend computes in it, else float32 (fused kernels)."""
    return torch.float64 if backend == "torch" else torch.float32


def value_tolerance(backend: str) -> float:
    return 1e-10 if backend_dtype(backend) == torch.float64 else 2e-5


def test_reference_and_torch_are_always_available():
    status = backend_status()
    assert status["reference"] == status["torch"] == "available"
    assert set(status) == {"reference", "torch", "native", "triton"}
    for name, message in status.items():
        assert (name in available_backends()) == (message == "available")


def test_reference_matches_hand_computed_recurrence():
    # One channel, one state, three steps, no softplus: h_t = e^{a d_t} h_{t-1} + d_t b_t u_t, y_t = c_t h_t + D u_t.
    u = torch.tensor([[[1.0], [2.0], [-1.0]]], dtype=torch.float64)
    delta = torch.tensor([[[0.5], [1.0], [2.0]]], dtype=torch.float64)
    A = torch.tensor([[-1.0]], dtype=torch.float64)
    B = torch.tensor([[[1.0], [0.5], [2.0]]], dtype=torch.float64)
    C = torch.tensor([[[2.0], [1.0], [1.0]]], dtype=torch.float64)
    D = torch.tensor([0.25], dtype=torch.float64)
    h0 = 0.5 * 1.0 * 1.0
    h1 = torch.exp(torch.tensor(-1.0)) * h0 + 1.0 * 0.5 * 2.0
    h2 = torch.exp(torch.tensor(-2.0)) * h1 + 2.0 * 2.0 * -1.0
    expected = torch.tensor([2 * h0 + 0.25, 1 * h1 + 0.5, 1 * h2 - 0.25], dtype=torch.float64)
    for backend in ["reference"] + BACKENDS:
        dtype = backend_dtype(backend)
        y = selective_scan(*(t.to(dtype) for t in (u, delta, A, B, C, D)), delta_softplus=False, backend=backend)
        torch.testing.assert_close(y[0, :, 0].double(), expected, rtol=1e-6, atol=1e-6)


def test_reverse_equals_flipped_forward():
    inputs = make_scan_inputs(2, 23, 5, 4)
    flipped = ScanInputs(**{name: (t.flip(1) if t is not None and t.dim() == 3 else t)
                            for name, t in vars(inputs).items()})
    y_reverse = reference(inputs, reverse=True)
    y_flipped = reference(flipped).flip(1)
    torch.testing.assert_close(y_reverse, y_flipped, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("length", [1, 2, 17, 197, 1025])
@pytest.mark.parametrize("reverse", [False, True])
def test_values_match_reference_over_lengths(backend, length, reverse):
    inputs = make_scan_inputs(2, length, 20, 16, seed=length)
    expected, expected_state = reference(inputs, reverse=reverse, return_last_state=True)
    y, state = scan(inputs.to(backend_dtype(backend)), backend, reverse=reverse, return_last_state=True)
    assert y.dtype == backend_dtype(backend)
    assert relative_error(y, expected) < value_tolerance(backend)
    assert relative_error(state, expected_state) < value_tolerance(backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d_state", [1, 8, 16])
@pytest.mark.parametrize("options", [
    dict(),
    dict(with_D=False, with_z=False, with_bias=False),
    dict(with_z=False, with_bias=False, delta_softplus=False),
    dict(stress=True),
])
def test_values_match_reference_over_options(backend, d_state, options):
    options = dict(options)
    softplus = options.pop("delta_softplus", True)
    inputs = make_scan_inputs(3, 67, 19, d_state, seed=d_state, **options)
    if not softplus:  # the caller supplies the final, positive step
        inputs.delta = torch.nn.functional.softplus(inputs.delta)
    expected = reference(inputs, delta_softplus=softplus)
    y = scan(inputs.to(backend_dtype(backend)), backend, delta_softplus=softplus)
    assert torch.isfinite(y).all()
    assert relative_error(y, expected) < value_tolerance(backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("stress", [False, True])
def test_gradients_match_reference(backend, reverse, stress):
    inputs = make_scan_inputs(2, 45, 18, 8, stress=stress, seed=3)
    grad_out = torch.randn(2, 45, 18, dtype=torch.float64)
    grad_state = torch.randn(2, 18, 8, dtype=torch.float64)

    def gradients(leaves: ScanInputs, name: str) -> list[torch.Tensor]:
        y, state = scan(leaves, name, reverse=reverse, return_last_state=True)
        loss = (y.double() * grad_out).sum() + (state.double() * grad_state).sum()
        return torch.autograd.grad(loss, leaves.tensors())

    expected = gradients(inputs.detached_leaves(torch.float64), "reference")
    actual = gradients(inputs.detached_leaves(backend_dtype(backend)), backend)
    tolerance = 1e-9 if backend_dtype(backend) == torch.float64 else 1e-4
    for name, grad, grad_expected in zip(GRAD_NAMES, actual, expected):
        assert grad.shape == grad_expected.shape, name
        assert torch.isfinite(grad).all(), name
        assert relative_error(grad, grad_expected) < tolerance, name


def test_torch_backend_passes_gradcheck():
    inputs = make_scan_inputs(1, 21, 3, 2, seed=5).detached_leaves(torch.float64)

    def function(*tensors):
        return selective_scan(*tensors, reverse=True, backend="torch")

    assert torch.autograd.gradcheck(function, inputs.tensors(), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stress_long_sequence_is_finite_and_exact(backend):
    inputs = make_scan_inputs(1, 1025, 16, 16, stress=True, seed=11)
    inputs.delta = inputs.delta * 20  # steps far beyond any chunked closed form's safe range
    expected = reference(inputs)
    y = scan(inputs.to(backend_dtype(backend)), backend)
    assert torch.isfinite(y).all()
    assert relative_error(y, expected) < value_tolerance(backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_paths_with_expanded_views(backend):
    # Four scan "paths" in one call: u and B differ per path, delta/C/z are shared expand-ed (stride-0) views.
    base = make_scan_inputs(1, 30, 12, 16, seed=8, dtype=backend_dtype(backend))
    u = torch.randn(4, 30, 12, dtype=base.u.dtype)
    B = torch.randn(4, 30, 16, dtype=base.u.dtype)
    shared = dict(delta=base.delta.expand(4, -1, -1), C=base.C.expand(4, -1, -1), z=base.z.expand(4, -1, -1))
    y = selective_scan(u, shared["delta"], base.A, B, shared["C"], base.D, shared["z"], base.delta_bias,
                       backend=backend)
    for path in range(4):
        single = ScanInputs(u[path:path + 1], base.delta, base.A, B[path:path + 1], base.C, base.D, base.z,
                            base.delta_bias)
        assert relative_error(y[path:path + 1], reference(single)) < value_tolerance(backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    inputs = make_scan_inputs(2, 33, 10, 8, seed=4, dtype=backend_dtype(backend))
    expected = reference(inputs)
    strided = ScanInputs(**{name: (t.transpose(1, 2).contiguous().transpose(1, 2) if t is not None and t.dim() == 3
                                   else t) for name, t in vars(inputs).items()})
    assert not strided.u.is_contiguous()
    assert relative_error(scan(strided, backend), expected) < value_tolerance(backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(backend, dtype):
    inputs = make_scan_inputs(2, 40, 16, 16, seed=6).to(dtype)
    y = scan(inputs, backend)
    assert y.dtype == dtype
    # The inputs are already rounded; the reference sees the same rounded values, so only output rounding remains.
    assert relative_error(y, reference(inputs)) < 1e-2


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 90),
    dim=st.integers(1, 40),
    d_state=st.sampled_from([1, 2, 8, 16]),
    reverse=st.booleans(),
    flags=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_reference(batch, length, dim, d_state, reverse, flags, seed):
    with_D, with_z, with_bias = flags
    inputs = make_scan_inputs(batch, length, dim, d_state, with_D=with_D, with_z=with_z, with_bias=with_bias,
                              seed=seed)
    expected = reference(inputs, reverse=reverse)
    for backend in BACKENDS:
        y = scan(inputs.to(backend_dtype(backend)), backend, reverse=reverse)
        assert relative_error(y, expected) < value_tolerance(backend), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_matches_eager(backend):
    inputs = make_scan_inputs(2, 24, 8, 4, seed=9, dtype=torch.float32)

    def doubled_input_scan(u, delta, A, B, C, D, z, delta_bias):
        return selective_scan(u * 2, delta, A, B, C, D, z, delta_bias, reverse=True, backend=backend)

    compiled = torch.compile(doubled_input_scan, fullgraph=True)
    eager_leaves, compiled_leaves = inputs.detached_leaves(), inputs.detached_leaves()
    y_eager, y_compiled = doubled_input_scan(*eager_leaves.tensors()), compiled(*compiled_leaves.tensors())
    torch.testing.assert_close(y_compiled, y_eager, rtol=1e-5, atol=1e-5)
    y_eager.square().sum().backward()
    y_compiled.square().sum().backward()
    for name, eager, traced in zip(GRAD_NAMES, eager_leaves.tensors(), compiled_leaves.tensors()):
        torch.testing.assert_close(traced.grad, eager.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("change, error, message", [
    (dict(u=torch.zeros(2, 5)), ValueError, "u must be a \\(batch, length, dim\\)"),
    (dict(delta=torch.zeros(2, 5, 3)), ValueError, "delta must have shape"),
    (dict(A=torch.zeros(4, 2)), ValueError, "A must have shape"),
    (dict(A=torch.ones(6, 2)), ValueError, "A has positive entries"),
    (dict(B=torch.zeros(2, 5, 3)), ValueError, "B must have shape"),
    (dict(C=torch.zeros(2, 4, 2)), ValueError, "C must have shape"),
    (dict(D=torch.zeros(5)), ValueError, "D must have shape"),
    (dict(z=torch.zeros(1, 5, 6)), ValueError, "z must have shape"),
    (dict(delta_bias=torch.zeros(6, 1)), ValueError, "delta_bias must have shape"),
    (dict(u=torch.zeros(2, 5, 6, dtype=torch.int64)), TypeError, "u must be a float16"),
    (dict(B=torch.zeros(2, 5, 2, dtype=torch.float64)), TypeError, "B has dtype torch.float64 but u has"),
    (dict(backend="cuda-magic"), ValueError, "backend must be 'auto' or one of"),
    (dict(A=-torch.ones(6, 0), B=torch.zeros(2, 5, 0), C=torch.zeros(2, 5, 0)), ValueError, "A has d_state 0"),
])
def test_bad_input_names_the_problem(change, error, message):
    arguments = dict(u=torch.zeros(2, 5, 6), delta=torch.zeros(2, 5, 6), A=-torch.ones(6, 2), B=torch.zeros(2, 5, 2),
                     C=torch.zeros(2, 5, 2))
    arguments.update(change)
    with pytest.raises(error, match=message):
        selective_scan(**arguments)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_positive_A_is_rejected_by_every_cpu_backend(backend):
    arguments = dict(u=torch.zeros(2, 5, 6), delta=torch.zeros(2, 5, 6), A=-torch.ones(6, 2), B=torch.zeros(2, 5, 2),
                     C=torch.zeros(2, 5, 2))
    arguments["A"][4, 1] = 0.5
    with pytest.raises(ValueError, match="A has positive entries"):
        selective_scan(**arguments, backend=backend)


def test_meta_device_input_is_rejected_with_device_in_message():
    arguments = dict(u=torch.zeros(1, 3, 2), delta=torch.zeros(1, 3, 2, device="meta"), A=-torch.ones(2, 1),
                     B=torch.zeros(1, 3, 1), C=torch.zeros(1, 3, 1))
    with pytest.raises(ValueError, match="delta is on meta but u is on cpu"):
        selective_scan(**arguments)


def test_unavailable_backend_explains_why():
    missing = [name for name, status in backend_status().items() if status != "available"]
    if not missing:
        pytest.skip("every backend is available here")
    with pytest.raises(ValueError, match=f"selective_scan backend '{missing[0]}' cannot run this call"):
        selective_scan(torch.zeros(1, 2, 1), torch.zeros(1, 2, 1), -torch.ones(1, 1), torch.zeros(1, 2, 1),
                       torch.zeros(1, 2, 1), backend=missing[0])

"""The all-states scan (``mambazoo.ops.state_scan``) on every CPU backend against a float64 sequential loop: values,
every gradient, options, layouts, dtypes, non-finite inputs, empty inputs, the custom op under torch.compile/export."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from mambazoo.flops import count_macs
from mambazoo.ops import selective_scan, state_scan
from mambazoo.ops.capabilities import backend_status, resolve_backend

BACKENDS = [name for name in ("torch", "native") if backend_status("state_scan")[name] == "available"]
NAMES = ("u", "delta", "A", "B", "delta_bias")
needs_native = pytest.mark.skipif("native" not in BACKENDS, reason="native extension not built")


def make_inputs(batch: int, length: int, dim: int, stress: bool = False, with_bias: bool = True,
                seed: int = 0) -> dict:
    """float64 inputs; the step after bias + softplus is log-uniform in [1e-3, 1e-1] (x30 and A x2 if stress)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    step = torch.exp(torch.rand(dim, generator=generator, dtype=torch.float64) * math.log(100) + math.log(1e-3))
    step = step * (30.0 if stress else 1.0)
    bias = step + torch.log(-torch.expm1(-step))  # softplus(bias) = step
    A = -torch.exp(randn(dim, 1) * 0.5) * (2.0 if stress else 1.0)
    delta = 0.5 * randn(batch, length, dim)
    if not with_bias:
        delta, bias = delta + bias, None
    return dict(u=randn(batch, length, dim), delta=delta, A=A, B=randn(batch, length, 1), delta_bias=bias)


def cast(inputs: dict, dtype: torch.dtype, leaves: bool = False) -> dict:
    """Sequence tensors to ``dtype`` (parameters stay float64 unless dtype is float32); optionally fresh leaves."""
    out = {}
    for name, tensor in inputs.items():
        if tensor is not None:
            tensor = tensor.to(dtype if name in ("u", "delta", "B") or dtype == torch.float32 else tensor.dtype)
            tensor = tensor.detach().clone().requires_grad_(leaves)
        out[name] = tensor
    return out


def backend_dtype(backend: str) -> torch.dtype:
    return torch.float64 if backend in ("torch", "reference") else torch.float32


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max abs error relative to the largest expected magnitude."""
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def states_and_grads(inputs: dict, backend: str, **options) -> tuple[torch.Tensor, dict]:
    """States and the gradients of <states, g> (g fixed random) w.r.t. every present input."""
    leaves = {name: t for name, t in inputs.items() if t is not None}
    states = state_scan(**inputs, backend=backend, **options)
    grad_out = torch.randn(states.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad((states.double() * grad_out).sum(), list(leaves.values()))
    return states, dict(zip(leaves, grads))


def assert_matches_reference(inputs: dict, backend: str, value_tol: float = None, grad_tol: float = None,
                             **options) -> None:
    """``backend`` in its compute dtype against the float64 reference: states and every gradient."""
    dtype = backend_dtype(backend)
    value_tol = value_tol or (1e-10 if dtype == torch.float64 else 2e-6)
    grad_tol = grad_tol or (1e-9 if dtype == torch.float64 else 2e-5)
    expected, expected_grads = states_and_grads(cast(inputs, torch.float64, leaves=True), "reference", **options)
    states, grads = states_and_grads(cast(inputs, dtype, leaves=True), backend, **options)
    assert states.dtype == dtype and states.shape == expected.shape
    assert torch.isfinite(states).all()
    assert relative_error(states, expected) < value_tol
    for name, grad in grads.items():
        assert grad.shape == inputs[name].shape and torch.isfinite(grad).all(), name
        assert relative_error(grad, expected_grads[name]) < grad_tol, name


def test_reference_matches_hand_computed_recurrence():
    # One channel, three steps, no softplus: h_t = e^{a s_t} h_{t-1} + s_t u_t b_t.
    u = torch.tensor([[[1.0], [2.0], [-1.0]]], dtype=torch.float64)
    delta = torch.tensor([[[0.5], [1.0], [2.0]]], dtype=torch.float64)
    A = torch.tensor([[-1.0]], dtype=torch.float64)
    B = torch.tensor([[[1.0], [0.5], [2.0]]], dtype=torch.float64)
    h0 = 0.5 * 1.0 * 1.0
    h1 = math.exp(-1.0) * h0 + 1.0 * 2.0 * 0.5
    h2 = math.exp(-2.0) * h1 + 2.0 * -1.0 * 2.0
    for backend in ["reference"] + BACKENDS:
        dtype = backend_dtype(backend)
        states = state_scan(u.to(dtype), delta.to(dtype), A, B.to(dtype), delta_softplus=False, backend=backend)
        torch.testing.assert_close(states[0, :, 0].double(), torch.tensor([h0, h1, h2], dtype=torch.float64))


@pytest.mark.parametrize("reverse", [False, True])
def test_reference_equals_selective_scan_with_unit_C(reverse):
    # Independent oracle: with N = 1 and C = 1 the selective scan's output is the state itself (no D, no z).
    inputs = cast(make_inputs(2, 29, 7, seed=2), torch.float64, leaves=True)
    states, grads = states_and_grads(inputs, "reference", reverse=reverse)
    leaves = {name: t.detach().clone().requires_grad_() for name, t in inputs.items()}
    y = selective_scan(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], torch.ones_like(leaves["B"]),
                       delta_bias=leaves["delta_bias"], reverse=reverse, backend="reference")
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = torch.autograd.grad((y * grad_out).sum(), list(leaves.values()))
    torch.testing.assert_close(states, y, rtol=1e-13, atol=1e-13)
    for name, grad in zip(leaves, expected):
        torch.testing.assert_close(grads[name], grad, rtol=1e-12, atol=1e-12, msg=name)


def test_reverse_equals_flipped_forward():
    inputs = make_inputs(2, 23, 5, seed=3)
    flipped = {name: t.flip(1) if t is not None and t.dim() == 3 else t for name, t in inputs.items()}
    torch.testing.assert_close(state_scan(**inputs, reverse=True, backend="reference"),
                               state_scan(**flipped, backend="reference").flip(1), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("length", [1, 2, 17, 67])
@pytest.mark.parametrize("reverse", [False, True])
def test_values_and_gradients_over_lengths(backend, length, reverse):
    assert_matches_reference(make_inputs(2, length, 19, seed=length), backend, reverse=reverse)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [dict(with_bias=False), dict(with_bias=False, softplus=False)],
                         ids=["no-bias", "no-bias-no-softplus"])
def test_values_and_gradients_without_bias_or_softplus(backend, options):
    inputs = make_inputs(2, 40, 21, with_bias=False, seed=4)
    softplus = options.get("softplus", True)
    if not softplus:  # the caller supplies the final, positive step
        inputs["delta"] = F.softplus(inputs["delta"])
    assert_matches_reference(inputs, backend, delta_softplus=softplus, reverse=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_long_sequence_values_and_gradients(backend, reverse):
    # L = 3136: Spatial-Mamba's first stage at 224 px (56 x 56 tokens), one whole-image scan.
    assert_matches_reference(make_inputs(1, 3136, 20, seed=5), backend, reverse=reverse)


@needs_native
def test_detection_length_sequence_native_matches_float64_torch():
    # L = 67,000 (a whole ~1036 px image at stride 4): native float32 vs the float64 torch backend (itself checked
    # against the sequential loop above), values and every gradient.
    inputs = make_inputs(1, 67_000, 20, seed=15)
    expected, expected_grads = states_and_grads(cast(inputs, torch.float64, leaves=True), "torch", reverse=True)
    states, grads = states_and_grads(cast(inputs, torch.float32, leaves=True), "native", reverse=True)
    assert relative_error(states, expected) < 2e-6
    for name, grad in grads.items():
        assert relative_error(grad, expected_grads[name]) < 2e-5, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_steps_stay_finite_and_exact(backend):
    inputs = make_inputs(2, 301, 18, stress=True, seed=6)
    inputs["delta"] = inputs["delta"] * 40 + 20  # |Δ'A| per step in the hundreds: factored forms overflow
    log_decay = F.softplus(inputs["delta"] + inputs["delta_bias"]) * inputs["A"][:, 0]
    assert log_decay.min() < -300 and (log_decay > -1).any()
    assert_matches_reference(inputs, backend, reverse=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_and_strided_inputs(backend):
    # u a (B, D, L) tensor seen as (B, L, D); delta an expand-ed (stride-0) batch view; B every other row.
    dtype = backend_dtype(backend)
    base = make_inputs(1, 45, 24, seed=7)
    generator = torch.Generator().manual_seed(8)
    channels_first = torch.randn(3, 24, 45, generator=generator, dtype=torch.float64)
    every_other = torch.randn(3, 90, 1, generator=generator, dtype=torch.float64)

    def views(dt: torch.dtype) -> dict:
        return dict(u=channels_first.to(dt).transpose(1, 2), delta=base["delta"].to(dt).expand(3, -1, -1),
                    A=base["A"], B=every_other.to(dt)[:, ::2], delta_bias=base["delta_bias"])

    strided = views(dtype)
    assert strided["u"].stride(2) == 45 and strided["delta"].stride(0) == 0 and strided["B"].stride(1) == 2
    expected = state_scan(**views(torch.float64), backend="reference")
    assert relative_error(state_scan(**strided, backend=backend), expected) < 2e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(backend, dtype):
    inputs = cast(make_inputs(2, 50, 20, seed=9), dtype)  # the reference sees the same rounded values
    states, grads = states_and_grads(cast(inputs, dtype, leaves=True), backend)
    expected, expected_grads = states_and_grads(cast(inputs, torch.float64, leaves=True), "reference")
    assert states.dtype == torch.float32  # states stay float32 for half inputs
    assert relative_error(states, expected) < 1e-5
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype, name
        assert relative_error(grad, expected_grads[name]) < 2e-2, name


def _poisoned_inputs() -> dict:
    inputs = make_inputs(2, 30, 20, seed=10)
    inputs["u"][0, 5, 3] = math.nan  # NaN from step 5 on in channel 3 of sample 0
    inputs["delta"][1, 7, 4] = math.inf  # decay 0 and an infinite increment at step 7
    inputs["delta"][1, 12, 9] = -math.inf  # step 0: the state is carried over unchanged
    inputs["B"][0, 20, 0] = math.inf  # every channel of sample 0 at step 20
    inputs["A"][17, 0] = math.nan  # channel 17 is NaN from the first step on
    inputs["u"][1, 25, 11] = -math.inf
    return inputs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_nan_and_inf_propagate_as_in_the_reference(backend, reverse):
    inputs = _poisoned_inputs()
    expected = state_scan(**inputs, reverse=reverse, backend="reference")
    states = state_scan(**cast(inputs, backend_dtype(backend)), reverse=reverse, backend=backend)
    assert expected.isnan().any() and expected.isposinf().any() and expected.isneginf().any()
    for kind in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(kind(states), kind(expected)), kind.__name__
    finite = torch.isfinite(expected)
    assert relative_error(states[finite], expected[finite]) < 2e-6


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5, 4), (2, 0, 4), (2, 3, 0)], ids=["batch0", "length0", "dim0"])
def test_empty_inputs_give_empty_states_and_gradients(backend, shape):
    batch, length, dim = shape
    inputs = dict(u=torch.randn(shape), delta=torch.randn(shape), A=-torch.ones(dim, 1),
                  B=torch.randn(batch, length, 1), delta_bias=torch.zeros(dim))
    leaves = {name: t.requires_grad_() for name, t in inputs.items()}
    states = state_scan(**leaves, reverse=True, backend=backend)
    assert states.shape == shape and states.dtype == torch.float32
    grads = torch.autograd.grad(states.sum(), list(leaves.values()), allow_unused=True)
    for name, grad in zip(leaves, grads):
        assert grad is not None and grad.shape == leaves[name].shape and not grad.any(), name


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 3), length=st.integers(1, 90), dim=st.integers(1, 40), reverse=st.booleans(),
       with_bias=st.booleans(), stress=st.booleans(), seed=st.integers(0, 2**16))
def test_random_shapes_match_reference(batch, length, dim, reverse, with_bias, stress, seed):
    inputs = make_inputs(batch, length, dim, stress=stress, with_bias=with_bias, seed=seed)
    expected = state_scan(**inputs, reverse=reverse, backend="reference")
    for backend in BACKENDS:
        states = state_scan(**cast(inputs, backend_dtype(backend)), reverse=reverse, backend=backend)
        assert relative_error(states, expected) < (1e-10 if backend == "torch" else 2e-6), backend


def test_auto_backend_choice():
    cpu = torch.device("cpu")
    expected = "native" if "native" in BACKENDS else "torch"
    assert resolve_backend("state_scan", "auto", cpu, torch.float32) == expected
    assert resolve_backend("state_scan", "auto", cpu, torch.bfloat16) == expected
    assert resolve_backend("state_scan", "auto", cpu, torch.float64) == "torch"
    assert resolve_backend("state_scan", "auto", torch.device("meta"), torch.float32) == "torch"
    assert set(backend_status("state_scan")) == {"triton", "native", "torch", "reference"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_matches_eager(backend):
    inputs = cast(make_inputs(2, 37, 20, seed=11), torch.float32)

    def fused(u, delta, A, B, delta_bias):
        return state_scan(u * 2, delta, A, B, delta_bias, reverse=True, backend=backend).square().sum()

    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    eager_leaves, compiled_leaves = cast(inputs, torch.float32, True), cast(inputs, torch.float32, True)
    eager, traced = fused(**eager_leaves), compiled(**compiled_leaves)
    torch.testing.assert_close(traced, eager)
    for name, expected, actual in zip(NAMES, torch.autograd.grad(eager, list(eager_leaves.values())),
                                      torch.autograd.grad(traced, list(compiled_leaves.values()))):
        torch.testing.assert_close(actual, expected, msg=name)


@needs_native
def test_torch_export_keeps_one_custom_op():
    inputs = cast(make_inputs(1, 12, 8, seed=12), torch.float32)

    class Scan(torch.nn.Module):
        def forward(self, u, delta, A, B, delta_bias):
            return state_scan(u, delta, A, B, delta_bias, backend="native")

    exported = torch.export.export(Scan(), tuple(inputs.values()))
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert targets.count("mambazoo.state_scan_fused.default") == 1
    torch.testing.assert_close(exported.module()(*inputs.values()), Scan()(*inputs.values()))


@pytest.mark.parametrize("kernel", ["torch"] + (["native"] if "native" in BACKENDS else []))
def test_custom_op_passes_opcheck(kernel):
    inputs = cast(make_inputs(2, 19, 18, seed=13), torch.float32, leaves=True)
    torch.library.opcheck(torch.ops.mambazoo.state_scan_fused.default, (*inputs.values(), True, True, kernel))


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_flop_count_is_nine_macs_per_element_on_every_backend(backend):
    inputs = cast(make_inputs(2, 5, 3, seed=14), backend_dtype(backend))
    count = count_macs(lambda: state_scan(**inputs, backend=backend))
    assert count.total == count.scan == 9 * 2 * 5 * 3  # 9·B·L·D·N with N = 1, nothing else counted


@pytest.mark.parametrize("change, error, message", [
    (dict(u=torch.zeros(2, 5)), ValueError, r"u must be a \(batch, length, dim\)"),
    (dict(delta=torch.zeros(2, 5, 3)), ValueError, "delta must have shape"),
    (dict(A=torch.zeros(6)), ValueError, r"A must have shape \(6, 1\)"),
    (dict(A=torch.ones(6, 1)), ValueError, "A has positive entries"),
    (dict(B=torch.zeros(2, 5, 2)), ValueError, r"B must have shape \(2, 5, 1\)"),
    (dict(delta_bias=torch.zeros(5)), ValueError, "delta_bias must have shape"),
    (dict(u=torch.zeros(2, 5, 6, dtype=torch.int64)), TypeError, "u must be a float16"),
    (dict(B=torch.zeros(2, 5, 1, dtype=torch.float64)), TypeError, "B has dtype torch.float64 but u has"),
    (dict(delta=torch.zeros(2, 5, 6, device="meta")), ValueError, "delta is on meta but u is on cpu"),
    (dict(backend="cuda-magic"), ValueError, "backend must be 'auto' or one of"),
])
def test_bad_input_names_the_problem(change, error, message):
    arguments = dict(u=torch.zeros(2, 5, 6), delta=torch.zeros(2, 5, 6), A=-torch.ones(6, 1), B=torch.zeros(2, 5, 1))
    arguments.update(change)
    with pytest.raises(error, match=message):
        state_scan(**arguments)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_positive_A_is_rejected_by_every_cpu_backend(backend):
    # the native kernel checks A itself (no host-side check before it), also when autograd records the call
    A = -torch.ones(6, 1)
    A[4, 0] = 0.5
    u = torch.zeros(2, 5, 6, requires_grad=True)
    with pytest.raises(ValueError, match="A has positive entries"):
        state_scan(u, torch.zeros(2, 5, 6), A, torch.zeros(2, 5, 1), backend=backend)


def test_unavailable_backend_explains_why():
    missing = [name for name, status in backend_status("state_scan").items() if status != "available"]
    if not missing:
        pytest.skip("every backend is available here")
    with pytest.raises(ValueError, match=f"state_scan backend '{missing[0]}' cannot run this call"):
        state_scan(torch.zeros(1, 2, 1), torch.zeros(1, 2, 1), -torch.ones(1, 1), torch.zeros(1, 2, 1),
                   backend=missing[0])

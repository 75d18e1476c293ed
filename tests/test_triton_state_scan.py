"""Triton all-states scan kernels against the float64 sequential reference: values, every gradient, options, layouts.

Without a GPU the kernels run in Triton's interpreter on CPU tensors at small sizes: ``TRITON_INTERPRET`` must be set
before triton is imported, so ``test_kernels_under_the_interpreter`` re-runs this file in a subprocess with
``TRITON_INTERPRET=1``. On a CUDA machine the same checks run natively (plus a ~67k-token sequence).
"""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mambazoo.ops import state_scan
from mambazoo.ops.capabilities import backend_status
from test_state_scan import _poisoned_inputs, cast, make_inputs, relative_error, states_and_grads

importlib.import_module("test_triton")  # under TRITON_INTERPRET=1 importing it vectorises the interpreter's scan

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
MODE = "interpreter" if INTERPRETER else "cuda" if torch.cuda.is_available() else None
DEVICE = "cuda" if MODE == "cuda" else "cpu"
needs_kernels = pytest.mark.skipif(
    MODE is None, reason="no CUDA device: these checks run in the TRITON_INTERPRET=1 subprocess of "
                         "test_kernels_under_the_interpreter")


def on_device(inputs: dict) -> dict:
    return {name: None if t is None else t.to(DEVICE) for name, t in inputs.items()}


def assert_matches_reference(inputs: dict, dtype: torch.dtype = torch.float32, value_tol: float = 2e-6,
                             grad_tol: float = 2e-5, **options) -> None:
    """Triton on ``dtype`` inputs vs the float64 reference on the same rounded values: states and every gradient."""
    rounded = cast(inputs, dtype)
    expected, expected_grads = states_and_grads(cast(rounded, torch.float64, leaves=True), "reference", **options)
    leaves = {name: None if t is None else t.detach().to(DEVICE).requires_grad_() for name, t in rounded.items()}
    states, grads = states_and_grads(leaves, "triton", **options)
    assert states.dtype == torch.float32 and torch.isfinite(states).all()
    assert relative_error(states.cpu(), expected) < value_tol
    for name, grad in grads.items():
        assert grad.dtype == leaves[name].dtype and torch.isfinite(grad).all(), name
        assert relative_error(grad.cpu(), expected_grads[name]) < grad_tol, name


# (batch, length, dim): several chunks of 64 with an odd tail, one step, channel counts off the block size.
SHAPES = {"interpreter": [(2, 150, 11), (1, 1, 3)], "cuda": [(2, 3136, 128), (1, 1, 40), (4, 1025, 200)]}


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES.get(MODE, [None]), ids=str)
@pytest.mark.parametrize("reverse", [False, True])
def test_values_and_gradients_match_reference(shape, reverse):
    assert_matches_reference(make_inputs(*shape, seed=sum(shape)), reverse=reverse)


@needs_kernels
def test_without_bias_or_softplus():
    inputs = make_inputs(2, 70, 9, with_bias=False, seed=3)
    inputs["delta"] = torch.nn.functional.softplus(inputs["delta"])
    assert_matches_reference(inputs, delta_softplus=False, reverse=True)


@needs_kernels
def test_large_steps_stay_finite_and_exact():
    inputs = make_inputs(1, 97 if MODE == "interpreter" else 6085, 6 if MODE == "interpreter" else 64, stress=True,
                         seed=4)
    inputs["delta"] = inputs["delta"] * 40 + 20
    assert_matches_reference(inputs, reverse=True)


@needs_kernels
def test_half_precision_inputs():
    assert_matches_reference(make_inputs(2, 40, 10, seed=5), dtype=torch.bfloat16, value_tol=1e-5, grad_tol=2e-2)


@needs_kernels
def test_expanded_and_strided_inputs():
    # u a (B, D, L) tensor seen as (B, L, D); delta an expand-ed (stride-0) batch view; B every other row.
    base = make_inputs(1, 45, 10, seed=6)
    generator = torch.Generator().manual_seed(7)
    channels_first = torch.randn(3, 10, 45, generator=generator, dtype=torch.float64)
    every_other = torch.randn(3, 90, 1, generator=generator, dtype=torch.float64)

    def views(dtype: torch.dtype, device: str) -> dict:
        return dict(u=channels_first.to(device, dtype).transpose(1, 2),
                    delta=base["delta"].to(device, dtype).expand(3, -1, -1), A=base["A"].to(device),
                    B=every_other.to(device, dtype)[:, ::2], delta_bias=base["delta_bias"].to(device))

    strided = views(torch.float32, DEVICE)
    assert strided["u"].stride(2) == 45 and strided["delta"].stride(0) == 0 and strided["B"].stride(1) == 2
    expected = state_scan(**views(torch.float64, "cpu"), backend="reference")
    assert relative_error(state_scan(**strided, backend="triton").cpu(), expected) < 2e-6


@needs_kernels
@pytest.mark.parametrize("reverse", [False, True])
def test_nan_and_inf_propagate_as_in_the_reference(reverse):
    inputs = _poisoned_inputs()
    expected = state_scan(**inputs, reverse=reverse, backend="reference")
    states = state_scan(**on_device(cast(inputs, torch.float32)), reverse=reverse, backend="triton").cpu()
    for kind in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(kind(states), kind(expected)), kind.__name__
    finite = torch.isfinite(expected)
    assert relative_error(states[finite], expected[finite]) < 2e-6


@needs_kernels
@pytest.mark.parametrize("shape", [(0, 5, 4), (2, 0, 4)], ids=["batch0", "length0"])
def test_empty_inputs(shape):
    inputs = on_device(dict(u=torch.randn(shape), delta=torch.randn(shape), A=-torch.ones(shape[2], 1),
                            B=torch.randn(*shape[:2], 1), delta_bias=torch.zeros(shape[2])))
    leaves = {name: t.requires_grad_() for name, t in inputs.items()}
    states = state_scan(**leaves, backend="triton")
    assert states.shape == shape
    grads = torch.autograd.grad(states.sum(), list(leaves.values()))
    assert all(g.shape == t.shape and not g.any() for g, t in zip(grads, leaves.values()))


@needs_kernels
def test_custom_op_passes_opcheck():
    inputs = on_device(cast(make_inputs(2, 35, 9, seed=8), torch.float32, leaves=True))
    torch.library.opcheck(torch.ops.mambazoo.state_scan_fused.default, (*inputs.values(), True, True, "triton"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.skipif(MODE != "cuda", reason="needs a CUDA device (real sizes)")
def test_detection_length_sequence():
    # ~67k tokens (Spatial-Mamba at detection resolution); the float64 torch backend is the reference here.
    inputs = make_inputs(1, 67_000, 64, seed=9)
    expected = state_scan(**on_device(inputs), backend="torch")
    leaves = {name: t.detach().to(DEVICE, torch.float32).requires_grad_() for name, t in inputs.items()}
    states = state_scan(**leaves, backend="triton")
    assert relative_error(states, expected) < 2e-5
    states.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves.values())


@pytest.mark.skipif(MODE is not None, reason="only meaningful without CUDA and without the interpreter")
def test_backend_reports_why_it_is_unavailable():
    assert "no CUDA device" in backend_status("state_scan")["triton"]
    with pytest.raises(ValueError, match="state_scan backend 'triton' cannot run this call: no CUDA device"):
        state_scan(torch.zeros(1, 2, 1), torch.zeros(1, 2, 1), -torch.ones(1, 1), torch.zeros(1, 2, 1),
                   backend="triton")


@pytest.mark.skipif(INTERPRETER, reason="this is the interpreter run")
def test_kernels_under_the_interpreter():
    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve())]
    result = subprocess.run(command, cwd=root, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True,
                            text=True, timeout=600)
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    assert " passed" in result.stdout and " failed" not in result.stdout, report

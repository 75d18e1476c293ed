"""Every backend of the ops on the inputs that break kernels, and the custom-op contract of every compiled kernel.

* Non-finite inputs (NaN, +inf, -inf in each input) come out exactly where the oracle puts them: the same NaN, +inf
  and -inf positions in y, the last state and every gradient, the finite values equal. The oracle of both scans is
  their float64 sequential reference; the conv's is its PyTorch implementation in float64.
* Empty batches, sequences and channel sets give empty outputs, a zero last state and zero gradients, on every
  backend and through every model family (Vim, PlainMamba, MambaOut, MambaVision, Spatial-Mamba), forward and
  backward. (The all-states scan's empty inputs and opcheck are in tests/test_state_scan.py and
  tests/test_triton_state_scan.py.)
* ``torch.library.opcheck`` (schema, autograd registration, fake tensor) passes for every kernel of the scan custom op
  (its forward and backward ops) and for the native conv.

The Triton kernels run in Triton's interpreter on CPU tensors: ``test_triton_cases_under_the_interpreter`` re-runs the
triton cases of this file with ``TRITON_INTERPRET=1``. For the selective scan's non-finite inputs it checks values
only: the Triton backward regroups sums (docs/triton.md), and with C = +-inf or z = +inf some entries of d delta and dA
are NaN where the reference has +-inf or the other way round (tests/test_triton.py checks the gradients of the inputs
it lists).
"""
import dataclasses
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from mambazoo.ops import available_backends, causal_conv1d, native, selective_scan, state_scan
from mambazoo.ops.capabilities import backend_status
from scan_inputs import ScanInputs, make_scan_inputs

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NumPy, interpreter

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
SCAN_BACKENDS = [name for name in ("torch", "native", "triton") if name in available_backends()]
STATE_SCAN_BACKENDS = [name for name in ("torch", "native", "triton")
                       if backend_status("state_scan")[name] == "available"]
CONV_BACKENDS = ["torch"] + (["native"] if native.AVAILABLE else [])
SCAN_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": -float("inf")}
# A must be <= 0 (the op rejects +inf); every other input gets all three values.
SCAN_CASES = [(name, value) for name in SCAN_NAMES for value in VALUES if not (name == "A" and value == "inf")]
# Long enough to cross the chunks of the torch (16) and native (64) kernels; the last channel sits in a partial
# vector block of every ISA. The interpreter is slow: Triton gets one chunk of its 32 steps.
SHAPE = {"triton": (1, 9, 3, 4)}
DEFAULT_SHAPE = (2, 70, 5, 4)


def pattern(tensor: torch.Tensor) -> torch.Tensor:
    """Where a tensor is NaN, +inf and -inf."""
    tensor = tensor.detach().double()
    return torch.stack([tensor.isnan(), tensor.isposinf(), tensor.isneginf()])


def assert_same_non_finite(actual: torch.Tensor, expected: torch.Tensor, label: str, tol: float = 1e-4) -> None:
    assert actual.shape == expected.shape, label
    assert torch.equal(pattern(actual), pattern(expected)), label
    finite = torch.isfinite(expected)
    if finite.any():
        scale = expected[finite].double().abs().max().clamp_min(1e-6)
        assert ((actual.double() - expected.double())[finite].abs().max() / scale).item() < tol, label


def poisoned_scan_inputs(name: str, value: str, shape: tuple) -> ScanInputs:
    """Init-like scan inputs with one element of ``name`` set to ``value`` (mid-sequence, last channel/state)."""
    inputs = make_scan_inputs(*shape, seed=3)
    tensor = getattr(inputs, name).clone()
    index = {3: (-1, shape[1] // 2, -1), 2: (-1, 1), 1: (-1,)}[tensor.dim()]
    tensor[index] = VALUES[value]
    setattr(inputs, name, tensor)
    return inputs


def scan_outputs(inputs: ScanInputs, backend: str, dtype: torch.dtype, reverse: bool, gradients: bool) -> list:
    """y, the last state and (optionally) the gradients of <y, gy> + <h, gh> for fixed random gy, gh."""
    leaves = inputs.detached_leaves(dtype)
    y, state = selective_scan(*leaves.tensors(), reverse=reverse, return_last_state=True, backend=backend)
    if not gradients:
        return [y, state]
    generator = torch.Generator().manual_seed(0)
    loss = sum((t.double() * torch.randn(t.shape, generator=generator, dtype=torch.float64)).sum() for t in (y, state))
    return [y, state, *torch.autograd.grad(loss, leaves.tensors())]


@functools.lru_cache(maxsize=None)
def scan_oracle(name: str, value: str, shape: tuple, reverse: bool, gradients: bool) -> list:
    return scan_outputs(poisoned_scan_inputs(name, value, shape), "reference", torch.float64, reverse, gradients)


@pytest.mark.parametrize("backend", SCAN_BACKENDS)
@pytest.mark.parametrize("name,value", SCAN_CASES)
def test_scan_non_finite_inputs_propagate_like_the_reference(backend, name, value):
    shape, gradients, reverse = SHAPE.get(backend, DEFAULT_SHAPE), backend != "triton", name in ("B", "D", "z")
    expected = scan_oracle(name, value, shape, reverse, gradients)
    actual = scan_outputs(poisoned_scan_inputs(name, value, shape), backend, torch.float32, reverse, gradients)
    for label, got, want in zip(("y", "last_state", *(f"d{n}" for n in SCAN_NAMES)), actual, expected):
        assert_same_non_finite(got, want, label)


STATE_SCAN_NAMES = ("u", "delta", "A", "B", "delta_bias")
STATE_SCAN_CASES = [(name, value) for name in STATE_SCAN_NAMES for value in VALUES
                    if not (name == "A" and value == "inf")]
# 70 steps cross the native backward's 64-step chunks; the last of 37 channels sits in a partial vector block.
STATE_SHAPE = {"triton": (1, 9, 3)}
DEFAULT_STATE_SHAPE = (2, 70, 37)


def poisoned_state_scan_inputs(name: str, value: str, shape: tuple) -> list[torch.Tensor]:
    """Init-like all-states scan inputs (the N = 1 part of scan inputs) with one element of ``name`` set to ``value``
    (mid-sequence, last channel)."""
    inputs = make_scan_inputs(*shape, 1, seed=5)
    tensors = [getattr(inputs, n).clone() for n in STATE_SCAN_NAMES]
    tensor = tensors[STATE_SCAN_NAMES.index(name)]
    tensor[{3: (-1, shape[1] // 2, -1), 2: (-1, -1), 1: (-1,)}[tensor.dim()]] = VALUES[value]
    return tensors


def state_scan_outputs(tensors: list[torch.Tensor], backend: str, dtype: torch.dtype, reverse: bool) -> list:
    """The states and the gradients of <states, g> for a fixed random g."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in tensors]
    states = state_scan(*leaves, reverse=reverse, backend=backend)
    grad = torch.randn(states.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return [states, *torch.autograd.grad((states.double() * grad).sum(), leaves)]


@pytest.mark.parametrize("backend", STATE_SCAN_BACKENDS)
@pytest.mark.parametrize("name,value", STATE_SCAN_CASES)
def test_state_scan_non_finite_inputs_propagate_like_the_reference(backend, name, value):
    shape, reverse = STATE_SHAPE.get(backend, DEFAULT_STATE_SHAPE), name in ("delta", "B")
    tensors = poisoned_state_scan_inputs(name, value, shape)
    expected = state_scan_outputs(tensors, "reference", torch.float64, reverse)
    actual = state_scan_outputs(tensors, backend, torch.float32, reverse)
    for label, got, want in zip(("states", *(f"d{n}" for n in STATE_SCAN_NAMES)), actual, expected):
        assert_same_non_finite(got, want, label)


def poisoned_conv_inputs(name: str, value: str) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    x, weight, bias, grad_y = (torch.randn(*shape, generator=generator, dtype=torch.float64)
                               for shape in ((2, 23, 37), (37, 4), (37,), (2, 23, 37)))
    index = {"x": (1, 11, 36), "weight": (36, 1), "bias": (36,)}[name]
    dict(x=x, weight=weight, bias=bias)[name][index] = VALUES[value]
    return x, weight, bias, grad_y


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("name", ["x", "weight", "bias"])
@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("activation,reverse", [("silu", False), (None, True)])
def test_conv_non_finite_inputs_propagate_like_float64(backend, name, value, activation, reverse):
    *tensors, grad_y = poisoned_conv_inputs(name, value)

    def outputs(backend: str, dtype: torch.dtype) -> list:
        leaves = [t.to(dtype).requires_grad_() for t in tensors]
        y = causal_conv1d(*leaves, activation=activation, reverse=reverse, backend=backend)
        return [y, *torch.autograd.grad((y.double() * grad_y).sum(), leaves)]

    for label, got, want in zip(("y", "dx", "dweight", "dbias"), outputs(backend, torch.float32),
                                outputs("torch", torch.float64)):
        assert_same_non_finite(got, want, label)


@pytest.mark.parametrize("backend", ["reference"] + SCAN_BACKENDS)
@pytest.mark.parametrize("batch,length,dim", [(0, 7, 5), (2, 0, 5), (0, 0, 5), (2, 7, 0)])
def test_scan_of_nothing_is_empty_with_zero_state_and_gradients(backend, batch, length, dim):
    leaves = make_scan_inputs(batch, length, dim, 4, seed=1).detached_leaves(torch.float32)
    y, state = selective_scan(*leaves.tensors(), return_last_state=True, backend=backend)
    assert y.shape == (batch, length, dim) and state.shape == (batch, dim, 4)
    assert not state.any()
    grads = torch.autograd.grad(y.sum() + state.sum(), leaves.tensors(), allow_unused=True, materialize_grads=True)
    for name, grad, leaf in zip(SCAN_NAMES, grads, leaves.tensors()):
        assert grad.shape == leaf.shape and not grad.any(), name


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("batch,length", [(0, 7), (2, 0)])
def test_conv_of_nothing_is_empty_with_zero_gradients(backend, batch, length):
    leaves = [torch.randn(*shape).requires_grad_() for shape in ((batch, length, 5), (5, 4), (5,))]
    y = causal_conv1d(*leaves, backend=backend)
    assert y.shape == (batch, length, 5)
    grads = torch.autograd.grad(y.sum(), leaves, allow_unused=True, materialize_grads=True)
    for grad, leaf in zip(grads, leaves):
        assert grad.shape == leaf.shape and not grad.any()


@pytest.mark.skipif(INTERPRETER, reason="models run in the main test process")
@pytest.mark.parametrize("model_name", ["test_vim", "test_plainmamba", "test_mambaout", "test_mambavision",
                                        "test_spatialmamba"])
def test_models_take_an_empty_batch_forward_and_backward(model_name):
    model = timm.create_model(model_name)
    images = torch.randn(0, *model.pretrained_cfg["input_size"], requires_grad=True)
    logits = model(images)
    assert logits.shape == (0, model.num_classes)
    logits.sum().backward()
    assert images.grad.shape == images.shape
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


SCAN_OP = torch.ops.mambazoo.selective_scan_fused
CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("kernel", SCAN_BACKENDS)
def test_scan_custom_op_passes_opcheck_for_every_kernel(kernel):
    # ``torch`` is the pure-PyTorch scan run inside the op (as under mambazoo.ops.route_through_custom_op).
    shape = SHAPE.get(kernel, DEFAULT_SHAPE)
    inputs = make_scan_inputs(*shape, seed=13).to(torch.float32)
    leaves = inputs.detached_leaves()
    for reverse in (False, True):
        torch.library.opcheck(SCAN_OP.default, (*leaves.tensors(), True, reverse, kernel), test_utils=CHECKS)
    if kernel == "torch":
        return  # its backward runs in the op's autograd formula, not as the backward op
    # B and C as views with length-minor strides (as a model's split/transposed projections can be): the backward
    # op returns contiguous gradients, and its fake must say so (torch.compile's inductor asserts the strides).
    strided = dataclasses.replace(inputs, B=_length_minor(inputs.B), C=_length_minor(inputs.C))
    _, _, chunk_states = SCAN_OP(*strided.tensors(), True, True, kernel)
    generator = torch.Generator().manual_seed(0)
    grad_y = torch.randn(shape[:3], generator=generator)
    grad_state = torch.randn((shape[0], *shape[2:]), generator=generator)
    torch.library.opcheck(torch.ops.mambazoo.selective_scan_fused_bwd.default,
                          (grad_y, grad_state, *strided.tensors(), chunk_states, True, True, kernel), test_utils=CHECKS)


def _length_minor(tensor: torch.Tensor) -> torch.Tensor:
    """The same values in a (batch, length, d_state) view whose length dimension has stride 1."""
    return tensor.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.skipif(not native.AVAILABLE, reason=f"native kernels unavailable: {native.UNAVAILABLE_REASON}")
def test_native_conv_custom_op_passes_opcheck():
    x, weight, bias = (torch.randn(*shape, requires_grad=True) for shape in ((2, 9, 20), (20, 4), (20,)))
    for args in ((x, weight, bias, True, False), (x, weight, None, False, True)):
        torch.library.opcheck(torch.ops.mambazoo.causal_conv1d_native.default, args, test_utils=CHECKS)
    grad_y = torch.randn(2, 9, 20)
    torch.library.opcheck(torch.ops.mambazoo.causal_conv1d_native_bwd.default,
                          (grad_y, x.detach(), weight.detach(), bias.detach(), True, True), test_utils=CHECKS)


@pytest.mark.skipif(INTERPRETER or torch.cuda.is_available(), reason="the interpreter run itself, or a real GPU")
def test_triton_cases_under_the_interpreter():
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton", __file__]
    result = subprocess.run(command, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                            env=dict(os.environ, TRITON_INTERPRET="1"), timeout=900)
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    assert " passed" in result.stdout and " failed" not in result.stdout, report

"""Pointwise epilogues (mambazoo.ops.pointwise): the native RMSNorm and gate against float64 formulas and the PyTorch
composites, their dispatch (plain eager inference only) and their errors."""
import pytest
import torch
import torch.nn.functional as F

from mambazoo.ops import gated_sum, native, rms_norm
from threading_helpers import results_per_thread_count

needs_native = pytest.mark.skipif(not native.AVAILABLE,
                                  reason=f"native kernels unavailable: {native.UNAVAILABLE_REASON}")

# 37 and 385 channels leave partial vectors for every width (16, 8, 4 lanes); 300 x 192 and 2 x 300 x 77 floats are
# above the kernels' threading threshold (2^15), the others below it.
RMS_SHAPES = [(0, 192), (1, 1), (3, 7), (5, 37), (197, 192), (300, 192), (2, 3, 385)]
GATE_SHAPES = [(0, 5), (1, 1), (3, 17), (197, 384), (2, 300, 77)]


def rms_norm_float64(x: torch.Tensor, weight, eps: float) -> torch.Tensor:
    x = x.double()
    y = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight.double()


def gated_sum_float64(a, b, z, scale: float) -> torch.Tensor:
    summed = a.double() if b is None else a.double() + b.double()
    return summed * F.silu(z.double()) * scale


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if not expected.numel():
        return 0.0
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


@needs_native
@pytest.mark.parametrize("isa", native.RUNNABLE_ISAS)
@pytest.mark.parametrize("shape", RMS_SHAPES)
@pytest.mark.parametrize("with_weight, magnitude", [(True, 3.0), (False, 3.0), (True, 1e-3)])
def test_native_rms_norm_matches_float64(isa, shape, with_weight, magnitude):
    generator = torch.Generator().manual_seed(0)
    x = magnitude * torch.randn(shape, generator=generator)  # at 1e-3 the mean square is below eps
    weight = torch.randn(shape[-1], generator=generator) if with_weight else None
    with native.use_isa(isa), torch.inference_mode():
        y = rms_norm(x, weight, 1e-5, backend="native")
    assert y.shape == x.shape and y.dtype == torch.float32
    assert relative_error(y, rms_norm_float64(x, weight, 1e-5)) < 1e-6


@needs_native
@pytest.mark.parametrize("isa", native.RUNNABLE_ISAS)
@pytest.mark.parametrize("shape", GATE_SHAPES)
@pytest.mark.parametrize("with_b, scale", [(True, 0.5), (False, 1.0), (True, 1.0)])
def test_native_gated_sum_matches_float64(isa, shape, with_b, scale):
    generator = torch.Generator().manual_seed(1)
    a, b, z = (4.0 * torch.randn(shape, generator=generator) for _ in range(3))
    b = b if with_b else None
    with native.use_isa(isa), torch.inference_mode():
        y = gated_sum(a, b, z, scale, backend="native")
    assert y.shape == a.shape and y.dtype == torch.float32
    assert relative_error(y, gated_sum_float64(a, b, z, scale)) < 1e-6


NON_FINITE = [float("nan"), float("inf"), float("-inf")]


@needs_native
@pytest.mark.parametrize("value", NON_FINITE)
def test_native_rms_norm_non_finite_like_torch(value):
    x, weight = torch.randn(4, 37), torch.randn(37)
    x[1, 5] = value  # one row hit; the others stay finite
    with torch.inference_mode():
        expected = rms_norm(x, weight, backend="torch")
        actual = rms_norm(x, weight, backend="native")
    torch.testing.assert_close(actual, expected, equal_nan=True, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(actual[[0, 2, 3]]).all() and not torch.isfinite(actual[1, 5])


@needs_native
@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("name", ["a", "b", "z"])
def test_native_gated_sum_non_finite_like_torch(name, value):
    tensors = dict(a=torch.randn(3, 40), b=torch.randn(3, 40), z=torch.randn(3, 40))
    tensors[name][1, 3] = value
    tensors["z"][2, 7] = -100.0  # silu underflows to -0
    with torch.inference_mode():
        expected = gated_sum(**tensors, scale=0.5, backend="torch")
        actual = gated_sum(**tensors, scale=0.5, backend="native")
    torch.testing.assert_close(actual, expected, equal_nan=True, rtol=1e-6, atol=1e-6)
    assert torch.isnan(actual[1, 3]) == torch.isnan(expected[1, 3])


@needs_native
def test_native_rms_norm_is_bitwise_identical_for_any_thread_count():
    x, weight = torch.randn(600, 192), torch.randn(192)
    with torch.inference_mode():
        results = results_per_thread_count(lambda: rms_norm(x, weight, backend="native"))
    assert all(torch.equal(results[0], other) for other in results[1:])


@needs_native
def test_auto_runs_native_in_plain_inference_and_torch_under_autograd(monkeypatch):
    calls = []
    for function in ("rms_norm_forward", "gated_sum_forward"):
        original = getattr(native, function)
        monkeypatch.setattr(native, function, lambda *args, _f=original, _n=function: calls.append(_n) or _f(*args))
    x, weight = torch.randn(2, 9, 24), torch.randn(24)
    with torch.no_grad():
        rms_norm(x, weight)
        gated_sum(x, x, x)
    assert calls == ["rms_norm_forward", "gated_sum_forward"]
    calls.clear()
    x64, weight64 = x.double().requires_grad_(), weight.double().requires_grad_()
    leaves = (x.clone().requires_grad_(), weight.clone().requires_grad_())
    for inputs, dtype in ((leaves, torch.float32), ((x64, weight64), torch.float64)):
        loss = rms_norm(*inputs).sum() + gated_sum(inputs[0], inputs[0], inputs[0], 0.5).square().sum()
        loss.backward()
    assert calls == []  # autograd (and float64) went through the PyTorch composites
    for leaf, reference in zip(leaves, (x64, weight64)):
        torch.testing.assert_close(leaf.grad.double(), reference.grad, rtol=1e-5, atol=1e-5)


@needs_native
def test_explicit_native_refuses_what_it_cannot_run():
    x = torch.randn(3, 8, requires_grad=True)
    with pytest.raises(ValueError, match="native rms_norm runs plain eager inference"):
        rms_norm(x, torch.ones(8), backend="native")
    with pytest.raises(ValueError, match="native gated_sum runs plain eager inference"):
        gated_sum(x, x, x, backend="native")
    with pytest.raises(ValueError, match="it accepts float32 inputs, got torch.bfloat16"):
        rms_norm(torch.randn(3, 8, dtype=torch.bfloat16), backend="native")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes_run_the_torch_composites(dtype):
    x, weight = torch.randn(4, 24, dtype=dtype), torch.randn(24, dtype=dtype)
    with torch.inference_mode():
        torch.testing.assert_close(rms_norm(x, weight), F.rms_norm(x, (24,), weight, 1e-5))
        torch.testing.assert_close(gated_sum(x, x, x, 0.5), (x + x) * F.silu(x) * 0.5)


def test_bad_shapes_are_named():
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"weight must have shape \(dim,\).*x \(2, 5, 8\), weight \(5,\)"):
        rms_norm(x, torch.ones(5))
    with pytest.raises(ValueError, match="at least one dimension"):
        rms_norm(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"b must have a's shape \(2, 5, 8\), got \(2, 5, 1\)"):
        gated_sum(x, x[..., :1], x)
    with pytest.raises(ValueError, match=r"z must have a's shape"):
        gated_sum(x, None, x[0])

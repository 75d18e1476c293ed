"""Bidirectional selective scan (mambazoo.ops.bidirectional_scan): the native inference kernel against a float64
composite of the reference scan, its non-finite and empty cases, its dispatch (plain eager float32 inference only)
and its errors."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from mambazoo.ops import ScanDirection, bidirectional_scan, native
from threading_helpers import results_per_thread_count

needs_native = pytest.mark.skipif(not native.AVAILABLE,
                                  reason=f"native kernels unavailable: {native.UNAVAILABLE_REASON}")


def make_direction(batch: int, length: int, dim: int, d_state: int, rank: int, seed: int,
                   dtype: torch.dtype = torch.float32) -> ScanDirection:
    """A direction as Vim's mixer builds it: dt_low_rank, B and C are column slices of one x_proj output."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    projected = randn(batch, length, rank + 2 * d_state)
    A_log = torch.log(torch.arange(1, d_state + 1, dtype=dtype)).repeat(dim, 1) + 0.3 * randn(dim, d_state)
    return ScanDirection(u=randn(batch, length, dim), dt_low_rank=projected[..., :rank],
                         dt_weight=randn(dim, rank) / rank ** 0.5, dt_bias=randn(dim) - 2.0, A_log=A_log,
                         B=projected[..., rank:rank + d_state], C=projected[..., rank + d_state:],
                         D=1.0 + 0.1 * randn(dim))


def make_inputs(batch: int, length: int, dim: int, d_state: int = 16, rank: int = 12,
                dtype: torch.dtype = torch.float32) -> tuple[ScanDirection, ScanDirection, torch.Tensor]:
    z = torch.randn(batch, length, dim, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    return (make_direction(batch, length, dim, d_state, rank, 1, dtype),
            make_direction(batch, length, dim, d_state, rank, 2, dtype), z.to(dtype))


def as_float64(direction: ScanDirection) -> ScanDirection:
    return ScanDirection(*(None if t is None else t.double() for t in direction))


def expected_float64(forward: ScanDirection, backward: ScanDirection, z: torch.Tensor, scale: float) -> torch.Tensor:
    """The composite with the float64 reference scan on the same values: the definition the kernel implements."""
    return bidirectional_scan(as_float64(forward), as_float64(backward), z.double(), scale, backend="reference")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if not expected.numel():
        return 0.0
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def run_native(forward: ScanDirection, backward: ScanDirection, z: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    with torch.inference_mode():
        return bidirectional_scan(forward, backward, z, scale, backend="native")


@needs_native
@pytest.mark.parametrize("isa", native.RUNNABLE_ISAS)
@pytest.mark.parametrize("batch, length, dim, d_state, rank", [
    (2, 1, 20, 16, 12), (2, 17, 20, 8, 5), (1, 197, 384, 16, 12), (2, 70, 37, 1, 1), (1, 130, 24, 5, 64),
])
def test_native_matches_float64_composite(isa, batch, length, dim, d_state, rank):
    forward, backward, z = make_inputs(batch, length, dim, d_state, rank)
    with native.use_isa(isa):
        y = run_native(forward, backward, z)
    assert y.shape == (batch, length, dim) and y.dtype == torch.float32
    assert relative_error(y, expected_float64(forward, backward, z, 0.5)) < 2e-5


@needs_native
def test_native_long_sequence_matches_float64_composite():
    forward, backward, z = make_inputs(1, 3000, 20, 16, 12)
    assert relative_error(run_native(forward, backward, z, 1.0), expected_float64(forward, backward, z, 1.0)) < 2e-5


@needs_native
def test_native_reads_strided_and_expanded_inputs():
    forward, backward, z = make_inputs(1, 40, 24, 8, 4)
    forward, backward = (ScanDirection(*(t.expand(3, -1, -1) if t.dim() == 3 else t for t in direction))
                         for direction in (forward, backward))  # batch stride 0
    forward = forward._replace(u=torch.randn(3, 24, 40).transpose(1, 2))  # channel stride 40
    z = z.expand(3, -1, -1)
    assert forward.u.stride(2) == 40 and backward.B.stride(0) == 0 and forward.B.stride(1) == 4 + 2 * 8
    assert relative_error(run_native(forward, backward, z), expected_float64(forward, backward, z, 0.5)) < 2e-5


@needs_native
def test_native_without_optional_inputs():
    forward, backward, z = make_inputs(2, 33, 20, 4, 3)
    forward, backward = forward._replace(D=None, dt_bias=None), backward._replace(D=None)
    assert relative_error(run_native(forward, backward, z), expected_float64(forward, backward, z, 0.5)) < 2e-5


@needs_native
@pytest.mark.parametrize("shape", [(0, 5, 20), (2, 0, 20), (2, 5, 0)])
def test_native_empty_inputs_give_empty_outputs(shape):
    forward, backward, z = make_inputs(*shape, d_state=4, rank=3)
    y = run_native(forward, backward, z)
    assert y.shape == shape and y.dtype == torch.float32


NON_FINITE = [float("nan"), float("inf"), float("-inf")]


@needs_native
@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("direction, field", [
    ("forward", "u"), ("forward", "dt_low_rank"), ("forward", "B"), ("backward", "C"), ("backward", "dt_weight"),
    ("backward", "A_log"), ("forward", "D"), ("forward", "dt_bias"), ("gate", "z"),
])
def test_native_non_finite_inputs_like_the_reference(value, direction, field):
    forward, backward, z = make_inputs(1, 12, 20, 4, 3)
    directions = dict(forward=forward, backward=backward)
    if direction == "gate":
        z = z.clone()
        z[0, 5, 3] = value
    else:
        tensor = getattr(directions[direction], field).clone()
        tensor.view(-1)[3 if tensor.dim() < 3 else 5 * tensor.shape[-1] + 1] = value
        directions[direction] = directions[direction]._replace(**{field: tensor})
    expected = expected_float64(directions["forward"], directions["backward"], z, 0.5)
    actual = run_native(directions["forward"], directions["backward"], z)
    assert value == value or torch.isnan(expected).any()  # a NaN always reaches the output
    assert torch.equal(torch.isnan(actual), torch.isnan(expected))
    assert torch.equal(torch.isposinf(actual), torch.isposinf(expected))
    assert torch.equal(torch.isneginf(actual), torch.isneginf(expected))
    finite = torch.isfinite(expected)
    assert relative_error(actual[finite], expected[finite]) < 2e-5


@needs_native
def test_native_is_bitwise_identical_for_any_thread_count():
    forward, backward, z = make_inputs(2, 50, 100, 16, 7)
    results = results_per_thread_count(lambda: run_native(forward, backward, z))
    assert all(torch.equal(results[0], other) for other in results[1:])


@needs_native
def test_auto_runs_the_kernel_in_plain_inference_only(monkeypatch):
    calls = []
    original = native.bidirectional_scan_forward
    monkeypatch.setattr(native, "bidirectional_scan_forward", lambda *args: calls.append(1) or original(*args))
    forward, backward, z = make_inputs(1, 9, 20, 4, 3)
    with torch.no_grad():
        fused = bidirectional_scan(forward, backward, z, 0.5)
    assert calls == [1]
    leaves = forward._replace(u=forward.u.clone().requires_grad_())
    composite = bidirectional_scan(leaves, backward, z, 0.5)
    composite.sum().backward()  # autograd ran the composite, whose gradient reaches u
    assert calls == [1] and leaves.u.grad is not None and torch.isfinite(leaves.u.grad).all()
    torch.testing.assert_close(composite.detach(), fused, rtol=2e-5, atol=2e-5)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        bidirectional_scan(forward, backward, z, 0.5)
    assert calls == [1] and counter.get_total_flops() > 0  # a dispatch mode sees the composite's ops
    with torch.no_grad():
        bidirectional_scan(forward, backward, z, 0.5, backend="torch")
        bidirectional_scan(as_float64(forward), as_float64(backward), z.double(), 0.5)
    assert calls == [1]


@needs_native
def test_auto_leaves_sizes_beyond_the_kernel_to_the_composite(monkeypatch):
    calls = []
    original = native.bidirectional_scan_forward
    monkeypatch.setattr(native, "bidirectional_scan_forward", lambda *args: calls.append(1) or original(*args))
    forward, backward, z = make_inputs(1, 6, 20, 4, native.MAX_RANK + 1)
    with torch.inference_mode():
        y = bidirectional_scan(forward, backward, z, 0.5)
    assert calls == [] and relative_error(y, expected_float64(forward, backward, z, 0.5)) < 2e-5


def test_composite_matches_its_definition():
    forward, backward, z = make_inputs(2, 9, 12, 4, 3, torch.float64)
    expected = torch.zeros_like(z)
    for direction, reverse in ((forward, False), (backward, True)):
        delta = F.softplus(direction.dt_low_rank @ direction.dt_weight.T + direction.dt_bias)
        A = -torch.exp(direction.A_log)
        h = torch.zeros(2, 12, 4, dtype=torch.float64)
        for t in (reversed(range(9)) if reverse else range(9)):
            h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * direction.u[:, t])[..., None] * \
                direction.B[:, t, None, :]
            expected[:, t] += (h * direction.C[:, t, None, :]).sum(-1) + direction.D * direction.u[:, t]
    expected = expected * F.silu(z) * 0.5
    torch.testing.assert_close(bidirectional_scan(forward, backward, z, 0.5, backend="torch"), expected)


def test_bad_inputs_are_named():
    forward, backward, z = make_inputs(2, 5, 8, 4, 3)
    with pytest.raises(ValueError, match=r"backward\.B must have shape \(2, 5, 4\) for z of shape \(2, 5, 8\), "
                                         r"got \(2, 4, 4\)"):
        bidirectional_scan(forward, backward._replace(B=backward.B[:, :4]), z)
    with pytest.raises(ValueError, match=r"forward\.dt_weight must have shape \(8, 3\)"):
        bidirectional_scan(forward._replace(dt_weight=forward.dt_weight[:7]), backward, z)
    with pytest.raises(ValueError, match="one dt_rank and d_state"):
        bidirectional_scan(forward, make_direction(2, 5, 8, 4, 2, 3), z)
    with pytest.raises(ValueError, match=r"z must be \(batch, length, dim\)"):
        bidirectional_scan(forward, backward, z[0])
    with pytest.raises(TypeError, match="forward must be a ScanDirection, got tuple"):
        bidirectional_scan(tuple(forward), backward, z)

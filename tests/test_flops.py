"""MAC counter: hand-computed counts on single layers and scan calls, and the published GMACs of the zoo."""
from functools import lru_cache

import pytest
import torch
from torch import nn

from mambazoo.flops import attention_macs, count_macs, count_model_macs, scan_macs
from mambazoo.ops import available_backends, causal_conv1d, selective_scan
from mambazoo.zoo import list_models


def test_linear_counts_batch_times_in_times_out() -> None:
    layer = nn.Linear(7, 5)
    assert count_macs(lambda: layer(torch.randn(3, 4, 7))).total == 3 * 4 * 7 * 5  # bias adds no MAC


def test_conv_counts_output_pixels_times_kernel_volume() -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1)
    depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    assert count_macs(lambda: conv(torch.randn(2, 3, 10, 10))).total == 2 * 8 * 10 * 10 * 3 * 3 * 3
    assert count_macs(lambda: depthwise(torch.randn(1, 4, 6, 6))).total == 4 * 6 * 6 * 3 * 3


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_causal_conv1d_counts_one_mac_per_tap(backend: str) -> None:
    if backend not in available_backends():
        pytest.skip(f"{backend} backend not built")
    x, weight = torch.randn(2, 9, 5), torch.randn(5, 4)
    # the torch backend pads explicitly and runs an unpadded conv: it computes the 9 outputs only
    assert count_macs(lambda: causal_conv1d(x, weight, backend=backend)).total == 2 * 9 * 5 * 4


def _scan_inputs(batch: int, length: int, dim: int, d_state: int, device: str = "cpu") -> dict:
    return dict(u=torch.randn(batch, length, dim, device=device), delta=torch.randn(batch, length, dim, device=device),
                A=-torch.ones(dim, d_state, device=device), B=torch.randn(batch, length, d_state, device=device),
                C=torch.randn(batch, length, d_state, device=device), D=torch.ones(dim, device=device),
                z=torch.randn(batch, length, dim, device=device))


@pytest.mark.parametrize("backend", [b for b in available_backends() if b != "triton"])
@pytest.mark.parametrize("reverse", [False, True])
def test_one_scan_call_is_nine_macs_per_element_on_every_backend(backend: str, reverse: bool) -> None:
    inputs = _scan_inputs(batch=2, length=5, dim=3, d_state=4)
    count = count_macs(lambda: selective_scan(**inputs, reverse=reverse, backend=backend))
    assert count.total == 9 * 2 * 5 * 3 * 4 == 1080  # nothing else (e.g. the torch backend's einsum) is counted
    assert count.scan == 1080


def test_scan_counts_on_meta_tensors_and_scan_macs_formula() -> None:
    inputs = _scan_inputs(batch=3, length=7, dim=2, d_state=16, device="meta")
    assert count_macs(lambda: selective_scan(**inputs)).total == 9 * 3 * 7 * 2 * 16
    assert scan_macs(1, 197, 384, 16) == 9 * 197 * 384 * 16 == 10_893_312


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_attention_matmuls_are_counted_and_reported(device: str) -> None:
    q = torch.randn(2, 3, 5, 4, device=device)
    v = torch.randn(2, 3, 7, 6, device=device)
    k = torch.randn(2, 3, 7, 4, device=device)
    count = count_macs(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, value=v))
    expected = 2 * 3 * 5 * 7 * (4 + 6)  # Q·Kᵀ: B·H·Lq·Lk·E, weights·V: B·H·Lq·Lk·Ev (torch's CPU kernel counted 0)
    assert count.total == count.attention == expected == attention_macs(q.shape, k.shape, v.shape)
    assert count.excl_scan == expected and count.excl_scan_attention == 0


def test_counting_does_not_change_scan_results() -> None:
    inputs = _scan_inputs(batch=1, length=6, dim=3, d_state=2)
    expected = selective_scan(**inputs, backend="reference")
    outputs = []
    count_macs(lambda: outputs.append(selective_scan(**inputs, backend="torch")))
    torch.testing.assert_close(outputs[0], expected)


def test_routed_scan_matches_reference_values_and_gradients() -> None:
    from mambazoo.ops.selective_scan import route_through_custom_op

    generator = torch.Generator().manual_seed(1)
    inputs = {k: v.double().requires_grad_() for k, v in _scan_inputs(batch=2, length=7, dim=3, d_state=4).items()}
    inputs["A"] = (-torch.rand(3, 4, generator=generator, dtype=torch.float64)).requires_grad_()
    with route_through_custom_op():
        y, state = selective_scan(**inputs, reverse=True, return_last_state=True, backend="torch")
    y_ref, state_ref = selective_scan(**inputs, reverse=True, return_last_state=True, backend="reference")
    grads = torch.autograd.grad((y.sum() + state.sum()), list(inputs.values()))
    grads_ref = torch.autograd.grad((y_ref.sum() + state_ref.sum()), list(inputs.values()))
    torch.testing.assert_close(y, y_ref)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref)


# (name, published GMACs @224, source). Published values carry 2 significant digits for MambaOut and DeiT.
FEMTO_MISS = pytest.mark.xfail(strict=True, reason="conv+linear MACs of MambaOut-Femto are 1.148G: 4.3% below the "
                                                  "paper's 1.2G (timm's fvcore figure 1.16G is met, see below)")
PUBLISHED = [
    pytest.param("mambaout_femto", 1.2, "MambaOut paper", marks=FEMTO_MISS), ("mambaout_kobe", 1.5, "MambaOut paper"),
    ("mambaout_tiny", 4.5, "MambaOut paper"), ("mambaout_small", 9.0, "MambaOut paper"),
    ("mambaout_base", 15.8, "MambaOut paper"), ("deit_tiny_patch16_224", 1.3, "DeiT paper"),
    ("plainmamba_l1", 3.0, "PlainMamba paper"), ("plainmamba_l2", 8.1, "PlainMamba paper"),
    ("plainmamba_l3", 14.4, "PlainMamba paper"),
    ("vim_tiny_patch16_224", 1.82, "docs/vim.md"), ("vim_small_patch16_224", 5.90, "docs/vim.md"),
    ("vim_base_patch16_224", 20.86, "docs/vim.md"),
]
# Finer independently counted figures (docs/scan_operation.md, docs/vim.md, docs/mambaout.md), checked to 0.5%.
SPEC_COUNTED = [
    ("mambaout_femto", 1.15), ("mambaout_kobe", 1.51), ("mambaout_tiny", 4.47), ("mambaout_small", 8.94),
    ("mambaout_base", 15.79), ("plainmamba_l1", 3.006), ("plainmamba_l2", 8.060), ("plainmamba_l3", 14.408),
    ("vim_tiny_patch16_stride8_224", 6.73), ("vim_small_patch16_stride8_224", 21.85),
]


def _require(name: str) -> None:
    if not name.startswith("deit") and name not in list_models():
        pytest.skip(f"{name} is not registered yet")


@lru_cache(maxsize=None)
def _gmacs_at_224(name: str) -> float:
    return count_model_macs(name).gmacs


@pytest.mark.parametrize("name,published,source", PUBLISHED)
def test_published_gmacs(name: str, published: float, source: str) -> None:
    _require(name)
    counted = _gmacs_at_224(name)
    # 2%, widened to half a unit of the published last digit (DeiT-Ti counts 1.254G, published as "1.3G").
    digits = len(str(published).split(".")[1])
    tolerance = max(0.02 * published, 0.5 * 10 ** -digits)
    assert abs(counted - published) <= tolerance, f"{name}: counted {counted:.3f}G vs {published}G ({source})"


def test_mambaout_femto_matches_timms_published_gmacs() -> None:
    # timm's GPU results CSV (fvcore GMACs): mambaout_femto,224,...,7.3,1.16,8.34 (docs/mambaout.md)
    assert _gmacs_at_224("mambaout_femto") == pytest.approx(1.16, rel=0.02)


@pytest.mark.parametrize("name,expected", SPEC_COUNTED)
def test_counted_gmacs_match_spec_figures(name: str, expected: float) -> None:
    _require(name)
    assert _gmacs_at_224(name) == pytest.approx(expected, rel=5e-3)


def test_scan_share_of_vim_tiny() -> None:
    _require("vim_tiny_patch16_224")
    # 24 layers x 2 directions x 9 x L197 x E384 x N16 (docs/vim.md: scan 0.52G)
    assert count_model_macs("vim_tiny_patch16_224").scan == 48 * scan_macs(1, 197, 384, 16)


def test_macs_scale_with_batch_and_resolution() -> None:
    one = count_model_macs("test_mambaout", img_size=64).total
    assert count_model_macs("test_mambaout", img_size=64, batch_size=3).total == 3 * one
    femto = count_model_macs("mambaout_femto").total  # 4x the pixels: 4x the MACs but for the 1.5M-MAC head
    assert count_model_macs("mambaout_femto", img_size=448).total == pytest.approx(4 * femto, rel=0.01)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown model name 'no_such_model'"):
        count_model_macs("no_such_model")
    with pytest.raises(ValueError, match="batch_size"):
        count_model_macs("test_mambaout", batch_size=0)
    with pytest.raises(TypeError, match="model must be"):
        count_model_macs(3)

"""The capability table decides every backend choice: auto falls back where a kernel cannot run a call, explicit
requests outside a kernel's capabilities fail with the reason."""
import pytest
import torch

from mambazoo.ops import capabilities, causal_conv1d, native, selective_scan
from mambazoo.ops.capabilities import resolve_backend

CPU = torch.device("cpu")
needs_native = pytest.mark.skipif(not native.AVAILABLE, reason=native.UNAVAILABLE_REASON or "")


def scan_inputs(d_state: int, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    u = torch.randn(1, 5, 3, generator=generator, dtype=dtype)
    B, C = (torch.randn(1, 5, d_state, generator=generator, dtype=dtype) for _ in range(2))
    return dict(u=u, delta=torch.rand(1, 5, 3, generator=generator, dtype=dtype), A=-torch.ones(3, d_state, dtype=dtype),
                B=B, C=C)


def test_every_op_lists_a_pure_pytorch_backend_that_auto_can_always_use():
    for op, rows in capabilities.CAPABILITIES.items():
        assert "torch" in capabilities.backend_names(op)
        for device, dtype in ((CPU, torch.float64), (torch.device("meta"), torch.float16)):
            assert resolve_backend(op, "auto", device, dtype, d_state=10**6, kernel_size=10**6) == "torch"


@needs_native
def test_auto_prefers_native_on_cpu_within_its_limits():
    assert resolve_backend("selective_scan", "auto", CPU, torch.float32, d_state=16) == "native"
    assert resolve_backend("selective_scan", "auto", CPU, torch.bfloat16, d_state=1) == "native"
    assert resolve_backend("causal_conv1d", "auto", CPU, torch.float32, kernel_size=4) == "native"


@needs_native
def test_auto_falls_back_to_torch_beyond_the_native_d_state_limit():
    d_state = native.MAX_STATE + 1
    assert resolve_backend("selective_scan", "auto", CPU, torch.float32, d_state=d_state) == "torch"
    inputs = scan_inputs(d_state)
    expected = selective_scan(**inputs, backend="reference")
    torch.testing.assert_close(selective_scan(**inputs), expected, rtol=1e-5, atol=1e-5)


@needs_native
def test_explicit_native_beyond_its_limit_names_the_limit():
    with pytest.raises(ValueError, match=rf"backend 'native' cannot run this call: it supports d_state 1..{native.MAX_STATE}"):
        selective_scan(**scan_inputs(native.MAX_STATE + 1), backend="native")
    x = torch.randn(1, 6, 2)
    with pytest.raises(ValueError, match=rf"supports kernel_size 1..{native.MAX_KERNEL}"):
        causal_conv1d(x, torch.randn(2, native.MAX_KERNEL + 1), backend="native")


@needs_native
def test_auto_conv_falls_back_to_torch_beyond_the_native_kernel_limit():
    x, weight = torch.randn(2, 9, 3), torch.randn(3, native.MAX_KERNEL + 2)
    torch.testing.assert_close(causal_conv1d(x, weight), causal_conv1d(x, weight, backend="torch"))


def test_float64_goes_to_a_float64_backend_under_auto():
    assert resolve_backend("selective_scan", "auto", CPU, torch.float64, d_state=4) == "torch"
    assert resolve_backend("causal_conv1d", "auto", CPU, torch.float64, kernel_size=4) == "torch"


def test_unknown_backend_and_op_are_named():
    with pytest.raises(ValueError, match=r"selective_scan backend must be 'auto' or one of .*'torch'.*got 'cuda'"):
        selective_scan(**scan_inputs(2), backend="cuda")
    with pytest.raises(ValueError, match="unknown op 'fft'"):
        capabilities.backend_names("fft")


def test_disabled_backend_reports_its_switch(monkeypatch):
    monkeypatch.setattr(capabilities, "_status", {})
    monkeypatch.setattr(capabilities, "_limits", {})
    monkeypatch.setattr(capabilities, "_modules", {})
    monkeypatch.setattr(capabilities, "_resolved", {})
    monkeypatch.setenv("MAMBAZOO_DISABLE_NATIVE", "1")
    assert capabilities.backend_status("selective_scan")["native"] == "disabled by MAMBAZOO_DISABLE_NATIVE"
    assert resolve_backend("selective_scan", "auto", CPU, torch.float32, d_state=16) == "torch"


def test_first_model_call_inside_torch_compile_finds_its_backends_loaded() -> None:
    """Kernel modules load lazily; a model loads them when it is built, so a compiled first call needs no import."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = """
import sys, timm, torch, mambazoo
from mambazoo.ops import capabilities
assert not capabilities._status, "no backend may be loaded before a model is built"
model = timm.create_model("test_vim", img_size=32, depth=1).eval()
x = torch.randn(2, 3, 32, 32)
with torch.no_grad():
    compiled = torch.compile(model, fullgraph=True)(x)  # the first call of the scan is inside the traced forward
    torch.testing.assert_close(compiled, model(x), rtol=0, atol=1e-5)
print("OK", capabilities._status[("selective_scan", "native")])
"""
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]

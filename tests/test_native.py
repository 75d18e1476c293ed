"""Native CPU kernels (csrc/): fused selective scan, all-states scan and causal conv1d against independent references.

Scan values and gradients are compared with the float64 sequential references (``backend="reference"``) and float64
autograd through them; the causal conv1d against the PyTorch implementation (float64 oracle for the gradients). The
all-states scan's own tests are in tests/test_state_scan.py; here it joins the ISA, thread-count and call-path checks.
"""
import ctypes
import importlib
import os
import platform
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from mambazoo.ops import causal_conv1d, native, selective_scan, state_scan

pytestmark = pytest.mark.skipif(not native.AVAILABLE,
                                reason=f"native kernels unavailable: {native.UNAVAILABLE_REASON}")

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
STATE_SCAN_NAMES = ("u", "delta", "A", "B", "delta_bias")


def make_inputs(batch: int, length: int, dim: int, d_state: int, stress: bool = False, seed: int = 0) -> dict:
    """Mamba-init-like float64 inputs (docs/scan_operation.md); ``stress``: ~30x larger steps, A x2 (|ΔA| per step up
    to ~150)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    dt_init = torch.exp(torch.rand(dim, generator=generator, dtype=torch.float64) * 4.6 - 6.9)  # log-uniform 1e-3..1e-1
    delta_bias = dt_init + torch.log(-torch.expm1(-dt_init))  # inverse softplus
    delta = 0.5 * randn(batch, length, dim)
    A = -torch.arange(1, d_state + 1, dtype=torch.float64).repeat(dim, 1)
    if stress:
        delta, A = delta + 4.0, 2 * A
    return dict(u=randn(batch, length, dim), delta=delta, A=A, B=randn(batch, length, d_state),
                C=randn(batch, length, d_state), D=torch.ones(dim, dtype=torch.float64) + 0.1 * randn(dim),
                z=randn(batch, length, dim), delta_bias=delta_bias)


def scan_with_grads(inputs: dict, backend: str, reverse: bool, seed: int = 1, **options):
    """y, last state and the gradients of every tensor input of loss = <y, gy> + <h_last, gh> (fixed random gy, gh)."""
    leaves = {name: t.detach().clone().requires_grad_() for name, t in inputs.items() if t is not None}
    y, last_state = selective_scan(**leaves, reverse=reverse, return_last_state=True, backend=backend, **options)
    generator = torch.Generator().manual_seed(seed)
    grad_y = torch.randn(y.shape, generator=generator, dtype=torch.float64).to(y.dtype)
    grad_last = torch.randn(last_state.shape, generator=generator, dtype=torch.float64).to(last_state.dtype)
    loss = (y * grad_y).sum() + (last_state * grad_last).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return y, last_state, dict(zip(leaves, grads))


def state_scan_with_grads(inputs: dict, backend: str, reverse: bool) -> list[torch.Tensor]:
    """The all-states scan of the N = 1 part of ``inputs`` and the gradients of <states, g> (fixed random g)."""
    leaves = [inputs[name].detach().clone().requires_grad_() for name in STATE_SCAN_NAMES]
    states = state_scan(*leaves, reverse=reverse, backend=backend)
    grad = torch.randn(states.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return [states, *torch.autograd.grad((states * grad.to(states.dtype)).sum(), leaves)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max error relative to the largest expected magnitude (floor 1e-6: an all-zero tensor compares absolutely)."""
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-6)).item()


def assert_matches_reference(inputs: dict, reverse: bool = False, tol: float = 2e-5, grad_tol: float = 5e-5,
                             native_inputs: dict = None, **options) -> None:
    """Native float32 (``native_inputs``, default: ``inputs`` cast) against the float64 reference on ``inputs``."""
    y_ref, h_ref, g_ref = scan_with_grads(inputs, "reference", reverse, **options)
    if native_inputs is None:
        native_inputs = {name: None if t is None else t.float() for name, t in inputs.items()}
    y, h, g = scan_with_grads(native_inputs, "native", reverse, **options)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert relative_error(y, y_ref) < tol
    assert relative_error(h, h_ref) < tol
    for name in g_ref:
        assert g[name].shape == g_ref[name].shape, name
        assert relative_error(g[name], g_ref[name]) < grad_tol, name


@pytest.mark.parametrize("d_state", [1, 8, 16])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("length", [1, 2, 17, 197])
def test_scan_matches_float64_reference(d_state, reverse, length):
    assert_matches_reference(make_inputs(2, length, 20, d_state), reverse=reverse)


@pytest.mark.parametrize("dim,d_state,reverse", [(3, 16, True), (20, 5, False)])
def test_scan_long_sequence_crosses_chunks(dim, d_state, reverse):
    assert native.CHUNK_SIZE < 1025
    assert_matches_reference(make_inputs(1, 1025, dim, d_state), reverse=reverse)


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_stress_steps_stay_finite_and_accurate(reverse):
    inputs = make_inputs(2, 197, 20, 16, stress=True)
    delta_steps = F.softplus(inputs["delta"] + inputs["delta_bias"])[..., None] * inputs["A"]
    assert delta_steps.abs().max() > 100  # the stress regime of docs/scan_operation.md (|ΔA| per step up to ~150)
    assert_matches_reference(inputs, reverse=reverse)


def test_scan_huge_steps_stay_finite():
    inputs = make_inputs(1, 33, 20, 16)
    inputs["delta"] = inputs["delta"] + 1e4  # |ΔA| per step up to 1.6e5: every decay underflows
    assert_matches_reference(inputs, reverse=True)


def test_scan_without_optional_inputs_or_softplus():
    inputs = make_inputs(2, 70, 20, 8)
    inputs.update(D=None, z=None, delta_bias=None, delta=F.softplus(inputs["delta"] - 4.0))
    assert_matches_reference(inputs, delta_softplus=False)


def test_scan_accepts_expanded_and_strided_inputs():
    shared = make_inputs(1, 130, 24, 16)
    batch = 3

    def views(dtype: torch.dtype) -> dict:
        """Stride-0 batch views of shared tensors, a (B, D, L) tensor seen as (B, L, D), and a length-strided C."""
        cast = {name: t.to(dtype) for name, t in shared.items()}
        generator = torch.Generator().manual_seed(2)
        channels_first = torch.randn(batch, 24, 130, generator=generator, dtype=torch.float64).to(dtype)
        every_other = torch.randn(batch, 260, 16, generator=generator, dtype=torch.float64).to(dtype)[:, ::2]
        expanded = {name: cast[name].expand(batch, -1, -1) for name in ("delta", "B", "z")}
        return dict(cast, **expanded, u=channels_first.transpose(1, 2), C=every_other)

    native_inputs = views(torch.float32)
    assert native_inputs["B"].stride(0) == 0 and native_inputs["u"].stride(2) == 130
    assert native_inputs["C"].stride(1) == 32
    assert_matches_reference(views(torch.float64), reverse=True, native_inputs=native_inputs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scan_half_precision_inputs(dtype):
    inputs = make_inputs(2, 97, 20, 16)
    rounded = {name: t.to(dtype) for name, t in inputs.items()}
    y, h, g = scan_with_grads(rounded, "native", reverse=False)
    y_ref, h_ref, g_ref = scan_with_grads({n: t.double() for n, t in rounded.items()}, "reference", reverse=False)
    assert y.dtype == dtype and h.dtype == torch.float32
    assert relative_error(y, y_ref) < 1e-2
    assert relative_error(h, h_ref) < 1e-5
    for name in g_ref:
        assert g[name].dtype == dtype, name
        assert relative_error(g[name], g_ref[name]) < 2e-2, name


def test_scan_rejects_unsupported_state_size():
    inputs = {name: t.float() for name, t in make_inputs(1, 4, 8, native.MAX_STATE + 1).items()}
    with pytest.raises(ValueError, match="d_state"):
        selective_scan(**inputs, backend="native")


def test_scan_and_conv_under_torch_compile_match_eager():
    inputs = {name: t.float().requires_grad_() for name, t in make_inputs(2, 40, 20, 8).items()}
    inputs["weight"] = torch.randn(20, 4, requires_grad=True)
    names = NAMES + ("weight",)

    def block(u, delta, A, B, C, D, z, delta_bias, weight):
        u = causal_conv1d(u, weight, None, "silu", reverse=True, backend="native")
        y = selective_scan(u, delta, A, B, C, D, z, delta_bias, reverse=True, backend="native")
        return (y * y).sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    eager_loss = block(**inputs)
    eager_grads = torch.autograd.grad(eager_loss, list(inputs.values()))
    compiled_loss = compiled(**inputs)
    compiled_grads = torch.autograd.grad(compiled_loss, list(inputs.values()))
    torch.testing.assert_close(compiled_loss, eager_loss)
    for name, expected, actual in zip(names, eager_grads, compiled_grads):
        torch.testing.assert_close(actual, expected, msg=name)


def test_one_library_dispatches_among_isas_at_run_time(monkeypatch):
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert native.COMPILED_ISAS == ("avx512", "avx2", "portable")
    assert "portable" in native.RUNNABLE_ISAS
    assert native.ISA == (os.environ.get("MAMBAZOO_NATIVE_ISA") or native.RUNNABLE_ISAS[0])
    assert native.describe()["isa"] == native.active_isa() == native.ISA
    monkeypatch.setenv("MAMBAZOO_NATIVE_ISA", "portable")
    assert native._load()[4] == "portable"
    monkeypatch.setenv("MAMBAZOO_NATIVE_ISA", "sse9")
    library, reason = native._load()[:2]
    assert library is None and "MAMBAZOO_NATIVE_ISA='sse9' is not one of" in reason
    with pytest.raises(ValueError, match="ISA 'sse9' is not runnable here"):
        with native.use_isa("sse9"):
            pass


def test_library_is_a_plain_shared_library_without_python_abi():
    path = native.LIBRARY_PATH
    assert path.name == "libmambazoo_native.so"
    library = ctypes.CDLL(str(path))
    assert not hasattr(library, "PyInit__native")
    if shutil.which("readelf"):
        dynamic = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout
        assert "libpython" not in dynamic
        assert "NEEDED" in dynamic


@pytest.mark.parametrize("isa", native.RUNNABLE_ISAS)
def test_every_runnable_isa_variant_matches_the_references(isa):
    # 37 channels leave a partial channel block for every vector width (16, 8 and 4 lanes).
    with native.use_isa(isa):
        assert native.active_isa() == isa
        assert_matches_reference(make_inputs(2, 70, 37, 16, seed=4), reverse=True)
        linear = make_inputs(1, 30, 37, 1, seed=5)
        linear.update(D=None, z=None, delta_bias=None, delta=F.softplus(linear["delta"] - 4.0))
        assert_matches_reference(linear, delta_softplus=False)
        assert_conv_matches_torch(4, reverse=True, with_bias=True, activation="silu")
        state_inputs = make_inputs(2, 150, 37, 1, seed=6)
        expected = state_scan_with_grads(state_inputs, "reference", reverse=True)
        actual = state_scan_with_grads({n: t.float() for n, t in state_inputs.items()}, "native", reverse=True)
        for name, got, want in zip(("states", *STATE_SCAN_NAMES), actual, expected):
            assert relative_error(got, want) < 5e-5, name


def scan_and_conv_gradients(threads: int) -> list[torch.Tensor]:
    """Native gradients of both scans and a conv with ``threads`` threads (batch rows split into several groups)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _, _, grads = scan_with_grads({n: t.float() for n, t in make_inputs(13, 150, 40, 16, seed=7).items()},
                                      "native", reverse=False)
        # 1100 steps: more than one chunk of the all-states scan's backward (1024 steps)
        state_inputs = {n: t.float() for n, t in make_inputs(13, 1100, 40, 1, seed=9).items()}
        state_grads = state_scan_with_grads(state_inputs, "native", reverse=False)[1:]
        generator = torch.Generator().manual_seed(8)
        x, weight, bias = (torch.randn(*shape, generator=generator).requires_grad_()
                           for shape in ((13, 150, 40), (40, 4), (40,)))
        y = causal_conv1d(x, weight, bias, backend="native")
        conv_grads = torch.autograd.grad((y * torch.randn(y.shape, generator=generator)).sum(), (x, weight, bias))
    finally:
        torch.set_num_threads(previous)
    return [*grads.values(), *state_grads, *conv_grads]


def test_gradients_are_bitwise_identical_for_any_thread_count():
    single = scan_and_conv_gradients(1)
    for threads in (2, 3):
        for expected, actual in zip(single, scan_and_conv_gradients(threads)):
            assert torch.equal(actual, expected), threads


def test_plain_eager_inference_skips_the_custom_ops_but_observers_see_them(monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    conv_module = importlib.import_module("mambazoo.ops.causal_conv1d")  # the package attribute is the function
    calls = []

    def counting(name: str, op):
        return lambda *args: calls.append(name) or op(*args)

    for module, name in (("fused", "_selective_scan_fused_op"), ("fused_state_scan", "_state_scan_op")):
        module = importlib.import_module(f"mambazoo.ops.{module}")
        monkeypatch.setattr(module, name, counting(name, getattr(module, name)))
    monkeypatch.setitem(conv_module._COMPILED_OPS, "native", counting("conv", conv_module._COMPILED_OPS["native"]))
    inputs = {name: t.float() for name, t in make_inputs(1, 9, 20, 4).items()}
    state_inputs = {name: t.float() for name, t in make_inputs(1, 9, 20, 1).items() if name in STATE_SCAN_NAMES}
    weight = torch.randn(20, 4)

    def run() -> torch.Tensor:
        return (selective_scan(**inputs, backend="native") + causal_conv1d(inputs["u"], weight, backend="native")
                + state_scan(**state_inputs, backend="native"))

    with torch.inference_mode():
        plain = run()
        assert calls == []
        with FlopCounterMode(display=False):
            counted = run()
        assert len(calls) == 3
    inputs["u"].requires_grad_()
    state_inputs["u"].requires_grad_()
    assert torch.equal(run().detach(), plain) and torch.equal(counted, plain)
    assert len(calls) == 6


def run_python(code: str, **env: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.subprocess
def test_native_shares_torch_openmp_runtime_and_thread_count():
    if "(libgomp)" not in native.BUILD_INFO:
        pytest.skip(f"built with {native.BUILD_INFO}: the kernels have their own OpenMP thread pool (docs/native.md)")
    output = run_python("""
        import os, torch
        from mambazoo.ops import selective_scan
        torch.set_num_threads(2)
        torch.mm(torch.randn(256, 256), torch.randn(256, 256))  # start torch's OpenMP team
        u, A, B = torch.randn(2, 64, 64), -torch.ones(64, 16), torch.randn(2, 64, 16)
        selective_scan(u, u, A, B, B, backend="native")
        shared = len(os.listdir("/proc/self/task"))
        torch.set_num_threads(5)
        selective_scan(u, u, A, B, B, backend="native")
        grown = len(os.listdir("/proc/self/task"))
        libraries = {line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line}
        print(shared, grown, *libraries)
    """)
    threads_at_2, threads_at_5, *libraries = output.split()
    assert len(libraries) == 1 and os.path.join("torch", "lib") in libraries[0]
    assert int(threads_at_5) - int(threads_at_2) == 3  # the team grew by torch's new thread count, in the same pool


@pytest.mark.subprocess
def test_disable_env_var_falls_back_to_torch():
    output = run_python("""
        import torch
        from mambazoo.ops import available_backends, backend_status, causal_conv1d, native, selective_scan
        u, A, B = torch.randn(1, 8, 4), -torch.ones(4, 2), torch.randn(1, 8, 2)
        expected = selective_scan(u, u, A, B, B, backend="torch")
        assert torch.equal(selective_scan(u, u, A, B, B), expected)
        weight = torch.randn(4, 4)
        assert torch.equal(causal_conv1d(u, weight), causal_conv1d(u, weight, backend="torch"))
        print(native.AVAILABLE, "native" in available_backends(), backend_status()["native"])
    """, MAMBAZOO_DISABLE_NATIVE="1")
    assert output.split(maxsplit=2) == ["False", "False", "disabled by MAMBAZOO_DISABLE_NATIVE\n"]


def assert_conv_matches_torch(kernel_size: int, reverse: bool, with_bias: bool, activation, dim: int = 37) -> None:
    """Native float32 conv1d (values and gradients) against the PyTorch implementation in float64."""
    generator = torch.Generator().manual_seed(kernel_size)
    x64 = torch.randn(2, 45, dim, generator=generator, dtype=torch.float64)
    weight64 = torch.randn(dim, kernel_size, generator=generator, dtype=torch.float64)
    bias64 = torch.randn(dim, generator=generator, dtype=torch.float64) if with_bias else None
    grad_y = torch.randn(2, 45, dim, generator=generator, dtype=torch.float64)
    results = {}
    for backend, dtype in (("torch", torch.float64), ("native", torch.float32)):
        leaves = [t.to(dtype).requires_grad_() for t in (x64, weight64, bias64) if t is not None]
        x, weight, *bias = leaves
        y = causal_conv1d(x, weight, bias[0] if bias else None, activation, reverse, backend=backend)
        results[backend] = (y, *torch.autograd.grad((y * grad_y.to(dtype)).sum(), leaves))
    for expected, actual in zip(results["torch"], results["native"]):
        assert actual.dtype == torch.float32
        assert relative_error(actual, expected) < 1e-5


@pytest.mark.parametrize("kernel_size", [2, 3, 4, 5])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_bias,activation", [(True, "silu"), (False, None)])
def test_causal_conv1d_native_matches_torch(kernel_size, reverse, with_bias, activation):
    assert_conv_matches_torch(kernel_size, reverse, with_bias, activation)


def test_causal_conv1d_auto_picks_native_and_handles_short_and_strided_inputs():
    x = torch.randn(3, 2, 40)[:, :, ::2]  # length 2 < kernel size, non-contiguous channels
    weight, bias = torch.randn(20, 4), torch.randn(20)
    expected = causal_conv1d(x, weight, bias, backend="torch")
    torch.testing.assert_close(causal_conv1d(x, weight, bias), expected)
    with pytest.raises(ValueError, match="backend"):
        causal_conv1d(x, weight, bias, backend="cuda")

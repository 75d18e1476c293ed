"""GPU benchmark of the Triton selective scan and of Vim-Ti vs DeiT-Ti (needs a CUDA device).

Part 1, kernels: forward and forward+backward time of the ``triton`` and ``torch`` scan backends (and mamba_ssm's
``selective_scan_fn`` when importable) on Vim-Ti shapes (D = 384, N = 16, z gate, D skip, delta_bias + softplus),
with the achieved bandwidth on the minimal IO against the device's copy bandwidth measured in the same run.
Part 2, models: Vim-Ti vs DeiT-Ti inference images/s and peak memory at several resolutions, batch 64, bf16 autocast
(timm ``benchmark.py`` method: ``inference_mode``, 10 warm-up and 40 timed steps, synchronised).

Method: every implementation runs in one process, interleaved round-robin, several rounds; medians of CUDA-event
times; speedups are medians of per-round ratios. Results go to ``benchmarks/results/scan_gpu_<device>.md``
(written atomically).

Usage: ``python benchmarks/scan_gpu.py [--rounds 7] [--dtype float32] [--skip-models]``
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from mambazoo.ops import selective_scan

RESULTS = Path(__file__).resolve().parent / "results"
DIM, D_STATE = 384, 16
BATCHES, LENGTHS = (1, 64), (197, 1025, 6085)
RESOLUTIONS = (224, 512, 1024, 1248)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def scan_bytes(batch: int, length: int, element_size: int, backward: bool) -> int:
    """Minimal HBM traffic of one scan call (each tensor read or written once; parameters ignored).

    Forward: read u, delta, z (B·L·D) and B, C (B·L·N); write y. Backward adds: read u, delta, z, B, C and grad_y;
    write du, ddelta, dz, dB, dC.
    """
    sequence, projection = batch * length * DIM, batch * length * D_STATE
    forward = (4 * sequence + 2 * projection) * element_size
    return forward + (7 * sequence + 4 * projection) * element_size if backward else forward


def make_inputs(batch: int, length: int, dtype: torch.dtype, requires_grad: bool) -> dict:
    """Vim-Ti-like scan inputs on the GPU (Mamba init: steps log-uniform in [1e-3, 1e-1]); A, D, bias in fp32."""
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=dtype)

    step = torch.exp(torch.empty(DIM, device="cuda").uniform_(-6.9, -2.3))
    inputs = dict(
        u=randn(batch, length, DIM),
        delta=0.5 * randn(batch, length, DIM),
        A=-torch.arange(1, D_STATE + 1, device="cuda", dtype=torch.float32).repeat(DIM, 1),
        B=randn(batch, length, D_STATE),
        C=randn(batch, length, D_STATE),
        D=torch.ones(DIM, device="cuda"),
        z=randn(batch, length, DIM),
        delta_bias=step + torch.log(-torch.expm1(-step)),
    )
    return {name: tensor.requires_grad_(requires_grad) for name, tensor in inputs.items()}


def mamba_ssm_scan() -> Optional[Callable]:
    """mamba_ssm's CUDA ``selective_scan_fn`` (channels-first) when it is installed with its CUDA build."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None
    return selective_scan_fn


def timed(function: Callable[[], None]) -> float:
    """Milliseconds of one call, measured with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    function()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def copy_bandwidth_gbs(rounds: int) -> float:
    """Achievable HBM bandwidth: a 1 GiB device-to-device copy (read + write), median GB/s."""
    source = torch.empty(1 << 28, device="cuda", dtype=torch.float32)
    target = torch.empty_like(source)
    target.copy_(source)
    times = [timed(lambda: target.copy_(source)) for _ in range(rounds)]
    return 2 * source.numel() * 4 / statistics.median(times) / 1e6


def theoretical_bandwidth_gbs() -> Optional[float]:
    """Peak from the memory clock and bus width when torch exposes them (DDR: 2 transfers per clock)."""
    properties = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = getattr(properties, "memory_clock_rate", None), getattr(properties, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def kernel_callables(inputs: dict, channels_first: dict, mamba: Optional[Callable], backward: bool) -> dict:
    """One zero-argument callable per implementation (forward, or forward + backward of sum(y·g))."""
    grad = torch.randn_like(inputs["u"]) if backward else None
    ordered = [inputs[key] for key in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]

    def ours(backend: str) -> Callable[[], None]:
        def run() -> None:
            y = selective_scan(*ordered, backend=backend)
            if backward:
                torch.autograd.backward(y, grad)
        return run

    callables = {"triton": ours("triton"), "torch": ours("torch")}
    if mamba is not None:
        first = [channels_first[key] for key in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
        grad_first = grad.transpose(1, 2).contiguous() if backward else None

        def run_mamba() -> None:
            y = mamba(*first, delta_softplus=True)
            if backward:
                torch.autograd.backward(y, grad_first)
        callables["mamba_ssm"] = run_mamba
    return callables


def bench_kernels(rounds: int, dtype: torch.dtype, bandwidth: float) -> list[str]:
    """Markdown table rows for every (batch, length) and pass."""
    mamba = mamba_ssm_scan()
    rows = []
    for backward in (False, True):
        for batch in BATCHES:
            for length in LENGTHS:
                inputs = make_inputs(batch, length, dtype, requires_grad=backward)
                channels_first = {key: (value.detach().transpose(1, 2).contiguous().requires_grad_(backward)
                                        if value.dim() == 3 else value) for key, value in inputs.items()}
                callables = kernel_callables(inputs, channels_first, mamba, backward)
                times = {name: [] for name in callables}
                for name, function in callables.items():  # warm-up (compilation, autotuning, allocator)
                    function()
                torch.cuda.synchronize()
                for _ in range(rounds):
                    for name, function in callables.items():
                        times[name].append(timed(function))
                moved = scan_bytes(batch, length, inputs["u"].element_size(), backward)
                triton_ms = statistics.median(times["triton"])
                cells = [f"{'fwd+bwd' if backward else 'fwd'}", str(batch), str(length),
                         f"{triton_ms:.3f}", f"{moved / triton_ms / 1e6:.0f}",
                         f"{100 * moved / triton_ms / 1e6 / bandwidth:.0f}%"]
                for other in ("torch", "mamba_ssm"):
                    if other in times:
                        ratio = statistics.median(a / b for a, b in zip(times[other], times["triton"]))
                        cells.append(f"{statistics.median(times[other]):.3f} (x{ratio:.2f})")
                    else:
                        cells.append("n/a")
                rows.append("| " + " | ".join(cells) + " |")
                print(rows[-1], flush=True)
                del inputs, channels_first, callables
                torch.cuda.empty_cache()
    return rows


def bench_model(name: str, resolution: int, batch: int, warmup: int, iterations: int) -> tuple[float, float]:
    """(images/s, peak MiB) of bf16-autocast inference, timm benchmark.py style; raises on OOM."""
    import timm

    model = timm.create_model(name, img_size=resolution, num_classes=1000).cuda().eval()
    images = torch.randn(batch, 3, resolution, resolution, device="cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(warmup):
            model(images)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(iterations):
            model(images)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20
    del model, images
    torch.cuda.empty_cache()
    return batch * iterations / elapsed, peak


def bench_models(batch: int, warmup: int, iterations: int) -> list[str]:
    """Markdown rows: Vim-Ti vs DeiT-Ti per resolution (guarded until the Vim model is registered)."""
    import timm

    if "vim_tiny_patch16_224" not in timm.list_models("vim_tiny_patch16_224"):
        return ["| (vim_tiny_patch16_224 is not registered in this checkout: model table skipped) |"]
    rows = []
    for resolution in RESOLUTIONS:
        cells = [str(resolution)]
        throughput = {}
        for name in ("deit_tiny_patch16_224", "vim_tiny_patch16_224"):
            try:
                throughput[name], peak = bench_model(name, resolution, batch, warmup, iterations)
                cells.append(f"{throughput[name]:.0f} img/s, {peak:.0f} MiB")
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                cells.append("OOM")
        if len(throughput) == 2:
            cells.append(f"x{throughput['vim_tiny_patch16_224'] / throughput['deit_tiny_patch16_224']:.2f}")
        else:
            cells.append("n/a")
        rows.append("| " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return rows


def machine_description() -> str:
    import triton

    properties = torch.cuda.get_device_properties(0)
    return (f"{properties.name}, {properties.total_memory / 2**30:.0f} GiB, {properties.multi_processor_count} SMs; "
            f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        handle.write(text)
    os.replace(handle.name, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds per shape")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="scan input dtype")
    parser.add_argument("--batch", type=int, default=64, help="model benchmark batch size")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--skip-models", action="store_true", help="only the kernel table")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("scan_gpu.py needs a CUDA device (none found); the CPU scan benchmark is benchmarks/scan.py")
    from mambazoo.ops import available_backends
    if "triton" not in available_backends():
        sys.exit("the triton scan backend is unavailable here; see mambazoo.ops.backend_status()")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True

    bandwidth, peak = copy_bandwidth_gbs(args.rounds), theoretical_bandwidth_gbs()
    peak_text = f"{peak:.0f} GB/s theoretical" if peak else "theoretical peak not exposed by torch"
    lines = [f"# Triton selective scan on {torch.cuda.get_device_name(0)}", "",
             f"Machine: {machine_description()}.", "",
             f"## Kernels (D = {DIM}, N = {D_STATE}, z, D, delta_bias + softplus; {args.dtype}; "
             f"median of {args.rounds} interleaved rounds)", "",
             f"Bandwidth limit: {bandwidth:.0f} GB/s measured device copy; {peak_text}. GB/s = minimal IO / time "
             "(`scan_bytes`). Other columns: median ms (x = median per-round time ratio vs triton; >1 = triton "
             "faster).",
             "", "| pass | B | L | triton ms | triton GB/s | % of copy BW | torch ms | mamba_ssm ms |",
             "|---|---|---|---|---|---|---|---|"]
    lines += bench_kernels(args.rounds, DTYPES[args.dtype], bandwidth)
    if not args.skip_models:
        lines += ["", f"## Vim-Ti vs DeiT-Ti inference (batch {args.batch}, bf16 autocast, {args.warmup} warm-up + "
                  f"{args.iterations} steps)", "", "| px | DeiT-Ti | Vim-Ti | Vim/DeiT img/s |", "|---|---|---|---|"]
        lines += bench_models(args.batch, args.warmup, args.iterations)
    device = torch.cuda.get_device_name(0).replace(" ", "_").lower()
    path = RESULTS / f"scan_gpu_{device}.md"
    write_atomically(path, "\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

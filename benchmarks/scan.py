"""CPU benchmark of the selective-scan backends (reference, torch, native) on Vim-Ti shapes.

Shapes: D = 384, N = 16, z gate, D skip, delta_bias + softplus (Mamba init: steps log-uniform in [1e-3, 1e-1]);
B in {1, 8}, L in {197, 1025, 6085} (224, 512 and 1248 px). Forward under ``no_grad`` and forward+backward (autograd,
loss = sum(y * g) for a fixed random g), fp32.

Method (docs/benchmarks.md): every backend runs in one process, interleaved round-robin (each round calls every backend
once, plus one fp32 2048^3 ``torch.mm`` in forward rounds), after one warm-up call each; a sample repeats a call that
takes less than 20 ms until it lasts 20 ms, so that a short call is not timed on the caches and sleeping threads the
previous call left; the table gives the median ms [min-max] over rounds, the speedup over the reference as the median
of per-round ratios, and GFLOP/s with the 9·B·L·D·N convention (docs/scan_operation.md) next to the same rounds' matmul
GFLOP/s. Cells that cannot finish in reasonable time or memory are skipped with the reason; a backend whose warm-up
call exceeds 10 s is timed in one round only.

Usage: ``python benchmarks/scan.py [--quick] [--rounds 5] [--threads 2] [--output benchmarks/results/scan_cpu.md]``
"""
import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from mambazoo.ops import backend_status, selective_scan

DIM, D_STATE = 384, 16
SHAPES = [(1, 197), (8, 197), (1, 1025), (8, 1025), (1, 6085), (8, 6085)]
QUICK_SHAPES = [(1, 197), (8, 197), (1, 1025)]
BACKENDS = ("reference", "torch", "native")
MATMUL_SIZE = 2048
MAX_AUTOGRAD_STATE_BYTES = 512 * 2**20
SLOW_CALL_SECONDS = 10.0  # a backend whose warm-up call takes longer is timed in the first round only
MIN_SAMPLE_SECONDS = 0.02  # a sample repeats a fast call for at least this long (cold caches, sleeping threads)


def make_inputs(batch: int, length: int, requires_grad: bool, seed: int = 0) -> dict:
    """Vim-Ti-like scan inputs (Mamba-init-like distribution, docs/scan_operation.md)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    step = torch.exp(torch.rand(DIM, generator=generator) * 4.6 - 6.9)
    inputs = dict(u=randn(batch, length, DIM), delta=0.5 * randn(batch, length, DIM),
                  A=-torch.arange(1, D_STATE + 1, dtype=torch.float32).repeat(DIM, 1), B=randn(batch, length, D_STATE),
                  C=randn(batch, length, D_STATE), D=torch.ones(DIM), z=randn(batch, length, DIM),
                  delta_bias=step + torch.log(-torch.expm1(-step)))
    return {name: t.requires_grad_(requires_grad) for name, t in inputs.items()}


def skip_reason(backend: str, batch: int, length: int, backward: bool) -> Optional[str]:
    """Why a cell is not run, or None."""
    if backend not in backend_status() or backend_status()[backend] != "available":
        return f"backend unavailable: {backend_status().get(backend, 'unknown')}"
    state_bytes = batch * length * DIM * D_STATE * 4
    if backward and backend != "native" and state_bytes > MAX_AUTOGRAD_STATE_BYTES:
        return (f"autograd keeps several (B,L,D,N) fp32 tensors of {state_bytes / 2**30:.1f} GiB "
                "(peak RSS 15.8 GB measured in a reference design)")
    return None


def scan_call(backend: str, inputs: dict, backward: bool) -> Callable[[], None]:
    grad_y = torch.randn(inputs["u"].shape) if backward else None

    def forward() -> None:
        with torch.no_grad():
            selective_scan(**inputs, backend=backend)

    def forward_backward() -> None:
        y = selective_scan(**inputs, backend=backend)
        torch.autograd.grad((y * grad_y).sum(), list(inputs.values()))

    return forward_backward if backward else forward


def seconds(function: Callable[[], None], repeats: int = 1) -> float:
    """Seconds per call of ``function``, averaged over ``repeats`` calls."""
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


def run_row(batch: int, length: int, backward: bool, rounds: int) -> tuple[dict, dict, list[float]]:
    """Times of every runnable backend over interleaved rounds; returns (times, skipped reasons, matmul GFLOP/s)."""
    inputs = make_inputs(batch, length, requires_grad=backward)
    skipped = {b: reason for b in BACKENDS if (reason := skip_reason(b, batch, length, backward))}
    calls = {b: scan_call(b, inputs, backward) for b in BACKENDS if b not in skipped}
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    matmul = (lambda: torch.mm(a, a)) if not backward else None
    warm_up = {backend: seconds(call) for backend, call in calls.items()}
    slow = {backend for backend, elapsed in warm_up.items() if elapsed > SLOW_CALL_SECONDS}
    repeats = {backend: max(1, math.ceil(MIN_SAMPLE_SECONDS / elapsed)) for backend, elapsed in warm_up.items()}
    if matmul:
        matmul()
    times: dict[str, list[float]] = {b: [] for b in calls}
    matmul_gflops = []
    for round_index in range(rounds):
        for backend, call in calls.items():
            if round_index == 0 or backend not in slow:
                times[backend].append(seconds(call, repeats[backend]))
        if matmul:
            matmul_gflops.append(2 * MATMUL_SIZE**3 / seconds(matmul) / 1e9)
    return times, skipped, matmul_gflops


def format_row(batch: int, length: int, backward: bool, times: dict, skipped: dict, matmul_gflops: list,
               forward_native: Optional[list]) -> list[str]:
    flops = 9 * batch * length * DIM * D_STATE
    lines = []
    for backend in BACKENDS:
        label = f"B{batch} L{length}"
        if backend in skipped:
            lines.append(f"| {label} | {backend} | skipped: {skipped[backend]} | | | |")
            continue
        ms = [1e3 * t for t in times[backend]]
        cell = f"{statistics.median(ms):.3g} [{min(ms):.3g}–{max(ms):.3g}]"
        speedup = "–"
        if "reference" in times:
            speedup = f"x{statistics.median(r / t for r, t in zip(times['reference'], times[backend])):.3g}"
            if min(len(times["reference"]), len(times[backend])) == 1:
                speedup += " (1 round)"
        if backward:
            extra = ""
            if backend == "native" and forward_native:
                extra = f"fwd+bwd / fwd = {statistics.median(ms) / (1e3 * statistics.median(forward_native)):.2f}"
            lines.append(f"| {label} | {backend} | {cell} | {speedup} | | {extra} |")
        else:
            gflops = [flops / t / 1e9 for t in times[backend]]
            fraction = statistics.median(g / m for g, m in zip(gflops, matmul_gflops))  # same-round pairs
            lines.append(f"| {label} | {backend} | {cell} | {speedup} | {statistics.median(gflops):.3g} | "
                         f"{100 * fraction:.2g}% of mm ({statistics.median(matmul_gflops):.0f} GFLOP/s) |")
    return lines


def machine_description() -> list[str]:
    cpu, flags = platform.processor(), []
    if os.path.exists("/proc/cpuinfo"):
        info = open("/proc/cpuinfo").read().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
        family = next((line.split(":", 1)[1].strip() for line in info if line.startswith("cpu family")), "?")
        model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model\t")), "?")
        cpu = f"{cpu} (family {family}, model {model})"
        flags = sorted({f for line in info if line.startswith("flags") for f in line.split(":", 1)[1].split()
                        if f.startswith(("avx512", "avx2", "fma"))})
    try:
        compiler = subprocess.run(["cc", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        compiler = "unknown"
    return [
        f"* CPU: {cpu}, {os.cpu_count()} logical CPUs; SIMD flags: {' '.join(flags) or 'n/a'}",
        f"* torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads; "
        f"Python {platform.python_version()}; C compiler: {compiler}",
        f"* native backend: {backend_status()['native']}",
        f"* load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (the machine may be shared)",
    ]


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "w") as file:
        file.write(text)
    os.replace(temporary, path)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~1-minute subset (3 shapes, 3 rounds)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per cell (default 5, quick 3)")
    parser.add_argument("--output", type=Path, default=None, help="write the markdown table and machine description")
    parser.add_argument("--threads", type=int, default=None, help="torch (and native) threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 5)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    header = ["| shape | backend | median ms [min–max] | speedup vs reference | GFLOP/s (9·B·L·D·N) | |",
              "|---|---|---|---|---|---|"]
    sections = {False: ["## Forward (no_grad)", "", *header], True: ["## Forward + backward (autograd)", "",
                                                                        *header]}
    for batch, length in shapes:
        native_forward = None
        for backward in (False, True):
            times, skipped, matmul_gflops = run_row(batch, length, backward, rounds)
            native_forward = times.get("native") if not backward else native_forward
            lines = format_row(batch, length, backward, times, skipped, matmul_gflops, native_forward)
            sections[backward].extend(lines)
            print("\n".join(lines), flush=True)
    text = "\n".join([
        "# Selective scan on CPU: reference vs torch vs native (Vim-Ti shapes, D=384, N=16, z gate, fp32)", "",
        f"Produced by `python benchmarks/scan.py {' '.join(argv or [])}`; {rounds} interleaved rounds "
        "after one warm-up; speedups are medians of per-round ratios; GFLOP/s uses 9·B·L·D·N per call; the matmul "
        f"column is fp32 `torch.mm` {MATMUL_SIZE}³ timed in the same rounds.", "",
        *machine_description(), "", *sections[False], "", *sections[True], "",
        "GPU results (Triton kernels) are written separately by `benchmarks/scan_gpu.py` to "
        "`benchmarks/results/scan_gpu_<device>.md`.", ""])
    print()
    print(text)
    if args.output:
        write_atomically(args.output, text)


if __name__ == "__main__":
    main(sys.argv[1:])

"""The native CPU kernels in one interleaved run: scan GFLOP/s per ISA against GEMM, the conv against a copy of the same
bytes, the inference kernels against their composites, and Vim-Ti against DeiT-Ti (SDPA) images/s.

Everything runs in one process, in interleaved rounds after one warm-up call each (a scan sample repeats its call for
at least 20 ms); tables give medians over rounds, and every ratio is the median of per-round ratios, so drift in
machine load cancels (the method of docs/benchmarks.md).

* Scan (Vim-Ti shapes: D = 384, N = 16, D skip, delta_bias + softplus, z gate, fp32): forward under
  ``inference_mode`` and forward + backward (autograd, loss = sum(y * g)), for every ISA variant this CPU runs
  (``mambazoo.ops.native.use_isa``), next to an fp32 ``torch.mm`` of size 2048 timed in every round. GFLOP/s counts
  9·B·L·D·N per call (docs/scan_operation.md, FLOP convention) for the forward and for forward + backward alike.
* Conv (Vim-Ti: D = 384, K = 4, bias, SiLU) through ``causal_conv1d`` per ISA, against ``copy_`` of the same tensor
  into a preallocated one (the bytes a conv must read and write: its bandwidth bound) in the same rounds.
* Inference kernels (Vim-Ti shapes at 224 and 1248 px): ``rms_norm`` of (1, L, 192), ``gated_sum`` of three
  (1, L, 384) tensors with scale 1/2, and ``bidirectional_scan`` (two directions of (1, L, 384), N = 16, dt_rank 12,
  gate, scale 1/2), native (best ISA) against the composite (``backend="torch"`` for the epilogues; for the
  bidirectional scan its two native ``selective_scan`` calls, step projections and native gate, i.e. what Vim ran
  before), under ``inference_mode``, each sample repeated for at least 20 ms.
* Vim-Ti vs DeiT-Ti (SDPA attention), batch 1, fp32, ``inference_mode``, at 224 and 1248 px: the best ISA, with the
  minor page faults per image (the allocator's churn; docs/benchmarks.md, "Allocator"), in this process
  (interleaved) and with one fresh process per model (``vim_cpu.speed_separate``).

The forward's physical limit (docs/native.md): per state update and LANES channels the AVX-512 loop runs 13 vector
instructions -- the decay exp(dt·A) is 9 of them (a multiply, round, subtract, compare, 4 FMAs of the polynomial,
the power-of-two scale) and the update and the C contraction 3 more -- 8 of which compete for the two FMA pipes.

Usage: ``python benchmarks/native_cpu.py [--quick] [--rounds 5] [--threads 2] [--clock wall|cpu] [--label TEXT]
[--output benchmarks/results/native_cpu.md]``
"""
import argparse
import math
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from mambazoo.ops import ScanDirection, bidirectional_scan, causal_conv1d, gated_sum, native, rms_norm, selective_scan
from scan import DIM, D_STATE, MATMUL_SIZE, machine_description, make_inputs, write_atomically
from vim_cpu import allocator_description, speed, speed_separate

SCAN_SHAPES = {"forward": [(1, 197), (1, 1025), (8, 1025), (1, 6085)], "forward+backward": [(1, 197), (1, 1025)]}
QUICK_SCAN_SHAPES = {"forward": [(1, 197)], "forward+backward": [(1, 197)]}
CONV_LENGTHS, QUICK_CONV_LENGTHS = (197, 6085), (197,)
EPILOGUE_LENGTHS, QUICK_EPILOGUE_LENGTHS = (197, 6085), (197,)
MODEL_SIZES, QUICK_MODEL_SIZES = (224, 1248), (224,)
EMBED_DIM = DIM // 2  # Vim-Ti: the mixer's inner width is twice the model width
KERNEL_SIZE = 4


SCAN_SAMPLE_SECONDS = 0.02  # a scan-table sample repeats its call for at least this long
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}  # cpu: the calling thread's CPU time (1 thread only)
clock = CLOCKS["wall"]


def seconds(function: Callable[[], object], repeats: int = 1) -> float:
    """Time per call of ``function`` by the chosen clock."""
    start = clock()
    for _ in range(repeats):
        function()
    return (clock() - start) / repeats


def interleave(calls: dict[str, Callable[[], None]], rounds: int, min_sample: float = 0.0) -> dict[str, list[float]]:
    """Seconds per call of every callable over ``rounds`` interleaved rounds.

    A warm-up call of each sets how often a sample repeats it: enough to last ``min_sample`` seconds (the scan
    table: a sub-millisecond kernel is then not timed on the cold caches and sleeping threads that the previous
    callable, e.g. the 2048³ GEMM, leaves behind), or once (the conv table: conv and copy both read their tensors
    from beyond the caches the other calls evicted, which is the bandwidth comparison it makes).
    """
    repeats = {name: max(1, math.ceil(min_sample / seconds(call))) for name, call in calls.items()}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            times[name].append(seconds(call, repeats[name]))
    return times


def ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of the per-round ratio."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def scan_call(batch: int, length: int, backward: bool) -> Callable[[], None]:
    inputs = make_inputs(batch, length, requires_grad=backward)
    grad_y = torch.randn(inputs["u"].shape)

    def forward() -> None:
        with torch.inference_mode():
            selective_scan(**inputs, backend="native")

    def forward_backward() -> None:
        y = selective_scan(**inputs, backend="native")
        torch.autograd.grad((y * grad_y).sum(), list(inputs.values()))

    return forward_backward if backward else forward


def in_isa(isa: str, call: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        with native.use_isa(isa):
            call()
    return run


def scan_tables(shapes: dict, rounds: int) -> list[str]:
    matrix = torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    calls: dict[str, Callable[[], None]] = {"mm": lambda: torch.mm(matrix, matrix)}
    for kind, kind_shapes in shapes.items():
        for batch, length in kind_shapes:
            call = scan_call(batch, length, backward=kind != "forward")
            for isa in native.RUNNABLE_ISAS:
                calls[f"{kind}|{batch}|{length}|{isa}"] = in_isa(isa, call)
    times = interleave(calls, rounds, SCAN_SAMPLE_SECONDS)
    mm_gflops = [2 * MATMUL_SIZE ** 3 / t / 1e9 for t in times.pop("mm")]
    lines = [f"fp32 `torch.mm` {MATMUL_SIZE}³ in the same rounds: {statistics.median(mm_gflops):.0f} GFLOP/s "
             f"[{min(mm_gflops):.0f}–{max(mm_gflops):.0f}].", "",
             "| pass | shape | ISA | median ms [min–max] | GFLOP/s (9·B·L·D·N) | % of same-round mm | "
             "fwd+bwd / fwd |", "|---|---|---|---|---|---|---|"]
    for name, call_times in times.items():
        kind, batch, length, isa = name.split("|")
        flops = 9 * int(batch) * int(length) * DIM * D_STATE
        gflops = [flops / t / 1e9 for t in call_times]
        share = statistics.median(g / m for g, m in zip(gflops, mm_gflops))
        forward = times.get(f"forward|{batch}|{length}|{isa}")
        backward_ratio = f"{ratio(call_times, forward):.2f}" if kind != "forward" and forward else ""
        ms = [1e3 * t for t in call_times]
        lines.append(f"| {kind} | B{batch} L{length} | {isa} | {statistics.median(ms):.3g} [{min(ms):.3g}–"
                     f"{max(ms):.3g}] | {statistics.median(gflops):.3g} | {100 * share:.0f}% | {backward_ratio} |")
    return lines


def summary(values: list[float]) -> str:
    """"median [min–max]" with one decimal."""
    return f"{statistics.median(values):.1f} [{min(values):.1f}–{max(values):.1f}]"


def conv_table(lengths: tuple, rounds: int) -> list[str]:
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(DIM, KERNEL_SIZE, generator=generator), torch.randn(DIM, generator=generator)
    calls: dict[str, Callable[[], None]] = {}
    for length in lengths:
        x = torch.randn(1, length, DIM, generator=generator)
        copy_target = torch.empty_like(x)
        calls[f"copy|{length}"] = lambda x=x, target=copy_target: target.copy_(x)
        for isa in native.RUNNABLE_ISAS:
            def conv(x=x) -> None:
                with torch.inference_mode():
                    causal_conv1d(x, weight, bias, "silu", backend="native")
            calls[f"conv|{length}|{isa}"] = in_isa(isa, conv)
    times = interleave(calls, rounds)
    lines = ["| shape | ISA | conv median µs [min–max] | copy of the same bytes, µs | conv / copy | GB/s moved |",
             "|---|---|---|---|---|---|"]
    for name, call_times in times.items():
        if not name.startswith("conv"):
            continue
        _, length, isa = name.split("|")
        copy_times = times[f"copy|{length}"]
        moved = 2 * int(length) * DIM * 4 / statistics.median(call_times) / 1e9
        lines.append(f"| B1 L{length} D{DIM} K{KERNEL_SIZE} | {isa} | {summary([1e6 * t for t in call_times])} | "
                     f"{1e6 * statistics.median(copy_times):.1f} | {ratio(call_times, copy_times):.2f} | "
                     f"{moved:.1f} |")
    return lines


DT_RANK = 12  # Vim-Ti: ceil(192 / 16)


def scan_direction(length: int, generator: torch.Generator) -> ScanDirection:
    """One direction of Vim-Ti's mixer at ``length`` tokens (dt_low_rank, B and C slices of one x_proj output)."""
    projected = torch.randn(1, length, DT_RANK + 2 * D_STATE, generator=generator)
    return ScanDirection(torch.randn(1, length, DIM, generator=generator), projected[..., :DT_RANK],
                         torch.randn(DIM, DT_RANK, generator=generator) / DT_RANK ** 0.5,
                         torch.randn(DIM, generator=generator) - 2.0,
                         torch.arange(1, D_STATE + 1.0).log().repeat(DIM, 1), projected[..., DT_RANK:-D_STATE],
                         projected[..., -D_STATE:], torch.ones(DIM))


def epilogue_calls(length: int) -> dict[str, Callable[[], None]]:
    """``rms_norm``, ``gated_sum`` and ``bidirectional_scan`` at Vim-Ti's widths, native and composite, keyed
    "op|backend" (the composite of the bidirectional scan: native scans, step projections and gate)."""
    generator = torch.Generator().manual_seed(1)
    x, weight = torch.randn(1, length, EMBED_DIM, generator=generator), torch.randn(EMBED_DIM, generator=generator)
    a, b, z = (torch.randn(1, length, DIM, generator=generator) for _ in range(3))
    forward, backward = scan_direction(length, generator), scan_direction(length, generator)
    calls = {}
    for backend in ("native", "torch"):
        calls[f"rms_norm|{backend}"] = lambda backend=backend: rms_norm(x, weight, 1e-5, backend)
        calls[f"gated_sum|{backend}"] = lambda backend=backend: gated_sum(a, b, z, 0.5, backend)
    calls["bidirectional_scan|native"] = lambda: bidirectional_scan(forward, backward, z, 0.5)
    calls["bidirectional_scan|torch"] = lambda: gated_sum(*(
        selective_scan(d.u, torch.nn.functional.linear(d.dt_low_rank, d.dt_weight), -torch.exp(d.A_log), d.B, d.C,
                       d.D, delta_bias=d.dt_bias, reverse=reverse) for d, reverse in ((forward, False), (backward, True))),
        z, 0.5)
    return calls


def epilogue_table(lengths: tuple, rounds: int) -> list[str]:
    calls = {f"{length}|{name}": call for length in lengths for name, call in epilogue_calls(length).items()}
    with torch.inference_mode():
        times = interleave(calls, rounds, SCAN_SAMPLE_SECONDS)
    lines = ["| op | shape | native µs [min–max] | composite µs [min–max] | composite / native |",
             "|---|---|---|---|---|"]
    for length in lengths:
        for op, width in (("rms_norm", EMBED_DIM), ("gated_sum", DIM), ("bidirectional_scan", DIM)):
            native_us, torch_us = ([1e6 * t for t in times[f"{length}|{op}|{backend}"]]
                                   for backend in ("native", "torch"))
            lines.append(f"| `{op}` | 1×{length}×{width} | {summary(native_us)} | {summary(torch_us)} | "
                         f"{ratio(torch_us, native_us):.2f} |")
    return lines


def model_table(sizes: tuple, rounds: int) -> list[str]:
    lines = ["| px | protocol | DeiT-Ti (SDPA) ms (img/s) | Vim-Ti ms (img/s) | Vim / DeiT img/s, median [min–max] | "
             "page faults per image DeiT / Vim |", "|---|---|---|---|---|---|"]
    for size in sizes:  # ~16 forwards per round and model at 224, 1 at 1248
        for protocol, result in (("this process, interleaved", speed(size, rounds)),
                                 ("one process per model", speed_separate(size, rounds))):
            deit, vim = result["ms"]["deit_tiny"], result["ms"]["vim_tiny"]
            low, high = result["ratio_range"]
            lines.append(f"| {size} | {protocol} | {deit:.1f} ({1e3 / deit:.2f}) | {vim:.1f} ({1e3 / vim:.2f}) | "
                         f"x{result['ratio']:.2f} [{low:.2f}–{high:.2f}] | "
                         f"{result['faults']['deit_tiny']:.0f} / {result['faults']['vim_tiny']:.0f} |")
    return lines


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (one shape each, 224 px only)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch (and native) threads (default: torch's)")
    parser.add_argument("--output", default=None, help="write the tables and the machine description (markdown)")
    parser.add_argument("--label", default=None, help="a line on the run's conditions, written under the title")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time (default), or the thread's CPU time (with --threads 1: on a shared machine it "
                             "leaves out the time other jobs hold the core)")
    args = parser.parse_args(argv)
    if not native.AVAILABLE:
        raise SystemExit(f"the native backend is unavailable: {native.UNAVAILABLE_REASON}")
    if args.clock == "cpu" and args.threads != 1:
        raise SystemExit("--clock cpu measures one thread: use it with --threads 1")
    global clock
    clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = [
        ("Selective scan per ISA vs GEMM", scan_tables(QUICK_SCAN_SHAPES if args.quick else SCAN_SHAPES, args.rounds)),
        ("Causal conv1d vs a copy of the same bytes", conv_table(QUICK_CONV_LENGTHS if args.quick else CONV_LENGTHS,
                                                                  args.rounds)),
        ("Inference kernels vs their composites", epilogue_table(
            QUICK_EPILOGUE_LENGTHS if args.quick else EPILOGUE_LENGTHS, args.rounds)),
        ("Vim-Ti vs DeiT-Ti (SDPA), batch 1", model_table(QUICK_MODEL_SIZES if args.quick else MODEL_SIZES,
                                                          args.rounds)),
    ]
    command = shlex.join(["python", "benchmarks/native_cpu.py", *(argv if argv is not None else sys.argv[1:])])
    text = "\n".join([
        "# Native CPU kernels: scan per ISA, conv vs copy, inference kernels, Vim-Ti vs DeiT-Ti", "",
        *([f"**{args.label}**", ""] if args.label else []),
        f"Produced by `{command}`: one process, {args.rounds} interleaved rounds after one warm-up; medians, ratios "
        f"are medians of per-round ratios (method in the script's docstring); {args.clock} clock.", "",
        *machine_description(), allocator_description(), f"* native build: {native.describe()}", "",
        *(line for title, table in sections for line in (f"## {title}", "", *table, "")),
    ])
    print(text)
    if args.output:
        write_atomically(Path(args.output), text)


if __name__ == "__main__":
    main()

"""Spatial-Mamba on CPU: the model next to Vim-S, MambaVision-T and ConvNeXt-T; the all-states scan per backend; the
state fusion's two forms.

1. Models (``mambazoo.bench.sweep``, timm ``benchmark.py`` semantics): batch 1, fp32, ``inference_mode``;
   ``spatialmamba_t``, ``vim_small_patch16_224``, ``mambavision_t`` (only when registered) and timm's
   ``convnext_tiny``, interleaved round-robin per resolution, medians over rounds, ``speed_vs_baseline`` = median of
   the per-round ratios of images/s to ConvNeXt-T; peak memory as :data:`mambazoo.bench.CPU_MEMORY_METHOD`.
2. The all-states scan (:func:`mambazoo.ops.state_scan`) forward (``no_grad``) and forward+backward on every CPU
   backend at Spatial-Mamba-T's first-stage shapes (D = 128; L = 3136 at 224 px, 16384 at 512 px, 65536 at 1024 px),
   interleaved rounds after a warm-up, median ms, speedup = median of per-round ratios to the reference (to the torch
   backend where the Python-loop reference would take minutes); plus the peak memory of one native forward+backward
   at L = 65536 next to the size of the states.
3. State fusion: the whole Spatial-Mamba-T (inference, and a training step) with three dilated 3×3 convolutions vs
   one merged 11×11 kernel rebuilt per call, interleaved, median of per-round time ratios.

Writes a markdown report (and the raw numbers as JSON) with the machine description.

Usage: ``python benchmarks/spatialmamba_cpu.py [--sizes 224 512] [--repeats 5] [--quick]
[--output benchmarks/results/spatialmamba_cpu.md]``
"""
import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import timm
import torch

from mambazoo import bench
from mambazoo.ops import state_scan
from mambazoo.ops.capabilities import backend_status

MODELS = ("spatialmamba_t", "vim_small_patch16_224", "mambavision_t", "convnext_tiny")
BASELINE = "convnext_tiny"
SCAN_DIM = 128
SCAN_SHAPES = [(1, 3136), (8, 3136), (1, 16384), (1, 65536)]
QUICK_SCAN_SHAPES = [(1, 3136), (1, 16384)]
REFERENCE_LIMIT = 20_000  # batch × length above which the Python-loop reference is not timed


def model_rows(sizes: list[int], repeats: int) -> list[dict]:
    models = [name for name in MODELS if timm.is_model(name)]
    return bench.sweep(models, sizes, batch_size=1, repeats=repeats, baseline=BASELINE, progress=False)


def scan_inputs(batch: int, length: int, requires_grad: bool) -> dict:
    """Spatial-Mamba-like inputs: trained-like step sizes (softplus of N(-2, 1) plus bias), A = -exp(N(0, 0.5))."""
    generator = torch.Generator().manual_seed(length)
    inputs = dict(u=torch.randn(batch, length, SCAN_DIM, generator=generator),
                  delta=torch.randn(batch, length, SCAN_DIM, generator=generator) - 2,
                  A=-torch.exp(0.5 * torch.randn(SCAN_DIM, 1, generator=generator)),
                  B=torch.randn(batch, length, 1, generator=generator),
                  delta_bias=0.5 * torch.randn(SCAN_DIM, generator=generator))
    return {name: tensor.requires_grad_(requires_grad) for name, tensor in inputs.items()}


def scan_call(backend: str, inputs: dict, backward: bool) -> Callable[[], None]:
    grad = torch.randn(inputs["u"].shape) if backward else None

    def forward() -> None:
        with torch.no_grad():
            state_scan(**inputs, backend=backend)

    def forward_backward() -> None:
        states = state_scan(**inputs, backend=backend)
        torch.autograd.grad((states * grad).sum(), list(inputs.values()))

    return forward_backward if backward else forward


def seconds(function: Callable[[], None]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def interleaved(calls: dict[str, Callable[[], None]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of every function, one call each per round, after one warm-up call each."""
    for call in calls.values():
        call()
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            times[name].append(seconds(call))
    return times


def scan_rows(shapes: list[tuple[int, int]], rounds: int) -> list[dict]:
    backends = [name for name in ("reference", "torch", "native") if backend_status("state_scan")[name] == "available"]
    rows = []
    for backward in (False, True):
        for batch, length in shapes:
            names = [b for b in backends if b != "reference" or batch * length <= REFERENCE_LIMIT]
            inputs = scan_inputs(batch, length, backward)
            times = interleaved({name: scan_call(name, inputs, backward) for name in names}, rounds)
            base = names[0]
            for name in names:
                ratios = [b / t for b, t in zip(times[base], times[name])]
                rows.append(dict(pass_="forward+backward" if backward else "forward", shape=f"B{batch} L{length}",
                                 backend=name, median_ms=round(1e3 * statistics.median(times[name]), 2),
                                 range_ms=f"{1e3 * min(times[name]):.3g}-{1e3 * max(times[name]):.3g}",
                                 speedup=f"x{statistics.median(ratios):.3g} vs {base}"))
    return rows


def scan_memory_row(length: int = 65536) -> dict:
    """Peak RSS increase of one native forward+backward (inputs and output gradient allocated before)."""
    inputs = scan_inputs(1, length, requires_grad=True)
    grad = torch.randn(inputs["u"].shape)
    with bench.PeakMemory(torch.device("cpu")) as memory:
        states = state_scan(**inputs, backend="native")
        torch.autograd.grad(states, list(inputs.values()), grad)
    return dict(shape=f"B1 L{length} D{SCAN_DIM}", states_mb=round(states.numel() * 4 / 2**20, 1),
                peak_mb=round(memory.mb, 1))


def fusion_rows(size: int, rounds: int) -> list[dict]:
    torch.manual_seed(0)
    models = {merged: timm.create_model("spatialmamba_t", merged_fusion=merged) for merged in (False, True)}
    models[True].load_state_dict(models[False].state_dict())
    images = torch.randn(1, 3, size, size)

    def inference(model: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            model.eval()
            with torch.inference_mode():
                model(images)
        return run

    def training(model: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            model.train()
            model(images).sum().backward()
        return run

    rows = []
    for kind, make in (("inference", inference), ("training step", training)):
        times = interleaved({merged: make(model) for merged, model in models.items()}, rounds)
        ratios = [three / merged for three, merged in zip(times[False], times[True])]
        rows.append(dict(pass_=kind, img_size=size, three_convs_ms=round(1e3 * statistics.median(times[False]), 1),
                         merged_kernel_ms=round(1e3 * statistics.median(times[True]), 1),
                         three_over_merged=f"{statistics.median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}]"))
    return rows


def report(sections: dict[str, list[dict]], meta: dict, command: str) -> str:
    lines = ["# Spatial-Mamba on CPU", "", f"Produced by `{command}` (method in the script's docstring).", ""]
    for key, value in meta.items():
        value = ", ".join(f"{k}: {v}" for k, v in value.items()) if isinstance(value, dict) else value
        lines.append(f"* **{key}**: {value}")
    for title, rows in sections.items():
        lines += ["", f"## {title}", "", bench.markdown_table([{k.rstrip("_"): v for k, v in r.items()} for r in rows])]
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        handle.write(text)
    os.replace(handle.name, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smoke test: one round, fewer scan shapes")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/spatialmamba_cpu.md"))
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    columns = ["label", "infer_img_size", "infer_samples_per_sec", "infer_step_time", "infer_peak_mem_mb",
               "speed_vs_baseline", "infer_gmacs", "param_count", "error"]
    models = [{c: row[c] for c in columns if c in row} for row in model_rows(args.sizes, repeats)]
    sections = {
        "Models (batch 1, fp32, images/s, peak MB; ratio = median per-round images/s ratio to convnext_tiny)": models,
        "All-states scan, D = 128 (ms per call)": scan_rows(QUICK_SCAN_SHAPES if args.quick else SCAN_SHAPES,
                                                             repeats),
        "All-states scan memory (native forward+backward, peak RSS increase)": [scan_memory_row()],
        "State fusion forms, whole Spatial-Mamba-T": fusion_rows(args.sizes[0], repeats),
    }
    meta = dict(machine=bench.machine_description(), cpu_memory_method=bench.CPU_MEMORY_METHOD,
                scan_backends=backend_status("state_scan"))
    command = "python benchmarks/spatialmamba_cpu.py " + " ".join(
        (["--quick"] if args.quick else ["--repeats", str(args.repeats)]) + ["--sizes", *map(str, args.sizes)])
    text = report(sections, meta, command)
    print(text)
    write_atomically(args.output, text)
    write_atomically(args.output.with_suffix(".json"), json.dumps(dict(meta=meta, **sections), indent=2) + "\n")
    print(f"wrote {args.output} and {args.output.with_suffix('.json')}")


if __name__ == "__main__":
    main()

"""GPU benchmarks of the Triton kernels and of the Vim family against DeiT (needs a CUDA device).

Parts (each writes ``<out>/<part>.md`` and ``<out>/<part>.json`` atomically, with the machine description):

* ``kernels``: forward and forward+backward time of the Triton selective scan on Vim-Ti shapes (D = 384, N = 16, z
  gate, D skip, delta_bias + softplus) for batch {1, 64} × length {197, 1025, 6085}, float32 and bfloat16 inputs;
  achieved bandwidth on the minimal IO against the device-to-device copy bandwidth measured in the same run; the
  fwd+bwd / fwd ratio; the launch configuration (segments). Also the Triton causal conv1d (forward, fwd+bwd).
* ``tune``: the scan's launch knobs (``mambazoo.ops.triton_scan.TUNING``) swept on two shapes, to replace the
  reasoned defaults by measured ones.
* ``models``: ``mambazoo.bench`` runs — bf16-autocast inference at batch 64 of Vim-Ti vs DeiT-Ti (fused SDPA and
  materialised attention) at 224/512/1024/1248 px; Vim-S, DeiT-S, PlainMamba-L1 and MambaOut-Femto at 224; training
  steps at batch 128, 224 px, with peak memory (Vim-Ti vs DeiT-Ti).
* ``profile``: ``torch.profiler`` summary (GPU time per kernel) of Vim-Ti training steps, batch 128, bf16 autocast.

Method: kernels are timed with CUDA events, warm-up first, then interleaved rounds (forward and forward+backward of a
shape alternate), medians; ratios are medians of per-round ratios. Models follow timm's benchmark.py via
``mambazoo.bench`` (models interleaved per resolution).

Usage: ``python benchmarks/scan_gpu.py {kernels,tune,models,profile,all} [--out DIR] [--rounds 7]``; the one-command
GPU check (tests + all parts, time-boxed) is ``benchmarks/gpu_check.sh``. ``--smoke`` runs every part at tiny sizes
(on CPU under ``TRITON_INTERPRET=1`` when there is no GPU) to check the script itself.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from mambazoo import bench
from mambazoo.ops import causal_conv1d, selective_scan

RESULTS = Path(__file__).resolve().parent / "results" / "gpu"
D_STATE, KERNEL = 16, 4
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class Sizes:
    """Benchmark sizes (``--smoke`` shrinks them to check the script on a CPU)."""

    dim, batches, lengths, resolutions = 384, (1, 64), (197, 1025, 6085), (224, 512, 1024, 1248)
    model_batch, train_batch, vim, deit, profile_model = 64, 128, "vim_tiny_patch16_224", "deit_tiny_patch16_224", \
        "vim_tiny_patch16_224"

    @classmethod
    def smoke(cls) -> None:
        cls.dim, cls.batches, cls.lengths, cls.resolutions = 8, (1, 2), (9, 20), (32, 48)
        cls.model_batch, cls.train_batch, cls.vim, cls.deit, cls.profile_model = 2, 2, "test_vim", "test_vit", \
            "test_vim"


# ----------------------------------------------------------------------------------------------------------------------
# Timing helpers
# ----------------------------------------------------------------------------------------------------------------------

def timed(function: Callable[[], None]) -> float:
    """Milliseconds of one call, measured with CUDA events (wall clock on CPU)."""
    if DEVICE != "cuda":
        start = time.perf_counter()
        function()
        return 1000 * (time.perf_counter() - start)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    function()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def interleaved(callables: dict[str, Callable[[], None]], rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """Per-callable lists of milliseconds, measured round-robin after a warm-up (compilation, autotuning)."""
    for _ in range(warmup):
        for function in callables.values():
            function()
    synchronize()
    times = {name: [] for name in callables}
    for _ in range(rounds):
        for name, function in callables.items():
            times[name].append(timed(function))
    return times


def copy_bandwidth_gbs(rounds: int) -> float:
    """Achievable HBM bandwidth: a 1 GiB device-to-device copy (read + write), median GB/s."""
    source = torch.empty(1 << (28 if DEVICE == "cuda" else 20), device=DEVICE, dtype=torch.float32)
    target = torch.empty_like(source)
    times = interleaved({"copy": lambda: target.copy_(source)}, rounds)["copy"]
    return 2 * source.numel() * 4 / statistics.median(times) / 1e6


def empty_cache() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(numerators, denominators))


# ----------------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------------

def scan_bytes(batch: int, length: int, element_size: int, backward: bool) -> int:
    """Minimal HBM traffic of one scan call (each tensor read or written once; parameters and checkpoints ignored).

    Forward: read u, delta, z (B·L·D) and B, C (B·L·N); write y. Backward adds: read u, delta, z, B, C and grad_y;
    write du, ddelta, dz, dB, dC.
    """
    sequence, projection = batch * length * Sizes.dim, batch * length * D_STATE
    forward = (4 * sequence + 2 * projection) * element_size
    return forward + (7 * sequence + 4 * projection) * element_size if backward else forward


def scan_inputs(batch: int, length: int, dtype: torch.dtype, requires_grad: bool) -> dict:
    """Vim-Ti-like scan inputs (Mamba init: steps log-uniform in [1e-3, 1e-1]); A, D, bias in float32."""
    dim = Sizes.dim

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=DEVICE, dtype=dtype)

    step = torch.exp(torch.empty(dim, device=DEVICE).uniform_(-6.9, -2.3))
    inputs = dict(u=randn(batch, length, dim), delta=0.5 * randn(batch, length, dim),
                  A=-torch.arange(1, D_STATE + 1, device=DEVICE, dtype=torch.float32).repeat(dim, 1),
                  B=randn(batch, length, D_STATE), C=randn(batch, length, D_STATE), D=torch.ones(dim, device=DEVICE),
                  z=randn(batch, length, dim), delta_bias=step + torch.log(-torch.expm1(-step)))
    return {name: tensor.requires_grad_(requires_grad) for name, tensor in inputs.items()}


def scan_callables(batch: int, length: int, dtype: torch.dtype) -> dict[str, Callable[[], None]]:
    """Forward (inference) and forward+backward of one Triton scan call."""
    inputs = scan_inputs(batch, length, dtype, requires_grad=True)
    ordered = [inputs[key] for key in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    grad = torch.randn_like(inputs["u"])

    def forward() -> None:
        with torch.no_grad():
            selective_scan(*ordered, backend="triton")

    def forward_backward() -> None:
        torch.autograd.backward(selective_scan(*ordered, backend="triton"), grad)

    return dict(fwd=forward, fwd_bwd=forward_backward)


def conv_callables(batch: int, length: int, dtype: torch.dtype) -> dict[str, Callable[[], None]]:
    x = torch.randn(batch, length, Sizes.dim, device=DEVICE, dtype=dtype, requires_grad=True)
    weight = torch.randn(x.shape[-1], KERNEL, device=DEVICE, requires_grad=True)
    bias = torch.randn(x.shape[-1], device=DEVICE, requires_grad=True)
    grad = torch.randn_like(x)

    def forward() -> None:
        with torch.no_grad():
            causal_conv1d(x, weight, bias, reverse=True, backend="triton")

    def forward_backward() -> None:
        torch.autograd.backward(causal_conv1d(x, weight, bias, reverse=True, backend="triton"), grad)

    return dict(fwd=forward, fwd_bwd=forward_backward)


def kernels_part(args: argparse.Namespace) -> tuple[list[str], list[dict]]:
    from mambazoo.ops.triton_scan import launch_config

    bandwidth = copy_bandwidth_gbs(args.rounds)
    rows = []
    for dtype_name, dtype in DTYPES.items():
        for batch in Sizes.batches:
            for length in Sizes.lengths:
                times = interleaved(scan_callables(batch, length, dtype), args.rounds)
                element = torch.empty((), dtype=dtype).element_size()
                fwd, both = statistics.median(times["fwd"]), statistics.median(times["fwd_bwd"])
                segments = [launch_config(batch, length, Sizes.dim, torch.device(DEVICE), backward).n_seg
                            for backward in (False, True)]
                rows.append(dict(op="scan", dtype=dtype_name, batch=batch, length=length, fwd_ms=round(fwd, 4),
                                 fwd_gbs=round(scan_bytes(batch, length, element, False) / fwd / 1e6),
                                 fwd_pct_copy_bw=round(100 * scan_bytes(batch, length, element, False) / fwd / 1e6
                                                       / bandwidth, 1),
                                 fwd_bwd_ms=round(both, 4),
                                 fwd_bwd_gbs=round(scan_bytes(batch, length, element, True) / both / 1e6),
                                 fwd_bwd_over_fwd=round(median_ratio(times["fwd_bwd"], times["fwd"]), 2),
                                 segments_fwd_bwd=f"{segments[0]}/{segments[1]}"))
                print(rows[-1], flush=True)
                empty_cache()
        for batch, length in ((Sizes.batches[-1], Sizes.lengths[0]), (Sizes.batches[-1], Sizes.lengths[1]),
                              (Sizes.batches[0], Sizes.lengths[-1])):
            times = interleaved(conv_callables(batch, length, dtype), args.rounds)
            element = torch.empty((), dtype=dtype).element_size()
            moved = 2 * batch * length * Sizes.dim * element  # read x, write y
            fwd, both = statistics.median(times["fwd"]), statistics.median(times["fwd_bwd"])
            rows.append(dict(op="conv1d k4 reverse", dtype=dtype_name, batch=batch, length=length,
                             fwd_ms=round(fwd, 4), fwd_gbs=round(moved / fwd / 1e6),
                             fwd_pct_copy_bw=round(100 * moved / fwd / 1e6 / bandwidth, 1), fwd_bwd_ms=round(both, 4),
                             fwd_bwd_gbs=round(5 * batch * length * Sizes.dim * element / both / 1e6),
                             fwd_bwd_over_fwd=round(median_ratio(times["fwd_bwd"], times["fwd"]), 2)))
            print(rows[-1], flush=True)
    notes = [f"Copy bandwidth measured in this run: **{bandwidth:.0f} GB/s** (1 GiB device-to-device copy).",
             "GB/s = minimal IO / time (`scan_bytes`: fwd reads u, delta, z, B, C and writes y; fwd+bwd adds the "
             f"backward's reads and writes; conv: fwd reads x and writes y, fwd+bwd 5 passes). Scan shapes: D = "
             f"{Sizes.dim}, N = 16, z, D, delta_bias + softplus, forward direction; conv: {Sizes.dim} channels, "
             "kernel 4, reverse, SiLU. "
             f"Median of {args.rounds} interleaved rounds (CUDA events). segments = sequence segments of the forward/"
             "backward launch (1 = not split)."]
    return notes, rows


def tune_part(args: argparse.Namespace) -> tuple[list[str], list[dict]]:
    from mambazoo.ops import triton_scan

    defaults = dict(triton_scan.TUNING)
    variations = [dict()]
    variations += [dict(forward_block_d=16), dict(backward_block_d=16)]
    variations += [dict(forward_stages=stages) for stages in (1, 2, 4)]
    variations += [dict(backward_stages=stages) for stages in (1, 3)]
    variations += [dict(target_programs_per_sm=target) for target in (4, 16)]
    variations += [dict(split_below_programs_per_sm=8)]
    rows = []
    for batch, length in ((Sizes.batches[-1], Sizes.lengths[1]), (Sizes.batches[0], Sizes.lengths[-1])):
        for change in variations:
            triton_scan.TUNING.update(defaults, **change)
            times = interleaved(scan_callables(batch, length, torch.float32), args.rounds)
            rows.append(dict(batch=batch, length=length, change=", ".join(f"{k}={v}" for k, v in change.items())
                             or "defaults", fwd_ms=round(statistics.median(times["fwd"]), 4),
                             fwd_bwd_ms=round(statistics.median(times["fwd_bwd"]), 4)))
            print(rows[-1], flush=True)
    triton_scan.TUNING.update(defaults)
    notes = [f"Defaults: {defaults}. float32, D = {Sizes.dim}, N = 16; median of {args.rounds} rounds per "
             "configuration (configurations run one after the other, so compare within a shape only)."]
    return notes, rows


# ----------------------------------------------------------------------------------------------------------------------
# Models and profile
# ----------------------------------------------------------------------------------------------------------------------

def models_part(args: argparse.Namespace) -> tuple[list[str], list[dict]]:
    common = dict(device=DEVICE, precision="amp", amp_dtype="bfloat16", repeats=args.model_rounds,
                  num_warm_iter=3, num_bench_iter=args.model_iters, progress=False)
    vim, deit, size = Sizes.vim, Sizes.deit, Sizes.resolutions[0]
    rows = bench.sweep([vim, f"{deit}:math", deit], list(Sizes.resolutions), batch_size=Sizes.model_batch,
                       baseline=deit, **common)
    others = ["vim_small_patch16_224", "plainmamba_l1", "mambaout_femto", "deit_small_patch16_224"]
    others = others if DEVICE == "cuda" else ["test_plainmamba", "test_mambaout"]
    rows += bench.sweep(others + [deit], [size if DEVICE == "cuda" else 64], batch_size=Sizes.model_batch,
                        baseline=deit, **common)
    for name in (vim, deit):
        row = bench.benchmark(name, batch_size=Sizes.train_batch, img_size=size, bench="train", device=DEVICE,
                              precision="amp", amp_dtype="bfloat16", num_warm_iter=3,
                              num_bench_iter=args.model_iters, count_gmacs=False)
        rows.append(dict(row, label=f"{name} (train)"))
        print(rows[-1], flush=True)
    notes = ["Inference: bf16 autocast, batch 64, `mambazoo.bench.sweep` (timm benchmark.py method, models "
             f"interleaved per resolution, {args.model_rounds} rounds of {args.model_iters} steps; "
             "speed_vs_baseline = median per-round ratio vs DeiT-Ti with fused SDPA attention). Training: batch 128, "
             "224 px, bf16 autocast, SGD step (`mambazoo.bench.benchmark`). Peak memory = torch.cuda max allocated."]
    return notes, rows


def profile_part(args: argparse.Namespace) -> tuple[list[str], list[dict]]:
    import timm
    from torch.profiler import ProfilerActivity, profile

    size = Sizes.resolutions[0]
    model = timm.create_model(Sizes.profile_model, img_size=size).to(DEVICE).train()
    images = torch.randn(Sizes.train_batch, 3, size, size, device=DEVICE)
    targets = torch.randint(0, model.num_classes, (Sizes.train_batch,), device=DEVICE)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(images), targets)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(3):
            step()
        synchronize()
    # GPU kernels by their device time; on CPU (smoke runs) the operators by their own CPU time.
    own_time = (lambda e: e.self_device_time_total) if DEVICE == "cuda" else (lambda e: e.self_cpu_time_total)
    events = [event for event in profiler.key_averages() if own_time(event) > 0]
    total = sum(own_time(event) for event in events)
    events.sort(key=lambda event: -own_time(event))
    rows = [dict(kernel=event.key[:90], calls=event.count // 3, ms_per_step=round(own_time(event) / 3 / 1000, 3),
                 share_pct=round(100 * own_time(event) / total, 1)) for event in events[:30]]
    notes = [f"{Sizes.profile_model} training step, batch {Sizes.train_batch}, {size} px, bf16 autocast, SGD; 3 "
             f"profiled steps after 3 warm-up steps. {DEVICE.upper()} time per step: {total / 3 / 1000:.2f} ms (sum of "
             "kernel self times). Top 30 by time."]
    return notes, rows


# ----------------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------------

def machine() -> dict:
    import triton

    description = dict(bench.machine_description(DEVICE), triton=triton.__version__)
    if DEVICE == "cuda":
        properties = torch.cuda.get_device_properties(0)
        description.update(gpu_memory_gib=round(properties.total_memory / 2**30),
                           sms=properties.multi_processor_count, cuda=torch.version.cuda)
    return description


def write(out: Path, part: str, notes: list[str], rows: list[dict], seconds: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = machine()
    text = "\n".join([f"# GPU check: {part}", "", *(f"* **{k}**: {v}" for k, v in meta.items()), "", *notes, "",
                      f"Wall time of this part: {seconds:.0f} s.", "", bench.markdown_table(rows), ""])
    for suffix, content in ((".md", text), (".json", json.dumps(dict(meta=meta, notes=notes, results=rows),
                                                                indent=2) + "\n")):
        with tempfile.NamedTemporaryFile("w", dir=out, delete=False, suffix=".tmp") as handle:
            handle.write(content)
        os.replace(handle.name, out / f"{part}{suffix}")
    print(f"wrote {out / part}.md", flush=True)


PARTS = dict(kernels=kernels_part, tune=tune_part, models=models_part, profile=profile_part)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=[*PARTS, "all"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds per kernel shape")
    parser.add_argument("--model-rounds", type=int, default=3, help="interleaved rounds per resolution (models)")
    parser.add_argument("--model-iters", type=int, default=10, help="timed steps per model and round")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the script (CPU: TRITON_INTERPRET=1)")
    args = parser.parse_args()
    if args.smoke:
        Sizes.smoke()
    elif DEVICE != "cuda":
        sys.exit("scan_gpu.py needs a CUDA device (none found); the CPU scan benchmark is benchmarks/scan.py")
    if DEVICE != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("without a GPU the smoke run needs TRITON_INTERPRET=1 (the Triton kernels run interpreted)")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    for part in PARTS if args.part == "all" else [args.part]:
        started = time.perf_counter()
        notes, rows = PARTS[part](args)
        write(args.out, part, notes, rows, time.perf_counter() - started)


if __name__ == "__main__":
    main()

"""Vim-Ti vs DeiT-Ti on CPU: batch 1, fp32, ``inference_mode``; images/s and peak activation memory.

Speed: both models in one process, interleaved round-robin (each round times ``iters`` forwards of each model after
the warm-up); the table gives median ms per image, images/s and the median over rounds of the per-round ratio
(Vim images/s / DeiT images/s), so drift in machine load cancels, and the median minor page faults per image (memory
the allocator mapped afresh). The process's allocator settings are printed first: at 1248 px glibc's defaults make
Vim-Ti re-fault hundreds of MB per image (docs/benchmarks.md, "Allocator"); run it once more with
``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296`` to see the models without that churn.

Speed again, one process per model: each round starts a fresh process for DeiT-Ti, then one for Vim-Ti; each builds
its model, warms up and reports the median of three timings of ``iters`` forwards. The ratio is again the median over
rounds of the per-round ratio. This is how a deployment runs one model; in the shared process the two models' frees
and allocations also change each other's heap (at 1248 px glibc then trims and re-faults Vim-Ti's temporaries).

Memory: one fresh subprocess per (model, size). After building the model and the input, the process resets its peak
RSS (``/proc/self/clear_refs``), runs one forward and reports VmHWM − RSS before the forward, measured identically
for both models. Two allocator settings: the one the script runs with (with glibc's defaults its mmap threshold grows
after large frees, so freed activations stay resident and the number includes that slack), and a fixed 128 KiB mmap/trim
threshold (``MALLOC_MMAP_THRESHOLD_``), with which freed activations go back to the OS and the peak tracks the
live activations.

Training: ``--train`` profiles one forward+backward of Vim-Ti at 224 and reports which scan backward op ran.

Usage: python benchmarks/vim_cpu.py [--sizes 224 1248] [--rounds 5] [--train]
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import timm

import mambazoo  # noqa: F401  (registers the Vim models)

MODELS = {"deit_tiny": "deit_tiny_patch16_224", "vim_tiny": "vim_tiny_patch16_224"}


def build(name: str, size: int) -> torch.nn.Module:
    return timm.create_model(MODELS[name], img_size=size).eval()


def time_forward(model: torch.nn.Module, x: torch.Tensor, iters: int) -> float:
    """Seconds per forward, averaged over ``iters`` calls."""
    return time_and_faults(model, x, iters)[0]


def time_and_faults(model: torch.nn.Module, x: torch.Tensor, iters: int) -> tuple[float, float]:
    """Seconds and minor page faults of the process per forward, averaged over ``iters`` calls under
    ``inference_mode``. Page faults count fresh memory the allocator had to map (docs/benchmarks.md, allocator)."""
    with torch.inference_mode():
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        elapsed = time.perf_counter() - start
        return elapsed / iters, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / iters


def allocator_description() -> str:
    """The allocator settings of this process: the glibc tunables and preloads that change how freed memory is kept."""
    settings = {name: value for name, value in os.environ.items()
                if name.startswith("MALLOC_") or name in ("LD_PRELOAD", "GLIBC_TUNABLES")}
    described = ", ".join(f"{name}={value}" for name, value in sorted(settings.items()))
    return f"* allocator: {described or 'glibc malloc with its defaults (no MALLOC_* variable, no LD_PRELOAD)'}"


def speed(size: int, rounds: int) -> dict:
    models = {name: build(name, size) for name in MODELS}
    x = torch.randn(1, 3, size, size)
    iters = max(1, round(4e5 / size ** 2 * 2))  # ~16 forwards at 224, 1 at 1248
    for model in models.values():
        time_forward(model, x, 2)  # warm-up
    times, faults = {name: [] for name in models}, {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            seconds, page_faults = time_and_faults(model, x, iters)
            times[name].append(seconds)
            faults[name].append(page_faults)
    ratios = [deit / vim for deit, vim in zip(times["deit_tiny"], times["vim_tiny"])]
    return dict(size=size, iters=iters, rounds=rounds,
                ms={name: 1e3 * statistics.median(t) for name, t in times.items()},
                ms_range={name: (1e3 * min(t), 1e3 * max(t)) for name, t in times.items()},
                faults={name: statistics.median(f) for name, f in faults.items()},
                ratio=statistics.median(ratios), ratio_range=(min(ratios), max(ratios)))


def speed_child(name: str, size: int, iters: int) -> None:
    """Runs in a fresh process: print the median ms per forward and page faults per forward over three timings."""
    model, x = build(name, size), torch.randn(1, 3, size, size)
    time_forward(model, x, 2)  # warm-up
    timings = sorted(time_and_faults(model, x, iters) for _ in range(3))
    print(json.dumps([1e3 * timings[1][0], timings[1][1]]))


def speed_separate(size: int, rounds: int) -> dict:
    """Per-round ratio of two fresh processes, one per model (see the module docstring)."""
    iters = max(1, round(4e5 / size ** 2 * 2))
    ms, faults = {name: [] for name in MODELS}, {name: [] for name in MODELS}
    for _ in range(rounds):
        for name in MODELS:
            out = subprocess.run([sys.executable, __file__, "--speed-child", name, str(size), str(iters)], check=True,
                                 capture_output=True, text=True).stdout
            milliseconds, page_faults = json.loads(out.strip().splitlines()[-1])
            ms[name].append(milliseconds)
            faults[name].append(page_faults)
    ratios = [deit / vim for deit, vim in zip(ms["deit_tiny"], ms["vim_tiny"])]
    return dict(ms={name: statistics.median(t) for name, t in ms.items()},
                faults={name: statistics.median(f) for name, f in faults.items()},
                ratio=statistics.median(ratios), ratio_range=(min(ratios), max(ratios)))


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(name: str, size: int) -> None:
    """Runs in a fresh process: print the peak RSS increase (MB) of one forward."""
    model = build(name, size)
    x = torch.randn(1, 3, size, size)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current RSS
    before = _rss_kb("VmRSS")
    with torch.inference_mode():
        model(x)
    print(json.dumps((_rss_kb("VmHWM") - before) / 1024))


FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def memory(name: str, size: int, env: dict) -> float:
    out = subprocess.run([sys.executable, __file__, "--memory-child", name, str(size)], check=True,
                         capture_output=True, text=True, env={**os.environ, **env}).stdout
    return json.loads(out.strip().splitlines()[-1])


def train_profile() -> None:
    model = timm.create_model("vim_tiny_patch16_224").train()
    x = torch.randn(1, 3, 224, 224)
    model(x).sum().backward()  # warm-up
    with torch.profiler.profile() as prof:
        start = time.perf_counter()
        model(x).sum().backward()
        elapsed = time.perf_counter() - start
    counts = {e.key: e.count for e in prof.key_averages() if e.key.startswith("mambazoo::")}
    print(f"\nTraining-mode forward+backward, Vim-Ti, 224 px, batch 1: {1e3 * elapsed:.0f} ms (profiled)")
    print("| op | calls |\n|---|---|")
    for key, count in sorted(counts.items()):
        print(f"| `{key}` | {count} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 1248])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL", "SIZE"), help=argparse.SUPPRESS)
    parser.add_argument("--speed-child", nargs=3, metavar=("MODEL", "SIZE", "ITERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]))
        return
    if args.speed_child:
        speed_child(args.speed_child[0], int(args.speed_child[1]), int(args.speed_child[2]))
        return
    print(f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, scan backends {mambazoo.available_backends()}")
    print(allocator_description())
    print("\n| px | protocol | DeiT-Ti ms (img/s) | Vim-Ti ms (img/s) | Vim/DeiT img/s, median [min-max] | "
          "page faults per image DeiT / Vim | peak MB DeiT / Vim (allocator as run) | "
          "peak MB DeiT / Vim (fixed mmap threshold) |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        mem = {name: memory(name, size, {}) for name in MODELS}
        fixed = {name: memory(name, size, FIXED_MMAP_THRESHOLD) for name in MODELS}
        for protocol, result in (("one process, interleaved", speed(size, args.rounds)),
                                 ("one process per model", speed_separate(size, args.rounds))):
            deit, vim = result["ms"]["deit_tiny"], result["ms"]["vim_tiny"]
            low, high = result["ratio_range"]
            print(f"| {size} | {protocol} | {deit:.1f} ({1e3 / deit:.2f}) | {vim:.1f} ({1e3 / vim:.2f}) | "
                  f"x{result['ratio']:.2f} [{low:.2f}-{high:.2f}] | "
                  f"{result['faults']['deit_tiny']:.0f} / {result['faults']['vim_tiny']:.0f} | "
                  f"{mem['deit_tiny']:.0f} / {mem['vim_tiny']:.0f} | "
                  f"{fixed['deit_tiny']:.0f} / {fixed['vim_tiny']:.0f} |",
                  flush=True)
    if args.train:
        train_profile()


if __name__ == "__main__":
    main()

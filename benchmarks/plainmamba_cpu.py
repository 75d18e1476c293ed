"""PlainMamba on CPU: FLOPs of L1/L2/L3 at 224 vs the paper, and PlainMamba-L1 vs DeiT-Ti and Vim-Ti images/s.

FLOPs: conv + linear MACs plus 9·B·L·E·N per selective-scan call (``mambazoo.flops``, counted on the meta device),
next to the paper's 3.0 / 8.1 / 14.4 G.

Speed: batch 1, fp32, ``inference_mode``, all models in one process, interleaved round-robin (each round times
``iters`` forwards of every model after a warm-up). The table gives the median ms per image, images/s and the median
over rounds of the per-round ratio PlainMamba-L1 img/s / model img/s, so drift in machine load cancels. Vim-Ti is
skipped when ``vim_tiny_patch16_224`` is not registered.

Usage: python benchmarks/plainmamba_cpu.py [--sizes 224 1024] [--rounds 5]
"""
import argparse
import platform
import statistics

import timm
import torch

import mambazoo  # noqa: F401  (registers the models)
from mambazoo.flops import count_model_macs
from vim_cpu import time_forward  # the same timing as the Vim benchmark (scripts share this folder)

MODELS = {"PlainMamba-L1": "plainmamba_l1", "DeiT-Ti": "deit_tiny_patch16_224", "Vim-Ti": "vim_tiny_patch16_224"}
PUBLISHED_GFLOPS = {"plainmamba_l1": 3.0, "plainmamba_l2": 8.1, "plainmamba_l3": 14.4}


def flops_table() -> None:
    print("\n| model | conv+linear GMACs | scan GMACs | total G | paper G |\n|---|---|---|---|---|")
    for name, published in PUBLISHED_GFLOPS.items():
        count = count_model_macs(timm.create_model(name, device="meta"))
        print(f"| {name} | {(count.total - count.scan) / 1e9:.3f} | {count.scan / 1e9:.3f} | {count.gmacs:.3f} | "
              f"{published} |", flush=True)


def speed_table(sizes: list[int], rounds: int) -> None:
    names = [name for name, arch in MODELS.items() if timm.is_model(arch)]
    others = [name for name in names if name != "PlainMamba-L1"]
    print("\n| px | " + " | ".join(f"{n} ms (img/s)" for n in names) + " | "
          + " | ".join(f"L1/{n} img/s, median [min-max]" for n in others) + " |")
    print("|---" * (len(names) + len(others) + 1) + "|")
    for size in sizes:
        models = {name: timm.create_model(MODELS[name], img_size=size).eval() for name in names}
        x = torch.randn(1, 3, size, size)
        iters = max(1, round(8e5 / size ** 2))  # ~16 forwards at 224, 1 at 1024
        for model in models.values():
            time_forward(model, x, 1)  # warm-up
        times = {name: [] for name in names}
        for _ in range(rounds):
            for name, model in models.items():
                times[name].append(time_forward(model, x, iters))
        ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        cells = [f"{ms[n]:.1f} ({1e3 / ms[n]:.2f})" for n in names]
        for other in others:
            ratios = [o / l1 for o, l1 in zip(times[other], times["PlainMamba-L1"])]
            cells.append(f"x{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]")
        print(f"| {size} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 1024])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, scan backends {mambazoo.available_backends()}")
    flops_table()
    speed_table(args.sizes, args.rounds)


if __name__ == "__main__":
    main()

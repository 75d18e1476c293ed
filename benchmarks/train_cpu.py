"""Training throughput on CPU through the engine (``mambazoo train``) vs the raw train step (``mambazoo bench``).

Models: Vim-Ti, PlainMamba-L1, DeiT-Ti at 224 px, batch 8, fp32.

* **raw**: :func:`mambazoo.bench.benchmark` with ``bench="train"`` (timm ``benchmark.py``'s step: one random input
  tensor reused, cross-entropy on random targets, SGD lr 1e-4): zero_grad, forward, backward, step; nothing else.
* **engine**: :func:`mambazoo.training.train` on a synthetic ImageFolder of PNG images at the input size: PNG decode
  and timm's training transforms (random-resized crop, flip, colour jitter, normalise) in the loader, label
  smoothing off, SGD lr 1e-4 without weight decay, 1000-class head like the raw step, ``--workers`` loader
  processes (default 0: data preparation runs in the training process and counts against the loop). Its
  throughput is ``train_samples_per_sec`` of the second epoch (the first is warm-up); evaluation is not timed.

Interleaved: each round measures every model raw, then through the engine. Reported: medians over rounds and the
median per-round ratio engine / raw (the loop's overhead shows as ratio < 1).

Usage (the committed result)::

    python benchmarks/train_cpu.py
    python benchmarks/train_cpu.py --img-size 64 --steps 2 --warm-iter 1 --repeats 1 --out-dir /tmp/smoke  # smoke
"""
import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from mambazoo.bench import benchmark, machine_description, markdown_table, write_results
from mambazoo.training import train

MODELS = ("vim_tiny_patch16_224", "plainmamba_l1", "deit_tiny_patch16_224")


def make_image_folder(root: Path, num_train: int, num_val: int, size: int) -> Path:
    """Random RGB PNGs in two classes: ``root/train/<class>/*.png`` and ``root/val/<class>/*.png``."""
    rng = np.random.default_rng(0)
    for split, count in (("train", num_train), ("val", num_val)):
        for index in range(count):
            folder = root / split / f"class{index % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{index:05d}.png")
    return root


def engine_throughput(model: str, data: Path, out: Path, args: argparse.Namespace) -> float:
    """Images/s of the engine's second epoch."""
    result = train(["--model", model, "--data-dir", str(data), "--img-size", str(args.img_size), "--num-classes",
                    "1000", "-b", str(args.batch_size), "--epochs", "2", "--opt", "sgd", "--lr", "1e-4",
                    "--weight-decay", "0", "--smoothing", "0", "--warmup-epochs", "0", "-j", str(args.workers),
                    "--checkpoint-hist", "1", "--no-progress", "--output", str(out)])
    return result.history[-1]["train_samples_per_sec"]


def raw_throughput(model: str, args: argparse.Namespace) -> float:
    """Images/s of timm benchmark.py's train step."""
    row = benchmark(model, batch_size=args.batch_size, img_size=args.img_size, bench="train",
                    num_warm_iter=args.warm_iter, num_bench_iter=args.steps, count_gmacs=False)
    return row["train_samples_per_sec"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("-b", "--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (raw) and steps per epoch (engine)")
    parser.add_argument("--warm-iter", type=int, default=3, help="raw warm-up steps")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("-j", "--workers", type=int, default=0, help="engine loader processes")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    raw = {model: [] for model in args.models}
    engine = {model: [] for model in args.models}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_image_folder(Path(tmp) / "data", args.steps * args.batch_size, args.batch_size, args.img_size)
        for round_index in range(args.repeats):
            for model in args.models:
                raw[model].append(raw_throughput(model, args))
                engine[model].append(engine_throughput(model, data, Path(tmp) / f"{model}-{round_index}", args))
                print(f"round {round_index + 1}/{args.repeats} {model}: raw {raw[model][-1]:.3g} img/s, "
                      f"engine {engine[model][-1]:.3g} img/s", flush=True)
    rows = []
    for model in args.models:
        ratios = [e / r for e, r in zip(engine[model], raw[model])]
        rows.append(dict(model=model, img_size=args.img_size, batch_size=args.batch_size,
                         raw_train_samples_per_sec=round(statistics.median(raw[model]), 2),
                         engine_train_samples_per_sec=round(statistics.median(engine[model]), 2),
                         engine_vs_raw=round(statistics.median(ratios), 3),
                         raw_rounds=" ".join(f"{v:.3g}" for v in raw[model]),
                         engine_rounds=" ".join(f"{v:.3g}" for v in engine[model])))
    print(markdown_table(rows))
    meta = dict(machine=machine_description("cpu"),
                method=f"fp32, batch {args.batch_size}, {args.img_size} px; raw = mambazoo bench --bench train "
                       f"({args.warm_iter} warm-up + {args.steps} timed steps); engine = mambazoo train, 2 epochs of "
                       f"{args.steps} steps on synthetic PNGs, -j {args.workers}, second epoch's img/s; "
                       f"{args.repeats} interleaved rounds, medians; engine_vs_raw = median per-round ratio")
    for path in write_results(rows, args.out_dir, "train_cpu", meta, plot=False):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Dense training throughput on CPU through the engine (``mambazoo train --task ...``) vs the raw train step.

Configurations: Mask R-CNN + FPN (``--task detection``) and UperNet + auxiliary head (``--task segmentation``) at
the papers' head widths, on square composite images (``--img-size``, default 256 px), batch 2, fp32, AdamW.

* **raw**: the task's own ``training_step`` on one fixed, already transformed batch (forward with the losses,
  backward, optimiser step, zero_grad), timed with ``mambazoo.bench.measure``; nothing else.
* **engine**: :func:`mambazoo.training.train` on a glyph composite written at the image size: PNG decode, COCO
  mask decoding or mask reading and the task's training transforms in the loader (``--workers`` processes, default
  0: in the training process), the schedule, progress bookkeeping; the throughput is ``train_samples_per_sec`` of
  the second epoch (the first is warm-up); evaluation and checkpoint writes are not timed.

Interleaved: each round measures every (task, model) raw, then through the engine. Reported: medians over rounds
and the median per-round ratio engine / raw (the loop's overhead shows as a ratio below 1). Results with the machine
description go to ``benchmarks/results/dense_train_cpu.{csv,json,md}``.

Usage (the committed result)::

    python benchmarks/dense_train_cpu.py
    python benchmarks/dense_train_cpu.py --models test_vim --img-size 64 --steps 2 --repeats 1 --out-dir /tmp/x
"""
import argparse
import statistics
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Optional, Sequence

import torch
from timm.models import is_model

import mambazoo
from mambazoo import bench
from mambazoo.dense.synthetic import write_composite
from mambazoo.training import train
from mambazoo.training.config import parse_train_args
from mambazoo.training.distributed import Distributed
from mambazoo.training.tasks import TaskContext, get_task

MODELS = ("vim_tiny_patch16_224", "plainmamba_l1", "mambaout_femto", "mambavision_t", "spatialmamba_t",
          "deit_tiny_patch16_224", "convnext_tiny")
TASKS = ("detection", "segmentation")


def task_flags(task: str, model: str, data: Path, args: argparse.Namespace) -> list[str]:
    """The ``mambazoo train`` flags of one configuration (both measurements use them)."""
    size = str(args.img_size)
    sizes = ["--min-size", size, "--max-size", size] if task == "detection" else ["--crop-size", size]
    return ["--task", task, "--model", model, "--data-dir", str(data), "-b", str(args.batch_size), "--epochs", "2",
            "--lr", "1e-4", "--warmup-steps", "0", "--hflip", "0.5", "-j", str(args.workers), "--checkpoint-hist",
            "1", "--no-progress", *sizes]


def engine_throughput(flags: list[str], out: Path) -> float:
    """Images/s of the engine's second epoch."""
    return train(flags + ["--output", str(out)]).history[-1]["train_samples_per_sec"]


def raw_throughput(flags: list[str], args: argparse.Namespace) -> float:
    """Images/s of the task's training step on one fixed batch."""
    config, _ = parse_train_args(flags)
    task = get_task(config.task)(config, TaskContext(Distributed(), nullcontext))
    datasets = task.build_datasets()
    model = task.build_model(datasets)
    task.attach_transforms(model, datasets)
    batch = task.collate_fn(True)([datasets.train[index] for index in range(args.batch_size)])
    optimizer = torch.optim.AdamW(task.optimizer_params(model), lr=1e-4)
    model.train()

    def step() -> None:
        loss, _ = task.training_step(model, batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return bench.measure(step, torch.device("cpu"), args.batch_size, args.warm_iter, args.steps)["samples_per_sec"]


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    """Run the rounds, print the table, write the results; returns the rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("-b", "--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="timed steps (raw) and steps per epoch (engine)")
    parser.add_argument("--warm-iter", type=int, default=1, help="raw warm-up steps")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("-j", "--workers", type=int, default=0, help="engine loader processes")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    mambazoo.list_models()  # register every family that has landed
    models = [name for name in args.models if is_model(name)]
    if len(models) < len(args.models):
        print(f"not registered (skipped): {', '.join(sorted(set(args.models) - set(models)))}")
    configs = [(task, model) for task in args.tasks for model in models]
    raw, engine = {config: [] for config in configs}, {config: [] for config in configs}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_composite(Path(tmp) / "data", dict(train=args.steps * args.batch_size, val=args.batch_size),
                               image_size=args.img_size, objects=(2, 5), scales=(2, max(2, args.img_size // 32)))
        for round_index in range(args.repeats):
            for task, model in configs:
                flags = task_flags(task, model, data, args)
                raw[task, model].append(raw_throughput(flags, args))
                engine[task, model].append(engine_throughput(flags, Path(tmp) / f"{task}-{model}-{round_index}"))
                print(f"round {round_index + 1}/{args.repeats} {task} {model}: raw {raw[task, model][-1]:.3g} img/s, "
                      f"engine {engine[task, model][-1]:.3g} img/s", flush=True)
    rows = []
    for config in configs:
        ratios = [e / r for e, r in zip(engine[config], raw[config])]
        rows.append(dict(task=config[0], model=config[1], img_size=args.img_size, batch_size=args.batch_size,
                         raw_train_samples_per_sec=float(f"{statistics.median(raw[config]):.4g}"),
                         engine_train_samples_per_sec=float(f"{statistics.median(engine[config]):.4g}"),
                         engine_vs_raw=round(statistics.median(ratios), 3),
                         raw_rounds=" ".join(f"{v:.3g}" for v in raw[config]),
                         engine_rounds=" ".join(f"{v:.3g}" for v in engine[config])))
    print(bench.markdown_table(rows))
    meta = dict(machine=bench.machine_description("cpu"),
                method=f"fp32, batch {args.batch_size}, {args.img_size} px composite images, AdamW lr 1e-4; raw = "
                       f"the task's training_step on one fixed batch ({args.warm_iter} warm-up + {args.steps} timed "
                       f"steps); engine = mambazoo train, 2 epochs of {args.steps} steps, -j {args.workers}, second "
                       f"epoch's img/s; {args.repeats} interleaved rounds, medians; engine_vs_raw = median per-round "
                       "ratio",
                command="python benchmarks/dense_train_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    for path in bench.write_results(rows, args.out_dir, "dense_train_cpu", meta, plot=False):
        print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()

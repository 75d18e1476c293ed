"""``mambazoo validate``: timm ``validate.py`` semantics (top-1, top-5, loss, img/s) for any weights, and the
evaluation of any task's weights or training run (``--task``; e.g. COCO box/mask AP, mIoU).

Weights come from ``--pretrained`` (the hub or ``--pretrained-path``), ``--checkpoint`` (ours or an official file)
or a training output folder, whose recorded configuration (model, task, classes, input size, data config, dataset)
is reused so that the metric the run reported is reproduced exactly.
"""
import argparse
import csv
import io
import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from timm.data import create_transform, resolve_data_config

from ..zoo import check_model_name, create_model, create_model_for_size
from ..checkpoint import write_text
from .checkpoints import load_model_weights, resolve_weights_file
from .classification import ClassificationTask, add_data_config_arguments, data_config_args
from .config import load_run_config, parse_train_args
from .data import build_classification_datasets, create_eval_loader
from .distributed import Distributed, init_distributed
from .tasks import Task, TaskContext, get_task

__all__ = ["build_validate_parser", "validate", "validate_task"]


def _task_flags(task: Optional[type[Task]]) -> list[argparse.ArgumentParser]:
    """A parent parser with the task's own training flags, defaults suppressed (only given flags are set); none for
    classification, whose evaluation flags are ``validate``'s own."""
    if task is None or task.name == "classification":
        return []
    parser = argparse.ArgumentParser(add_help=False)
    task.add_arguments(parser)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return [parser]


def build_validate_parser(prog: str = "mambazoo validate", task: Optional[type[Task]] = None
                          ) -> argparse.ArgumentParser:
    """The ``validate`` flags (timm ``validate.py`` names), plus the flags of ``task`` other than classification."""
    parser = argparse.ArgumentParser(
        prog=prog, parents=_task_flags(task),
        description="Evaluate weights or a training run: top-1, top-5, loss and img/s of a classifier; COCO box/mask "
                    "AP (detection) or mIoU (segmentation).",
        epilog="Another task (--task or a run's) also takes that task's training flags, e.g. --test-mode slide "
               "--test-stride 341 for segmentation. Details: docs/training.md, docs/dense.md")
    parser.add_argument("run", nargs="?", default=None,
                        help="a training output folder (its model, task, classes, data and best checkpoint are used)")
    parser.add_argument("--task", default=None,
                        help="classification, detection or segmentation (default: the run's, else classification)")
    parser.add_argument("--model", default=None, help="model name")
    parser.add_argument("--pretrained", action="store_true", help="official weights from the timm hub")
    parser.add_argument("--pretrained-path", default=None, metavar="FILE", help="official weights file (offline)")
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="weights: a file (ours or official) or a training output folder")
    parser.add_argument("--which", default="best", choices=("best", "last"), help="checkpoint of an output folder")
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument("--use-ema", dest="use_ema", action="store_true", default=None,
                     help="EMA weights of an output folder (default: those the run ranked by)")
    ema.add_argument("--no-ema", dest="use_ema", action="store_false", help="the raw (non-EMA) weights")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="ImageFolder root (its val/ or validation/ split is used)")
    parser.add_argument("--dataset", default=None, help="digits | fashion-mnist | folder (default: folder)")
    parser.add_argument("--num-classes", type=int, default=None, help="classes (default: the data's)")
    parser.add_argument("-b", "--batch-size", type=int, default=None, metavar="N",
                        help="global batch (default: the run's evaluation batch, else 256)")
    parser.add_argument("-j", "--workers", type=int, default=4)
    add_data_config_arguments(parser)
    parser.add_argument("--use-train-size", action="store_true", help="the train input size, not test_input_size")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--amp-dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND")
    parser.add_argument("--device", default=None)
    parser.add_argument("--results-file", default=None, metavar="FILE", help="write the results (json or csv)")
    parser.add_argument("--results-format", default="json", choices=("json", "csv"))
    return parser


def _from_run(args: argparse.Namespace) -> Optional[dict[str, Any]]:
    """Fill unset flags from a training output folder; returns the run's recorded data config."""
    if not args.run:
        return None
    config = load_run_config(Path(args.run))
    saved = config["args"]
    for name in ("model", "num_classes", "img_size", "dataset", "data_dir"):
        if getattr(args, name) is None:
            setattr(args, name, saved[name])
    if args.batch_size is None:
        args.batch_size = saved["validation_batch_size"] or saved["batch_size"]
    if args.checkpoint is None:
        args.checkpoint = str(resolve_weights_file(args.run, args.which, args.use_ema))
    return config["data"]


def _build_model(args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    check_model_name(args.model)
    from_hub = args.pretrained and not args.pretrained_path
    kwargs = dict(num_classes=num_classes, pretrained=from_hub)
    model = create_model_for_size(args.model, args.img_size, **kwargs) if args.img_size \
        else create_model(args.model, **kwargs)
    weights = args.checkpoint or args.pretrained_path
    if weights:
        path = resolve_weights_file(weights, args.which, args.use_ema)
        load_model_weights(model, path)
        args.checkpoint = str(path)
    return model


def _task_of(argv: Sequence[str]) -> type[Task]:
    """The task to evaluate: ``--task``, else the run folder's, else classification."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task", default=None)
    name = pre.parse_known_args(list(argv))[0].task
    if name is None:
        run = build_validate_parser().parse_known_args(list(argv))[0].run
        if run and (Path(run) / "config.json").is_file():
            name = load_run_config(Path(run))["args"].get("task", "classification")
    return get_task(name or "classification")


def validate(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run ``mambazoo validate`` with command-line flags; returns the results (also printed by rank 0)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    task = _task_of(argv)
    args = build_validate_parser(task=task).parse_args(argv)
    if args.run:
        saved = load_run_config(Path(args.run))["args"].get("task", "classification")
        if saved != task.name:
            raise ValueError(f"--task {task.name}: {args.run} is a {saved} run")
    if task.name != "classification":
        return validate_task(task, args)
    run_data_config = _from_run(args)
    if not args.model:
        raise ValueError("--model is required (or give a training output folder)")
    dist = init_distributed(args.device)
    batch = args.batch_size or 256
    if batch % dist.world_size:
        raise ValueError(f"--batch-size {batch} is not divisible by the world size {dist.world_size}")
    datasets = build_classification_datasets(args.dataset or "folder", args.data_dir, splits=("val",))
    num_classes = args.num_classes or len(datasets.classes)
    if num_classes < len(datasets.classes):
        raise ValueError(f"--num-classes {num_classes} is smaller than the {len(datasets.classes)} classes of the data")
    model = _build_model(args, num_classes)
    config = run_data_config or resolve_data_config(data_config_args(args), model=model,
                                                    use_test_size=not args.use_train_size)
    config = dict(config, input_size=tuple(config["input_size"]), mean=tuple(config["mean"]),
                  std=tuple(config["std"]))
    datasets.val.transform = create_transform(**config, is_training=False)
    loader = create_eval_loader(datasets.val, batch // dist.world_size, dist.world_size, dist.rank, args.workers,
                                pin_memory=dist.device.type == "cuda")
    model.to(dist.device).eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    params = sum(p.numel() for p in model.parameters())
    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile)

    def autocast():
        return torch.autocast(dist.device.type, dtype=getattr(torch, args.amp_dtype), enabled=args.amp)

    task = ClassificationTask(args, TaskContext(dist, autocast, args.channels_last))
    start = time.perf_counter()
    with torch.inference_mode():
        metrics = task.evaluate(model, loader)
    seconds = time.perf_counter() - start
    results = dict(model=args.model, top1=metrics["top1"], top5=metrics["top5"], loss=metrics["loss"],
                   samples=len(datasets.val),
                   samples_per_sec=round(len(datasets.val) / seconds, 2), param_count=round(params / 1e6, 3),
                   img_size=config["input_size"][-1], crop_pct=config["crop_pct"],
                   interpolation=config["interpolation"], checkpoint=args.checkpoint, world_size=dist.world_size)
    _report(results, args, dist)
    return results


def _task_args(task: type[Task], args: argparse.Namespace) -> argparse.Namespace:
    """The task's configuration: a run's saved flags or the task's defaults (with ``--model``), then the task flags
    given here; the weights to evaluate become ``initial_checkpoint``."""
    if args.run:
        config = argparse.Namespace(**load_run_config(Path(args.run))["args"])
        weights = args.checkpoint or resolve_weights_file(args.run, args.which, args.use_ema)
    else:
        if not args.model or not args.checkpoint:
            raise ValueError(f"--task {task.name} evaluates a run folder, or --model with --checkpoint (the weights "
                             f"of the whole {task.name} model)")
        config = parse_train_args(["--task", task.name, "--model", args.model])[0]
        weights = args.checkpoint
    own = set(vars(build_validate_parser().parse_args([])))
    for name, value in vars(args).items():
        if name not in own:  # a task flag given here (the task's flags are only set when given)
            setattr(config, name, value)
    for name in ("data_dir", "dataset", "num_classes"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    config.initial_checkpoint, config.pretrained, config.pretrained_path = str(weights), False, None
    if hasattr(config, "backbone_checkpoint"):
        config.backbone_checkpoint = None
    return config


def validate_task(task_cls: type[Task], args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate a task's model (a run folder, or ``--model`` with ``--checkpoint``) with the task's own metrics."""
    config = _task_args(task_cls, args)
    dist = init_distributed(args.device)
    batch = args.batch_size or config.validation_batch_size or config.batch_size
    if batch % dist.world_size:
        raise ValueError(f"--batch-size {batch} is not divisible by the world size {dist.world_size}")
    amp = args.amp or config.amp

    def autocast():
        return torch.autocast(dist.device.type, dtype=getattr(torch, args.amp_dtype), enabled=amp)

    task = task_cls(config, TaskContext(dist, autocast, args.channels_last))
    datasets = task.build_validation_data()
    model = task.build_model(datasets)
    task.attach_transforms(model, datasets)
    loader = create_eval_loader(datasets.val, batch // dist.world_size, dist.world_size, dist.rank, args.workers,
                                task.collate_fn(False), pin_memory=dist.device.type == "cuda")
    model.to(dist.device).eval()
    params = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    with torch.inference_mode():
        metrics = task.evaluate(model, loader)
    seconds = time.perf_counter() - start
    results = dict(model=config.model, task=task_cls.name, **metrics, samples=len(datasets.val),
                   samples_per_sec=round(len(datasets.val) / seconds, 2), param_count=round(params / 1e6, 3),
                   checkpoint=config.initial_checkpoint, world_size=dist.world_size)
    _report(results, args, dist)
    return results


def _report(results: dict[str, Any], args: argparse.Namespace, dist: Distributed) -> None:
    """Print the results and write ``--results-file`` (rank 0)."""
    if dist.is_primary:
        print(json.dumps(results, indent=2))
        if args.results_file:
            _write_results(Path(args.results_file), results, args.results_format)


def _write_results(path: Path, results: dict[str, Any], kind: str) -> None:
    if kind == "json":
        write_text(path, json.dumps(results, indent=2) + "\n")
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(results))
    writer.writeheader()
    writer.writerow(results)
    write_text(path, buffer.getvalue())

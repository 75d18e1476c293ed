"""``mambazoo validate``: timm ``validate.py`` semantics (top-1, top-5, loss, img/s) for any weights.

Weights come from ``--pretrained`` (the hub or ``--pretrained-path``), ``--checkpoint`` (ours or an official file)
or a training output folder, whose recorded configuration (model, classes, input size, data config, dataset) is
reused so that the accuracy the run reported is reproduced exactly.
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

from ..checkpoint import write_text
from ..zoo import check_model_name, create_model, create_model_for_size
from .checkpoints import load_model_weights, resolve_weights_file
from .classification import ClassificationTask, add_data_config_arguments, data_config_args
from .config import load_run_config
from .data import build_classification_datasets, create_eval_loader
from .distributed import init_distributed
from .tasks import TaskContext

__all__ = ["build_validate_parser", "validate"]


def build_validate_parser(prog: str = "mambazoo validate") -> argparse.ArgumentParser:
    """The ``validate`` flags (timm ``validate.py`` names)."""
    parser = argparse.ArgumentParser(prog=prog, description="Evaluate a classifier: top-1, top-5, loss and img/s.",
                                     epilog="Details: docs/training.md")
    parser.add_argument("run", nargs="?", default=None,
                        help="a training output folder (its model, classes, data and best checkpoint are used)")
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


def validate(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run ``mambazoo validate`` with command-line flags; returns the results (also printed by rank 0)."""
    args = build_validate_parser().parse_args(argv)
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
    if dist.is_primary:
        print(json.dumps(results, indent=2))
        if args.results_file:
            _write_results(Path(args.results_file), results, args.results_format)
    return results


def _write_results(path: Path, results: dict[str, Any], kind: str) -> None:
    if kind == "json":
        write_text(path, json.dumps(results, indent=2) + "\n")
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(results))
    writer.writeheader()
    writer.writerow(results)
    write_text(path, buffer.getvalue())

"""The ``mambazoo train`` flags (timm ``train.py`` names) and their resolution into one run configuration.

Precedence, lowest first: the flag defaults below, the task's ``defaults``, the ``--recipe`` preset, then the flags
given on the command line. Unlike timm, ``-b/--batch-size`` is the **global** batch per optimiser micro-step (split
over the processes), so one command means the same optimisation on one process or many.
"""
import argparse
import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from .tasks import Task, get_task

__all__ = ["RESUMABLE_CHANGES", "build_train_parser", "load_run_config", "parse_explicit_flags", "parse_train_args",
           "resolve_learning_rate"]

# Flags that may differ from the saved configuration when resuming (they do not change the optimisation).
RESUMABLE_CHANGES = frozenset({"resume", "output", "experiment", "workers", "log_interval", "no_progress",
                               "recovery_interval", "checkpoint_hist", "device"})


def _add_common_arguments(parser: argparse.ArgumentParser, task: type[Task]) -> None:
    parser.add_argument("--task", default="classification",
                        help="classification (default), detection, segmentation, or a task your script registers")
    parser.add_argument("--recipe", default=None, choices=sorted(task.recipes) or None,
                        help=f"a family's published {task.name} recipe as defaults (explicit flags still win)")

    group = parser.add_argument_group("Data")
    group.add_argument("--data-dir", default=None, metavar="DIR",
                       help="data root: an ImageFolder with train/ and val/ (or the Fashion-MNIST files' folder); "
                            "detection and segmentation layouts: docs/dense.md")
    group.add_argument("--dataset", default="folder", metavar="NAME",
                       help="classification: digits | fashion-mnist | folder (ImageFolder at --data-dir, the "
                            "default); detection: folder | coco; segmentation: folder | ade20k")
    group.add_argument("-j", "--workers", type=int, default=4, metavar="N", help="data loading processes per rank")
    group.add_argument("--aug-repeats", type=int, default=0, metavar="N",
                       help="repeated augmentation: each image N times per epoch, spread over ranks (DeiT)")

    group = parser.add_argument_group("Model")
    group.add_argument("--model", default=None, metavar="NAME", help="model name (mambazoo or timm)")
    group.add_argument("--pretrained", action="store_true", help="start from the official weights (timm hub)")
    group.add_argument("--pretrained-path", default=None, metavar="FILE",
                       help="official or own weights file to fine-tune from (implies --pretrained): new classifier "
                            "if the class count differs, position embeddings resized, the rest loaded strictly")
    group.add_argument("--initial-checkpoint", default=None, metavar="PATH",
                       help="weights (file or training output folder) loaded strictly, classifier included")
    group.add_argument("--resume", default=None, metavar="PATH",
                       help="continue a run: its output folder (or a .state.pt file)")
    group.add_argument("--num-classes", type=int, default=None, metavar="N", help="classes (default: the data's)")
    group.add_argument("-b", "--batch-size", type=int, default=128, metavar="N",
                       help="global batch per step, split over the processes (default: 128)")
    group.add_argument("-vb", "--validation-batch-size", type=int, default=None, metavar="N",
                       help="global evaluation batch (default: --batch-size)")
    group.add_argument("--grad-accum-steps", type=int, default=1, metavar="N",
                       help="micro-batches accumulated per optimiser step")
    group.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    group.add_argument("--channels-last", action="store_true", help="channels-last memory layout")
    group.add_argument("--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                       help="torch.compile the model (default backend: inductor)")
    group.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    group.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                       help="mixed precision (autocast)")
    group.add_argument("--amp-dtype", default="bfloat16", choices=("bfloat16", "float16"),
                       help="autocast dtype (float16 adds a gradient scaler on CUDA)")
    group.add_argument("--fsdp", action="store_true", help="shard every block with FSDP2 instead of DDP")
    group.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=False,
                       help="BatchNorm statistics over all processes (SyncBatchNorm; GPUs only)")

    group = parser.add_argument_group("Optimiser (timm create_optimizer_v2)")
    group.add_argument("--opt", default="sgd", metavar="NAME", help="optimiser, e.g. sgd, adamw, lamb")
    group.add_argument("--opt-eps", type=float, default=None, metavar="EPS")
    group.add_argument("--opt-betas", type=float, nargs="+", default=None, metavar="BETA")
    group.add_argument("--momentum", type=float, default=0.9)
    group.add_argument("--weight-decay", type=float, default=2e-5)
    group.add_argument("--clip-grad", type=float, default=None, metavar="NORM", help="gradient clipping threshold")
    group.add_argument("--clip-mode", default="norm", choices=("norm", "value", "agc"))
    group.add_argument("--layer-decay", type=float, default=None, help="layer-wise learning-rate decay")

    group = parser.add_argument_group("Learning-rate schedule (timm create_scheduler_v2)")
    group.add_argument("--sched", default="cosine", metavar="NAME", help="cosine, step, multistep, poly, ...")
    group.add_argument("--sched-on-updates", action="store_true", help="update the schedule every step")
    group.add_argument("--lr", type=float, default=None,
                       help="learning rate (default: --lr-base scaled to the effective global batch)")
    group.add_argument("--lr-base", type=float, default=0.1, help="learning rate at --lr-base-size")
    group.add_argument("--lr-base-size", type=int, default=256, help="batch size of --lr-base")
    group.add_argument("--lr-base-scale", default="", choices=("", "linear", "sqrt"),
                       help="scaling rule (default: sqrt for ada*/lamb optimisers, else linear)")
    group.add_argument("--warmup-lr", type=float, default=1e-5)
    group.add_argument("--min-lr", type=float, default=0.0)
    group.add_argument("--epochs", type=int, default=300)
    group.add_argument("--iterations", type=int, default=None, metavar="N",
                       help="train for N optimiser updates instead of --epochs (the last epoch stops early; needs "
                            "--sched-on-updates; an explicit --epochs replaces a task's or recipe's value)")
    group.add_argument("--warmup-epochs", type=int, default=5)
    group.add_argument("--warmup-steps", type=int, default=None, metavar="N",
                       help="linear warm-up over N optimiser updates instead of --warmup-epochs (needs "
                            "--sched-on-updates)")
    group.add_argument("--warmup-prefix", action="store_true", help="warm-up before (not inside) the schedule")
    group.add_argument("--cooldown-epochs", type=int, default=0, help="epochs at --min-lr after the schedule")
    group.add_argument("--decay-epochs", type=float, default=90)
    group.add_argument("--decay-milestones", type=int, nargs="+", default=[90, 180, 270])
    group.add_argument("--decay-rate", type=float, default=0.1)

    group = parser.add_argument_group("Model EMA (timm ModelEmaV3)")
    group.add_argument("--model-ema", action="store_true", help="keep and evaluate an EMA of the weights")
    group.add_argument("--model-ema-decay", type=float, default=0.9998)
    group.add_argument("--model-ema-warmup", action="store_true", help="EMA decay warm-up")

    group = parser.add_argument_group("Run")
    group.add_argument("--seed", type=int, default=42)
    group.add_argument("--output", default=None, metavar="DIR",
                       help="run folder (default: output/train/<time>-<model>-<size>)")
    group.add_argument("--experiment", default=None, metavar="NAME", help="sub-folder of --output for this run")
    group.add_argument("--log-interval", type=int, default=50, metavar="N", help="steps between progress updates")
    group.add_argument("--recovery-interval", type=int, default=0, metavar="N",
                       help="also checkpoint every N steps inside an epoch (0: epoch ends only)")
    group.add_argument("--checkpoint-hist", type=int, default=3, metavar="N", help="best checkpoints to keep")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_train_parser(task: type[Task], prog: str = "mambazoo train") -> argparse.ArgumentParser:
    """The full parser: the engine's common flags plus the task's own."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Train or fine-tune a model (one process, or many under torchrun).",
        epilog="Recipes, resume and distributed notes: docs/training.md")
    _add_common_arguments(parser, task)
    task.add_arguments(parser)
    return parser


def resolve_learning_rate(args: argparse.Namespace) -> float:
    """timm's rule: ``lr_base × (effective global batch / lr_base_size)``, square-root scaled for ada*/lamb."""
    scale = args.lr_base_scale or ("sqrt" if any(name in args.opt.lower() for name in ("ada", "lamb")) else "linear")
    ratio = args.batch_size * args.grad_accum_steps / args.lr_base_size
    return args.lr_base * (math.sqrt(ratio) if scale == "sqrt" else ratio)


def _task_name(argv: Sequence[str]) -> str:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task", default="classification")
    return pre.parse_known_args(list(argv))[0].task


def parse_explicit_flags(task: type[Task], argv: Sequence[str]) -> dict[str, Any]:
    """The training flags given in ``argv`` (parsed without defaults: what remains was given)."""
    quiet = build_train_parser(task)
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return vars(quiet.parse_args(list(argv)))


def parse_train_args(argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, set[str]]:
    """Parse and resolve the training flags; returns the configuration and the set of explicitly given flags."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    task = get_task(_task_name(argv))
    parser = build_train_parser(task)
    args = parser.parse_args(argv)
    explicit = set(parse_explicit_flags(task, argv))
    values = vars(args)
    unknown = set(task.defaults) - set(values)
    if unknown:
        raise ValueError(f"task {task.name!r} defaults name unknown flags: {sorted(unknown)}")
    values.update({k: v for k, v in task.defaults.items() if k not in explicit})
    if args.recipe is not None and not task.recipes:
        raise ValueError(f"task {task.name!r} has no --recipe presets")
    recipe = task.recipes.get(args.recipe)
    if recipe is not None:
        if args.model is None:
            raise ValueError("--recipe needs --model (recipes have per-variant settings)")
        recipe.check_model(args.model)
        settings = recipe.resolve(args.model)
        unknown = set(settings) - set(values)
        if unknown:
            raise ValueError(f"recipe {recipe.family!r} sets flags the {task.name!r} task lacks: {sorted(unknown)}")
        values.update({k: v for k, v in settings.items() if k not in explicit})
    for length, unit in (("iterations", "epochs"), ("warmup_steps", "warmup_epochs")):
        if unit in explicit and length not in explicit:  # an explicit length in epochs replaces the preset's
            values[length] = None
    if args.pretrained_path:
        args.pretrained = True
    if args.lr is None:
        args.lr = resolve_learning_rate(args)
    for name, ratio in {**task.lr_ratios, **(recipe.lr_ratios if recipe else {})}.items():
        if name not in explicit:
            values[name] = args.lr * ratio
    return args, explicit


def load_run_config(run_dir: Path) -> dict[str, Any]:
    """The resolved configuration saved in a run folder."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} holds no config.json: not a mambazoo training output")
    return json.loads(path.read_text())

"""Image classification, the built-in task: timm data configs and transforms, Mixup/CutMix, timm losses and metrics."""
import argparse
from typing import Any, Optional

import torch
from timm.data import Mixup, create_transform, resolve_data_config
from timm.loss import create_classification_loss
from timm.task import ClassificationEvaluator, evaluation_sample_limit
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..zoo import check_model_name, create_model, create_model_for_size
from .checkpoints import load_model_weights
from .data import DatasetSplits, build_classification_datasets
from .recipes import RECIPES
from .tasks import Task, TaskContext, register_task

__all__ = ["ClassificationTask", "add_data_config_arguments", "create_classifier", "data_config_args"]


def add_data_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The timm flags that override the model's pretrained data config (shared by ``train`` and ``validate``)."""
    group = parser.add_argument_group("Data config (default: the model's pretrained_cfg)")
    group.add_argument("--img-size", type=int, default=None, metavar="N",
                       help="input size (the model is created for it: position embeddings are resized)")
    group.add_argument("--crop-pct", type=float, default=None, metavar="PCT", help="evaluation centre-crop fraction")
    group.add_argument("--mean", type=float, nargs="+", default=None, metavar="MEAN", help="normalisation mean")
    group.add_argument("--std", type=float, nargs="+", default=None, metavar="STD", help="normalisation std")
    group.add_argument("--interpolation", default="", metavar="NAME", help="resize interpolation of the model default")


def data_config_args(args: argparse.Namespace) -> dict[str, Any]:
    """The subset of flags timm's ``resolve_data_config`` reads."""
    return dict(img_size=args.img_size, crop_pct=args.crop_pct, mean=args.mean, std=args.std,
                interpolation=args.interpolation)


def create_classifier(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """Create ``args.model`` for ``num_classes`` (and ``--img-size``), with pretrained / initial weights.

    ``--pretrained`` alone downloads the official weights through timm; ``--pretrained-path FILE`` loads a local
    file instead (official or ours): the classifier is reset when its class count differs, the position embedding is
    resized to the input size and everything else loads strictly. ``--initial-checkpoint FILE`` loads strictly,
    classifier included.
    """
    check_model_name(args.model)
    kwargs = dict(num_classes=num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path)
    from_hub = args.pretrained and not args.pretrained_path
    if args.img_size:
        model = create_model_for_size(args.model, args.img_size, pretrained=from_hub, **kwargs)
    else:
        model = create_model(args.model, pretrained=from_hub, **kwargs)
    if args.pretrained_path:
        skipped = load_model_weights(model, args.pretrained_path, reset_head=True)
        if skipped:
            print(f"fine-tuning from {args.pretrained_path}: new classifier for {num_classes} classes "
                  f"({', '.join(skipped)} not loaded)")
    if args.initial_checkpoint:
        load_model_weights(model, args.initial_checkpoint)
    return model


@register_task
class ClassificationTask(Task):
    """Single-label image classification: cross-entropy (label smoothing, Mixup/CutMix soft targets), top-1/top-5.

    Data: ``--dataset digits|fashion-mnist`` or an ImageFolder at ``--data-dir``. Transforms come from timm's
    ``create_transform`` with the model's data config (``pretrained_cfg``) unless flags override it.
    """

    name = "classification"
    metric = "top1"
    higher_is_better = True
    recipes = RECIPES

    def __init__(self, args: argparse.Namespace, context: TaskContext) -> None:
        super().__init__(args, context)
        self.mixup: Optional[Mixup] = None
        self.criterion: Optional[nn.Module] = None

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add_data_config_arguments(parser)
        group = parser.add_argument_group("Augmentation and regularisation (timm)")
        group.add_argument("--no-aug", action="store_true", help="no training augmentation (resize + centre crop)")
        group.add_argument("--scale", type=float, nargs=2, default=[0.08, 1.0], metavar="PCT",
                           help="random-resized-crop area range")
        group.add_argument("--ratio", type=float, nargs=2, default=[3 / 4, 4 / 3], metavar="RATIO",
                           help="random-resized-crop aspect range")
        group.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
        group.add_argument("--vflip", type=float, default=0.0, help="vertical flip probability")
        group.add_argument("--color-jitter", type=float, default=0.4, metavar="PCT", help="colour jitter factor")
        group.add_argument("--aa", default=None, metavar="NAME",
                           help="AutoAugment / RandAugment policy, e.g. rand-m9-mstd0.5-inc1")
        group.add_argument("--train-interpolation", default="random", help="training resize interpolation")
        group.add_argument("--reprob", type=float, default=0.0, metavar="PCT", help="random erasing probability")
        group.add_argument("--remode", default="pixel", help="random erasing mode")
        group.add_argument("--recount", type=int, default=1, help="random erasing count")
        group.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (on if > 0)")
        group.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (on if > 0)")
        group.add_argument("--cutmix-minmax", type=float, nargs=2, default=None, help="cutmix min/max ratio")
        group.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixup or cutmix per batch")
        group.add_argument("--mixup-switch-prob", type=float, default=0.5,
                           help="probability of cutmix instead of mixup when both are on")
        group.add_argument("--mixup-mode", default="batch", choices=("batch", "pair", "elem"))
        group.add_argument("--mixup-off-epoch", type=int, default=0, metavar="N",
                           help="turn mixup/cutmix off from this epoch (0: never)")
        group.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
        group.add_argument("--drop", type=float, default=0.0, metavar="PCT", help="head dropout")
        group.add_argument("--drop-path", type=float, default=None, metavar="PCT",
                           help="stochastic depth rate (default: the model's)")

    @property
    def mixup_active(self) -> bool:
        """Whether Mixup/CutMix is configured."""
        args = self.args
        return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None

    def build_datasets(self) -> DatasetSplits:
        args = self.args
        check_model_name(args.model)
        datasets = build_classification_datasets(args.dataset, args.data_dir)
        num_found = len(datasets.classes)
        if args.num_classes is None:
            args.num_classes = num_found
        elif args.num_classes < num_found:
            raise ValueError(f"--num-classes {args.num_classes} is smaller than the {num_found} classes of the data")
        local_batch = args.batch_size // self.context.dist.world_size
        if self.mixup_active and local_batch % 2:
            raise ValueError(f"mixup/cutmix needs an even batch per process, got {local_batch}")
        if args.pretrained_path and args.initial_checkpoint:
            raise ValueError("give either --pretrained-path (fine-tuning, new head) or --initial-checkpoint, not both")
        return datasets

    def build_model(self, datasets: DatasetSplits) -> nn.Module:
        model = create_classifier(self.args, self.args.num_classes)
        if self.mixup_active:
            args = self.args
            self.mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                               prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                               label_smoothing=args.smoothing, num_classes=args.num_classes)
        self.criterion = create_classification_loss(smoothing=self.args.smoothing, soft_targets=self.mixup is not None)
        self.criterion = self.criterion.to(self.context.device)
        return model

    def attach_transforms(self, model: nn.Module, datasets: DatasetSplits) -> dict[str, Any]:
        args = self.args
        config = resolve_data_config(data_config_args(args), model=model)
        train_config = dict(config)
        if args.train_interpolation and not args.no_aug:
            train_config["interpolation"] = args.train_interpolation
        try:
            datasets.train.transform = create_transform(
                **train_config, is_training=True, no_aug=args.no_aug, scale=tuple(args.scale),
                ratio=tuple(args.ratio), hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
                auto_augment=args.aa, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)
        except AssertionError as error:  # timm asserts on unknown policies and modes
            raise ValueError(f"training augmentation: {error}") from None
        datasets.val.transform = create_transform(**config, is_training=False)
        return dict(config, input_size=list(config["input_size"]), mean=list(config["mean"]), std=list(config["std"]))

    def _to_device(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        device = self.context.device
        images = images.to(device, non_blocking=True)
        if self.context.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets.to(device, non_blocking=True)

    def training_step(self, model: nn.Module, batch: Any, epoch: int) -> tuple[Tensor, int]:
        images, targets = self._to_device(*batch)
        if self.mixup is not None:
            off_epoch = self.args.mixup_off_epoch
            self.mixup.mixup_enabled = not (off_epoch and epoch >= off_epoch)
            images, targets = self.mixup(images, targets)
        return self.criterion(model(images), targets), images.shape[0]

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        evaluator = ClassificationEvaluator(self.context.device, max_samples=evaluation_sample_limit(loader))
        for batch in loader:
            images, targets = self._to_device(*batch)
            with self.context.autocast():
                output = model(images)
            evaluator.update(output, targets)
        return dict(evaluator.compute(distributed=self.context.dist.enabled))

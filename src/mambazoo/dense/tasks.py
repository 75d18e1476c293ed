"""Detection / instance segmentation (Mask R-CNN) and semantic segmentation (UperNet) as training-engine tasks.

``mambazoo train --task detection|segmentation`` (also under ``torchrun -m mambazoo.train``) runs them through the
engine of :mod:`mambazoo.training` like classification: distributed setup, schedules, checkpoints, resume, records.
The tasks own the data layouts of ``--data-dir``, the models and their weights, the losses, the evaluation (COCO
box/mask AP, mIoU) and the ``--recipe`` presets, made from :mod:`mambazoo.dense.recipes`. ``mambazoo validate``
evaluates their runs and ``mambazoo predict`` draws with them. Guide: ``docs/dense.md`` ("Training").
"""
import abc
import argparse
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from timm.task import evaluation_sample_limit
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..checkpoint import check_state_dict, unwrap_state_dict
from ..cli import ParseKwargs
from ..training.checkpoints import load_model_weights, read_state_dict, resolve_weights_file
from ..training.data import DatasetSplits
from ..training.recipes import Recipe
from ..training.tasks import Task, TaskContext, register_task
from ..zoo import check_model_name, create_model
from .backbone import DenseBackbone, create_backbone, load_backbone_checkpoint
from .data import (
    CocoDetection,
    DetectionTransform,
    RepeatDataset,
    SegmentationFolder,
    SegmentationTransform,
    detection_collate,
    read_class_names,
    segmentation_collate,
)
from .detection import build_mask_rcnn
from .evaluation import CocoEvaluator, ConfusionMatrix
from .optim import find_backbone, param_groups
from .recipes import DEFAULTS, RECIPES, VARIANTS, DenseRecipe, get_recipe
from .segmentation import IGNORE_INDEX, UperNet
from .taps import TAP_SPECS, tap_spec_for

__all__ = ["DetectionTask", "SegmentationTask", "build_backbone", "engine_recipes", "load_dense_weights"]

def build_backbone(args: argparse.Namespace) -> DenseBackbone:
    """``args.model`` as a dense backbone with the weights the flags ask for.

    ``--pretrained`` loads the official ImageNet weights (timm hub); ``--pretrained-path FILE`` a classification
    checkpoint of the model — official release formats or ours — through the family's loader (as for
    classification fine-tuning; the classifier is dropped); ``--backbone-checkpoint FILE`` the ``backbone.*`` part of an
    official mmdet/mmseg checkpoint, per-level norms included. ``--drop-path`` and ``--model-kwargs`` go to the model.
    """
    kwargs = dict(args.model_kwargs)
    if args.drop_path is not None:
        kwargs["drop_path_rate"] = args.drop_path
    if args.pretrained_path:
        spec = tap_spec_for(args.model)
        model = create_model(args.model, **{**spec.create_kwargs, **kwargs})  # with the checkpoint's classifier
        load_model_weights(model, args.pretrained_path, reset_head=True)
        backbone = DenseBackbone(model, spec)
    else:
        backbone = create_backbone(args.model, pretrained=args.pretrained, **kwargs)
    if args.backbone_checkpoint:
        path = str(args.backbone_checkpoint)
        ignored = load_backbone_checkpoint(backbone, unwrap_state_dict(read_state_dict(path), path), source=path)
        print(f"backbone weights from {path} ({ignored} neck and head entries not used)")
    return backbone


def load_dense_weights(model: nn.Module, path: Union[str, Path]) -> Path:
    """Load the weights of a whole dense model strictly: a file (safetensors or ``torch.save``, a ``state_dict`` /
    ``model`` wrapper unwrapped) or a training run folder (its best checkpoint). Returns the file read."""
    file = resolve_weights_file(path)
    state_dict = unwrap_state_dict(read_state_dict(file), str(file))
    check_state_dict(state_dict, model, str(file), adaptable=False)
    model.load_state_dict(state_dict)
    return file


def _recipe_flags(recipe: DenseRecipe) -> dict[str, Any]:
    """A downstream recipe as ``mambazoo train`` flag values (argparse destinations)."""
    flags = dict(opt=recipe.optimizer, lr_base=recipe.lr, lr_base_size=recipe.batch_size, lr_base_scale="linear",
                 batch_size=recipe.batch_size, weight_decay=recipe.weight_decay, layer_decay=recipe.layer_decay,
                 warmup_steps=recipe.warmup_iterations, warmup_epochs=0, sched_on_updates=True, min_lr=0.0,
                 sync_bn=True, amp=bool(recipe.amp), drop_path=recipe.drop_path_rate,
                 model_kwargs=dict(recipe.model_kwargs))
    if recipe.schedule == "step":
        flags.update(sched="multistep", epochs=recipe.epochs, iterations=None, decay_milestones=list(recipe.lr_steps),
                     decay_rate=0.1)
    else:
        flags.update(sched="poly", iterations=recipe.iterations, decay_rate=1.0)
    if recipe.task == "detection":
        flags.update(min_size=[recipe.image_scale[0]], max_size=recipe.image_scale[1])
    else:
        flags.update(crop_size=list(recipe.crop_size), img_scale=list(recipe.image_scale), test_mode=recipe.test_mode,
                     test_stride=list(recipe.test_stride) if recipe.test_stride else None,
                     head=dict(channels=recipe.head_channels, aux_index=recipe.aux_index, aux_weight=recipe.aux_weight))
    return flags


def engine_recipes(task: str) -> dict[str, Recipe]:
    """The ``--recipe`` presets of a dense task: every family's :class:`DenseRecipe` for ``task`` as flag values,
    with the published per-variant differences (:data:`mambazoo.dense.recipes.VARIANTS`)."""
    recipes = {}
    for (family, kind), recipe in RECIPES.items():
        if kind != task:
            continue
        names = sorted({name for name, only in VARIANTS if only in (None, task) and TAP_SPECS[family].matches(name)})
        variants = tuple((pattern, _recipe_flags(get_recipe(name, task))) for name in names
                         for pattern in (name, f"{name}.*"))
        recipes[family] = Recipe(family, f"{recipe.protocol} (docs/dense.md, Recipes)", _recipe_flags(recipe),
                                 variants, notes=(recipe.notes,) if recipe.notes else (),
                                 models=TAP_SPECS[family].patterns)
    return recipes


def _int_or_none(text: str) -> Optional[int]:
    return None if text.lower() == "none" else int(text)


def _size_pair(values: Optional[list[int]], flag: str) -> Optional[tuple[int, int]]:
    if values is None:
        return None
    if len(values) not in (1, 2) or min(values) < 1:
        raise ValueError(f"{flag} takes one or two positive sizes (height width), got {values}")
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


class _DenseTask(Task):
    """What the two dense tasks share: backbone flags and weights, data checks, parameter groups."""

    higher_is_better = True
    layouts: tuple[str, ...] = ("folder",)
    head_help = ""

    def __init__(self, args: argparse.Namespace, context: TaskContext) -> None:
        super().__init__(args, context)
        self.train_data: Optional[Dataset] = None
        self.val_data: Optional[Dataset] = None

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group(f"{cls.name.capitalize()} (layouts and recipes: docs/dense.md)")
        group.add_argument("--drop-path", type=float, default=None, metavar="PCT",
                           help="stochastic depth of the backbone (default: the model's)")
        group.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
                           help="backbone creation arguments, e.g. 'window_size=(8,8,64,32)' (MambaVision)")
        group.add_argument("--head", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE", help=cls.head_help)
        group.add_argument("--backbone-checkpoint", default=None, metavar="FILE",
                           help="official mmdet/mmseg checkpoint whose backbone.* weights start the backbone")
        group.add_argument("--train-repeats", type=int, default=1, metavar="N",
                           help="each training image N times per epoch (mmdet's RepeatDataset, for small data)")
        group.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability in training")
        cls.add_task_arguments(group)

    @classmethod
    def add_task_arguments(cls, group: argparse._ArgumentGroup) -> None:
        """The task's own flags."""

    # ------------------------------------------------------------------------------------------------ data
    def _check_args(self) -> None:
        args = self.args
        check_model_name(args.model)
        tap_spec_for(args.model)  # the family is registered for dense prediction (the error lists the families)
        if not args.data_dir:
            raise ValueError(f"--task {self.name} reads --data-dir (layouts in docs/dense.md)")
        if args.dataset not in self.layouts:
            raise ValueError(f"--task {self.name}: --dataset must be one of {', '.join(self.layouts)} (the layout "
                             f"of --data-dir), got {args.dataset!r}")
        weights = ("pretrained_path", "backbone_checkpoint", "initial_checkpoint")
        given = [name for name in weights if getattr(args, name)]
        if len(given) > 1:
            raise ValueError("give only one of " + ", ".join(f"--{name.replace('_', '-')}" for name in given))
        for name in given:
            if not Path(getattr(args, name)).exists():
                raise FileNotFoundError(f"--{name.replace('_', '-')} {getattr(args, name)} does not exist")
        if args.train_repeats < 1:
            raise ValueError(f"--train-repeats must be positive, got {args.train_repeats}")

    @abc.abstractmethod
    def _read_split(self, split: str) -> Dataset:
        """The ``train`` or ``val`` split of ``--data-dir``, without transforms."""

    @abc.abstractmethod
    def _class_names(self, dataset: Dataset) -> list[str]:
        """The class names of a split, in label order."""

    def _splits(self, train: Optional[Dataset], val: Dataset) -> DatasetSplits:
        args = self.args
        classes = self._class_names(val)
        if train is not None and self._class_names(train) != classes:
            raise ValueError(f"{args.data_dir}: the train and val splits name different classes")
        if args.num_classes is None:
            args.num_classes = len(classes)
        elif args.num_classes < len(classes):
            raise ValueError(f"--num-classes {args.num_classes} is smaller than the {len(classes)} classes of the data")
        self.train_data, self.val_data = train, val
        if train is not None and args.train_repeats > 1:
            train = RepeatDataset(train, args.train_repeats)
        description = dict(name=args.dataset, root=str(args.data_dir), val=len(val))
        if train is not None:
            description.update(train=len(self.train_data), train_repeats=args.train_repeats)
        return DatasetSplits(train if train is not None else val, val, tuple(classes), description)

    def build_datasets(self) -> DatasetSplits:
        self._check_args()
        return self._splits(self._read_split("train"), self._read_split("val"))

    def build_validation_data(self) -> DatasetSplits:
        self._check_args()
        return self._splits(None, self._read_split("val"))

    # ----------------------------------------------------------------------------------------------- model
    @abc.abstractmethod
    def create_model(self) -> nn.Module:
        """The dense model for ``args.num_classes`` classes with its backbone weights (see :func:`build_backbone`)."""

    def build_model(self, datasets: Optional[DatasetSplits] = None) -> nn.Module:
        """:meth:`create_model`, then ``--initial-checkpoint`` (a whole dense model: file or run folder) if given."""
        try:
            model = self.create_model()
        except TypeError as error:  # an unknown --head or --model-kwargs key
            raise ValueError(f"--task {self.name}: {error} (check --head and --model-kwargs)") from None
        if self.args.initial_checkpoint:
            load_dense_weights(model, self.args.initial_checkpoint)
        return model

    def optimizer_params(self, model: nn.Module) -> list[dict]:
        """Weight decay except on 1-D parameters; ``--layer-decay`` over the backbone's blocks (see
        :func:`mambazoo.dense.optim.param_groups`)."""
        return param_groups(model, self.args.weight_decay, self.args.layer_decay)

    @staticmethod
    def _normalisation(model: nn.Module) -> dict[str, list[float]]:
        backbone = find_backbone(model)[1]
        return dict(mean=list(backbone.mean), std=list(backbone.std))

    @staticmethod
    def _kept(loader: DataLoader, seen: int, count: int) -> int:
        """How many of the next ``count`` samples are real (the distributed evaluation sampler pads with repeats)."""
        limit = evaluation_sample_limit(loader)
        return count if limit is None else max(0, min(count, limit - seen))


@register_task
class DetectionTask(_DenseTask):
    """Detection and instance segmentation with Mask R-CNN + FPN on COCO-format data; ranked by COCO box AP.

    ``--data-dir`` layouts: ``folder`` (``{train,val}/images`` + ``{train,val}/annotations.json``, as written by
    ``python -m mambazoo.dense composite``) or ``coco`` (COCO 2017: ``{train,val}2017/`` +
    ``annotations/instances_{train,val}2017.json``). Evaluation: pycocotools ``bbox`` and ``segm`` AP.
    """

    name = "detection"
    metric = "bbox_AP"
    layouts = ("folder", "coco")
    head_help = "build_mask_rcnn / torchvision MaskRCNN options, e.g. fpn_channels=256 box_detections_per_img=100"
    defaults = _recipe_flags(DEFAULTS["detection"])  # Mask R-CNN 1x
    lr_ratios = dict(warmup_lr=1e-3)  # mmdet's linear warm-up starts at 0.001 × lr
    recipes = engine_recipes("detection")

    @classmethod
    def add_task_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--min-size", type=int, nargs="+", default=[800], metavar="PX",
                           help="shorter image side in training; several values: one drawn per batch (multi-scale); "
                                "evaluation uses the last")
        group.add_argument("--max-size", type=int, default=1333, metavar="PX", help="longer image side limit")

    def _check_args(self) -> None:
        super()._check_args()
        if min(self.args.min_size) < 1 or self.args.max_size < max(self.args.min_size):
            raise ValueError(f"--min-size {self.args.min_size} must be positive and at most --max-size "
                             f"{self.args.max_size}")

    def _read_split(self, split: str) -> CocoDetection:
        root = Path(self.args.data_dir)
        if self.args.dataset == "coco":
            return CocoDetection(root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json")
        return CocoDetection(root / split / "images", root / split / "annotations.json")

    def _class_names(self, dataset: CocoDetection) -> list[str]:
        return list(dataset.class_names)

    def create_model(self) -> nn.Module:
        args = self.args
        min_size = args.min_size[0] if len(args.min_size) == 1 else tuple(args.min_size)
        return build_mask_rcnn(build_backbone(args), args.num_classes, min_size=min_size, max_size=args.max_size,
                               **args.head)

    def attach_transforms(self, model: nn.Module, datasets: DatasetSplits) -> dict[str, Any]:
        if self.train_data is not None:
            self.train_data.transforms = DetectionTransform(self.args.hflip)
        return dict(self._normalisation(model), min_size=list(self.args.min_size), max_size=self.args.max_size,
                    hflip=self.args.hflip)

    def collate_fn(self, train: bool):
        return detection_collate

    def training_step(self, model: nn.Module, batch: Any, epoch: int) -> tuple[Tensor, int]:
        device = self.context.device
        images = [image.to(device, non_blocking=True) for image in batch[0]]
        targets = [{key: value.to(device, non_blocking=True) if isinstance(value, Tensor) else value
                    for key, value in target.items()} for target in batch[1]]
        losses = model(images, targets)
        return sum(losses.values()), len(images)

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """COCO ``bbox_*`` and ``segm_*`` AP (AP, AP50, AP75, APs, APm, APl) over every rank's detections."""
        dataset = self.val_data
        evaluator = CocoEvaluator(dataset.coco, dataset.category_ids)
        seen = 0
        for images, targets in loader:
            with self.context.autocast():
                outputs = model([image.to(self.context.device, non_blocking=True) for image in images])
            kept = self._kept(loader, seen, len(images))
            seen += len(images)
            evaluator.update(outputs[:kept], [target["image_id"] for target in targets[:kept]])
        evaluator.synchronize()
        dist = self.context.dist
        return dist.broadcast_object(evaluator.summarize() if dist.is_primary else None)


@register_task
class SegmentationTask(_DenseTask):
    """Semantic segmentation with UperNet (+ auxiliary FCN head) on mask folders; ranked by mIoU.

    ``--data-dir`` layouts: ``folder`` (``{train,val}/images`` + ``{train,val}/masks`` with index masks, and
    ``classes.json``, as written by ``python -m mambazoo.dense composite``) or ``ade20k`` (ADEChallengeData2016:
    ``images/{training,validation}`` + ``annotations/{training,validation}``, label 0 unlabelled). Evaluation:
    mIoU, mAcc, aAcc and per-class IoU from a confusion matrix summed over ranks, whole-image or sliding-window.
    """

    name = "segmentation"
    metric = "mIoU"
    layouts = ("folder", "ade20k")
    head_help = "UperNet options, e.g. channels=512 aux_index=2 aux_weight=0.4 (channels=None: the backbone's width)"
    defaults = dict(_recipe_flags(DEFAULTS["segmentation"]), img_scale=None)  # UperNet 160k at the data's size
    lr_ratios = dict(warmup_lr=1e-6)  # mmseg's linear warm-up starts at 1e-6 × lr
    recipes = engine_recipes("segmentation")
    ADE20K_CLASSES = 150

    @classmethod
    def add_task_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--crop-size", type=int, nargs="+", default=[512], metavar="PX",
                           help="training crop: side, or height width")
        group.add_argument("--img-scale", type=_int_or_none, nargs="+", default=None, metavar="PX",
                           help="LONG SHORT: keep-ratio resize bound of training (times --ratio-range) and evaluation "
                                "images, e.g. 2048 512 (ADE20K); none: the images' own size (default)")
        group.add_argument("--ratio-range", type=float, nargs=2, default=[0.5, 2.0], metavar=("LOW", "HIGH"),
                           help="training rescale range")
        group.add_argument("--cat-max-ratio", type=float, default=0.75,
                           help="largest share of one class in a training crop (1: no limit)")
        group.add_argument("--test-mode", choices=("whole", "slide"), default="whole",
                           help="evaluation: the whole image at once, or sliding windows")
        group.add_argument("--test-crop", type=int, nargs="+", default=None, metavar="PX",
                           help="sliding-window size (default: --crop-size)")
        group.add_argument("--test-stride", type=int, nargs="+", default=None, metavar="PX",
                           help="sliding-window stride (required with --test-mode slide)")
        group.add_argument("--reduce-zero-label", action="store_true",
                           help="mask label 0 is 'unlabelled' (ignored) and the classes are 1..K (ADE20K)")

    @property
    def crop_size(self) -> tuple[int, int]:
        """Training crop (height, width)."""
        return _size_pair(self.args.crop_size, "--crop-size")

    @property
    def ignore_index(self) -> int:
        """Label ignored by the loss and the metrics."""
        return IGNORE_INDEX

    def _check_args(self) -> None:
        super()._check_args()
        args = self.args
        _size_pair(args.crop_size, "--crop-size")
        _size_pair(args.test_crop, "--test-crop")
        if args.test_mode == "slide":
            stride = _size_pair(args.test_stride, "--test-stride")
            crop = _size_pair(args.test_crop, "--test-crop") or self.crop_size
            if stride is None or stride[0] > crop[0] or stride[1] > crop[1]:
                raise ValueError(f"--test-mode slide needs --test-stride (at most the window {crop}), got "
                                 f"{args.test_stride}")
        if args.img_scale == [None]:
            args.img_scale = None
        elif args.img_scale is not None and (len(args.img_scale) != 2 or None in args.img_scale):
            raise ValueError(f"--img-scale takes LONG SHORT or none, got {args.img_scale}")
        if not 0 < args.ratio_range[0] <= args.ratio_range[1]:
            raise ValueError(f"--ratio-range must be 0 < LOW <= HIGH, got {args.ratio_range}")

    def _names(self) -> list[str]:
        """``classes.json``'s semantic names (numbers for ADE20K without one)."""
        root = Path(self.args.data_dir)
        if self.args.dataset == "ade20k" and not (root / "classes.json").is_file():
            return [str(index) for index in range(self.ADE20K_CLASSES)]
        return list(read_class_names(root)["semantic"])

    def _read_split(self, split: str) -> SegmentationFolder:
        root, names = Path(self.args.data_dir), self._names()
        if self.args.dataset == "ade20k":
            folder = dict(train="training", val="validation")[split]
            return SegmentationFolder(root, class_names=names, images=f"images/{folder}",
                                      masks=f"annotations/{folder}", reduce_zero_label=True)
        return SegmentationFolder(root / split, class_names=names, reduce_zero_label=self.args.reduce_zero_label)

    def _class_names(self, dataset: SegmentationFolder) -> list[str]:
        return list(dataset.class_names)

    def create_model(self) -> nn.Module:
        head = dict(self.args.head, ignore_index=self.ignore_index)
        return UperNet(build_backbone(self.args), self.args.num_classes, **head)

    def attach_transforms(self, model: nn.Module, datasets: DatasetSplits) -> dict[str, Any]:
        args = self.args
        common = dict(crop_size=self.crop_size, scale=args.img_scale, ignore_index=self.ignore_index)
        if self.train_data is not None:
            self.train_data.transforms = SegmentationTransform(
                True, ratio_range=tuple(args.ratio_range), flip_prob=args.hflip, cat_max_ratio=args.cat_max_ratio,
                **common)
        self.val_data.transforms = SegmentationTransform(False, **common)
        return dict(self._normalisation(model), crop_size=list(self.crop_size), img_scale=args.img_scale,
                    ratio_range=list(args.ratio_range), test_mode=args.test_mode, test_crop=args.test_crop,
                    test_stride=args.test_stride)

    def collate_fn(self, train: bool):
        return self._collate

    def _collate(self, batch):
        return segmentation_collate(batch, self.ignore_index)

    def training_step(self, model: nn.Module, batch: Any, epoch: int) -> tuple[Tensor, int]:
        images, targets = (tensor.to(self.context.device, non_blocking=True) for tensor in batch)
        if self.context.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return model(images, targets)["loss"], images.shape[0]

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """``loss`` (decode-head cross-entropy per labelled pixel), ``mIoU``, ``mAcc``, ``aAcc`` and ``IoU.<class>``
        over every rank's images; logits are resized to the full-resolution labels."""
        args, device = self.args, self.context.device
        matrix = ConfusionMatrix(args.num_classes, self.ignore_index, self._padded_names(), device=device)
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # cross-entropy sum, labelled pixels
        crop = _size_pair(args.test_crop, "--test-crop") or self.crop_size
        stride = _size_pair(args.test_stride, "--test-stride")
        seen = 0
        for images, targets in loader:  # padded batches run too: every rank makes the same model calls
            with self.context.autocast():
                logits = model.predict(images.to(device), args.test_mode, crop, stride)
            kept = self._kept(loader, seen, images.shape[0])
            seen += images.shape[0]
            targets = targets[:kept].to(device)
            logits = F.interpolate(logits[:kept].float(), size=targets.shape[-2:], mode="bilinear",
                                   align_corners=False)
            totals[0] += F.cross_entropy(logits, targets, ignore_index=self.ignore_index, reduction="sum")
            totals[1] += (targets != self.ignore_index).sum()
            matrix.update(logits.argmax(1), targets)
        matrix.all_reduce()
        self.context.dist.all_reduce_sum(totals)
        return dict(loss=float(totals[0] / totals[1].clamp(min=1)), **matrix.compute())

    def _padded_names(self) -> list[str]:
        """Class names for all ``--num-classes`` labels (numbers for labels beyond the data's names)."""
        names = list(self.val_data.class_names)
        return names + [str(index) for index in range(len(names), self.args.num_classes)]

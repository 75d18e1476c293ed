"""Task pieces for a training engine: detection (Mask R-CNN) and semantic segmentation (UperNet).

Each task bundles what a generic loop needs (the seam is described in ``docs/dense.md``): build the datasets and
the model, collate batches, compute the loss of a batch, evaluate into a metrics dict with one primary metric, and
optimizer parameter groups (with layer-wise lr decay where the recipe has it). Dataset layout:
``data_dir/{train,val}/images`` with ``annotations.json`` (COCO) for detection or ``masks/`` for segmentation, and
``data_dir/classes.json`` (see :mod:`mambazoo.dense.synthetic`).
"""
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .backbone import create_backbone
from .data import (
    CocoDetection,
    DetectionTransform,
    SegmentationFolder,
    SegmentationTransform,
    detection_collate,
    read_class_names,
    segmentation_collate,
)
from .detection import build_mask_rcnn
from .evaluation import CocoEvaluator, ConfusionMatrix
from .optim import param_groups
from .recipes import DenseRecipe, get_recipe
from .segmentation import IGNORE_INDEX, UperNet

__all__ = ["DenseTask", "DetectionTask", "SegmentationTask", "build_task"]


class DenseTask(Protocol):
    """What a training engine needs from a dense task."""

    name: str
    primary_metric: str

    def build_datasets(self, data_dir: Union[str, Path]) -> tuple[Dataset, Dataset]: ...

    def class_names(self, dataset: Dataset) -> list[str]: ...

    def build_model(self, model_name: str, num_classes: int, pretrained: bool = False,
                    recipe: Optional[DenseRecipe] = None, **model_kwargs: Any) -> nn.Module: ...

    def collate(self, batch: Sequence) -> Any: ...

    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> tuple[Tensor, dict[str, float]]: ...

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]: ...

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float,
                     layer_decay: Optional[float] = None) -> list[dict]: ...

    def recipe(self, model_name: str) -> DenseRecipe: ...


def _base_dataset(loader: DataLoader) -> Dataset:
    dataset = loader.dataset
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset


def _model_kwargs(recipe: Optional[DenseRecipe], model_kwargs: dict) -> dict:
    if recipe is None:
        return model_kwargs
    defaults = dict(recipe.model_kwargs)
    if recipe.drop_path_rate is not None:
        defaults["drop_path_rate"] = recipe.drop_path_rate
    return {**defaults, **model_kwargs}


class _TaskBase:
    """Members shared by the tasks: the recipe lookup and the parameter groups."""

    name = ""

    def recipe(self, model_name: str) -> DenseRecipe:
        """The paper's recipe for ``model_name`` (see :mod:`mambazoo.dense.recipes`)."""
        return get_recipe(model_name, self.name)

    @staticmethod
    def param_groups(model: nn.Module, lr: float, weight_decay: float,
                     layer_decay: Optional[float] = None) -> list[dict]:
        """See :func:`mambazoo.dense.optim.param_groups`."""
        return param_groups(model, lr, weight_decay, layer_decay)


class DetectionTask(_TaskBase):
    """Detection + instance segmentation on COCO-format data with Mask R-CNN; primary metric COCO box AP.

    Args:
        min_size: Training shorter side (tuple: random per batch) when no recipe is given.
        max_size: Longer side limit when no recipe is given.
        flip_prob: Training horizontal flip probability.
        head_kwargs: Further :func:`~mambazoo.dense.detection.build_mask_rcnn` arguments (head widths, sampling).
    """

    name = "detection"
    primary_metric = "bbox_AP"

    def __init__(self, min_size: Union[int, tuple[int, ...]] = 800, max_size: int = 1333, flip_prob: float = 0.5,
                 **head_kwargs: Any) -> None:
        self.min_size, self.max_size, self.flip_prob = min_size, max_size, flip_prob
        self.head_kwargs = head_kwargs

    @classmethod
    def from_recipe(cls, recipe: DenseRecipe, **kwargs: Any) -> "DetectionTask":
        """The task with the recipe's image scale (``kwargs`` override)."""
        min_size, max_size = recipe.image_scale
        return cls(**{**dict(min_size=min_size, max_size=max_size), **kwargs})

    def build_datasets(self, data_dir: Union[str, Path]) -> tuple[CocoDetection, CocoDetection]:
        """``train`` (with flips) and ``val`` splits of ``data_dir``."""
        root = Path(data_dir)
        train = CocoDetection(root / "train" / "images", root / "train" / "annotations.json",
                              DetectionTransform(self.flip_prob))
        val = CocoDetection(root / "val" / "images", root / "val" / "annotations.json")
        return train, val

    @staticmethod
    def class_names(dataset: CocoDetection) -> list[str]:
        """Object class names (labels 1..K)."""
        return list(dataset.class_names)

    def build_model(self, model_name: str, num_classes: int, pretrained: bool = False,
                    recipe: Optional[DenseRecipe] = None, **model_kwargs: Any) -> nn.Module:
        """Mask R-CNN for ``num_classes`` object classes; a recipe sets image scale, drop path and model kwargs."""
        min_size, max_size = (recipe.image_scale if recipe is not None else (self.min_size, self.max_size))
        return build_mask_rcnn(model_name, num_classes, min_size=min_size, max_size=max_size, pretrained=pretrained,
                               model_kwargs=_model_kwargs(recipe, model_kwargs), **self.head_kwargs)

    collate = staticmethod(detection_collate)

    @staticmethod
    def loss(model: nn.Module, batch: tuple[list[Tensor], list[dict]],
             device: torch.device) -> tuple[Tensor, dict[str, float]]:
        """Sum of Mask R-CNN's losses (RPN objectness/box, classifier, box regression, mask) in training mode."""
        images, targets = batch
        images = [image.to(device) for image in images]
        targets = [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets]
        losses = model(images, targets)
        total = sum(losses.values())
        return total, {name: float(value.detach()) for name, value in losses.items()}

    @staticmethod
    @torch.no_grad()
    def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
        """COCO box and mask AP over the loader (detections gathered across ranks)."""
        dataset = _base_dataset(loader)
        evaluator = CocoEvaluator(dataset.coco, dataset.category_ids)
        model.eval()
        for images, targets in loader:
            outputs = model([image.to(device) for image in images])
            evaluator.update(outputs, [target["image_id"] for target in targets])
        evaluator.synchronize()
        return evaluator.summarize()


class SegmentationTask(_TaskBase):
    """Semantic segmentation on image/mask folders with UperNet (+ auxiliary FCN head); primary metric mIoU.

    Args:
        crop_size: Training crop.
        scale: Keep-ratio resize bound (long, short) for training and evaluation; None: the images' own size.
        ratio_range: Training rescale range.
        test_mode: ``"whole"`` or ``"slide"`` inference.
        test_stride: Stride of slide inference (windows of ``crop_size``).
        ignore_index: Label excluded from loss and metrics.
        head_kwargs: Further :class:`~mambazoo.dense.segmentation.UperNet` arguments.
    """

    name = "segmentation"
    primary_metric = "mIoU"

    def __init__(self, crop_size: Union[int, tuple[int, int]] = 512, scale: Optional[tuple[int, int]] = None,
                 ratio_range: tuple[float, float] = (0.5, 2.0), test_mode: str = "whole",
                 test_stride: Optional[Union[int, tuple[int, int]]] = None, ignore_index: int = IGNORE_INDEX,
                 **head_kwargs: Any) -> None:
        if test_mode not in ("whole", "slide") or (test_mode == "slide" and test_stride is None):
            raise ValueError(f"test_mode must be 'whole' or 'slide' (with test_stride), got {test_mode!r}")
        self.crop_size, self.scale, self.ratio_range = crop_size, scale, ratio_range
        self.test_mode, self.test_stride, self.ignore_index = test_mode, test_stride, ignore_index
        self.head_kwargs = head_kwargs

    @classmethod
    def from_recipe(cls, recipe: DenseRecipe, **kwargs: Any) -> "SegmentationTask":
        """The task with the recipe's crop, resize scale and test mode (``kwargs`` override)."""
        options = dict(crop_size=recipe.crop_size, scale=recipe.image_scale, test_mode=recipe.test_mode,
                       test_stride=recipe.test_stride)
        return cls(**{**options, **kwargs})

    def build_datasets(self, data_dir: Union[str, Path]) -> tuple[SegmentationFolder, SegmentationFolder]:
        """``train`` (random rescale/crop/flip) and ``val`` splits of ``data_dir``."""
        root = Path(data_dir)
        names = read_class_names(root)["semantic"]
        common = dict(crop_size=self.crop_size, scale=self.scale, ignore_index=self.ignore_index)
        train = SegmentationFolder(root / "train", SegmentationTransform(True, ratio_range=self.ratio_range, **common),
                                   class_names=names)
        val = SegmentationFolder(root / "val", SegmentationTransform(False, **common), class_names=names)
        return train, val

    @staticmethod
    def class_names(dataset: SegmentationFolder) -> list[str]:
        """Semantic class names (labels 0..K-1)."""
        if dataset.class_names is None:
            raise ValueError("the dataset has no class names (pass class_names to SegmentationFolder)")
        return list(dataset.class_names)

    def build_model(self, model_name: str, num_classes: int, pretrained: bool = False,
                    recipe: Optional[DenseRecipe] = None, **model_kwargs: Any) -> nn.Module:
        """UperNet for ``num_classes`` classes; a recipe sets head width, auxiliary level, drop path, model kwargs."""
        backbone = create_backbone(model_name, pretrained=pretrained, **_model_kwargs(recipe, model_kwargs))
        head = dict(self.head_kwargs, ignore_index=self.ignore_index)
        if recipe is not None:
            head.update(aux_index=recipe.aux_index, aux_weight=recipe.aux_weight,
                        channels=recipe.head_channels or backbone.out_channels[0])
        return UperNet(backbone, num_classes, **head)

    def collate(self, batch: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """Stacked, padded images and labels."""
        return segmentation_collate(batch, self.ignore_index)

    @staticmethod
    def loss(model: nn.Module, batch: tuple[Tensor, Tensor], device: torch.device) -> tuple[Tensor, dict[str, float]]:
        """Decode-head cross-entropy plus the weighted auxiliary one."""
        images, targets = batch
        losses = model(images.to(device), targets.to(device))
        return losses["loss"], {name: float(value.detach()) for name, value in losses.items()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
        """mIoU, mAcc, aAcc and per-class IoU over the loader (confusion matrix summed across ranks)."""
        model = getattr(model, "module", model)  # a DistributedDataParallel wrapper: its UperNet
        names = _base_dataset(loader).class_names
        matrix = ConfusionMatrix(model.num_classes, self.ignore_index, names, device=device)
        model.eval()
        crop = self.crop_size
        for images, targets in loader:
            images, targets = images.to(device), targets.to(device)
            logits = model.predict(images, self.test_mode, crop, self.test_stride)
            if logits.shape[-2:] != targets.shape[-2:]:
                logits = F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)
            matrix.update(logits.argmax(1), targets)
        matrix.all_reduce()
        return matrix.compute()


def build_task(name: str, **kwargs: Any) -> Union[DetectionTask, SegmentationTask]:
    """``"detection"`` or ``"segmentation"`` task with its options."""
    tasks = dict(detection=DetectionTask, segmentation=SegmentationTask)
    if name not in tasks:
        raise ValueError(f"task must be one of {sorted(tasks)}, got {name!r}")
    return tasks[name](**kwargs)

"""Evaluation: COCO box/mask mAP through pycocotools, and mIoU from a confusion matrix.

Both evaluators accumulate per batch and reduce across ``torch.distributed`` ranks when a process group is
initialised: :class:`CocoEvaluator` gathers the detections of every rank, :class:`ConfusionMatrix` sums its matrix
(so ranks may see any disjoint shards of the data).
"""
import contextlib
import io
import math
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["COCO_STATS", "CocoEvaluator", "ConfusionMatrix", "detections_to_coco"]

# Names of COCOeval.stats entries 0..5, prefixed with "bbox_" or "segm_" in the metrics.
COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def detections_to_coco(prediction: dict, image_id: int, category_ids: Sequence[int],
                       mask_threshold: float = 0.5) -> list[dict]:
    """COCO results entries for one image's torchvision detections.

    Args:
        prediction: ``boxes`` (N, 4) xyxy, ``scores`` (N,), ``labels`` (N,) in 1..K and optionally ``masks``
            (N, 1, H, W) probabilities.
        image_id: The image's COCO id.
        category_ids: COCO category id of each label 1..K (``category_ids[label - 1]``).
        mask_threshold: Probability above which a pixel belongs to the mask.

    Returns:
        Dicts with ``image_id, category_id, bbox`` (x, y, w, h), ``score`` and, with masks, an RLE ``segmentation``.
    """
    from pycocotools import mask as mask_utils

    boxes = prediction["boxes"].detach().float().cpu()
    boxes = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = prediction["scores"].detach().cpu().tolist()
    labels = prediction["labels"].detach().cpu().tolist()
    results = [dict(image_id=int(image_id), category_id=int(category_ids[label - 1]), bbox=box, score=score)
               for box, score, label in zip(boxes, scores, labels)]
    if "masks" in prediction:
        masks = (prediction["masks"].detach().cpu()[:, 0] > mask_threshold).numpy().astype(np.uint8)
        for result, mask in zip(results, masks):
            rle = mask_utils.encode(np.asfortranarray(mask))
            result["segmentation"] = dict(size=list(rle["size"]), counts=rle["counts"].decode("ascii"))
    return results


class CocoEvaluator:
    """COCO mAP of detections against a ground-truth ``pycocotools.coco.COCO``.

    Args:
        coco_gt: Ground truth.
        category_ids: COCO category id of each label 1..K.
        iou_types: ``"bbox"`` and/or ``"segm"``.
    """

    def __init__(self, coco_gt, category_ids: Sequence[int], iou_types: Sequence[str] = ("bbox", "segm")) -> None:
        unknown = set(iou_types) - {"bbox", "segm"}
        if unknown:
            raise ValueError(f"iou_types must be 'bbox' and/or 'segm', got {sorted(unknown)}")
        self.coco_gt = coco_gt
        self.category_ids = list(category_ids)
        self.iou_types = tuple(iou_types)
        self.results: list[dict] = []
        self.image_ids: set[int] = set()
        self.summary_text = ""

    def update(self, predictions: Iterable[dict], image_ids: Iterable[int]) -> None:
        """Add one batch: torchvision outputs and their COCO image ids."""
        for prediction, image_id in zip(predictions, image_ids):
            self.image_ids.add(int(image_id))
            self.results.extend(detections_to_coco(prediction, image_id, self.category_ids))

    def synchronize(self) -> None:
        """Gather the detections and image ids of every rank (no-op without a process group)."""
        if not _distributed():
            return
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (self.results, sorted(self.image_ids)))
        self.results = [result for results, _ in gathered for result in results]
        self.image_ids = {image_id for _, ids in gathered for image_id in ids}

    def _no_detections(self):
        """An empty result set (pycocotools' ``loadRes`` needs at least one detection)."""
        from pycocotools.coco import COCO

        empty = COCO()
        empty.dataset = dict(images=list(self.coco_gt.dataset["images"]),
                             categories=list(self.coco_gt.dataset["categories"]), annotations=[])
        empty.createIndex()
        return empty

    def summarize(self) -> dict[str, float]:
        """``bbox_AP``, ``bbox_AP50``, ..., ``segm_APl`` over the images seen (NaN where COCO reports -1, i.e. no
        ground truth in that area range; 0 where there are objects but no detections); COCO's printed summary is
        kept in ``summary_text``."""
        from pycocotools.cocoeval import COCOeval

        metrics, texts = {}, []
        for iou_type in self.iou_types:
            # Fresh dicts (loadRes mutates them); segm results without "bbox" so that COCO sizes instances by
            # mask area, and bbox results without masks (as detectron2 and torchvision's references do).
            dropped = "segmentation" if iou_type == "bbox" else "bbox"
            results = [{k: v for k, v in r.items() if k != dropped} for r in self.results
                       if iou_type == "bbox" or "segmentation" in r]
            output = io.StringIO()
            with contextlib.redirect_stdout(output):
                coco_dt = self.coco_gt.loadRes(results) if results else self._no_detections()
                evaluator = COCOeval(self.coco_gt, coco_dt, iou_type)
                evaluator.params.imgIds = sorted(self.image_ids)
                evaluator.evaluate()
                evaluator.accumulate()
                evaluator.summarize()
            texts.append(f"{iou_type}:\n{output.getvalue()}")
            metrics.update({f"{iou_type}_{name}": float(value) if value >= 0 else math.nan
                            for name, value in zip(COCO_STATS, evaluator.stats)})
        self.summary_text = "\n".join(texts)
        return metrics


class ConfusionMatrix:
    """Pixel confusion matrix (rows: ground truth, columns: prediction) and the mmseg metrics derived from it.

    Args:
        num_classes: Classes K (labels 0..K-1).
        ignore_index: Label excluded from the counts.
        class_names: Names used for per-class IoU keys (default the indices).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: Optional[Sequence[str]] = None,
                 device=None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, prediction: Tensor, target: Tensor) -> None:
        """Count predicted vs true labels of matching (..., H, W) integer tensors."""
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ")
        valid = target != self.ignore_index
        truth, guess = target[valid].long(), prediction[valid].long()
        for name, values in (("target", truth), ("prediction", guess)):
            if values.numel() and (values.min() < 0 or values.max() >= self.num_classes):
                raise ValueError(f"{name} labels must be in 0..{self.num_classes - 1} or {self.ignore_index}, "
                                 f"got {int(values.min())}..{int(values.max())}")
        counts = torch.bincount(truth * self.num_classes + guess, minlength=self.num_classes ** 2)
        self.matrix += counts.view(self.num_classes, self.num_classes).to(self.matrix.device)

    def all_reduce(self) -> None:
        """Sum the matrix over ranks (no-op without a process group)."""
        if _distributed():
            dist.all_reduce(self.matrix)

    def compute(self) -> dict[str, float]:
        """``mIoU``, ``mAcc``, ``aAcc`` and ``IoU.<class>`` (NaN for classes absent from truth and prediction;
        means skip NaN, as mmseg)."""
        matrix = self.matrix.double()
        intersection = matrix.diag()
        truth, predicted = matrix.sum(1), matrix.sum(0)
        union = truth + predicted - intersection
        iou = torch.where(union > 0, intersection / union.clamp(min=1), torch.full_like(union, math.nan))
        accuracy = torch.where(truth > 0, intersection / truth.clamp(min=1), torch.full_like(truth, math.nan))
        total = truth.sum()
        metrics = dict(mIoU=float(iou.nanmean()), mAcc=float(accuracy.nanmean()),
                       aAcc=float(intersection.sum() / total) if total > 0 else math.nan)
        metrics.update({f"IoU.{name}": float(value) for name, value in zip(self.class_names, iou)})
        return metrics

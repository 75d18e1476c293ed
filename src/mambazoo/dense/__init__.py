"""Dense prediction on every family: detection / instance segmentation (torchvision Mask R-CNN + FPN) and semantic
segmentation (UperNet), with datasets, evaluation, recipes and inference. Guide: ``docs/dense.md``.

Layers, each usable alone: :mod:`.taps` (the family registry) → :mod:`.backbone` (the adapter) →
:mod:`.detection` / :mod:`.segmentation` (heads) → :mod:`.data`, :mod:`.synthetic`, :mod:`.evaluation`,
:mod:`.recipes`, :mod:`.optim` → :mod:`.tasks` (``--task detection|segmentation`` of the training engine) →
:mod:`.predict` (CLI).
"""
from .backbone import DenseBackbone, SimplePyramid, create_backbone, load_backbone_checkpoint
from .detection import DetectionBackbone, build_mask_rcnn
from .evaluation import CocoEvaluator, ConfusionMatrix, detections_to_coco
from .recipes import RECIPES, DenseRecipe, get_recipe
from .segmentation import UperNet, slide_inference
from .taps import TAP_SPECS, TapSpec, register_taps, tap_spec_for
from .tasks import DetectionTask, SegmentationTask, load_dense_weights

__all__ = [
    "RECIPES",
    "TAP_SPECS",
    "CocoEvaluator",
    "ConfusionMatrix",
    "DenseBackbone",
    "DenseRecipe",
    "DetectionBackbone",
    "DetectionTask",
    "SegmentationTask",
    "SimplePyramid",
    "TapSpec",
    "UperNet",
    "build_mask_rcnn",
    "create_backbone",
    "detections_to_coco",
    "get_recipe",
    "load_backbone_checkpoint",
    "load_dense_weights",
    "register_taps",
    "slide_inference",
    "tap_spec_for",
]

"""The papers' downstream recipes as data: one :class:`DenseRecipe` per (family, task), with per-variant overrides.

Every value comes from the family's official downstream configuration as documented in ``docs/dense.md``
("Recipes"), which also says where a value is not published. Schedules are stated in the papers' units: epochs for
detection (mmdet's 1× = 12 epochs, lr steps at 8 and 11; 3× = 36 epochs, steps at 27 and 33), iterations for
segmentation (poly decay, power 1.0).
"""
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from .taps import tap_spec_for

__all__ = ["DEFAULTS", "DenseRecipe", "RECIPES", "TASKS", "VARIANTS", "get_recipe"]

TASKS = ("detection", "segmentation")


@dataclass(frozen=True)
class DenseRecipe:
    """A downstream training recipe.

    Attributes:
        family: Model family.
        task: ``"detection"`` (Mask R-CNN + FPN) or ``"segmentation"`` (UperNet + auxiliary FCN head).
        protocol: What the paper ran (e.g. "Mask R-CNN 1x", "Cascade Mask R-CNN 3x", "UperNet 160k").
        optimizer: Optimizer name (timm's ``create_optimizer_v2`` names).
        lr: Base learning rate at ``batch_size``.
        weight_decay: Weight decay (1-D parameters excluded, see ``mambazoo.dense.optim``).
        layer_decay: Layer-wise lr decay factor, None where the paper uses none.
        schedule: ``"step"`` (detection) or ``"poly"`` (segmentation).
        epochs: Detection epochs (None for iteration-based schedules).
        lr_steps: Epochs at which a step schedule multiplies the lr by 0.1.
        iterations: Segmentation iterations (None for epoch-based schedules).
        warmup_iterations: Linear warm-up iterations.
        batch_size: Global batch size of the paper's run.
        drop_path_rate: Stochastic depth of the backbone, None where the recipe leaves the model default.
        model_kwargs: Creation arguments of the backbone for dense inputs (e.g. MambaVision's enlarged windows).
        image_scale: Detection (short, long) resize, or segmentation (long, short) keep-ratio bound.
        crop_size: Segmentation training crop.
        head_channels: UperNet head width; None: the backbone's width (Vim).
        aux_index: Level of the auxiliary FCN head.
        aux_weight: Auxiliary loss weight.
        test_mode: Segmentation inference: ``"whole"`` or ``"slide"``.
        test_stride: Stride of ``"slide"`` inference (crops of ``crop_size``).
        amp: Whether the paper trained with mixed precision (None: not stated).
        notes: Deviations and unpublished values.
    """

    family: str
    task: str
    protocol: str
    optimizer: str
    lr: float
    weight_decay: float
    layer_decay: Optional[float] = None
    schedule: str = "step"
    epochs: Optional[int] = None
    lr_steps: tuple[int, ...] = ()
    iterations: Optional[int] = None
    warmup_iterations: int = 500
    batch_size: int = 16
    drop_path_rate: Optional[float] = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    image_scale: tuple[int, int] = (800, 1333)
    crop_size: Optional[tuple[int, int]] = None
    head_channels: Optional[int] = 512
    aux_index: int = 2
    aux_weight: float = 0.4
    test_mode: str = "whole"
    test_stride: Optional[tuple[int, int]] = None
    amp: Optional[bool] = None
    notes: str = ""


def _detection_1x(family: str, lr: float = 1e-4, weight_decay: float = 0.05, **kwargs: Any) -> DenseRecipe:
    base = dict(protocol="Mask R-CNN 1x", optimizer="adamw", lr=lr, weight_decay=weight_decay, schedule="step",
                epochs=12, lr_steps=(8, 11), warmup_iterations=500, batch_size=16, image_scale=(800, 1333))
    return DenseRecipe(family=family, task="detection", **{**base, **kwargs})


def _upernet_160k(family: str, lr: float = 6e-5, weight_decay: float = 0.01, **kwargs: Any) -> DenseRecipe:
    base = dict(protocol="UperNet 160k", optimizer="adamw", lr=lr, weight_decay=weight_decay, schedule="poly",
                iterations=160_000, warmup_iterations=1500, batch_size=16, image_scale=(2048, 512),
                crop_size=(512, 512))
    return DenseRecipe(family=family, task="segmentation", **{**base, **kwargs})


# What the training tasks use without --recipe: the common protocols with the values of Swin's mmdet/mmseg configs.
DEFAULTS: dict[str, DenseRecipe] = dict(detection=_detection_1x("default"), segmentation=_upernet_160k("default"))

RECIPES: dict[tuple[str, str], DenseRecipe] = {(recipe.family, recipe.task): recipe for recipe in (
    _detection_1x(
        "vim", weight_decay=0.1, layer_decay=0.837, amp=True,
        notes="Paper: Cascade Mask R-CNN with the ViTDet recipe (LSJ 1024, 100 epochs, layer decay 0.837 for Ti/S); "
              "lr 1e-4 and weight decay 0.1 are ViTDet's defaults (UNVERIFIED for Vim). Here: Mask R-CNN 1x on "
              "the same optimizer settings."),
    _upernet_160k(
        "vim", lr=1e-4, weight_decay=0.05, layer_decay=0.92, iterations=60_000, head_channels=None, aux_index=2,
        test_mode="slide", test_stride=(341, 341), protocol="UperNet 60k", batch_size=32, drop_path_rate=0.1,
        notes="Configs: AdamW 1e-4, wd 0.05, layer decay 0.92, 4 GPUs x 8 images; the training scripts override "
              "Ti to lr 2e-4, wd 0.1 and S to layer decay 0.95 (see VARIANTS). Head width = embedding width. Drop "
              "path is the model constructor's default 0.1 (the configs do not set it)."),
    _detection_1x(
        "plainmamba", lr=1e-4, weight_decay=0.05,
        notes="Paper: Mask R-CNN 1x on a ViT-Adapter (needs deformable attention); here the simple pyramid."),
    _upernet_160k(
        "plainmamba", lr=6e-5, weight_decay=0.01, aux_index=3,
        notes="Paper: the four stride-16 taps go straight into UperNet; here through the simple pyramid."),
    _detection_1x(
        "mambaout", lr=1e-4, weight_decay=0.05,
        notes="Author's recipe (yuweihao/MambaOut#251): Swin's mmdet config, a LayerNorm per stage, lr 1e-4, no "
              "layer decay. Drop path published for Tiny/Small/Base only."),
    _upernet_160k(
        "mambaout", lr=1e-4, weight_decay=0.01,
        notes="Author's recipe: Swin's mmseg config with lr 1e-4 for all sizes, a LayerNorm per stage."),
    _detection_1x(
        "mambavision", lr=1e-4, weight_decay=0.05, epochs=36, lr_steps=(27, 33), amp=True, drop_path_rate=0.2,
        protocol="Cascade Mask R-CNN 3x", model_kwargs=dict(window_size=(8, 8, 112, 56)),
        notes="Paper: Cascade Mask R-CNN 3x with DETR-style multi-scale crops; here Mask R-CNN on the same "
              "schedule. Official code ignores configured drop path (class default 0.2 applies)."),
    _upernet_160k(
        "mambavision", lr=5e-5, weight_decay=0.01, drop_path_rate=0.2, model_kwargs=dict(window_size=(8, 8, 64, 32)),
        notes="S uses lr 6e-5 and windows (8, 8, 160, 56) (see VARIANTS). Official code ignores configured drop "
              "path (class default 0.2 applies)."),
    _detection_1x(
        "spatialmamba", lr=1e-4, weight_decay=0.05,
        notes="Swin-T's mmdet Mask R-CNN config; the 3x variant (36 epochs, multi-scale) also published."),
    _upernet_160k(
        "spatialmamba", lr=6e-5, weight_decay=0.01,
        notes="Swin-T's mmseg UperNet config; config names say 4xb4 (16 images) but the active per-GPU batch "
              "inherited from Swin is 2."),
)}

# Per-variant values that differ from the family recipe: (model name, task or None for both) -> field overrides.
VARIANTS: dict[tuple[str, Optional[str]], dict[str, Any]] = {
    ("vim_tiny_patch16_224", "segmentation"): dict(lr=2e-4, weight_decay=0.1),
    ("vim_small_patch16_224", "segmentation"): dict(layer_decay=0.95),
    ("plainmamba_l1", None): dict(drop_path_rate=0.1),
    ("plainmamba_l2", None): dict(drop_path_rate=0.2),
    ("plainmamba_l3", None): dict(drop_path_rate=0.3),
    ("mambaout_tiny", None): dict(drop_path_rate=0.3),
    ("mambaout_small", None): dict(drop_path_rate=0.3),
    ("mambaout_base", None): dict(drop_path_rate=0.6),
    ("mambavision_s", "segmentation"): dict(lr=6e-5, model_kwargs=dict(window_size=(8, 8, 160, 56))),
    ("spatialmamba_t", None): dict(drop_path_rate=0.2),
    ("spatialmamba_s", None): dict(drop_path_rate=0.3),
    ("spatialmamba_b", None): dict(drop_path_rate=0.5),
}


def get_recipe(model_name: str, task: str) -> DenseRecipe:
    """The recipe of a model for ``task``: the family's, with the variant's published differences applied."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    family = tap_spec_for(model_name).family
    if (family, task) not in RECIPES:
        raise ValueError(f"no {task} recipe for family {family!r}")
    recipe = RECIPES[(family, task)]
    base = model_name.split(".")[0]
    for key in ((base, None), (base, task)):
        recipe = replace(recipe, **VARIANTS.get(key, {}))
    return recipe

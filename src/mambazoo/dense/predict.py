"""``mambazoo predict``: run a detection or segmentation model on one image and draw the result into a PNG.

The model comes from a training run folder (``--checkpoint RUN``: its model, head settings, classes and best
weights) or is built from a registered backbone name and ``--task`` (random weights, or ``--checkpoint FILE`` with
the weights of the whole dense model: safetensors or a ``torch.save`` state dict, loaded with ``weights_only=True``
and strictly). Class names and count then come from a dataset's ``classes.json`` (``--classes``) or
``--num-classes``.
"""
import argparse
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from ..checkpoint import atomic_write
from ..training.config import load_run_config
from ..training.distributed import Distributed
from ..training.tasks import TaskContext, get_task
from .data import load_image
from .detection import build_mask_rcnn
from .segmentation import UperNet
from .tasks import load_dense_weights

__all__ = ["run_predict"]

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
           (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
           (0, 0, 128), (128, 128, 128)]
DETECTION_SIZES = (800, 1333)


def _class_names(args: argparse.Namespace) -> list[str]:
    if args.classes is not None:
        if not args.classes.is_file():
            raise ValueError(f"--classes file not found: {args.classes}")
        names = json.loads(args.classes.read_text())
        return list(names["things" if args.task == "detection" else "semantic"])
    if args.num_classes is None or args.num_classes < 1:
        raise ValueError("give --classes (a dataset's classes.json) or a positive --num-classes")
    return [str(index) for index in range(args.num_classes)]


def _build(args: argparse.Namespace, num_classes: int) -> nn.Module:
    if not args.model or not args.task:
        raise ValueError("give --model and --task, or a training run folder as --checkpoint")
    head = dict(args.head)
    if args.task == "detection":
        min_size, max_size = args.min_size or DETECTION_SIZES[0], args.max_size or DETECTION_SIZES[1]
        return build_mask_rcnn(args.model, num_classes, min_size=min_size, max_size=max_size, **head)
    return UperNet(args.model, num_classes, **head)


def _from_run(args: argparse.Namespace) -> tuple[nn.Module, list[str]]:
    """The model of a detection or segmentation run folder (weights not loaded yet) and its class names.

    ``--min-size``, ``--max-size`` and ``--slide`` override the run's sizes and test mode where given.
    """
    config = load_run_config(args.checkpoint)
    saved = argparse.Namespace(**config["args"])
    if saved.task not in ("detection", "segmentation"):
        raise ValueError(f"{args.checkpoint} is a {saved.task} run; predict draws detection and segmentation")
    for name in ("model", "task"):
        if getattr(args, name) and getattr(args, name) != getattr(saved, name):
            raise ValueError(f"--{name} {getattr(args, name)}: {args.checkpoint} trained {getattr(saved, name)}")
    args.model, args.task = saved.model, saved.task
    saved.pretrained, saved.pretrained_path, saved.backbone_checkpoint = False, None, None
    if args.task == "detection":
        saved.min_size = [args.min_size] if args.min_size else saved.min_size
        saved.max_size = args.max_size or saved.max_size
    elif args.slide is None and saved.test_mode == "slide":
        args.slide = (saved.test_crop or saved.crop_size)[0], saved.test_stride[0]
    task = get_task(saved.task)(saved, TaskContext(Distributed(), nullcontext))
    return task.create_model(), list(config["classes"])


def _draw_detections(image: Tensor, output: dict, names: list[str]) -> tuple[Tensor, str]:
    labels = output["labels"].tolist()
    colors = [PALETTE[(label - 1) % len(PALETTE)] for label in labels]
    canvas = (image * 255).round().to(torch.uint8)
    if len(labels):
        if "masks" in output:
            canvas = draw_segmentation_masks(canvas, output["masks"][:, 0] > 0.5, alpha=0.45, colors=colors)
        texts = [f"{names[label - 1]} {score:.2f}" for label, score in zip(labels, output["scores"].tolist())]
        canvas = draw_bounding_boxes(canvas, output["boxes"], labels=texts, colors=colors, width=2)
    summary = f"{len(labels)} detections with score >= threshold"
    return canvas, summary


def _draw_segmentation(image: Tensor, labels: Tensor, names: list[str]) -> tuple[Tensor, str]:
    present = labels.unique().tolist()
    masks = torch.stack([labels == value for value in present])
    colors = [PALETTE[value % len(PALETTE)] for value in present]
    canvas = draw_segmentation_masks((image * 255).round().to(torch.uint8), masks, alpha=0.5, colors=colors)
    shares = ", ".join(f"{names[value]} {100 * float((labels == value).float().mean()):.1f}%" for value in present)
    return canvas, f"classes: {shares}"


def _check_paths(args: argparse.Namespace) -> Optional[Path]:
    """Check the input and output paths; returns the run folder when ``--checkpoint`` is one."""
    if not args.image.is_file():
        raise ValueError(f"image not found: {args.image}")
    if args.output.suffix.lower() != ".png":
        raise ValueError(f"--output must be a .png file, got {args.output}")
    if args.checkpoint is not None and not args.checkpoint.exists():
        raise ValueError(f"checkpoint not found: {args.checkpoint}")
    return args.checkpoint if args.checkpoint is not None and args.checkpoint.is_dir() else None


def run_predict(args: argparse.Namespace) -> str:
    """Predict and draw; returns a one-line summary (also printed)."""
    run = _check_paths(args)
    torch.manual_seed(args.seed)
    if run is not None:
        model, names = _from_run(args)
    else:
        names = _class_names(args)
        model = _build(args, len(names))
    if args.checkpoint is not None:
        load_dense_weights(model, args.checkpoint)
    model.eval()
    image = load_image(args.image)
    with torch.inference_mode():
        if args.task == "detection":
            model.roi_heads.score_thresh = args.score_threshold
            canvas, summary = _draw_detections(image, model([image])[0], names)
        else:
            mode = dict(mode="slide", crop_size=args.slide[0], stride=args.slide[1]) if args.slide else {}
            canvas, summary = _draw_segmentation(image, model.predict(image[None], **mode)[0].argmax(0), names)
    with atomic_write(args.output) as temporary:
        Image.fromarray(np.ascontiguousarray(canvas.permute(1, 2, 0).numpy())).save(temporary, format="PNG")
    summary = f"{args.model} {args.task} on {args.image.name}: {summary}; wrote {args.output}"
    print(summary)
    return summary

"""``mambazoo predict``: run a detection or segmentation model on one image and draw the result into a PNG.

The model is built from a registered backbone name (random weights, or a checkpoint of the whole dense model:
safetensors or a ``torch.save`` state dict, loaded with ``weights_only=True`` and strictly). Class names and count
come from a dataset's ``classes.json`` (``--classes``) or ``--num-classes``.
"""
import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from .checkpoint import atomic_write, load_state_dict_file, strict_load
from .data import load_image
from .detection import build_mask_rcnn
from .segmentation import UperNet

__all__ = ["run_predict"]

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
           (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
           (0, 0, 128), (128, 128, 128)]


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
    head = dict(args.head)
    if args.task == "detection":
        head.setdefault("box_score_thresh", args.score_threshold)
        return build_mask_rcnn(args.model, num_classes, min_size=args.min_size, max_size=args.max_size, **head)
    return UperNet(args.model, num_classes, **head)


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


def run_predict(args: argparse.Namespace) -> str:
    """Predict and draw; returns a one-line summary (also printed)."""
    if not args.image.is_file():
        raise ValueError(f"image not found: {args.image}")
    if args.output.suffix.lower() != ".png":
        raise ValueError(f"--output must be a .png file, got {args.output}")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise ValueError(f"checkpoint not found: {args.checkpoint}")
    names = _class_names(args)
    torch.manual_seed(args.seed)
    model = _build(args, len(names))
    if args.checkpoint is not None:
        strict_load(model, load_state_dict_file(args.checkpoint), str(args.checkpoint))
    model.eval()
    image = load_image(args.image)
    with torch.inference_mode():
        if args.task == "detection":
            canvas, summary = _draw_detections(image, model([image])[0], names)
        else:
            mode = dict(mode="slide", crop_size=args.slide[0], stride=args.slide[1]) if args.slide else {}
            canvas, summary = _draw_segmentation(image, model.predict(image[None], **mode)[0].argmax(0), names)
    pixels = np.ascontiguousarray(canvas.permute(1, 2, 0).numpy())
    atomic_write(args.output, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))
    summary = f"{args.model} {args.task} on {args.image.name}: {summary}; wrote {args.output}"
    print(summary)
    return summary

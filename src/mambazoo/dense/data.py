"""Readers for COCO-format instance datasets and segmentation folders, train transforms and collate functions.

Samples are ``(image, target)`` with ``image`` a float (3, H, W) tensor in [0, 1]:

* detection: ``target`` = dict(boxes (N, 4) float xyxy in pixels, labels (N,) int64 in 1..K, masks (N, H, W)
  uint8, image_id int) — what torchvision's Mask R-CNN takes;
* segmentation: ``target`` = (H, W) int64 label map (``ignore_index`` = 255 is ignored).

Transforms draw their randomness from torch's generator, so DataLoader workers and ``torch.manual_seed`` control it.
"""
import contextlib
import io
import json
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "CocoDetection",
    "DetectionTransform",
    "RepeatDataset",
    "SegmentationFolder",
    "SegmentationTransform",
    "detection_collate",
    "load_image",
    "read_class_names",
    "segmentation_collate",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
IGNORE_INDEX = 255


def load_image(path: Union[str, Path]) -> Tensor:
    """An image file as a float (3, H, W) RGB tensor in [0, 1]."""
    with Image.open(path) as image:
        array = np.array(image.convert("RGB"))
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255)


def read_class_names(root: Union[str, Path]) -> dict:
    """The ``classes.json`` of a dataset root (``things``, ``semantic``, ``ignore_index``)."""
    path = Path(root) / "classes.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (written by mambazoo.dense.synthetic; see docs/dense.md)")
    return json.loads(path.read_text())


class CocoDetection(Dataset):
    """Instances of a COCO-format dataset (images + a COCO JSON with boxes and polygon/RLE masks).

    Crowd annotations and degenerate boxes are left out of the targets (they still count in COCO evaluation through
    the JSON). Category ids are mapped to contiguous labels 1..K in ascending id order (0 is background).

    Args:
        image_dir: Folder with the images (``file_name`` entries are relative to it).
        ann_file: The COCO JSON.
        transforms: Called as ``transforms(image, target)``.
    """

    def __init__(self, image_dir: Union[str, Path], ann_file: Union[str, Path],
                 transforms: Optional[Callable] = None) -> None:
        from pycocotools.coco import COCO

        self.image_dir, ann_file = Path(image_dir), Path(ann_file)
        for path, kind in ((self.image_dir, "image folder"), (ann_file, "annotation file")):
            if not path.exists():
                raise FileNotFoundError(f"{kind} not found: {path}")
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(str(ann_file))
        self.ann_file = ann_file
        self.ids = sorted(self.coco.imgs)
        if not self.ids:
            raise ValueError(f"{ann_file} lists no images")
        self.category_ids = sorted(self.coco.cats)
        self.label_of = {category: label for label, category in enumerate(self.category_ids, start=1)}
        self.class_names = [self.coco.cats[category]["name"] for category in self.category_ids]
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        image = load_image(self.image_dir / info["file_name"])
        height, width = image.shape[-2:]
        annotations = [ann for ann in self.coco.imgToAnns[image_id]
                       if not ann.get("iscrowd", 0) and ann["bbox"][2] > 0 and ann["bbox"][3] > 0]
        boxes = torch.tensor([ann["bbox"] for ann in annotations], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        masks = np.stack([self.coco.annToMask(ann) for ann in annotations]) if annotations \
            else np.zeros((0, height, width), dtype=np.uint8)
        target = dict(
            boxes=boxes,
            labels=torch.tensor([self.label_of[ann["category_id"]] for ann in annotations], dtype=torch.int64),
            masks=torch.from_numpy(masks),
            image_id=image_id,
        )
        return self.transforms(image, target) if self.transforms else (image, target)


class SegmentationFolder(Dataset):
    """Images with index masks of the same name: ``root/images/<name>.*`` and ``root/masks/<name>.png``.

    Args:
        root: Folder holding the image and mask folders.
        transforms: Called as ``transforms(image, target)``.
        class_names: Names of the labels 0..K-1 (e.g. ``read_class_names(dataset_root)["semantic"]``).
        images: Image folder, relative to ``root``.
        masks: Mask folder, relative to ``root`` (e.g. ADE20K: ``images/training`` and ``annotations/training``).
        reduce_zero_label: Label 0 means "unlabelled" (ADE20K): it becomes 255 and every other label drops by one
            (mmseg's ``reduce_zero_label``).
    """

    def __init__(self, root: Union[str, Path], transforms: Optional[Callable] = None,
                 class_names: Optional[Sequence[str]] = None, images: str = "images", masks: str = "masks",
                 reduce_zero_label: bool = False) -> None:
        self.class_names = list(class_names) if class_names is not None else None
        self.reduce_zero_label = reduce_zero_label
        root = Path(root)
        image_dir, mask_dir = root / images, root / masks
        for folder in (image_dir, mask_dir):
            if not folder.is_dir():
                raise FileNotFoundError(f"segmentation folder needs {folder}")
        self.images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.images:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}")
        self.masks = [mask_dir / f"{path.stem}.png" for path in self.images]
        missing = [path.name for path in self.masks if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images have no mask in {mask_dir}: {', '.join(missing[:5])}")
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = load_image(self.images[index])
        with Image.open(self.masks[index]) as mask:
            target = torch.from_numpy(np.array(mask).astype(np.int64))
        if self.reduce_zero_label:
            target = torch.where(target == 0, IGNORE_INDEX, target - 1)
            target[target == IGNORE_INDEX - 1] = IGNORE_INDEX
        if target.shape != image.shape[-2:]:
            raise ValueError(f"{self.masks[index]} is {tuple(target.shape)}, its image {tuple(image.shape[-2:])}")
        return self.transforms(image, target) if self.transforms else (image, target)


class RepeatDataset(Dataset):
    """``dataset`` repeated ``times`` times in a row, so that an epoch of a small dataset holds more steps (mmdet's
    ``RepeatDataset``)."""

    def __init__(self, dataset: Dataset, times: int) -> None:
        if times < 1:
            raise ValueError(f"times must be positive, got {times}")
        self.dataset, self.times = dataset, times

    def __len__(self) -> int:
        return len(self.dataset) * self.times

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        return self.dataset[index % len(self.dataset)]


class DetectionTransform:
    """Detection train transform: horizontal flip of the image, boxes and masks with probability ``flip_prob``.

    Scale jitter is done by the detector (a tuple ``min_size`` in :func:`~mambazoo.dense.detection.build_mask_rcnn`).
    """

    def __init__(self, flip_prob: float = 0.5) -> None:
        self.flip_prob = flip_prob

    def __call__(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        if torch.rand(()) < self.flip_prob:
            width = image.shape[-1]
            image = image.flip(-1)
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
            target = dict(target, boxes=boxes, masks=target["masks"].flip(-1))
        return image, target


def _pair(value: Union[int, Sequence[int]]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _resize(image: Tensor, target: Optional[Tensor], size: tuple[int, int]) -> tuple[Tensor, Optional[Tensor]]:
    if tuple(image.shape[-2:]) == size:
        return image, target
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    if target is not None:
        target = F.interpolate(target[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image, target


class SegmentationTransform:
    """mmseg-style segmentation transform.

    Training: random rescale (``ratio_range`` × the keep-ratio fit into ``scale``, or × the image size when
    ``scale`` is None), random ``crop_size`` crop in which no class covers more than ``cat_max_ratio`` of the labelled
    pixels (up to 10 tries), horizontal flip, padding to ``crop_size`` (image 0, label ``ignore_index``).
    Evaluation: the keep-ratio fit into ``scale`` for the image only (labels stay at full resolution; logits are
    resized back), or nothing when ``scale`` is None.

    Args:
        train: Training or evaluation behaviour.
        crop_size: Training crop (height, width).
        scale: (long side, short side) bound of the keep-ratio resize, e.g. (2048, 512) for ADE20K; None: none.
        ratio_range: Training rescale range.
        flip_prob: Horizontal flip probability.
        cat_max_ratio: Largest share of one class in a crop (1.0: no constraint).
        ignore_index: Label of padded pixels.
    """

    def __init__(self, train: bool, crop_size: Union[int, Sequence[int]] = 512,
                 scale: Optional[Sequence[int]] = None, ratio_range: tuple[float, float] = (0.5, 2.0),
                 flip_prob: float = 0.5, cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX) -> None:
        self.train = train
        self.crop_size = _pair(crop_size)
        self.scale = tuple(scale) if scale is not None else None
        self.ratio_range = ratio_range
        self.flip_prob = flip_prob
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index

    def _fit(self, size: tuple[int, int], ratio: float) -> tuple[int, int]:
        if self.scale is None:
            factor = ratio
        else:
            long_side, short_side = max(self.scale) * ratio, min(self.scale) * ratio
            factor = min(long_side / max(size), short_side / min(size))
        return max(1, round(size[0] * factor)), max(1, round(size[1] * factor))

    def _crop_box(self, target: Tensor) -> tuple[int, int, int, int]:
        height, width = target.shape
        crop_h, crop_w = min(self.crop_size[0], height), min(self.crop_size[1], width)
        for _ in range(10):
            y = int(torch.randint(height - crop_h + 1, ()))
            x = int(torch.randint(width - crop_w + 1, ()))
            labels = target[y:y + crop_h, x:x + crop_w]
            counts = labels[labels != self.ignore_index].bincount()
            counts = counts[counts > 0]
            if self.cat_max_ratio >= 1 or (len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio):
                break
        return y, x, crop_h, crop_w

    def __call__(self, image: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        size = tuple(image.shape[-2:])
        if not self.train:
            return (_resize(image, None, self._fit(size, 1.0))[0] if self.scale else image), target
        low, high = self.ratio_range
        image, target = _resize(image, target, self._fit(size, low + float(torch.rand(())) * (high - low)))
        y, x, crop_h, crop_w = self._crop_box(target)
        image, target = image[:, y:y + crop_h, x:x + crop_w], target[y:y + crop_h, x:x + crop_w]
        if torch.rand(()) < self.flip_prob:
            image, target = image.flip(-1), target.flip(-1)
        pad_h, pad_w = self.crop_size[0] - crop_h, self.crop_size[1] - crop_w
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h))
            target = F.pad(target, (0, pad_w, 0, pad_h), value=self.ignore_index)
        return image, target


def detection_collate(batch: Sequence[tuple[Tensor, dict]]) -> tuple[list[Tensor], list[dict]]:
    """Lists of images and targets (torchvision's detectors batch and pad them themselves)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def segmentation_collate(batch: Sequence[tuple[Tensor, Tensor]],
                         ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Stack images (B, 3, H, W) and labels (B, h, w), padding each to its largest size (image 0, label ignored).

    Labels may be larger than their images (evaluation at full label resolution after an image resize).
    """
    def largest(tensors: list[Tensor]) -> tuple[int, int]:
        return max(t.shape[-2] for t in tensors), max(t.shape[-1] for t in tensors)

    image_list, target_list = [image for image, _ in batch], [target for _, target in batch]
    images = torch.zeros(len(batch), image_list[0].shape[0], *largest(image_list), dtype=image_list[0].dtype)
    targets = torch.full((len(batch), *largest(target_list)), ignore_index, dtype=torch.int64)
    for index, (image, target) in enumerate(batch):
        images[index, :, :image.shape[-2], :image.shape[-1]] = image
        targets[index, :target.shape[-2], :target.shape[-1]] = target
    return images, targets

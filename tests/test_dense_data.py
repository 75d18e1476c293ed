"""Dense datasets: the composite generator's exact boxes/masks (recomputed from the glyph placements), the stardist
nuclei sample, the COCO and mask-folder readers, train transforms and collate functions."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from sklearn.datasets import load_digits

from mambazoo.dense.data import (
    CocoDetection,
    DetectionTransform,
    SegmentationFolder,
    SegmentationTransform,
    detection_collate,
    read_class_names,
    segmentation_collate,
)
from mambazoo.dense.synthetic import FASHION_MNIST_DIR, load_glyphs, write_composite, write_nuclei

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def composite(tmp_path_factory) -> Path:
    return write_composite(tmp_path_factory.mktemp("composite"), dict(train=6, val=2), image_size=(64, 80), seed=3)


def _glyph_mask(index: int, scale: int, threshold: int = 128) -> np.ndarray:
    """Independent re-rendering: sklearn's 8×8 digit (levels 0..16) scaled to 0..255, each pixel repeated."""
    digit = np.rint(load_digits().images[index] * 255 / 16)
    return np.repeat(np.repeat(digit, scale, axis=0), scale, axis=1) >= threshold


def test_composite_boxes_and_masks_are_exact(composite: Path) -> None:
    coco = json.loads((composite / "train" / "annotations.json").read_text())
    digits = load_digits()
    assert len(coco["images"]) == 6 and coco["annotations"]
    assert [c["name"] for c in coco["categories"]] == [str(d) for d in range(10)]
    for image_info in coco["images"]:
        image = np.array(Image.open(composite / "train" / "images" / image_info["file_name"]))
        semantic = np.array(Image.open(composite / "train" / "masks" / image_info["file_name"]))
        expected_semantic = np.zeros_like(semantic)
        annotations = [a for a in coco["annotations"] if a["image_id"] == image_info["id"]]
        for ann in annotations:
            glyph = ann["glyph"]
            local = _glyph_mask(glyph["index"], glyph["scale"])
            mask = np.zeros(image.shape[:2], dtype=bool)
            mask[glyph["y"]:glyph["y"] + local.shape[0], glyph["x"]:glyph["x"] + local.shape[1]] = local
            rows, cols = np.nonzero(mask)
            box = [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]
            assert ann["bbox"] == box and ann["area"] == mask.sum()
            assert ann["category_id"] == digits.target[glyph["index"]] + 1
            assert np.array_equal(mask_utils.decode(ann["segmentation"]).astype(bool), mask)
            assert (image[mask].max(axis=1) > 0).all()  # glyph pixels are painted (colour × intensity)
            expected_semantic[mask] = ann["category_id"]
        assert np.array_equal(semantic, expected_semantic)
        covered = sum(mask_utils.decode(a["segmentation"]).astype(int) for a in annotations)
        assert np.max(covered, initial=0) <= 1  # instances never overlap


def test_composite_is_deterministic_and_classes_file_is_written(composite: Path, tmp_path: Path) -> None:
    again = write_composite(tmp_path, dict(train=6, val=2), image_size=(64, 80), seed=3)
    for split in ("train", "val"):
        assert (again / split / "annotations.json").read_text() == (composite / split / "annotations.json").read_text()
    classes = read_class_names(composite)
    assert classes["semantic"][0] == "background" and len(classes["semantic"]) == 11
    assert classes["ignore_index"] == 255


def test_glyph_sources_and_bad_arguments(tmp_path: Path) -> None:
    glyphs = load_glyphs("digits")
    assert glyphs.images.shape == (1797, 8, 8) and glyphs.images.dtype == np.uint8 and glyphs.images.max() == 255
    with pytest.raises(ValueError, match="glyph source must be"):
        load_glyphs("mnist")
    if not FASHION_MNIST_DIR.exists():
        with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
            load_glyphs("fashion-mnist")
    with pytest.raises(ValueError, match="ranges"):
        write_composite(tmp_path, scales=(4, 2))


def test_coco_reader_gives_torchvision_targets(composite: Path) -> None:
    dataset = CocoDetection(composite / "train" / "images", composite / "train" / "annotations.json")
    coco = json.loads((composite / "train" / "annotations.json").read_text())
    image, target = dataset[0]
    assert image.shape == (3, 64, 80) and 0 <= image.min() and image.max() <= 1
    anns = [a for a in coco["annotations"] if a["image_id"] == dataset.ids[0]]
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
    assert torch.equal(target["boxes"], boxes) and target["image_id"] == dataset.ids[0]
    assert target["labels"].tolist() == [a["category_id"] for a in anns]  # ids 1..10 map to labels 1..10
    assert target["masks"].shape == (len(anns), 64, 80) and target["masks"].dtype == torch.uint8
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        CocoDetection(composite / "train" / "images", composite / "missing.json")


def _box_of(mask: torch.Tensor) -> list[float]:
    rows, cols = torch.nonzero(mask, as_tuple=True)
    return [cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1]


def test_detection_flip_moves_boxes_with_the_masks(composite: Path) -> None:
    dataset = CocoDetection(composite / "train" / "images", composite / "train" / "annotations.json",
                            DetectionTransform(flip_prob=1.0))
    plain = CocoDetection(composite / "train" / "images", composite / "train" / "annotations.json")
    image, target = dataset[1]
    assert torch.equal(image, plain[1][0].flip(-1))
    for box, mask in zip(target["boxes"], target["masks"]):
        assert box.tolist() == _box_of(mask)


def test_segmentation_folder_and_transforms(composite: Path) -> None:
    names = read_class_names(composite)["semantic"]
    dataset = SegmentationFolder(composite / "train", class_names=names)
    image, labels = dataset[0]
    assert labels.shape == image.shape[-2:] and labels.dtype == torch.int64 and int(labels.max()) <= 10
    flip_and_pad = SegmentationTransform(True, crop_size=(96, 96), ratio_range=(1.0, 1.0), flip_prob=1.0)
    out_image, out_labels = flip_and_pad(image, labels)
    assert out_image.shape == (3, 96, 96) and out_labels.shape == (96, 96)
    assert torch.equal(out_image[:, :64, :80], image.flip(-1)) and torch.equal(out_labels[:64, :80], labels.flip(-1))
    assert (out_labels[64:] == 255).all() and (out_labels[:, 80:] == 255).all() and (out_image[:, 64:] == 0).all()
    torch.manual_seed(0)
    crop = SegmentationTransform(True, crop_size=32, ratio_range=(0.5, 2.0))
    for _ in range(5):
        crop_image, crop_labels = crop(image, labels)
        assert crop_image.shape == (3, 32, 32) and crop_labels.shape == (32, 32)
    evaluation = SegmentationTransform(False, scale=(40, 32))
    resized, kept = evaluation(image, labels)
    assert resized.shape == (3, 32, 40) and kept is labels  # keep-ratio fit into (long 40, short 32)


def test_segmentation_folder_reports_missing_masks(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    with pytest.raises(FileNotFoundError, match="1 images have no mask.*a.png"):
        SegmentationFolder(tmp_path)


def test_collate_functions(composite: Path) -> None:
    dataset = CocoDetection(composite / "val" / "images", composite / "val" / "annotations.json")
    images, targets = detection_collate([dataset[0], dataset[1]])
    assert len(images) == len(targets) == 2 and isinstance(targets[0], dict)
    batch = [(torch.ones(3, 4, 6), torch.zeros(4, 6, dtype=torch.int64)), (torch.ones(3, 5, 3), torch.ones(6, 3))]
    images, labels = segmentation_collate(batch)
    assert images.shape == (2, 3, 5, 6) and labels.shape == (2, 6, 6)
    assert images[0, :, 4:].abs().sum() == 0 and (labels[0, 4:] == 255).all() and (labels[1, :, 3:] == 255).all()


@pytest.mark.skipif(importlib.util.find_spec("stardist") is None, reason="stardist wheel not installed")
def test_nuclei_sample_has_125_instances_with_boxes_from_masks(tmp_path: Path) -> None:
    root = write_nuclei(tmp_path)
    folder = Path(importlib.util.find_spec("stardist").submodule_search_locations[0]) / "data" / "images"
    labels = np.array(Image.open(folder / "mask2d.tif")).astype(np.int64)
    val = json.loads((root / "val" / "annotations.json").read_text())
    assert len(val["annotations"]) == 125 == len(np.unique(labels)) - 1
    for ann in val["annotations"]:
        rows, cols = np.nonzero(labels == ann["source_label"])
        assert ann["bbox"] == [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]
    quarters = [labels[r:r + 256, c:c + 256] for r in (0, 256) for c in (0, 256)]
    train = json.loads((root / "train" / "annotations.json").read_text())
    assert len(train["annotations"]) == sum(len(np.unique(q[q > 0])) for q in quarters)
    dataset = CocoDetection(root / "val" / "images", root / "val" / "annotations.json")
    image, target = dataset[0]
    assert image.shape == (3, 512, 512) and target["masks"].shape == (125, 512, 512)
    semantic = np.array(Image.open(root / "val" / "masks" / "nuclei.png"))
    assert np.array_equal(semantic, (labels > 0).astype(np.uint8))

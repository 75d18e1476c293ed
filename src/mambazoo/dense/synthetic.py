"""Offline datasets for tests and the quick start: a composite of real glyphs, and the stardist nuclei sample.

Both are written in the two formats :mod:`mambazoo.dense.data` reads (layout in ``docs/dense.md``)::

    root/classes.json                      {"things": [...], "semantic": [...], "ignore_index": 255}
    root/<split>/images/<name>.png         RGB images
    root/<split>/masks/<name>.png          semantic index masks (0 = background)
    root/<split>/annotations.json          COCO instances: boxes, RLE masks, areas

Composite: real glyphs (scikit-learn's 8×8 digits, or Fashion-MNIST when the Debian package
``dataset-fashion-mnist`` is installed) upscaled by an integer factor (nearest neighbour), pasted without overlap
on a noisy canvas in a random colour. A glyph's instance mask is its thresholded upscaled image, so boxes and masks
are exact; each annotation records the placement (``glyph``: source index, scale, x, y) so they can be recomputed.

Nuclei: the 512×512 fluorescence image with 125 labelled nuclei that the ``stardist`` wheel ships
(``stardist/data/images/img2d.tif`` + ``mask2d.tif``; 2018 Data Science Bowl per its docstring), boxes from masks.
"""
import gzip
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

from ..checkpoint import atomic_write, write_text

__all__ = [
    "FASHION_MNIST_DIR",
    "GlyphSet",
    "load_glyphs",
    "mask_to_rle",
    "render_glyph",
    "write_composite",
    "write_nuclei",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                         "ankle boot")
IGNORE_INDEX = 255
GLYPH_THRESHOLD = 128


@dataclass(frozen=True)
class GlyphSet:
    """Glyph images (N, h, w) as uint8 0..255, their class labels (N,) and the class names."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    if int.from_bytes(data[:4], "big") != magic:
        raise ValueError(f"{path} is not an IDX file with magic {magic}")
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_glyphs(source: str = "digits") -> GlyphSet:
    """Load ``"digits"`` (scikit-learn, 1,797 8×8 glyphs) or ``"fashion-mnist"`` (Debian package, 60,000 28×28)."""
    if source == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
        return GlyphSet(images, digits.target.astype(np.int64), tuple(str(d) for d in range(10)))
    if source == "fashion-mnist":
        images_file = FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz"
        if not images_file.is_file():
            raise FileNotFoundError(f"{images_file} not found: install it with "
                                    "`apt-get install dataset-fashion-mnist`, or use glyphs='digits'")
        labels = _read_idx(FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz", 2049).astype(np.int64)
        return GlyphSet(_read_idx(images_file, 2051), labels, FASHION_MNIST_CLASSES)
    raise ValueError(f"glyph source must be 'digits' or 'fashion-mnist', got {source!r}")


def render_glyph(glyph: np.ndarray, scale: int) -> np.ndarray:
    """Upscale a glyph by an integer factor with nearest-neighbour sampling."""
    return np.kron(glyph, np.ones((scale, scale), dtype=glyph.dtype))


def mask_to_rle(mask: np.ndarray) -> dict:
    """COCO run-length encoding (JSON-ready: ``counts`` as a string) of a binary (H, W) mask."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return dict(size=[int(s) for s in rle["size"]], counts=rle["counts"].decode("ascii"))


def _box_of(mask: np.ndarray) -> list[float]:
    rows, cols = np.nonzero(mask)
    x, y = cols.min(), rows.min()
    return [float(x), float(y), float(cols.max() + 1 - x), float(rows.max() + 1 - y)]


def _annotation(ann_id: int, image_id: int, category_id: int, mask: np.ndarray, **extra) -> dict:
    return dict(id=ann_id, image_id=image_id, category_id=category_id, bbox=_box_of(mask), area=int(mask.sum()),
                iscrowd=0, segmentation=mask_to_rle(mask), **extra)


def _write_png(path: Path, array: np.ndarray) -> None:
    with atomic_write(path) as temporary:
        Image.fromarray(array).save(temporary, format="PNG")


def _write_json(path: Path, content: dict) -> None:
    write_text(path, json.dumps(content))


def _coco(images: list[dict], annotations: list[dict], class_names: Sequence[str], description: str) -> dict:
    categories = [dict(id=index + 1, name=name) for index, name in enumerate(class_names)]
    return dict(info=dict(description=description), images=images, annotations=annotations, categories=categories)


def _place(rng: np.random.Generator, canvas: tuple[int, int], size: tuple[int, int],
           taken: list[tuple[int, int, int, int]], tries: int = 50) -> Optional[tuple[int, int]]:
    """Top-left corner for a (h, w) patch not touching the boxes in ``taken`` (1-pixel gap), or None."""
    height, width = size
    if height > canvas[0] or width > canvas[1]:
        return None
    for _ in range(tries):
        y, x = int(rng.integers(0, canvas[0] - height + 1)), int(rng.integers(0, canvas[1] - width + 1))
        if all(y + height < y0 or y1 < y or x + width < x0 or x1 < x for y0, x0, y1, x1 in taken):
            taken.append((y, x, y + height, x + width))
            return y, x
    return None


def _composite_image(rng: np.random.Generator, glyphs: GlyphSet, size: tuple[int, int],
                     objects: tuple[int, int], scales: tuple[int, int]):
    """One canvas; returns (image, semantic mask, [(glyph index, scale, y, x, instance mask)])."""
    image = rng.integers(0, 40, size=(*size, 3), dtype=np.uint8) + np.uint8(rng.integers(0, 40))
    semantic = np.zeros(size, dtype=np.uint8)
    placed, taken = [], []
    for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
        index = int(rng.integers(len(glyphs.images)))
        scale = int(rng.integers(scales[0], scales[1] + 1))
        rendered = render_glyph(glyphs.images[index], scale)
        corner = _place(rng, size, rendered.shape, taken)
        if corner is None:
            continue
        y, x = corner
        mask = np.zeros(size, dtype=bool)
        mask[y:y + rendered.shape[0], x:x + rendered.shape[1]] = rendered >= GLYPH_THRESHOLD
        colour = rng.integers(100, 256, size=3)
        shade = np.zeros(size, dtype=np.float64)
        shade[y:y + rendered.shape[0], x:x + rendered.shape[1]] = rendered / 255.0
        image[mask] = np.rint(colour[None, :] * shade[mask][:, None]).astype(np.uint8)
        semantic[mask] = glyphs.labels[index] + 1
        placed.append((index, scale, y, x, mask))
    return image, semantic, placed


def write_composite(
        root: Union[str, Path],
        splits: Optional[dict[str, int]] = None,
        image_size: Union[int, tuple[int, int]] = 128,
        objects: tuple[int, int] = (1, 4),
        scales: tuple[int, int] = (3, 6),
        glyphs: str = "digits",
        seed: int = 0,
) -> Path:
    """Write the composite dataset (layout in the module docstring); returns ``root``.

    Args:
        root: Output folder.
        splits: Images per split, default ``{"train": 32, "val": 8}``.
        image_size: Canvas (height, width) or a square side.
        objects: Inclusive range of glyphs tried per image (a glyph that does not fit is skipped).
        scales: Inclusive range of the integer upscaling factor.
        glyphs: ``"digits"`` or ``"fashion-mnist"``.
        seed: Random seed (split ``i`` uses ``seed + i``).
    """
    splits = dict(train=32, val=8) if splits is None else splits
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if min(size) < 8 or not 1 <= objects[0] <= objects[1] or not 1 <= scales[0] <= scales[1]:
        raise ValueError(f"need image_size >= 8 and ranges 1 <= low <= high, got {size}, {objects}, {scales}")
    glyph_set = load_glyphs(glyphs)
    root = Path(root)
    for offset, (split, count) in enumerate(splits.items()):
        rng = np.random.default_rng(seed + offset)
        images, annotations = [], []
        for image_id in range(1, count + 1):
            image, semantic, placed = _composite_image(rng, glyph_set, size, objects, scales)
            name = f"{image_id:06d}.png"
            _write_png(root / split / "images" / name, image)
            _write_png(root / split / "masks" / name, semantic)
            images.append(dict(id=image_id, file_name=name, height=size[0], width=size[1]))
            for index, scale, y, x, mask in placed:
                glyph = dict(index=index, scale=scale, y=y, x=x)
                category = int(glyph_set.labels[index]) + 1
                annotations.append(_annotation(len(annotations) + 1, image_id, category, mask, glyph=glyph))
        description = f"mambazoo composite of {glyphs} glyphs, split {split}, seed {seed + offset}"
        _write_json(root / split / "annotations.json", _coco(images, annotations, glyph_set.class_names, description))
    _write_json(root / "classes.json", dict(things=list(glyph_set.class_names),
                                           semantic=["background", *glyph_set.class_names],
                                           ignore_index=IGNORE_INDEX))
    return root


def stardist_sample_dir() -> Path:
    """Folder of the images bundled with the ``stardist`` wheel (found without importing stardist)."""
    spec = importlib.util.find_spec("stardist")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the nuclei sample needs the stardist wheel: `pip install --no-deps stardist`")
    return Path(spec.submodule_search_locations[0]) / "data" / "images"


def _to_rgb8(image: np.ndarray) -> np.ndarray:
    scaled = np.rint(image.astype(np.float64) * (255.0 / max(int(image.max()), 1))).astype(np.uint8)
    return np.repeat(scaled[..., None], 3, axis=2)


def _write_instances(root: Path, split: str, tiles: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
    images, annotations = [], []
    for image_id, (name, image, labels) in enumerate(tiles, start=1):
        _write_png(root / split / "images" / name, _to_rgb8(image))
        _write_png(root / split / "masks" / name, (labels > 0).astype(np.uint8))
        images.append(dict(id=image_id, file_name=name, height=int(labels.shape[0]), width=int(labels.shape[1])))
        for value in np.unique(labels[labels > 0]):
            annotations.append(_annotation(len(annotations) + 1, image_id, 1, labels == value,
                                           source_label=int(value)))
    _write_json(root / split / "annotations.json",
                _coco(images, annotations, ["nucleus"], f"stardist nuclei sample, split {split}"))


def write_nuclei(root: Union[str, Path]) -> Path:
    """Write the stardist nuclei sample: ``val`` = the whole 512×512 image, ``train`` = its four 256×256 quarters.

    Intensities are scaled to 0..255 (grey replicated to RGB); instance labels become COCO annotations (a label cut
    by a quarter boundary becomes one instance per quarter); the semantic mask is nucleus (1) vs background (0).
    """
    folder = stardist_sample_dir()
    image = np.array(Image.open(folder / "img2d.tif"))
    labels = np.array(Image.open(folder / "mask2d.tif")).astype(np.int64)
    root = Path(root)
    _write_instances(root, "val", [("nuclei.png", image, labels)])
    half_h, half_w = image.shape[0] // 2, image.shape[1] // 2
    quarters = [(f"nuclei_{row}{col}.png", image[row * half_h:(row + 1) * half_h, col * half_w:(col + 1) * half_w],
                 labels[row * half_h:(row + 1) * half_h, col * half_w:(col + 1) * half_w])
                for row in range(2) for col in range(2)]
    _write_instances(root, "train", quarters)
    _write_json(root / "classes.json", dict(things=["nucleus"], semantic=["background", "nucleus"],
                                           ignore_index=IGNORE_INDEX))
    return root

"""Datasets without network access, and deterministic, resumable, rank-aware data loading.

Datasets: ``digits`` (scikit-learn's bundled 8×8 digits, upsampled to 32×32), ``fashion-mnist`` (the Debian
``dataset-fashion-mnist`` files) and ImageFolder trees (``train/<class>/*``, ``val/<class>/*``).

Loading: :class:`EpochSampler` gives every rank its share of a per-epoch permutation (the same order for any number
of processes) and can start mid-epoch; each training sample is transformed under its own RNG seed, derived from
(seed, epoch, position in the epoch), so augmentation does not depend on the number of processes or workers, nor on
where a run was resumed. See ``docs/training.md`` ("Resume").
"""
import gzip
import importlib.util
import math
import random
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler

__all__ = [
    "DATASETS",
    "FASHION_MNIST_DIR",
    "ArrayImageDataset",
    "DatasetSplits",
    "EpochSampler",
    "SeededSamples",
    "build_classification_datasets",
    "create_eval_loader",
    "create_train_loader",
    "load_digits",
    "load_fashion_mnist",
    "load_image_folder",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
FASHION_MNIST_INSTALL = "sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"
DIGITS_SIZE = 32
DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DATASETS = ("digits", "fashion-mnist", "folder")


class ArrayImageDataset(Dataset):
    """Grayscale images held in memory as a (N, H, W) uint8 array, returned as RGB PIL images through ``transform``."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, classes: Sequence[str],
                 transform: Optional[Callable] = None) -> None:
        if images.ndim != 3 or images.dtype != np.uint8 or len(images) != len(targets):
            raise ValueError(f"images must be (N, H, W) uint8 with one target each, got {images.shape} "
                             f"{images.dtype} and {len(targets)} targets")
        self.images, self.targets, self.classes = images, targets.astype(np.int64), tuple(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index], mode="L").convert("RGB")
        return (self.transform(image) if self.transform else image), int(self.targets[index])


@dataclass
class DatasetSplits:
    """A training and a validation dataset with the class names they share."""

    train: Dataset
    val: Dataset
    classes: tuple[str, ...]
    description: dict = field(default_factory=dict)


def _sklearn_digits_file() -> Path:
    """scikit-learn's bundled ``digits.csv.gz``, located without importing scikit-learn (seconds of start-up)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("--dataset digits reads scikit-learn's bundled digits: pip install scikit-learn")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"


def _stratified_split(targets: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a per-class random split (each class contributes ``round(fraction × count)`` to validation)."""
    rng = np.random.RandomState(seed)
    train, val = [], []
    for label in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == label))
        cut = int(round(val_fraction * len(members)))
        val.append(members[:cut])
        train.append(members[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def load_digits() -> DatasetSplits:
    """scikit-learn's 1,797 8×8 digits (levels 0–16, UCI optdigits), upsampled bicubically to 32×32.

    The split is stratified and fixed (20 % validation, seed 0) whatever the training seed: 1,438 / 359 images.
    """
    table = np.loadtxt(_sklearn_digits_file(), delimiter=",", dtype=np.float64)
    pixels = np.clip(np.rint(table[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    targets = table[:, -1].astype(np.int64)
    images = np.stack([np.asarray(Image.fromarray(image, mode="L").resize((DIGITS_SIZE, DIGITS_SIZE),
                                                                         Image.Resampling.BICUBIC))
                       for image in pixels])
    train_idx, val_idx = _stratified_split(targets, DIGITS_VAL_FRACTION, DIGITS_SPLIT_SEED)
    classes = tuple(str(c) for c in range(10))
    return DatasetSplits(ArrayImageDataset(images[train_idx], targets[train_idx], classes),
                         ArrayImageDataset(images[val_idx], targets[val_idx], classes), classes,
                         dict(name="digits", train=len(train_idx), val=len(val_idx), source="scikit-learn"))


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Read a gzipped IDX file (big-endian header: magic, count[, rows, cols]; then uint8 data)."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    num_dims = magic & 0xFF
    header = 4 + 4 * num_dims
    if len(data) < header or struct.unpack(">i", data[:4])[0] != magic:
        raise ValueError(f"{path} is not an IDX file with magic {magic}")
    shape = struct.unpack(f">{num_dims}i", data[4:header])
    if len(data) - header != math.prod(shape):
        raise ValueError(f"{path}: header says {shape} but holds {len(data) - header} bytes of data")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(root: Optional[Union[str, Path]] = None) -> DatasetSplits:
    """Fashion-MNIST (60,000 train + 10,000 test 28×28 images, 10 classes) from the Debian package's files.

    Args:
        root: Folder with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``; default the Debian location.
    """
    root = Path(root) if root else FASHION_MNIST_DIR
    names = {split: (root / f"{split}-images-idx3-ubyte.gz", root / f"{split}-labels-idx1-ubyte.gz")
             for split in ("train", "t10k")}
    missing = [str(path) for pair in names.values() for path in pair if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST files not found: {', '.join(missing)}. Install the Debian package "
                                f"({FASHION_MNIST_INSTALL}) or pass --data-dir with the four IDX .gz files.")
    splits = {}
    for split, (image_path, label_path) in names.items():
        images, labels = _read_idx(image_path, 2051), _read_idx(label_path, 2049)
        if len(images) != len(labels):
            raise ValueError(f"{image_path} holds {len(images)} images but {label_path} {len(labels)} labels")
        splits[split] = ArrayImageDataset(images, labels, FASHION_MNIST_CLASSES)
    return DatasetSplits(splits["train"], splits["t10k"], FASHION_MNIST_CLASSES,
                         dict(name="fashion-mnist", train=len(splits["train"]), val=len(splits["t10k"]),
                              source=str(root)))


def _check_class_folders(root: Path) -> None:
    """Raise unless ``root`` holds class sub-folders that each contain at least one image."""
    folders = sorted(path for path in root.iterdir() if path.is_dir())
    empty = [folder.name for folder in folders
             if not any(path.suffix.lower() in IMAGE_EXTENSIONS for path in folder.rglob("*"))]
    if not folders or empty:
        detail = f"empty class folders: {', '.join(empty)}" if empty else "no class folders found"
        raise ValueError(f"data folder {root} must hold one sub-folder of images per class "
                         f"({', '.join(IMAGE_EXTENSIONS)}); {detail}")


def _find_split(root: Path, names: Sequence[str]) -> Path:
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(f"{root} has no {' or '.join(f'{n}/' for n in names)} folder (ImageFolder layout: "
                            f"{root}/train/<class>/<image> and {root}/val/<class>/<image>)")


def load_image_folder(root: Union[str, Path], splits: Sequence[str] = ("train", "val")) -> DatasetSplits:
    """An ImageFolder tree read with timm's ``ImageDataset``: ``root/train/<class>/*`` and ``root/val/<class>/*``.

    The splits may also be called ``training`` and ``validation``; they must hold the same class folders.
    """
    from timm.data import ImageDataset

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data-dir {root} does not exist")
    names = {"train": ("train", "training"), "val": ("val", "validation")}
    paths = {split: _find_split(root, names[split]) for split in splits}
    for path in paths.values():
        _check_class_folders(path)
    datasets = {split: ImageDataset(str(path)) for split, path in paths.items()}
    class_maps = {split: dataset.reader.class_to_idx for split, dataset in datasets.items()}
    if len({tuple(mapping.items()) for mapping in class_maps.values()}) > 1:
        raise ValueError(f"class folders differ between splits: "
                         f"{({split: sorted(mapping) for split, mapping in class_maps.items()})}")
    mapping = next(iter(class_maps.values()))
    classes = tuple(sorted(mapping, key=mapping.get))
    train = datasets.get("train", datasets.get("val"))
    return DatasetSplits(train, datasets.get("val", train), classes,
                         dict(name="folder", root=str(root), **{split: len(ds) for split, ds in datasets.items()}))


def build_classification_datasets(dataset: str, data_dir: Optional[str], splits: Sequence[str] = ("train", "val")
                                  ) -> DatasetSplits:
    """The datasets named by ``--dataset`` (``digits``, ``fashion-mnist``) or the ImageFolder at ``--data-dir``."""
    if dataset == "digits":
        return load_digits()
    if dataset == "fashion-mnist":
        return load_fashion_mnist(data_dir)
    if dataset in ("", "folder"):
        if not data_dir:
            raise ValueError("--data-dir is required for ImageFolder data (or pick --dataset digits|fashion-mnist)")
        return load_image_folder(data_dir, splits)
    raise ValueError(f"unknown --dataset {dataset!r}; choose one of {', '.join(DATASETS)} (folder = ImageFolder)")


def _mix64(value: int) -> int:
    """SplitMix64 finaliser: a well-spread 64-bit hash of ``value``."""
    value = (value + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return value ^ (value >> 31)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The RNG seed of the sample at ``position`` of epoch ``epoch`` (a 32-bit value, numpy's limit)."""
    return _mix64(_mix64(_mix64(seed) ^ epoch) ^ position) & 0xFFFFFFFF


class EpochSampler(Sampler):
    """Per-epoch shuffled indices split across ranks, yielding ``(index, sample_seed)`` pairs; can start mid-epoch.

    The epoch order is a permutation drawn from ``seed + epoch`` (each index repeated ``repeats`` times in a row for
    repeated augmentation), padded to a multiple of the world size and dealt round-robin: rank r takes global
    positions r, r + W, r + 2W, ... So the samples of global batch k are the same for any number of processes with
    the same global batch size. With repeated augmentation an epoch keeps ``len(dataset)`` samples in total.

    Args:
        num_samples: Dataset length.
        num_replicas: World size.
        rank: This process's rank.
        seed: Base seed (shared by all ranks).
        shuffle: Shuffle each epoch (else dataset order).
        repeats: Repeated augmentation count (0 or 1: off).
    """

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True,
                 repeats: int = 0) -> None:
        if num_samples <= 0:
            raise ValueError("the dataset is empty")
        self.num_samples, self.num_replicas, self.rank = num_samples, num_replicas, rank
        self.seed, self.shuffle, self.repeats = seed, shuffle, max(repeats, 1)
        self.per_rank = math.ceil(num_samples / num_replicas)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and the number of this rank's samples to skip (resume mid-epoch)."""
        if not 0 <= start <= self.per_rank:
            raise ValueError(f"start must be in 0..{self.per_rank}, got {start}")
        self.epoch, self.start = epoch, start

    def _epoch_order(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        if self.repeats > 1:
            order = [index for index in order for _ in range(self.repeats)]
        total = self.per_rank * self.num_replicas
        order = order[:total] if len(order) >= total else order + order[:total - len(order)]
        return order

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self._epoch_order()
        for local in range(self.start, self.per_rank):
            position = self.rank + local * self.num_replicas
            yield order[position], sample_seed(self.seed, self.epoch, position)

    def __len__(self) -> int:
        return self.per_rank - self.start


@contextmanager
def _isolated_rng(seed: int):
    """Seed python, numpy and torch (CPU) RNGs for one sample, restoring the caller's states afterwards."""
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


class SeededSamples(Dataset):
    """Wrap a map-style dataset so that ``dataset[(index, seed)]`` transforms sample ``index`` under RNG ``seed``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with _isolated_rng(seed):
            return self.dataset[index]


def create_train_loader(dataset: Dataset, batch_size: int, sampler: EpochSampler, workers: int = 0,
                        collate_fn: Optional[Callable] = None, pin_memory: bool = False) -> DataLoader:
    """Training loader over ``sampler`` (full batches only); samples are transformed under their own seeds."""
    return DataLoader(SeededSamples(dataset), batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate_fn, pin_memory=pin_memory, drop_last=True, persistent_workers=workers > 0,
                      generator=torch.Generator().manual_seed(sampler.seed))


def create_eval_loader(dataset: Dataset, batch_size: int, num_replicas: int = 1, rank: int = 0, workers: int = 0,
                       collate_fn: Optional[Callable] = None, pin_memory: bool = False) -> DataLoader:
    """Evaluation loader in dataset order; across ranks timm's ``OrderedDistributedSampler`` pads the last batch.

    The padding repeats samples; evaluators drop it with the sampler's ``num_valid_samples``.
    """
    if num_replicas > 1:
        from timm.data.distributed_sampler import OrderedDistributedSampler
        sampler = OrderedDistributedSampler(dataset, num_replicas=num_replicas, rank=rank)
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_fn,
                      pin_memory=pin_memory, drop_last=False, persistent_workers=workers > 0,
                      generator=torch.Generator().manual_seed(0))

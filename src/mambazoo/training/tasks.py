"""The task interface: what a kind of training job (classification, detection, segmentation) supplies to the engine.

The engine (:mod:`mambazoo.training.engine`) owns everything a task does not: distributed setup, DDP/FSDP2
wrapping, the optimiser, scheduler, EMA, AMP, gradient accumulation and clipping, the loop and its progress bar,
checkpoints and resume, ``summary.csv`` and the plot. A task owns its flags, data, model, loss and metrics.
See ``docs/training.md`` ("The task interface") for a walk-through.
"""
import abc
import argparse
import importlib
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Optional, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .data import DatasetSplits
from .distributed import Distributed
from .recipes import Recipe

__all__ = ["BUILTIN_TASKS", "TASKS", "Task", "TaskContext", "get_task", "register_task"]

# The package's own tasks and the modules that register them, imported on first use (detection and segmentation
# need torchvision and pycocotools, which classification does not).
BUILTIN_TASKS = {"classification": "mambazoo.training.classification", "detection": "mambazoo.dense.tasks",
                 "segmentation": "mambazoo.dense.tasks"}


@dataclass(frozen=True)
class TaskContext:
    """What the engine tells a task about the run."""

    dist: Distributed
    autocast: Callable[[], AbstractContextManager]
    channels_last: bool = False

    @property
    def device(self) -> torch.device:
        """The device of this process."""
        return self.dist.device


class Task(abc.ABC):
    """A kind of training job. Subclass it, then :func:`register_task` it to make it available as ``--task NAME``.

    Class attributes:
        name: The ``--task`` value.
        metric: Key of :meth:`evaluate`'s result that ranks checkpoints ("best N").
        higher_is_better: Ranking direction of ``metric``.
        defaults: The task's default recipe: values replacing the engine's flag defaults (a ``--recipe`` and
            explicit flags still override them).
        recipes: The ``--recipe`` presets of the task, by name.
        lr_ratios: Flags set relative to the resolved learning rate unless given (e.g. ``warmup_lr`` = 0.001 × lr);
            a recipe's ratios take precedence.

    Call order in the engine: :meth:`add_arguments` (while building the parser), then per run ``__init__`` →
    :meth:`build_datasets` → :meth:`build_model` → :meth:`attach_transforms`, then :meth:`training_step` for every
    batch and :meth:`evaluate` after every epoch. Everything that can be checked without work (paths, class counts,
    flag combinations) belongs in :meth:`build_datasets`, which runs before any model is built.
    """

    name: ClassVar[str]
    metric: ClassVar[str]
    higher_is_better: ClassVar[bool] = True
    defaults: ClassVar[dict[str, Any]] = {}
    recipes: ClassVar[Mapping[str, Recipe]] = {}
    lr_ratios: ClassVar[Mapping[str, float]] = {}

    def __init__(self, args: argparse.Namespace, context: TaskContext) -> None:
        self.args = args
        self.context = context

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add the task's own flags to the training parser (the engine's common flags are already there)."""

    @abc.abstractmethod
    def build_datasets(self) -> DatasetSplits:
        """Training and validation datasets (map-style, without transforms yet); validate data-related flags."""

    def build_validation_data(self) -> DatasetSplits:
        """The data ``mambazoo validate`` evaluates on (its ``val``); default :meth:`build_datasets`. Override it
        when the training split is not needed for evaluation."""
        return self.build_datasets()

    @abc.abstractmethod
    def build_model(self, datasets: DatasetSplits) -> nn.Module:
        """The model to train, on the CPU, with pretrained or initial weights loaded as the flags ask."""

    @abc.abstractmethod
    def attach_transforms(self, model: nn.Module, datasets: DatasetSplits) -> dict[str, Any]:
        """Give the datasets their training / evaluation transforms; returns the data config to record."""

    def collate_fn(self, train: bool) -> Optional[Callable]:
        """Collate function of the training or evaluation loader (None: PyTorch's default)."""
        return None

    def optimizer_params(self, model: nn.Module) -> Union[nn.Module, list[dict]]:
        """What the optimiser factory gets: the model (timm groups it: no weight decay on norms, biases and
        ``no_weight_decay()``; ``--layer-decay`` via ``group_matcher``) or explicit parameter groups."""
        return model

    @abc.abstractmethod
    def training_step(self, model: nn.Module, batch: Any, epoch: int) -> tuple[Tensor, int]:
        """Move ``batch`` to the device, run the model and return (loss, number of samples in the batch).

        Runs under the engine's autocast; the engine scales, back-propagates and steps.
        """

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """Metrics of ``model`` over ``loader`` (this rank's share), reduced across ranks; must contain :attr:`metric`
        and, where the task has one, ``loss`` (plotted with the training loss). Every rank gets the same values. Runs
        with the model in eval mode under ``torch.inference_mode()``."""


TASKS: dict[str, type[Task]] = {}


def register_task(task: type[Task]) -> type[Task]:
    """Make ``task`` available as ``--task task.name`` (usable as a class decorator)."""
    if not getattr(task, "name", None) or not getattr(task, "metric", None):
        raise ValueError(f"{task.__name__} must define the class attributes 'name' and 'metric'")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> type[Task]:
    """The task class registered as ``name`` (a built-in task's module is imported on first use)."""
    if name not in TASKS and name in BUILTIN_TASKS:
        importlib.import_module(BUILTIN_TASKS[name])
    if name not in TASKS:
        known = ", ".join(sorted(set(TASKS) | set(BUILTIN_TASKS)))
        raise ValueError(f"unknown --task {name!r}; registered tasks: {known}")
    return TASKS[name]

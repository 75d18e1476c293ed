"""Training and evaluation: ``mambazoo train`` / ``mambazoo validate`` (also under ``torchrun``).

See ``docs/training.md``. The engine (:mod:`.engine`) runs any :class:`~.tasks.Task`; classification is built in.
"""
from .checkpoints import CheckpointManager, load_model_weights, resolve_weights_file
from .classification import ClassificationTask
from .config import parse_train_args
from .engine import TrainResult, Trainer, train
from .evaluation import validate
from .recipes import RECIPES, Recipe
from .tasks import TASKS, Task, TaskContext, register_task

__all__ = [
    "RECIPES",
    "TASKS",
    "CheckpointManager",
    "ClassificationTask",
    "Recipe",
    "Task",
    "TaskContext",
    "TrainResult",
    "Trainer",
    "load_model_weights",
    "parse_train_args",
    "register_task",
    "resolve_weights_file",
    "train",
    "validate",
]

"""Checkpoints of a run (the last and the best N) and strict weight loading, on :mod:`mambazoo.checkpoint`.

A run folder holds ``checkpoints/<name>.safetensors`` (model weights), ``<name>.ema.safetensors`` (EMA weights, if
any), ``<name>.state.pt`` (the resumable training state, ``torch.load(weights_only=True)``-safe) and
``checkpoints.json``, the manifest naming the last checkpoint and the best N. Every file is written atomically
(:func:`mambazoo.checkpoint.atomic_write`: a temporary file, fsynced and renamed); the manifest is written last, so a
crash at any moment leaves the previous manifest and every file it names intact. See ``docs/training.md``.
"""
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Union

from torch import Tensor, nn

from ..checkpoint import TEMPORARY_MARK, check_state_dict, load_checkpoint_file, save_state_dict, write_text

__all__ = [
    "CHECKPOINT_DIR",
    "MANIFEST",
    "CheckpointManager",
    "load_model_weights",
    "read_manifest",
    "read_state_dict",
    "resolve_weights_file",
]

CHECKPOINT_DIR = "checkpoints"
MANIFEST = "checkpoints.json"
MANIFEST_FORMAT = "mambazoo-checkpoints"


def read_state_dict(path: Union[str, Path]) -> dict[str, Any]:
    """Read weights from a safetensors file or a ``torch.save`` file with ``weights_only=True``.

    Official Vim training checkpoints pickle an ``argparse.Namespace``; it is allow-listed.
    """
    from ..models.vim import CHECKPOINT_SAFE_GLOBALS

    return load_checkpoint_file(path, CHECKPOINT_SAFE_GLOBALS)


def read_manifest(run_dir: Union[str, Path]) -> dict[str, Any]:
    """The checkpoint manifest of a run folder."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} holds no {MANIFEST}: not a mambazoo training output (or no checkpoint "
                                f"was written yet)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a mambazoo checkpoint manifest")
    return manifest


def resolve_weights_file(path: Union[str, Path], which: str = "best", ema: Optional[bool] = None) -> Path:
    """A weights file: ``path`` itself, or for a run folder its best (or last) checkpoint.

    Args:
        path: A weights file or a training output folder.
        which: ``"best"`` (falls back to the last when no checkpoint was ranked) or ``"last"``.
        ema: Use the EMA weights; None picks the weights the run ranked its checkpoints by.
    """
    path = Path(path)
    if not path.is_dir():
        return path
    manifest = read_manifest(path)
    entry = (manifest["best"][0] if which == "best" and manifest["best"] else manifest["last"])
    use_ema = manifest["ranked_weights"] == "ema" if ema is None else ema
    if use_ema and not entry.get("ema"):
        raise ValueError(f"{path}: checkpoint {entry['name']} has no EMA weights (the run had no --model-ema)")
    return path / CHECKPOINT_DIR / f"{entry['name']}{'.ema' if use_ema else ''}.safetensors"


def _family_filter(model: nn.Module) -> Optional[Callable]:
    """The ``checkpoint_filter_fn`` of the model's family module (timm anatomy), if it has one."""
    return getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)


def _classifier_keys(model: nn.Module) -> tuple[str, ...]:
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{name}.{kind}" for name in names for kind in ("weight", "bias"))


def checkpoint_num_classes(state_dict: dict[str, Tensor], model: nn.Module) -> Optional[int]:
    """Classes of the checkpoint's classifier (None when it has none)."""
    for key in _classifier_keys(model):
        if key.endswith(".weight") and key in state_dict:
            return int(state_dict[key].shape[0])
    return None


def load_model_weights(model: nn.Module, path: Union[str, Path], reset_head: bool = False) -> list[str]:
    """Load a checkpoint strictly, adapting it with the family's ``checkpoint_filter_fn`` (key renames, unwrapping
    official containers, position-embedding resize to the model's input size).

    Args:
        model: Target model.
        path: A weights file (safetensors or ``torch.save``, ours or an official one) or a training output folder.
        reset_head: Fine-tuning: keep the model's freshly initialised classifier when the checkpoint's has another
            class count (otherwise that is an error).

    Returns:
        The classifier keys that were not loaded (empty unless the head was reset).
    """
    file = resolve_weights_file(path)
    state_dict = read_state_dict(file)
    filter_fn = _family_filter(model)
    if filter_fn is not None:
        try:
            state_dict = filter_fn(state_dict, model)
        except ValueError as error:
            raise ValueError(f"{file}: {error}") from None
    head_keys = _classifier_keys(model)
    model_state = model.state_dict()
    head_differs = any(key in state_dict and key in model_state and state_dict[key].shape != model_state[key].shape
                       for key in head_keys)
    skipped = []
    if head_differs:
        classes = checkpoint_num_classes(state_dict, model)
        if not reset_head:
            raise ValueError(f"class count mismatch: {file} has a classifier for {classes} classes, the model "
                             f"{getattr(model, 'num_classes', '?')}; pass --num-classes {classes}, or fine-tune "
                             f"from it with --pretrained-path {file} to start from a new classifier")
        skipped = [key for key in head_keys if key in state_dict]
        state_dict = {k: v for k, v in state_dict.items() if k not in skipped}
    check_state_dict(state_dict, model, str(file), ignore_prefixes=tuple(skipped), adaptable=False)
    model.load_state_dict(state_dict, strict=not skipped)
    return skipped


class CheckpointManager:
    """Keeps the last checkpoint (with resumable state) and the best N (weights) of a run; rank 0 writes.

    Args:
        run_dir: The run folder.
        keep_best: How many best checkpoints to keep.
        metric: Name of the ranking metric.
        higher_is_better: Ranking direction.
        ranked_weights: ``"model"`` or ``"ema"``: whose evaluation the metric comes from.
    """

    def __init__(self, run_dir: Union[str, Path], keep_best: int, metric: str, higher_is_better: bool,
                 ranked_weights: str = "model") -> None:
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / CHECKPOINT_DIR
        self.keep_best = keep_best
        self.manifest = dict(format=MANIFEST_FORMAT, version=1, metric=metric, higher_is_better=higher_is_better,
                             ranked_weights=ranked_weights, last=None, best=[])
        if (self.run_dir / MANIFEST).is_file():
            self.manifest.update(read_manifest(self.run_dir))

    @property
    def last_state_file(self) -> Optional[Path]:
        """The resumable state of the last checkpoint (None before the first save)."""
        last = self.manifest["last"]
        return self.folder / f"{last['name']}.state.pt" if last else None

    def save(self, name: str, weights: dict[str, Tensor], ema_weights: Optional[dict[str, Tensor]],
             state: dict[str, Any], epoch: int, step: int, metric: Optional[float] = None) -> None:
        """Write one checkpoint, make it the last one, rank it among the best N if it has a metric, and delete files
        no longer listed (including leftovers of interrupted writes)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        metadata = dict(format="pt", epoch=str(epoch), step=str(step))
        save_state_dict(weights, self.folder / f"{name}.safetensors", metadata)
        if ema_weights is not None:
            save_state_dict(ema_weights, self.folder / f"{name}.ema.safetensors", metadata)
        save_state_dict(state, self.folder / f"{name}.state.pt")
        entry = dict(name=name, epoch=epoch, step=step, metric=metric, ema=ema_weights is not None)
        self.manifest["last"] = entry
        if metric is not None and not math.isnan(metric):  # a diverged run (NaN) is never "best"
            ranked = [e for e in self.manifest["best"] if e["name"] != name] + [entry]
            ranked.sort(key=lambda e: e["metric"], reverse=self.manifest["higher_is_better"])
            self.manifest["best"] = ranked[:self.keep_best]
        write_text(self.run_dir / MANIFEST, json.dumps(self.manifest, indent=2) + "\n")
        self._delete_unlisted()

    def _delete_unlisted(self) -> None:
        names = {e["name"] for e in self.manifest["best"]}
        last = self.manifest["last"]["name"]
        keep = {f"{n}{suffix}" for n in names | {last} for suffix in (".safetensors", ".ema.safetensors")}
        keep.add(f"{last}.state.pt")
        temporary = re.escape(TEMPORARY_MARK)
        pattern = re.compile(rf"^(\.)?(epoch|step)\d+.*(\.safetensors|\.state\.pt)({temporary}\w+)?$")
        for path in self.folder.iterdir():
            if path.name not in keep and pattern.match(path.name):
                path.unlink(missing_ok=True)

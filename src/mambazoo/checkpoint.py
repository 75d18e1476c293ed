"""Checkpoint files for every model family: safe loading, a strict key check with a readable diff, atomic writes.

Every family's loading goes through this module, so every loading error names the file and the problem:

* :func:`load_checkpoint_file` reads a ``.safetensors`` file or a ``torch.save`` file with ``weights_only=True``
  (plus an allow-list of the classes a family's official files pickle, e.g. ``argparse.Namespace`` in Vim's training
  checkpoints). A missing path, a directory, an empty file, a truncated or corrupt file and a disallowed pickled
  class each raise an error naming the file (:class:`FileNotFoundError`, :class:`IsADirectoryError` or
  :class:`CheckpointError`). With ``unknown_objects="placeholder"`` a file that pickles other objects (e.g. a yacs
  config in Spatial-Mamba's training checkpoints) is read again with a restricted unpickler that resolves only the
  globals PyTorch's weights-only loader allows and turns every other class into an inert :class:`Placeholder`:
  nothing from the file is imported or called, the tensors load intact.
* :func:`check_state_dict` compares a (converted) state dict with a model and raises :class:`CheckpointMismatchError`
  listing the missing, unexpected and mis-shaped keys, grouped over block indices (``layers.{0-23}.norm.weight``)
  so that another model's checkpoint gives a short, readable listing. Families call it at the end of their
  ``checkpoint_filter_fn``.
* :func:`build_model_with_checkpoint` wraps timm's ``build_model_with_cfg``: a local file given as
  ``pretrained_cfg_overlay=dict(file=...)`` is read with :func:`load_checkpoint_file` (so its errors name it), hub
  downloads load with the family's allow-list, and a mismatch raised by the filter names the weights' source
  (file, hub id or URL).
* :func:`save_state_dict`, :func:`write_text` and :func:`atomic_write` write files atomically (a temporary file in
  the same folder, fsynced, then ``os.replace``): an interrupted write never leaves a truncated checkpoint or result
  file behind.

A family's model file uses it like this::

    def checkpoint_filter_fn(state_dict, model):
        state_dict = ...  # unwrap and rename the official layout
        check_state_dict(state_dict, model)
        return state_dict

    def _create_family(variant, pretrained=False, **kwargs):
        return build_model_with_checkpoint(
            FamilyModel, variant, pretrained, filter_fn=checkpoint_filter_fn,
            safe_globals=(argparse.Namespace,), feature_cfg=dict(...), **kwargs)
"""
import _compat_pickle
import contextlib
import logging
import os
import pickle
import types
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "Placeholder",
    "atomic_write",
    "build_model_with_checkpoint",
    "check_checkpoint_path",
    "check_state_dict",
    "describe_source",
    "load_checkpoint_file",
    "save_state_dict",
    "unwrap_state_dict",
    "write_text",
]

PathLike = Union[str, os.PathLike]
# Marks the temporary files of atomic writes: ``.<target name>.tmp-<random>``.
TEMPORARY_MARK = ".tmp-"
UNKNOWN_OBJECTS = ("error", "placeholder")
_logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (empty, truncated, corrupt, or pickling a disallowed class)."""


class CheckpointMismatchError(ValueError):
    """A state dict whose keys or shapes do not match the model; the message lists every difference.

    Attributes:
        missing: Model keys absent from the checkpoint.
        unexpected: Checkpoint keys the model does not have.
        mismatched: ``{key: (checkpoint shape, model shape)}``.
        source: Where the weights came from (a file, a hub id, ...), when known.
        hint: A family-specific remark appended to the listing, when any.
    """

    def __init__(self, model_name: str, missing: list[str], unexpected: list[str],
                 mismatched: dict[str, tuple[tuple, tuple]], num_model_keys: int, source: Optional[str] = None,
                 hint: Optional[str] = None):
        self.model_name = model_name
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        self.num_model_keys = num_model_keys
        self.source, self.hint = source, hint
        super().__init__(self._message())

    def with_source(self, source: str) -> "CheckpointMismatchError":
        """The same error naming ``source`` (kept if already set)."""
        if self.source is not None:
            return self
        return CheckpointMismatchError(self.model_name, self.missing, self.unexpected, self.mismatched,
                                       self.num_model_keys, source, self.hint)

    def _message(self) -> str:
        origin = f"checkpoint {self.source}" if self.source else "checkpoint"
        lines = [f"{origin} does not match {self.model_name}:"]
        matched = self.num_model_keys - len(self.missing)
        if matched * 2 < self.num_model_keys or len(self.mismatched) * 2 > self.num_model_keys:
            lines.append(f"  only {matched - len(self.mismatched)} of {self.num_model_keys} model keys match in name "
                         f"and shape: are these the weights of another model or variant?")
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}): {', '.join(_group_keys(self.missing))}")
        if self.unexpected:
            lines.append(f"  unexpected ({len(self.unexpected)}): {', '.join(_group_keys(self.unexpected))}")
        if self.mismatched:
            lines.append(f"  mis-shaped ({len(self.mismatched)}):")
            lines += [f"    {line}" for line in _group_shapes(self.mismatched)]
        if self.hint:
            lines.append(f"  ({self.hint})")
        return "\n".join(lines)


_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")


def _compress_indices(indices: Iterable[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    values = sorted(set(indices))
    runs, start = [], values[0]
    for previous, current in zip(values, values[1:] + [None]):
        if current != previous + 1:
            runs.append(str(start) if start == previous else f"{start}-{previous}")
            start = current
    return ",".join(runs)


def _pattern_groups(keys: Iterable[str]) -> dict[str, list[tuple[int, ...]]]:
    """Keys grouped by their pattern with numeric path components replaced, in first-seen order."""
    groups: dict[str, list[tuple[int, ...]]] = {}
    for key in keys:
        groups.setdefault(_INDEX.sub("#", key), []).append(tuple(int(i) for i in _INDEX.findall(key)))
    return groups


def _render(pattern: str, indices: list[tuple[int, ...]]) -> str:
    """A pattern with each ``#`` replaced by the index (or ``{a-b,c}`` set) it takes at that position."""
    parts = pattern.split("#")
    rendered = parts[0]
    for position, part in enumerate(parts[1:]):
        values = {index[position] for index in indices}
        rendered += str(next(iter(values))) if len(values) == 1 else "{" + _compress_indices(values) + "}"
        rendered += part
    return rendered


def _group_keys(keys: Sequence[str]) -> list[str]:
    """Readable key listing: keys differing only in block indices collapse into one entry.

    Patterns with one varying index are exact (``layers.{0-23}.norm.weight``); with several the entry names the
    index sets and the count of keys.
    """
    entries = []
    for pattern, indices in _pattern_groups(keys).items():
        varying = sum(len({index[p] for index in indices}) > 1 for p in range(pattern.count("#")))
        suffix = f" ({len(indices)} keys)" if varying > 1 else ""
        entries.append(_render(pattern, indices) + suffix)
    return entries


def _group_shapes(mismatched: Mapping[str, tuple[tuple, tuple]]) -> list[str]:
    """One line per key pattern and shape pair."""
    by_shapes: dict[tuple, list[str]] = {}
    for key, shapes in mismatched.items():
        by_shapes.setdefault((_INDEX.sub("#", key), shapes), []).append(key)
    lines = []
    for (_, (given, expected)), keys in by_shapes.items():
        for entry in _group_keys(keys):
            lines.append(f"{entry}: checkpoint {tuple(given)} vs model {tuple(expected)}")
    return lines


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    architecture = cfg.get("architecture") if isinstance(cfg, Mapping) else None
    return f"{type(model).__name__} ({architecture})" if architecture else type(model).__name__


def _adaptable_keys(model: nn.Module) -> tuple[set[str], set[str]]:
    """Keys whose shapes timm adapts after the filter: (classifier keys, first-conv weight keys).

    The classifier is re-initialised when the model's class count differs from the pretrained config's; the first
    conv's input channels are adapted for another ``in_chans``.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifiers, first_convs = set(), set()
    if isinstance(cfg, Mapping):
        names = cfg.get("classifier") or ()
        names = (names,) if isinstance(names, str) else names
        if getattr(model, "num_classes", None) != cfg.get("num_classes"):
            classifiers = {f"{name}.{part}" for name in names for part in ("weight", "bias")}
        convs = cfg.get("first_conv") or ()
        first_convs = {f"{name}.weight" for name in ((convs,) if isinstance(convs, str) else convs)}
    return classifiers, first_convs


def check_state_dict(
        state_dict: Mapping[str, Any],
        model: nn.Module,
        source: Optional[str] = None,
        ignore_prefixes: Sequence[str] = (),
        hint: Optional[Callable[[list[str], list[str]], Optional[str]]] = None,
        adaptable: bool = True,
) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``state_dict`` has exactly the model's keys and shapes.

    With ``adaptable`` (timm's pretrained loading), keys that timm adapts after a family's filter are not compared:
    the classifier when the model's ``num_classes`` differs from its pretrained config's, and the input-channel
    dimension of the first conv (``first_conv``). Without it every key and shape must match (a direct
    ``load_state_dict``).

    Args:
        state_dict: The converted state dict (the model's key names).
        model: The target model.
        source: Where the weights come from, named in the error (e.g. the file).
        ignore_prefixes: Key prefixes left out of the comparison on both sides.
        hint: ``hint(missing, unexpected)`` gives a family-specific remark for the error, or None.
        adaptable: Leave out what timm adapts when it loads pretrained weights (see above).
    """
    classifiers, first_convs = _adaptable_keys(model) if adaptable else (set(), set())

    def kept(key: str) -> bool:
        return key not in classifiers and not key.startswith(tuple(ignore_prefixes))

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if kept(k)}
    given = {k: tuple(getattr(v, "shape", ())) for k, v in state_dict.items() if kept(k)}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = {}
    for key in expected.keys() & given.keys():
        shape, model_shape = given[key], expected[key]
        channels_only = key in first_convs and len(shape) == len(model_shape) > 1 and \
            shape[:1] + shape[2:] == model_shape[:1] + model_shape[2:]
        if shape != model_shape and not channels_only:
            mismatched[key] = (shape, model_shape)
    if missing or unexpected or mismatched:
        mismatched = {k: mismatched[k] for k in expected if k in mismatched}  # model order
        remark = hint(missing, unexpected) if hint is not None else None
        raise CheckpointMismatchError(_model_name(model), missing, unexpected, mismatched, len(expected), source,
                                      remark)


def unwrap_state_dict(checkpoint: Mapping[str, Any], source: str) -> dict[str, Tensor]:
    """The state dict inside a checkpoint: itself, or its ``state_dict`` / ``model`` entry (mmdet/mmseg/mmcls and
    training checkpoints); an error naming ``source`` when no mapping of tensors is found."""
    for key in ("state_dict", "model"):
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    if not checkpoint or not all(isinstance(value, Tensor) for value in checkpoint.values()):
        raise CheckpointError(f"{source} holds no state dict of tensors (top-level keys: {list(checkpoint)[:8]})")
    return dict(checkpoint)


def check_checkpoint_path(path: PathLike) -> Path:
    """The path as a :class:`~pathlib.Path` if it names a non-empty file; otherwise an error naming it."""
    if path is None or str(path) == "":
        raise FileNotFoundError("no checkpoint file given (empty path)")
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(2, "checkpoint file not found", str(path))
    if path.is_dir():
        raise IsADirectoryError(21, "checkpoint path is a directory, not a file", str(path))
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint file '{path}' is empty (0 bytes): an interrupted download or copy?")
    return path


class Placeholder(dict):
    """Stands in for a pickled object of a class the loader does not allow; keeps only that class's name.

    It accepts whatever unpickling does to an object (construction with any arguments, ``__setstate__``, item and
    list assignment) and does nothing beyond storing dict items, which are themselves already-safe values.
    """

    source = "unknown"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def __setstate__(self, state: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"Placeholder({self.source})"


def _allowed_globals(safe_globals: Sequence[Any]) -> dict[str, Any]:
    """The globals PyTorch's weights-only unpickler allows, plus ``add_safe_globals`` entries and ``safe_globals``."""
    from torch import _weights_only_unpickler

    allowed = dict(_weights_only_unpickler._get_allowed_globals())
    for entry in [*torch.serialization.get_safe_globals(), *safe_globals]:
        obj, name = entry if isinstance(entry, tuple) else (entry, f"{entry.__module__}.{entry.__qualname__}")
        allowed[name] = obj
    return allowed


def _restricted_pickle_module(safe_globals: Sequence[Any], replaced: set[str]) -> types.ModuleType:
    """A pickle-module look-alike for ``torch.load(pickle_module=...)`` whose unpickler resolves only allowed globals;
    every other global becomes a :class:`Placeholder` subclass named after it (recorded in ``replaced``)."""
    allowed = _allowed_globals(safe_globals)

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            # Python 2 names (protocol 2, torch.save's default), mapped as pickle.Unpickler.find_class does
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
            key = f"{module}.{name}"
            if key in allowed:
                return allowed[key]
            replaced.add(key)
            return type(name, (Placeholder,), {"source": key})

    module = types.ModuleType("mambazoo_restricted_pickle")
    module.Unpickler = RestrictedUnpickler
    module.load = lambda file, **kwargs: RestrictedUnpickler(file, **kwargs).load()
    module.UnpicklingError = pickle.UnpicklingError
    return module


def _load_with_placeholders(path: Path, safe_globals: Sequence[Any]) -> Any:
    replaced: set[str] = set()
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False,
                                pickle_module=_restricted_pickle_module(safe_globals, replaced))
    except Exception as error:  # any failure of the restricted reader: report it with the file, never retry unsafely
        raise CheckpointError(f"checkpoint file '{path}' cannot be read safely: {error}. Convert it to a plain state "
                              f"dict (torch.save(ckpt['model'], ...)) or safetensors in a trusted environment.") \
            from error
    _logger.info("%s: objects of %s were replaced by inert placeholders", path, ", ".join(sorted(replaced)))
    return checkpoint


def load_checkpoint_file(path: PathLike, safe_globals: Sequence[Any] = (), unknown_objects: str = "error") -> dict:
    """Load a ``.safetensors`` file or a ``torch.save`` checkpoint onto the CPU, safely.

    ``torch.save`` files load with ``weights_only=True``: only tensors, containers and the classes in
    ``safe_globals`` may be unpickled, so a checkpoint cannot run code. Every failure names the file.

    Args:
        path: The file.
        safe_globals: Classes the file may pickle besides tensors and containers (e.g. ``argparse.Namespace``).
        unknown_objects: What to do with other pickled objects: ``"error"`` (a :class:`CheckpointError` naming the
            remedy) or ``"placeholder"`` (read the file again without running any of it, other objects becoming
            :class:`Placeholder` instances; for training checkpoints whose configs are not needed).

    Returns:
        What the file holds: a state dict, or a training checkpoint (a dict holding one).
    """
    if unknown_objects not in UNKNOWN_OBJECTS:
        raise ValueError(f"unknown_objects must be one of {UNKNOWN_OBJECTS}, got {unknown_objects!r}")
    path = check_checkpoint_path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"checkpoint file '{path}' is not a readable safetensors file: {error}") from error
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "Unsupported global" not in str(error):
            raise CheckpointError(f"checkpoint file '{path}' is corrupt: {first_line}") from error
        if unknown_objects == "placeholder":
            checkpoint = _load_with_placeholders(path, safe_globals)
        else:
            refused = next(line.strip() for line in str(error).splitlines() if "Unsupported global" in line)
            raise CheckpointError(
                f"checkpoint file '{path}' pickles objects that weights_only loading does not allow ({refused}). "
                f"If you trust the file, allow them with torch.serialization.add_safe_globals([...]) or convert it "
                f"to safetensors.") from error
    except (EOFError, RuntimeError, zipfile.BadZipFile, ValueError) as error:
        raise CheckpointError(f"checkpoint file '{path}' is truncated or not a PyTorch checkpoint "
                              f"({type(error).__name__}: {str(error).strip() or 'unexpected end of file'})") from error
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"checkpoint file '{path}' holds a {type(checkpoint).__name__}, not a state dict")
    return checkpoint


def describe_source(pretrained_cfg: Optional[Mapping[str, Any]]) -> Optional[str]:
    """Where a timm pretrained config takes its weights from, in words (None if it names no source)."""
    if not pretrained_cfg:
        return None
    if pretrained_cfg.get("file"):
        return f"file '{pretrained_cfg['file']}'"
    if pretrained_cfg.get("state_dict") is not None:
        return "given state dict"
    if pretrained_cfg.get("hf_hub_id"):
        filename = pretrained_cfg.get("hf_hub_filename")
        return f"hf-hub:{pretrained_cfg['hf_hub_id']}" + (f" ({filename})" if filename else "")
    if pretrained_cfg.get("url"):
        return f"url {pretrained_cfg['url']}"
    return None


def _naming_source(filter_fn: Callable[[dict, nn.Module], dict]) -> Callable[[dict, nn.Module], dict]:
    """``filter_fn`` whose errors (key mismatches, missing entries) name the source of the model's pretrained config."""
    def filter_naming_source(state_dict: dict, model: nn.Module) -> dict:
        try:
            return filter_fn(state_dict, model)
        except ValueError as error:
            source = describe_source(getattr(model, "pretrained_cfg", None))
            if source is None:
                raise
            if isinstance(error, CheckpointMismatchError):
                raise error.with_source(source) from None
            raise ValueError(f"{source}: {error}") from error
    return filter_naming_source


def build_model_with_checkpoint(
        model_cls: type,
        variant: str,
        pretrained: bool,
        filter_fn: Callable[[dict, nn.Module], dict],
        safe_globals: Sequence[Any] = (),
        unknown_objects: str = "error",
        **kwargs,
) -> nn.Module:
    """timm's ``build_model_with_cfg`` with this module's loading for pretrained weights.

    A local file (``pretrained_cfg_overlay=dict(file=...)``) is read with :func:`load_checkpoint_file` and handed to
    timm as a state dict (timm's own file loader would, for training checkpoints, silently prefer EMA weights);
    hub and URL downloads load with ``safe_globals`` allowed. Errors raised by ``filter_fn`` through
    :func:`check_state_dict` name the weights' source.

    Args:
        model_cls: The model class.
        variant: Registered model name.
        pretrained: Load pretrained weights.
        filter_fn: The family's ``checkpoint_filter_fn(state_dict, model)``.
        safe_globals: Classes the family's official files pickle (allowed by ``weights_only`` loading).
        unknown_objects: How local files treat other pickled objects (see :func:`load_checkpoint_file`).
        **kwargs: Everything else ``build_model_with_cfg`` takes (``feature_cfg``, model arguments, ...).
    """
    from timm.models import build_model_with_cfg

    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    preloaded = None
    if pretrained and overlay.get("file") and overlay.get("state_dict") is None:
        preloaded = overlay["state_dict"] = load_checkpoint_file(overlay["file"], safe_globals, unknown_objects)
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return build_model_with_cfg(model_cls, variant, pretrained, pretrained_cfg_overlay=overlay or None,
                                        pretrained_filter_fn=_naming_source(filter_fn), **kwargs)
    finally:
        if preloaded is not None:
            preloaded.clear()  # the model's pretrained cfg keeps a reference to this dict: release the tensors


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _default_file_mode() -> int:
    """The mode ``open()`` gives a new file under the current umask (``mkstemp`` files are private: 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_write(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one step (else it is removed).

    The temporary file (``.<name>.tmp-<random>``) is fsynced and given the permissions of a plainly created file
    before the rename, and the folder is fsynced after it: readers see the old file or the complete new one, and a
    crash at any moment leaves one of the two on disk.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}{TEMPORARY_MARK}", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.chmod(temporary, _default_file_mode())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    _fsync_folder(path.parent)


def write_text(path: PathLike, text: str) -> Path:
    """Write a text file atomically (see :func:`atomic_write`)."""
    with atomic_write(path) as temporary:
        temporary.write_text(text)
    return Path(path)


def save_state_dict(
        state_dict: Mapping[str, Any],
        path: PathLike,
        metadata: Optional[dict[str, str]] = None,
) -> Path:
    """Write a state dict atomically: safetensors for ``.safetensors`` paths, else ``torch.save``.

    Args:
        state_dict: Tensors by key for safetensors (copied to contiguous CPU tensors; tensors sharing memory are
            copied apart); any ``torch.save``-able mapping otherwise (e.g. a training state).
        path: Target file.
        metadata: String metadata stored in the safetensors header.
    """
    path = Path(path)
    with atomic_write(path) as temporary:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(_separate_tensors(state_dict), str(temporary), metadata=metadata)
        else:
            torch.save(dict(state_dict), temporary)
    return path


def _separate_tensors(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU tensors, none sharing memory with another (safetensors refuses shared storage)."""
    seen, separate = set(), {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu").contiguous()
        pointer = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        separate[key] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return separate

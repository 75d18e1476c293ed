"""Reading released checkpoint files safely: tensors always, arbitrary pickled objects never.

Training checkpoints often pickle more than tensors (a yacs ``CfgNode`` config, numpy scalars, an argparse
namespace). ``torch.load(weights_only=True)`` refuses such files. :func:`load_checkpoint_file` first tries exactly
that; if the file is refused, it reads it again with a restricted unpickler that resolves only the globals PyTorch's
weights-only loader allows (tensor and storage rebuilders, ``OrderedDict``, dtypes, ...) plus the ones registered
with ``torch.serialization.add_safe_globals``, and turns every other class or function into an inert
:class:`Placeholder`. Nothing from the file is ever called or imported, so a malicious file cannot run code; the
tensors (state dicts) load intact, and the non-tensor entries come back as placeholders.
"""
import _compat_pickle
import logging
import pickle
import types
from pathlib import Path
from typing import Any, Union

import torch

__all__ = ["Placeholder", "load_checkpoint_file"]

_logger = logging.getLogger(__name__)


class Placeholder(dict):
    """Stands in for an object of a class the loader does not allow; keeps only the name of that class.

    It accepts whatever unpickling does to an object (construction with any arguments, ``__setstate__``, item and
    list assignment) and does nothing with it beyond storing dict items, which are themselves already-safe values.
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


def _allowed_globals() -> dict[str, Any]:
    """The globals PyTorch's weights-only unpickler allows, plus the user's ``add_safe_globals`` entries."""
    from torch import _weights_only_unpickler

    allowed = dict(_weights_only_unpickler._get_allowed_globals())
    for entry in torch.serialization.get_safe_globals():
        obj, name = entry if isinstance(entry, tuple) else (entry, f"{entry.__module__}.{entry.__qualname__}")
        allowed[name] = obj
    return allowed


def _restricted_pickle_module(replaced: set[str]) -> types.ModuleType:
    """A pickle-module look-alike for ``torch.load(pickle_module=...)`` whose unpickler resolves only allowed globals;
    every other global becomes a :class:`Placeholder` subclass named after it (recorded in ``replaced``)."""
    allowed = _allowed_globals()

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


def load_checkpoint_file(path: Union[str, Path]) -> Any:
    """Load a ``.safetensors`` file or a ``torch.save`` checkpoint on the CPU without running code from it.

    Returns:
        What the file holds; objects of classes outside PyTorch's weights-only allow-list are
        :class:`Placeholder` instances.

    Raises:
        ValueError: The file cannot be read as a checkpoint (the message names the file).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # objects outside the allow-list: read again, replacing them with placeholders
    except (OSError, RuntimeError, EOFError) as error:
        raise ValueError(f"cannot read checkpoint {path}: {error}") from error
    replaced: set[str] = set()
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False,
                                pickle_module=_restricted_pickle_module(replaced))
    except Exception as error:  # any failure of the restricted reader: report it with the file, never retry unsafely
        raise ValueError(f"cannot read checkpoint {path} safely: {error}. Convert it to a plain state dict "
                         f"(torch.save(ckpt['model'], ...)) or safetensors in a trusted environment.") from error
    _logger.info("%s: objects of %s were replaced by inert placeholders", path, ", ".join(sorted(replaced)))
    return checkpoint

"""Register mambazoo's models in timm's registry without importing timm (or torch) at ``import mambazoo``.

timm has no plugin discovery: a model name exists only after the module defining it has been imported. Importing
timm costs seconds (it imports torchvision), so ``import mambazoo`` must not do it just to register names: the
command line's ``--help`` and ``import mambazoo.ops`` stay fast. Instead:

* if timm is already imported, the model modules are imported at once;
* otherwise an import hook waits for timm: right after ``timm`` itself has been executed (by whoever imports it
  first, e.g. ``import timm`` in user code or :mod:`mambazoo.zoo`), it imports :mod:`mambazoo.models`, so
  ``import mambazoo; import timm; timm.create_model("vim_tiny_patch16_224")`` works in either import order.
"""
import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Optional, Sequence

__all__ = ["register_models_with_timm"]

_MODELS_PACKAGE = "mambazoo.models"


class _LoaderThenRegister(importlib.abc.Loader):
    """Runs timm's own loader, then imports the model modules (every other attribute is timm's loader's)."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def __getattr__(self, name: str):
        return getattr(self._loader, name)

    def create_module(self, spec) -> Optional[ModuleType]:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        module.__loader__ = self._loader
        module.__spec__.loader = self._loader
        importlib.import_module(_MODELS_PACKAGE)


class _AfterTimmImport(importlib.abc.MetaPathFinder):
    """A one-shot finder: wraps the loader of the top-level ``timm`` package, then removes itself."""

    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Optional[ModuleType] = None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("timm")
        if spec is not None and spec.loader is not None:
            spec.loader = _LoaderThenRegister(spec.loader)
        return spec


def register_models_with_timm() -> None:
    """Make mambazoo's models appear in timm's registry as soon as timm is (or has been) imported."""
    if "timm" in sys.modules:
        importlib.import_module(_MODELS_PACKAGE)
    elif not any(isinstance(finder, _AfterTimmImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterTimmImport())

"""The model zoo: list and create mambazoo's models (and timm's MambaOut) through timm, plus per-variant metadata.

mambazoo's families register in timm's registry when their module in :mod:`mambazoo.models` is imported; MambaOut
is timm's own implementation (``timm.models.mambaout``, Apache-2.0, weights on the HF hub) and is listed here instead
of being implemented a second time. Official MambaOut release checkpoints load into timm's models through timm's
``checkpoint_filter_fn`` (see :func:`load_official_mambaout_state_dict`).
"""
import fnmatch
import importlib
import pkgutil
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Optional, Union

import timm
from timm.models import is_model, model_entrypoint
from torch import nn

from .checkpoint import CheckpointError, check_checkpoint_path, check_state_dict

__all__ = [
    "MODEL_INFO",
    "ModelInfo",
    "check_model_name",
    "create_model",
    "create_model_for_size",
    "list_models",
    "load_official_mambaout_state_dict",
    "metadata_table",
    "model_info",
]

_TIMM_FAMILIES = ("timm.models.mambaout",)


@lru_cache(maxsize=1)
def _import_model_modules() -> tuple[str, ...]:
    """Import every module of :mod:`mambazoo.models` (registering its models); returns their full names."""
    from . import models

    names = tuple(f"{models.__name__}.{info.name}" for info in pkgutil.iter_modules(models.__path__))
    for name in names:
        importlib.import_module(name)
    return names


def _is_zoo_model(name: str) -> bool:
    module = model_entrypoint(name).__module__
    return module.startswith("mambazoo.") or module in _TIMM_FAMILIES


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Names of the zoo's models (mambazoo's families and timm's MambaOut) matching a shell-style pattern.

    Args:
        pattern: ``fnmatch`` pattern, e.g. ``"vim_*"``.
        pretrained: Only list names with a pretrained weight tag (``arch.tag``), as timm's ``list_models`` does.
    """
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a string, got {type(pattern).__name__}")
    _import_model_modules()
    names = [name for name in timm.list_models() if _is_zoo_model(name)]
    if pretrained:
        with_weights = timm.list_models(pretrained=True)
        names = [tag for tag in with_weights if tag.split(".")[0] in set(names)]
    return sorted(name for name in names if fnmatch.fnmatchcase(name, pattern))


def create_model(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """Create any timm model by name, after making sure mambazoo's models are registered.

    A thin wrapper over :func:`timm.create_model` (same arguments: ``num_classes``, ``img_size``, ``features_only``,
    ``pretrained_cfg_overlay``, ...); baselines such as ``deit_tiny_patch16_224`` work too. A local weights file
    (``pretrained_cfg_overlay=dict(file=...)``) is checked first, and loading errors of models outside mambazoo's
    families (e.g. timm's MambaOut) are re-raised naming the file.
    """
    check_model_name(name)
    file = (kwargs.get("pretrained_cfg_overlay") or {}).get("file") if pretrained else None
    if file is None:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    check_checkpoint_path(file)
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as error:
        if "Error(s) in loading state_dict" not in str(error):
            raise
        raise CheckpointError(f"checkpoint file '{file}' does not match {name}: {error}") from error


def check_model_name(name: str) -> None:
    """Raise a ValueError naming close matches unless ``name`` (optionally ``arch.tag``) is registered in timm."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    _import_model_modules()
    if not is_model(name.split(".")[0]) and not name.startswith(("hf-hub:", "local-dir:")):
        close = fnmatch.filter(timm.list_models(), f"*{name.split('.')[0][:6]}*")[:8]
        raise ValueError(f"unknown model name {name!r}; similar registered names: {close or 'none'}")


def create_model_for_size(name: str, img_size: Union[int, tuple[int, int]], **kwargs) -> nn.Module:
    """Create a model for ``img_size`` inputs.

    ``img_size`` is passed to models whose constructor takes it (ViT/Vim-like position embeddings sized at build
    time); models whose constructor rejects it (convolutional ones such as MambaOut) take any resolution unchanged.
    """
    try:
        return create_model(name, img_size=img_size, **kwargs)
    except TypeError as error:
        if "img_size" not in str(error):
            raise
    return create_model(name, **kwargs)


@dataclass(frozen=True)
class ModelInfo:
    """Published facts about one variant; ``source`` names the page of ``docs/`` that gives them."""

    name: str
    family: str
    paper: str
    top1: float
    params: int
    reported_gmacs: Optional[float]
    weights: str
    license: str
    source: str
    img_size: int = 224


_MAMBAOUT = ("MambaOut (arXiv 2405.07992)", "HF timm/mambaout_* (official .pth on GitHub releases)", "Apache-2.0")
_VIM = ("Vision Mamba (arXiv 2401.09417)", "HF hustvl/Vim-*-midclstok", "Apache-2.0")
_PLAINMAMBA = ("PlainMamba (arXiv 2403.17695)", "HF ChenhongyiYang/PlainMamba", "no licence file (UNVERIFIED)")
_MAMBAVISION = ("MambaVision (arXiv 2407.08083)", "HF nvidia/MambaVision-*", "CC-BY-NC-SA-4.0 (non-commercial)")
_MV_DOC = "docs/mambavision.md"
_SPATIAL = ("Spatial-Mamba (arXiv 2410.15091)", "Google Drive (manual download)", "Apache-2.0")


def _info(name: str, family: str, facts: tuple[str, str, str], top1: float, params: int,
          gmacs: Optional[float], source: str, img_size: int = 224) -> ModelInfo:
    paper, weights, license_ = facts
    return ModelInfo(name, family, paper, top1, params, gmacs, weights, license_, source, img_size)


# Exact parameter counts include the 1000-class head. Reported GMACs are the papers' "FLOPs"/"MACs" at ``img_size``
# (224 px unless stated); Vim's paper reports none, its figures follow the convention of docs/scan_operation.md
# (docs/vim.md).
# MambaVision's count neither the scan nor the attention matmuls (docs/mambavision.md).
MODEL_INFO: dict[str, ModelInfo] = {info.name: info for info in (
    _info("mambaout_femto", "mambaout", _MAMBAOUT, 78.9, 7_304_536, 1.2, "docs/mambaout.md"),
    _info("mambaout_kobe", "mambaout", _MAMBAOUT, 80.0, 9_141_208, 1.5, "docs/mambaout.md"),
    _info("mambaout_tiny", "mambaout", _MAMBAOUT, 82.7, 26_545_096, 4.5, "docs/mambaout.md"),
    _info("mambaout_small", "mambaout", _MAMBAOUT, 84.1, 48_488_072, 9.0, "docs/mambaout.md"),
    _info("mambaout_base", "mambaout", _MAMBAOUT, 84.2, 84_813_092, 15.8, "docs/mambaout.md"),
    _info("vim_tiny_patch16_224", "vim", _VIM, 76.1, 7_148_008, 1.82, "docs/vim.md"),
    _info("vim_small_patch16_224", "vim", _VIM, 80.5, 25_796_584, 5.90, "docs/vim.md"),
    _info("vim_base_patch16_224", "vim", _VIM, 81.9, 97_598_440, 20.86, "docs/vim.md"),
    _info("vim_tiny_patch16_stride8_224", "vim", _VIM, 78.3, 7_250_344, 6.73, "docs/vim.md"),
    _info("vim_small_patch16_stride8_224", "vim", _VIM, 81.6, 26_001_256, 21.85, "docs/vim.md"),
    _info("plainmamba_l1", "plainmamba", _PLAINMAMBA, 77.9, 7_551_656, 3.0, "docs/plainmamba.md"),
    _info("plainmamba_l2", "plainmamba", _PLAINMAMBA, 81.6, 26_145_832, 8.1, "docs/plainmamba.md"),
    _info("plainmamba_l3", "plainmamba", _PLAINMAMBA, 82.3, 50_956_456, 14.4, "docs/plainmamba.md"),
    _info("mambavision_t", "mambavision", _MAMBAVISION, 82.3, 31_794_248, 4.4, _MV_DOC),
    _info("mambavision_t2", "mambavision", _MAMBAVISION, 82.7, 35_104_008, 5.1, _MV_DOC),
    _info("mambavision_s", "mambavision", _MAMBAVISION, 83.3, 50_140_584, 7.5, _MV_DOC),
    _info("mambavision_b", "mambavision", _MAMBAVISION, 84.2, 97_685_288, 15.0, _MV_DOC),
    _info("mambavision_l", "mambavision", _MAMBAVISION, 85.0, 227_961_048, 34.9, _MV_DOC),
    _info("mambavision_l2", "mambavision", _MAMBAVISION, 85.3, 241_554_824, 37.5, _MV_DOC),
    _info("mambavision_b_21k", "mambavision", _MAMBAVISION, 84.9, 97_685_288, 15.0, _MV_DOC),
    _info("mambavision_l_21k", "mambavision", _MAMBAVISION, 86.1, 227_961_048, 34.9, _MV_DOC),
    _info("mambavision_l2_512_21k", "mambavision", _MAMBAVISION, 87.3, 241_554_824, 196.3, _MV_DOC, 512),
    _info("mambavision_l3_256_21k", "mambavision", _MAMBAVISION, 87.3, 739_570_472, 122.3, _MV_DOC, 256),
    _info("mambavision_l3_512_21k", "mambavision", _MAMBAVISION, 88.1, 739_570_472, 489.1, _MV_DOC, 512),
    _info("spatialmamba_t", "spatialmamba", _SPATIAL, 83.5, 26_748_862, 4.5, "docs/spatialmamba.md"),
    _info("spatialmamba_s", "spatialmamba", _SPATIAL, 84.6, 43_074_280, 7.1, "docs/spatialmamba.md"),
    _info("spatialmamba_b", "spatialmamba", _SPATIAL, 85.3, 95_745_592, 15.8, "docs/spatialmamba.md"),
)}


def model_info(name: str) -> ModelInfo:
    """Published metadata of a variant (tags such as ``.in1k`` are ignored)."""
    base = name.split(".")[0]
    if base not in MODEL_INFO:
        raise ValueError(f"no metadata for {name!r}; known variants: {sorted(MODEL_INFO)}")
    return MODEL_INFO[base]


def metadata_table(registered_only: bool = False) -> list[dict]:
    """Metadata rows (dicts) of every variant, with a ``registered`` column; optionally only registered ones."""
    registered = set(list_models())
    rows = [dict(asdict(info), registered=info.name in registered) for info in MODEL_INFO.values()]
    return [row for row in rows if row["registered"] or not registered_only]


def load_official_mambaout_state_dict(model: nn.Module, state_dict: dict, strict: bool = True):
    """Load a state dict with the official MambaOut key names (yuweihao/MambaOut releases) into timm's model.

    The official release files are plain state dicts (``torch.load(path, weights_only=True)``); timm's own
    ``checkpoint_filter_fn`` renames their keys (``downsample_layers.*`` → ``stem.*``/``stages.i.downsample.*``,
    ``stages.i.j`` → ``stages.i.blocks.j``, head renames) and the result loads strictly. Equivalent with timm alone::

        model = timm.create_model("mambaout_femto", pretrained=True,
                                  pretrained_cfg_overlay=dict(file="mambaout_femto.pth"))

    Returns:
        The ``load_state_dict`` result (missing and unexpected keys; empty when strict loading succeeds).

    Raises:
        CheckpointMismatchError: With ``strict``, a listing of every missing, unexpected and mis-shaped key.
    """
    from timm.models.mambaout import checkpoint_filter_fn

    converted = checkpoint_filter_fn(state_dict, model)
    if strict:
        check_state_dict(converted, model)
    return model.load_state_dict(converted, strict=strict)

"""Optimizer parameter groups for dense models: weight-decay exclusions and layer-wise lr decay over the backbone."""
from typing import Optional

from timm.models import group_parameters
from torch import nn

from .backbone import DenseBackbone

__all__ = ["find_backbone", "param_groups"]


def find_backbone(model: nn.Module) -> tuple[str, DenseBackbone]:
    """The (qualified name prefix, module) of the :class:`DenseBackbone` inside a dense model."""
    for name, module in model.named_modules():
        if isinstance(module, DenseBackbone):
            return (f"{name}." if name else ""), module
    raise ValueError(f"{type(model).__name__} contains no DenseBackbone")


def _layer_ids(backbone: DenseBackbone, prefix: str) -> tuple[dict[str, int], int]:
    """Layer id of every backbone-model parameter (from the model's ``group_matcher``) and the number of ids."""
    inner = backbone.model
    if not hasattr(inner, "group_matcher"):
        raise ValueError(f"{type(inner).__name__} has no group_matcher(): layer-wise lr decay needs one")
    layer_map = group_parameters(inner, inner.group_matcher(coarse=False), reverse=True)
    ids = sorted(set(layer_map.values()))
    rank = {value: index for index, value in enumerate(ids)}  # dense ids 0..n-1 (pruned groups leave gaps)
    return {f"{prefix}model.{name}": rank[value] for name, value in layer_map.items()}, len(ids)


def param_groups(model: nn.Module, weight_decay: float, layer_decay: Optional[float] = None) -> list[dict]:
    """Parameter groups for a dense model (BEiT-style layer decay, as timm's ``param_groups_layer_decay``).

    No weight decay for 1-D parameters (norms, biases) and the backbone's ``no_weight_decay()`` names. With
    ``layer_decay``, backbone layer ``i`` of ``n`` (the wrapped model's ``group_matcher`` groups: stem, blocks, ...)
    gets ``lr_scale = layer_decay ** (n - i)`` and everything else (adapter norms and pyramid, neck, heads) scale 1.

    Returns:
        Groups with ``params``, ``param_names``, ``weight_decay`` and ``lr_scale``. As with timm's groups, the
        optimiser gives every group the base learning rate and timm's schedulers multiply it by ``lr_scale``.
    """
    prefix, backbone = find_backbone(model)
    inner = backbone.model
    no_decay = {f"{prefix}model.{name}" for name in getattr(inner, "no_weight_decay", lambda: set())()}
    layer_of, num_layers = _layer_ids(backbone, prefix) if layer_decay is not None else ({}, 0)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decays = param.ndim > 1 and name not in no_decay
        layer = layer_of.get(name, num_layers)
        scale = layer_decay ** (num_layers - layer) if layer_decay is not None else 1.0
        group = groups.setdefault((layer, decays), dict(params=[], param_names=[], lr_scale=scale,
                                                         weight_decay=weight_decay if decays else 0.0))
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[key] for key in sorted(groups)]

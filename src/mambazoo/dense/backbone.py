"""One thin adapter that turns any registered classification model into a multi-scale dense backbone.

:class:`DenseBackbone` wraps the model itself (no copy of its code): it calls the model's ``forward_intermediates``
at the taps of the family's :class:`~mambazoo.dense.taps.TapSpec`, applies the family's per-level norms and, for
plain (single-stride) families, a simple feature pyramid. The output is what torchvision's detection models and
FPN expect: an ``OrderedDict`` of NCHW maps at strides 4, 8, 16, 32 (keys ``"0"`` to ``"3"``) and an
``out_channels`` attribute. See ``docs/dense.md``.
"""
import sys
from collections import OrderedDict
from typing import Any, Mapping, Optional

import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import Tensor, nn

from ..checkpoint import CheckpointMismatchError, check_state_dict
from ..zoo import create_model
from .taps import HIERARCHICAL, OUTPUT_STRIDES, TapSpec, tap_spec_for, tap_spec_for_model

__all__ = ["DenseBackbone", "SimplePyramid", "create_backbone", "load_backbone_checkpoint"]


def _pyramid_norm(kind: str, channels: int, dd: dict) -> nn.Module:
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels, **dd)
    return LayerNorm2d(channels, eps=1e-6, **dd)


def _pyramid_level(channels: int, factor: float, norm: str, dd: dict) -> nn.Module:
    """Rescale a map by ``factor`` (a power of two): transposed 2×2 convs up, identity, or max-pooling down."""
    if factor == 1:
        return nn.Identity()
    if factor < 1:
        size = round(1 / factor)
        return nn.MaxPool2d(kernel_size=size, stride=size)
    layers: list[nn.Module] = []
    for step in range(round(factor).bit_length() - 1):
        if step:
            layers += [_pyramid_norm(norm, channels, dd), nn.GELU()]
        layers.append(nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2, **dd))
    return nn.Sequential(*layers)


class SimplePyramid(nn.Module):
    """ViTDet-style simple feature pyramid: maps at one stride to strides 4/8/16/32, one map per level.

    Level ``i`` rescales the ``i``-th input map: from stride 16, 2×2 transposed convs (with norm + GELU between
    them) to stride 4 and 8, identity at 16, 2×2 max-pooling to 32 — the neck of Vim's segmentation backbone
    (``fpn1`` to ``fpn4``). From stride 8 the factors are 2, 1, 1/2, 1/4.

    Args:
        channels: Channels of the input maps (kept at every level).
        in_stride: Stride of the input maps (a power of two ≤ 32).
        norm: ``"batchnorm"`` (Vim) or ``"layernorm"`` (ViTDet) between transposed convs.
    """

    def __init__(self, channels: int, in_stride: int, norm: str = "batchnorm", device=None, dtype=None) -> None:
        super().__init__()
        if in_stride not in (4, 8, 16, 32):
            raise ValueError(f"in_stride must be 4, 8, 16 or 32, got {in_stride}")
        dd = {"device": device, "dtype": dtype}
        for level, stride in enumerate(OUTPUT_STRIDES):
            self.add_module(f"fpn{level + 1}", _pyramid_level(channels, in_stride / stride, norm, dd))

    def forward(self, maps: list[Tensor]) -> list[Tensor]:
        """Rescale four maps (one per level)."""
        return [getattr(self, f"fpn{level + 1}")(feature) for level, feature in enumerate(maps)]


class DenseBackbone(nn.Module):
    """A registered model as a multi-scale backbone: ``OrderedDict`` of maps at strides 4/8/16/32.

    The model is pruned after its last tap (classifier head and, unless the spec uses it, the final norm go), so
    every remaining parameter takes part in the dense forward pass.

    Args:
        model: A model built by timm/mambazoo (``forward_intermediates`` and ``feature_info`` required).
        spec: The family's tap description; default: looked up from the model's architecture name.

    Attributes:
        out_channels: Channels of the four maps.
        strides: (4, 8, 16, 32).
        taps: The ``forward_intermediates`` indices taken.
    """

    def __init__(self, model: nn.Module, spec: Optional[TapSpec] = None) -> None:
        super().__init__()
        spec = spec or tap_spec_for_model(model)
        reference = next(model.parameters())
        dd = {"device": reference.device, "dtype": reference.dtype}
        self.spec = spec
        self.taps = spec.tap_indices(model)
        info = [model.feature_info[index] for index in self.taps]
        channels = [entry["num_chs"] for entry in info]
        reductions = [entry["reduction"] for entry in info]
        model.prune_intermediate_layers(list(self.taps), prune_norm=spec.final_norm is None, prune_head=True)
        self.model = model
        self.strides = OUTPUT_STRIDES
        if spec.kind == HIERARCHICAL:
            if tuple(reductions) != OUTPUT_STRIDES:
                raise ValueError(f"{spec.family}: hierarchical taps must have strides {OUTPUT_STRIDES}, "
                                 f"feature_info gives {tuple(reductions)}")
            self.out_channels = channels
            self.pyramid = None
        else:
            if len(set(reductions)) != 1 or len(set(channels)) != 1:
                raise ValueError(f"{spec.family}: plain taps must share one stride and width, got strides "
                                 f"{reductions} and channels {channels}")
            self.out_channels = [channels[0]] * len(OUTPUT_STRIDES)
            self.pyramid = SimplePyramid(channels[0], reductions[0], spec.pyramid_norm, **dd)
        self.norm_names = spec.level_norm_names(self.taps)
        for name, width in zip(self.norm_names, channels):
            if name is not None:
                self.add_module(name, LayerNorm2d(width, eps=spec.level_norm_eps, **dd))

    @property
    def mean(self) -> tuple[float, ...]:
        """Input normalisation mean of the wrapped model (its pretrained config)."""
        return tuple(self.model.pretrained_cfg["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        """Input normalisation std of the wrapped model (its pretrained config)."""
        return tuple(self.model.pretrained_cfg["std"])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the wrapped model's blocks in the backward pass."""
        self.model.set_grad_checkpointing(enable)

    def _normalise(self, level: int, feature: Tensor) -> Tensor:
        name = self.norm_names[level]
        if name is not None:
            return getattr(self, name)(feature)
        if self.spec.final_norm is not None and level == len(self.taps) - 1:
            norm = getattr(self.model, self.spec.final_norm)
            return norm(feature.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return feature

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        """Images (B, C, H, W), H and W multiples of 32, to maps ``{"0": stride 4, ..., "3": stride 32}``."""
        height, width = x.shape[-2:]
        if height % 32 or width % 32:
            raise ValueError(f"input size {(height, width)} must be a multiple of 32 (the coarsest stride); pad the "
                             "batch as torchvision's detection transform does (size_divisible=32)")
        pad = self.spec.input_padding(self.model)
        if pad:
            x = F.pad(x, (0, pad, 0, pad))
        maps = self.model.forward_intermediates(x, indices=list(self.taps), output_fmt="NCHW",
                                                intermediates_only=True, **self.spec.intermediates_kwargs)
        maps = [self._normalise(level, feature) for level, feature in enumerate(maps)]
        if self.pyramid is not None:
            maps = self.pyramid(maps)
        outputs = OrderedDict()
        for level, (feature, stride) in enumerate(zip(maps, self.strides)):
            if tuple(feature.shape[-2:]) != (height // stride, width // stride):
                raise RuntimeError(f"{self.spec.family}: level {level} map is {tuple(feature.shape[-2:])}, expected "
                                   f"{(height // stride, width // stride)} for input {(height, width)}")
            outputs[str(level)] = feature
        return outputs


def create_backbone(model_name: str, pretrained: bool = False, **kwargs: Any) -> DenseBackbone:
    """Create a registered model with the family's dense creation arguments and wrap it in a :class:`DenseBackbone`.

    ``kwargs`` go to the model (e.g. ``drop_path_rate``, MambaVision's ``window_size``, ``pretrained_cfg_overlay``)
    and override the family's defaults (e.g. Vim's ``dynamic_img_size=True``).
    """
    spec = tap_spec_for(model_name)
    model = create_model(model_name, pretrained=pretrained, num_classes=0, **{**spec.create_kwargs, **kwargs})
    return DenseBackbone(model, spec)


def load_backbone_checkpoint(backbone: DenseBackbone, state_dict: Mapping[str, Tensor], prefix: str = "backbone.",
                             source: Optional[str] = None) -> int:
    """Load the backbone part of an official downstream (mmdet/mmseg) checkpoint into ``backbone``, strictly.

    Keys under ``prefix`` are taken (others — neck, heads — are ignored): the per-level norms (e.g.
    ``outnorm{i}.*``) go to the adapter, the simple pyramid's ``fpn1``-``fpn4`` (Vim's segmentation backbone) to its
    pyramid, everything else through the family's ``checkpoint_filter_fn`` (when its model module has one) into the
    wrapped model. A checkpoint without pyramid keys (families whose official backbone has none, e.g. PlainMamba)
    leaves the pyramid as initialised.

    Returns:
        The number of ignored keys outside ``prefix``.

    Raises:
        ValueError: Nothing under ``prefix``, or missing/unexpected/mis-shaped keys (listed, naming ``source``).
    """
    selected = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    where = f" in {source}" if source else ""
    if not selected:
        raise ValueError(f"no keys start with {prefix!r}{where} (first keys: {list(state_dict)[:5]})")
    adapter_names = {name for name in backbone.norm_names if name is not None}
    pyramid_names = set(dict(backbone.pyramid.named_children())) if backbone.pyramid is not None else set()
    adapter = {key: value for key, value in selected.items() if key.split(".", 1)[0] in adapter_names}
    pyramid = {f"pyramid.{key}": value for key, value in selected.items() if key.split(".", 1)[0] in pyramid_names}
    model_part = {key: value for key, value in selected.items()
                  if key.split(".", 1)[0] not in adapter_names | pyramid_names}
    filter_fn = getattr(sys.modules[type(backbone.model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            model_part = filter_fn(model_part, backbone.model)
        except CheckpointMismatchError as error:
            raise error.with_source(source or "the backbone checkpoint") from None
    converted = {**adapter, **pyramid, **{f"model.{key}": value for key, value in model_part.items()}}
    keep_pyramid = () if pyramid or backbone.pyramid is None else ("pyramid.",)
    check_state_dict(converted, backbone, source, ignore_prefixes=keep_pyramid, adaptable=False)
    backbone.load_state_dict(converted, strict=not keep_pyramid)
    return len(state_dict) - len(selected)

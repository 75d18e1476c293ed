"""The tap registry: how each family's classification model becomes a multi-scale dense backbone.

A family plugs into detection and segmentation by registering one :class:`TapSpec` — which intermediates to take
(``forward_intermediates`` indices and extra arguments), whether they are hierarchical stage maps or plain
single-stride maps that need a simple feature pyramid, and which per-level norms the family's official downstream
code adds. Nothing else in :mod:`mambazoo.dense` knows about families. The entries and their sources are described
in ``docs/dense.md``.
"""
import fnmatch
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Sequence, Union

from torch import nn

__all__ = ["TAP_SPECS", "TapSpec", "quarter_points", "register_taps", "tap_spec_for", "tap_spec_for_model"]

HIERARCHICAL, PLAIN = "hierarchical", "plain"
OUTPUT_STRIDES = (4, 8, 16, 32)


def quarter_points(depth: int) -> tuple[int, ...]:
    """Indices of the blocks that end each quarter of a plain network (5, 11, 17, 23 for 24 blocks)."""
    if depth < 4:
        raise ValueError(f"a plain backbone needs at least 4 blocks to tap quarter points, got {depth}")
    return tuple(depth * quarter // 4 - 1 for quarter in range(1, 5))


def _no_padding(model: nn.Module) -> int:
    return 0


@dataclass(frozen=True)
class TapSpec:
    """The dense-prediction description of one family.

    Attributes:
        family: Family name (also the suffix of its tiny test model, ``test_<family>``).
        patterns: ``fnmatch`` patterns of the family's registered model names.
        kind: ``"hierarchical"`` (four stage maps at strides 4/8/16/32) or ``"plain"`` (four maps at one stride,
            turned into strides 4/8/16/32 by a simple feature pyramid).
        taps: ``"stages"`` (intermediates 0..3), ``"quarters"`` (the blocks ending each quarter of the depth) or
            four explicit ``forward_intermediates`` indices.
        intermediates_kwargs: Extra arguments of the model's ``forward_intermediates`` (e.g. Vim's
            ``mixer_output=True``).
        level_norm_eps: Epsilon of the per-level LayerNorm over channels added by the adapter; None: no norms.
        level_norm_name: Attribute name of the per-level norms, formatted with ``level`` (0..3) and ``tap`` (the
            intermediate index): the official downstream checkpoints' names, so their backbone parts load.
        final_norm: Attribute of the model that normalises the last tap instead of a new norm (PlainMamba's
            ``ln1``); the model keeps it when pruned.
        pyramid_norm: Norm between the transposed convs of the simple pyramid (plain kinds): ``"batchnorm"`` or
            ``"layernorm"``.
        create_kwargs: Arguments the model needs at creation for dense inputs of any size.
        input_padding: Pixels of zero padding (bottom and right) the model needs so that its maps have exactly
            ``size / stride`` rows and columns (overlapping patch embeddings).
        test_model: The family's tiny registered model, used by the tests.
        source: Where the semantics come from.
        variants: (model-name pattern, field overrides) pairs for variants whose official recipe differs.
    """

    family: str
    patterns: tuple[str, ...]
    kind: str
    taps: Union[str, tuple[int, ...]]
    intermediates_kwargs: dict[str, Any] = field(default_factory=dict)
    level_norm_eps: Optional[float] = None
    level_norm_name: str = "outnorm{level}"
    final_norm: Optional[str] = None
    pyramid_norm: str = "batchnorm"
    create_kwargs: dict[str, Any] = field(default_factory=dict)
    input_padding: Callable[[nn.Module], int] = _no_padding
    test_model: str = ""
    source: str = ""
    variants: tuple[tuple[str, dict[str, Any]], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in (HIERARCHICAL, PLAIN):
            raise ValueError(f"kind must be {HIERARCHICAL!r} or {PLAIN!r}, got {self.kind!r}")
        explicit = isinstance(self.taps, tuple) and len(self.taps) == 4 and all(isinstance(i, int) for i in self.taps)
        if self.taps not in ("stages", "quarters") and not explicit:
            raise ValueError(f"taps must be 'stages', 'quarters' or four indices, got {self.taps!r}")
        if self.pyramid_norm not in ("batchnorm", "layernorm"):
            raise ValueError(f"pyramid_norm must be 'batchnorm' or 'layernorm', got {self.pyramid_norm!r}")
        if not self.patterns:
            raise ValueError(f"family {self.family!r} needs at least one model-name pattern")

    def matches(self, model_name: str) -> bool:
        """Whether a registered model name (tags such as ``.in1k`` ignored) belongs to this family."""
        base = model_name.split(".")[0]
        return any(fnmatch.fnmatchcase(base, pattern) for pattern in self.patterns)

    def tap_indices(self, model: nn.Module) -> tuple[int, ...]:
        """The ``forward_intermediates`` indices to take from ``model``."""
        if self.taps == "stages":
            return 0, 1, 2, 3
        if self.taps == "quarters":
            return quarter_points(len(model.feature_info))
        return self.taps

    def for_model(self, model_name: str) -> "TapSpec":
        """The spec with the overrides of the variants ``model_name`` matches."""
        base = model_name.split(".")[0]
        overrides = [fields for pattern, fields in self.variants if fnmatch.fnmatchcase(base, pattern)]
        return replace(self, **{k: v for fields in overrides for k, v in fields.items()}) if overrides else self

    def level_norm_names(self, taps: Sequence[int]) -> list[Optional[str]]:
        """Attribute names of the adapter's per-level norms for these taps (None where a level has none)."""
        if self.level_norm_eps is None:
            return [None] * 4
        names: list[Optional[str]] = [self.level_norm_name.format(level=level, tap=tap)
                                      for level, tap in enumerate(taps)]
        if self.final_norm is not None:
            names[-1] = None
        return names


TAP_SPECS: dict[str, TapSpec] = {}


def register_taps(spec: TapSpec, overwrite: bool = False) -> TapSpec:
    """Register a family's :class:`TapSpec`; returns it. Raises a ValueError if the family exists (unless
    ``overwrite``)."""
    if spec.family in TAP_SPECS and not overwrite:
        raise ValueError(f"family {spec.family!r} already has a tap spec; pass overwrite=True to replace it")
    TAP_SPECS[spec.family] = spec
    return spec


def tap_spec_for(model_name: str) -> TapSpec:
    """The :class:`TapSpec` of a model name; a ValueError lists the registered families when none matches."""
    if not isinstance(model_name, str):
        raise TypeError(f"model name must be a string, got {type(model_name).__name__}")
    for spec in TAP_SPECS.values():
        if spec.matches(model_name):
            return spec.for_model(model_name)
    known = ", ".join(f"{spec.family} ({' '.join(spec.patterns)})" for spec in TAP_SPECS.values())
    raise ValueError(f"no dense tap description for model {model_name!r}; registered families: {known}. "
                     f"Register one with mambazoo.dense.register_taps(TapSpec(...)).")


def tap_spec_for_model(model: nn.Module) -> TapSpec:
    """The :class:`TapSpec` of a model built by timm (found from ``model.pretrained_cfg['architecture']``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    architecture = cfg.get("architecture")
    if not architecture:
        raise ValueError(f"{type(model).__name__} has no pretrained_cfg['architecture'] (not built by timm); "
                         "pass its TapSpec explicitly")
    return tap_spec_for(architecture)


def _patch_overlap(model: nn.Module) -> int:
    """Padding that gives an overlapping patch embedding (kernel > stride) exactly size / stride patches."""
    embed = model.patch_embed
    return max(embed.patch_size[0] - embed.stride[0], 0)


register_taps(TapSpec(
    family="vim",
    patterns=("vim_*", "test_vim"),
    kind=PLAIN,
    taps="quarters",
    intermediates_kwargs=dict(mixer_output=True),
    create_kwargs=dict(dynamic_img_size=True),
    input_padding=_patch_overlap,
    test_model="test_vim",
    source="Vim segmentation backbone: mixer outputs of blocks 5/11/17/23 (Vim-S: the residual stream), "
           "deconv/identity/max-pool neck with BN",
    variants=(("vim_small_*", dict(intermediates_kwargs={})),),
))
register_taps(TapSpec(
    family="plainmamba",
    patterns=("plainmamba_*", "test_plainmamba"),
    kind=PLAIN,
    taps="quarters",
    level_norm_eps=1e-6,
    level_norm_name="norm_layer{tap}",
    final_norm="ln1",
    test_model="test_plainmamba",
    source="PlainMamba segmentation backbone: residual stream at the quarter points, new LayerNorms (eps 1e-6) on "
           "the first three taps, ln1 on the last; simple pyramid added (upstream feeds stride 16 to UperNet)",
))
register_taps(TapSpec(
    family="mambaout",
    patterns=("mambaout_*", "test_mambaout"),
    kind=HIERARCHICAL,
    taps="stages",
    level_norm_eps=1e-6,
    test_model="test_mambaout",
    source="MambaOut author's recipe: a LayerNorm on each stage output (eps 1e-6 as everywhere in MambaOut)",
))
register_taps(TapSpec(
    family="mambavision",
    patterns=("mambavision_*", "test_mambavision"),
    kind=HIERARCHICAL,
    taps="stages",
    level_norm_eps=1e-5,
    test_model="test_mambavision",
    source="MambaVision MM backbone: pre-downsample level maps through outnorm{i} (channels-first LayerNorm2d, "
           "eps 1e-5)",
))
register_taps(TapSpec(
    family="spatialmamba",
    patterns=("spatialmamba_*", "test_spatialmamba"),
    kind=HIERARCHICAL,
    taps="stages",
    level_norm_eps=1e-5,
    test_model="test_spatialmamba",
    source="Spatial-Mamba MM backbone: pre-downsample stage maps through outnorm{i} (LayerNorm over channels, "
           "eps 1e-5, applied channels-last)",
))

# Baselines for comparisons (timm's models): a DeiT/ViT with a ViTDet-style pyramid and ConvNeXt with per-stage norms.
register_taps(TapSpec(
    family="vit",
    patterns=("deit_*", "vit_*", "test_vit"),
    kind=PLAIN,
    taps="quarters",
    pyramid_norm="layernorm",
    create_kwargs=dict(dynamic_img_size=True),
    test_model="test_vit",
    source="baseline: ViT/DeiT blocks at the quarter points, ViTDet-style simple pyramid with LayerNorm",
))
register_taps(TapSpec(
    family="convnext",
    patterns=("convnext_*", "test_convnext"),
    kind=HIERARCHICAL,
    taps="stages",
    level_norm_eps=1e-6,
    level_norm_name="norm{level}",
    test_model="test_convnext",
    source="baseline: ConvNeXt stage outputs with a LayerNorm each (eps 1e-6), as the official detection backbone",
))

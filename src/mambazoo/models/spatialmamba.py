"""Spatial-Mamba: a hierarchical visual state-space model whose hidden states are fused across space.

Paper: "Spatial-Mamba: Effective Visual State Space Models via Structure-Aware State Fusion", C. Xiao et al.,
ICLR 2025 (arXiv 2410.15091). Official code and weights: https://github.com/EdwardChasel/Spatial-Mamba (Apache-2.0).

Written from the architecture description in ``docs/spatialmamba.md``, with the official module and parameter names
so that the released checkpoints load unchanged. Each block scans the whole image once in raster order with a
one-dimensional state (N = 1) and keeps *every* hidden state (:func:`mambazoo.ops.state_scan`); the states, as an
image, go through the structure-aware state fusion (three dilated depthwise 3×3 convolutions with replicate padding,
:class:`StateFusion`) before the read-out. Differences from the official code: no custom CUDA kernels (the scan runs
on every backend of :mod:`mambazoo.ops`), the state fusion is computed from the current weights on every call instead
of being cached in eval mode (the cache goes stale when weights change), and the timm model contract.
"""
import contextlib
import math
from functools import partial
from typing import Any, ContextManager, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, calculate_drop_path_rates, register_notrace_function, \
    register_notrace_module, trunc_normal_
from timm.models import generate_default_cfgs, register_model

from ..checkpoint import build_model_with_checkpoint, check_state_dict
from ..layers.intermediates import resolve_indices
from ..layers.ssm_init import init_step_projection_
from ..layers.tracing import check_image_batch
from ..ops import capabilities, state_scan

__all__ = ["SpatialMamba", "SpatialMambaBlock", "StateFusion", "StructureAwareSSM", "checkpoint_filter_fn",
           "fuse_states", "fuse_states_merged", "merged_fusion_kernel", "replicate_pad"]

FUSION_DILATIONS = (1, 3, 5)
MERGED_KERNEL_SIZE = 2 * FUSION_DILATIONS[-1] + 1  # 11


def _at_least_float32(tensor: Tensor) -> Tensor:
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def _without_autocast(device_type: str) -> ContextManager:
    """Switch autocast off (the states and their fusion stay float32) where it is on."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def replicate_pad(states: Tensor, pad: int) -> Tensor:
    """Replicate (edge-clamp) padding of (B, D, H, W) states by ``pad`` on every side.

    Under ``torch.compile`` the padding is an index gather instead: inductor's backward of ``F.pad(mode="replicate")``
    on channels_last tensors fails its stride check (the op's meta kernel and its CPU kernel disagree on the layout of
    the input gradient, PyTorch 2.14).
    """
    if not torch.compiler.is_compiling():
        return F.pad(states, (pad,) * 4, mode="replicate")
    height, width = states.shape[-2:]
    rows = torch.arange(-pad, height + pad, device=states.device).clamp(0, height - 1)
    cols = torch.arange(-pad, width + pad, device=states.device).clamp(0, width - 1)
    return states.index_select(2, rows).index_select(3, cols)


def fuse_states(states: Tensor, kernels: Sequence[Tensor], alpha: Tensor) -> Tensor:
    """Structure-aware state fusion as three depthwise 3×3 convolutions.

    Hf = Σ_i alpha_i · DWConv(replicate_pad(H, d_i), K_i, dilation d_i) for d = 1, 3, 5.

    Args:
        states: Hidden states as an image, (B, D, H, W).
        kernels: The three depthwise kernels, (D, 1, 3, 3) each, for dilations 1, 3 and 5.
        alpha: Their weights, (3,).
    """
    fused = None
    for weight, kernel, dilation in zip(alpha.unbind(), kernels, FUSION_DILATIONS):
        term = F.conv2d(replicate_pad(states, dilation), weight * kernel, dilation=dilation,
                        groups=states.shape[1])  # alpha folded into the kernel
        fused = term if fused is None else fused + term
    return fused


def merged_fusion_kernel(kernels: Sequence[Tensor], alpha: Tensor) -> Tensor:
    """The three weighted dilated kernels of :func:`fuse_states` as one 11×11 depthwise kernel (D, 1, 11, 11).

    Replicate padding clamps indices to the edge, so padding by 5 once and convolving with this kernel equals the
    three-convolution form.
    """
    centre = MERGED_KERNEL_SIZE // 2
    merged = kernels[0].new_zeros(kernels[0].shape[0], 1, MERGED_KERNEL_SIZE, MERGED_KERNEL_SIZE)
    for weight, kernel, dilation in zip(alpha.unbind(), kernels, FUSION_DILATIONS):
        taps = slice(centre - dilation, centre + dilation + 1, dilation)
        merged[:, :, taps, taps] += weight * kernel
    return merged


def fuse_states_merged(states: Tensor, kernels: Sequence[Tensor], alpha: Tensor) -> Tensor:
    """:func:`fuse_states` computed with the merged 11×11 kernel (rebuilt from ``kernels`` and ``alpha``)."""
    padded = replicate_pad(states, MERGED_KERNEL_SIZE // 2)
    return F.conv2d(padded, merged_fusion_kernel(kernels, alpha), groups=states.shape[1])


@register_notrace_module
class StateFusion(nn.Module):
    """Structure-aware state fusion (SASF): per-channel dilated 3×3 kernels and their weights alpha.

    The fusion is computed from the current parameters on every call, in float32 (autocast is switched off). The
    official eval path instead caches a merged kernel once and keeps using it after the weights change; nothing is
    cached here.

    Args:
        dim: Channels D (the SSM's inner width).
        merged_kernel: Compute the fusion as one 11×11 depthwise convolution with a kernel rebuilt on every call
            (same result within float rounding; see ``docs/spatialmamba.md`` for which form is faster where).
    """

    def __init__(self, dim: int, merged_kernel: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.dim = dim
        self.merged_kernel = merged_kernel
        self.kernel_3 = nn.Parameter(torch.ones(dim, 1, 3, 3, **dd))
        self.kernel_3_1 = nn.Parameter(torch.ones(dim, 1, 3, 3, **dd))
        self.kernel_3_2 = nn.Parameter(torch.ones(dim, 1, 3, 3, **dd))
        self.alpha = nn.Parameter(torch.ones(3, **dd))

    def forward(self, states: Tensor) -> Tensor:
        """Fuse hidden states (B, D, H, W); returns float32 (float64 for float64 states) (B, D, H, W)."""
        with _without_autocast(states.device.type):
            dtype = _at_least_float32(states).dtype
            kernels = [k.to(dtype) for k in (self.kernel_3, self.kernel_3_1, self.kernel_3_2)]
            fuse = fuse_states_merged if self.merged_kernel else fuse_states
            return fuse(states.to(dtype), kernels, self.alpha.to(dtype))


@register_notrace_function  # a leaf for FX tracing (the scan checks its inputs' values); FX skips _private names
def scan_hidden_states(u: Tensor, delta: Tensor, A_log: Tensor, B: Tensor, delta_bias: Tensor, backend: str) -> Tensor:
    """Every state of the raster scan with A = -exp(A_log) (:func:`mambazoo.ops.state_scan`; float32 parameters, or
    float64 in a float64 model)."""
    A = -torch.exp(_at_least_float32(A_log))
    return state_scan(u, delta, A, B, _at_least_float32(delta_bias), delta_softplus=True, backend=backend)


class StructureAwareSSM(nn.Module):
    """Spatial-Mamba's token mixer (``self_attention`` in the official code, although it is an SSM).

    in_proj → depthwise 3×3 conv + SiLU → one raster scan over the H·W tokens keeping all states (N = 1) → state
    fusion → read-out h·C + u·D → LayerNorm → gate SiLU(z) → out_proj. Works on (B, H, W, C) tensors.

    Args:
        dim: Block width C.
        expand: Inner width factor (D = expand·C).
        d_conv: Depthwise conv kernel size.
        dt_rank: Rank of the step projection; None gives ceil(C / 16).
        dt_min: Smallest initial step.
        dt_max: Largest initial step.
        dt_init_floor: Lower clamp of the initial step.
        merged_fusion: See :class:`StateFusion`.
        scan_backend: Backend of :func:`mambazoo.ops.state_scan`.
    """

    def __init__(
            self,
            dim: int,
            expand: int = 2,
            d_conv: int = 3,
            dt_rank: Optional[int] = None,
            dt_min: float = 0.001,
            dt_max: float = 0.1,
            dt_init_floor: float = 1e-4,
            merged_fusion: bool = False,
            scan_backend: str = "auto",
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.d_inner = inner = expand * dim
        self.dt_rank = dt_rank or math.ceil(dim / 16)
        self.scan_backend = scan_backend
        self._dt_range = (dt_min, dt_max, dt_init_floor)
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False, **dd)
        self.conv2d = nn.Conv2d(inner, inner, d_conv, padding=(d_conv - 1) // 2, groups=inner, **dd)
        self.x_proj_weight = nn.Parameter(torch.empty(self.dt_rank + 2, inner, **dd))  # (dt, B, C) rows, N = 1
        self.dt_projs_weight = nn.Parameter(torch.empty(inner, self.dt_rank, **dd))
        self.dt_projs_bias = nn.Parameter(torch.empty(inner, **dd))
        self.A_logs = nn.Parameter(torch.empty(inner, 1, **dd))
        self.Ds = nn.Parameter(torch.empty(inner, **dd))
        self.state_fusion = StateFusion(inner, merged_fusion, **dd)
        self.out_norm = nn.LayerNorm(inner, eps=1e-5, **dd)
        self.out_proj = nn.Linear(inner, dim, bias=False, **dd)
        self.reset_ssm_parameters()
        capabilities.preload("state_scan")  # now, not on the first call (which may be inside torch.compile)

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """The official initialisation of the raw SSM parameters: ``x_proj_weight`` as nn.Linear's default, the
        Mamba step initialisation (weights U(±rank^-0.5), bias = softplus⁻¹ of a log-uniform step), A = -1, D = 1."""
        nn.init.kaiming_uniform_(self.x_proj_weight, a=math.sqrt(5))
        init_step_projection_(self.dt_projs_weight, self.dt_projs_bias, *self._dt_range)
        self.A_logs.zero_()
        self.Ds.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        """Mix (B, H, W, C) tokens; returns the same shape."""
        batch, height, width, _ = x.shape
        inner = self.d_inner
        # The x and z halves of in_proj are separate contiguous (B, H, W, D) tensors: permuted, x is a channels_last
        # NCHW view that conv2d takes without a copy; z is computed only when needed, and no (B, H, W, D) tensor is
        # held longer than necessary (peak memory at detection resolutions).
        weight = self.in_proj.weight
        u = F.silu(self.conv2d(F.linear(x, weight[:inner]).permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
        tokens = u.reshape(batch, height * width, inner)
        dt, B, C = F.linear(tokens, self.x_proj_weight).split([self.dt_rank, 1, 1], dim=-1)
        states = scan_hidden_states(tokens, F.linear(dt, self.dt_projs_weight), self.A_logs, B, self.dt_projs_bias,
                                    self.scan_backend)
        fused = self.state_fusion(states.view(batch, height, width, inner).permute(0, 3, 1, 2))
        del states
        y = torch.addcmul(u * self.Ds, fused.permute(0, 2, 3, 1), C.view(batch, height, width, 1))
        del fused
        y = self.out_norm(y.to(u.dtype)) * F.silu(F.linear(x, weight[inner:]))
        return self.out_proj(y)


class SpatialMambaBlock(nn.Module):
    """Residual conv position encoding, SSM and MLP sub-blocks on (B, H, W, C) tokens.

    x += cpe1(x); x += DropPath(SSM(LN(x))); x += cpe2(x); x += DropPath(MLP(LN(x))), with cpe = depthwise 3×3 conv.

    Args:
        dim: Width C.
        mlp_ratio: MLP hidden width factor.
        drop_path: Stochastic-depth rate of the SSM and MLP branches.
        ssm_kwargs: Extra arguments of :class:`StructureAwareSSM`.
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0, ssm_kwargs: Optional[dict] = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.cpe1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd)
        self.ln_1 = nn.LayerNorm(dim, eps=1e-5, **dd)
        self.self_attention = StructureAwareSSM(dim, **(ssm_kwargs or {}), **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.cpe2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-5, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, **dd)

    @staticmethod
    def _conv_nhwc(conv: nn.Conv2d, x: Tensor) -> Tensor:
        return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self._conv_nhwc(self.cpe1, x)
        x = x + self.drop_path(self.self_attention(self.ln_1(x)))
        x = x + self._conv_nhwc(self.cpe2, x)
        return x + self.drop_path(self.mlp(self.ln_2(x)))


class ConvNormAct(nn.Module):
    """Conv2d, optional BatchNorm, optional ReLU (parameter names ``conv.*`` and ``norm.*`` as upstream)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1, padding: int = 0,
                 groups: int = 1, bias: bool = True, norm: bool = True, act: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=bias, **dd)
        self.norm = nn.BatchNorm2d(out_chs, eps=1e-5, **dd) if norm else nn.Identity()
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class Stem(nn.Module):
    """Stride-4 conv stem: 3×3/2 → residual pair of 3×3 → 3×3/2 to 4C → 1×1 to C; returns (B, H/4, W/4, C)."""

    def __init__(self, in_chans: int, embed_dim: int, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        half = embed_dim // 2
        self.conv1 = ConvNormAct(in_chans, half, 3, 2, 1, bias=False, **dd)
        self.conv2 = nn.Sequential(
            ConvNormAct(half, half, 3, 1, 1, bias=False, **dd),
            ConvNormAct(half, half, 3, 1, 1, bias=False, act=False, **dd),
        )
        self.conv3 = nn.Sequential(
            ConvNormAct(half, 4 * embed_dim, 3, 2, 1, bias=False, **dd),
            ConvNormAct(4 * embed_dim, embed_dim, 1, bias=False, act=False, **dd),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(check_image_batch(x, self.conv1.conv.in_channels))
        x = self.conv2(x) + x
        return self.conv3(x).permute(0, 2, 3, 1)


class Downsample(nn.Module):
    """Stride-2 inverted bottleneck on (B, H, W, C): 1×1 to 4·out + ReLU, depthwise 3×3/2 + ReLU, 1×1 to out + BN."""

    def __init__(self, dim: int, out_dim: int, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        hidden = 4 * out_dim
        self.conv = nn.Sequential(
            ConvNormAct(dim, hidden, 1, norm=False, **dd),
            ConvNormAct(hidden, hidden, 3, 2, 1, groups=hidden, norm=False, **dd),
            ConvNormAct(hidden, out_dim, 1, act=False, **dd),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class SpatialMambaStage(nn.Module):
    """Blocks at one resolution, then (if ``out_dim`` is given, i.e. except in the last stage) the downsample to the
    next stage's width."""

    def __init__(self, dim: int, depth: int, drop_path: Sequence[float], out_dim: Optional[int] = None,
                 mlp_ratio: float = 4.0, ssm_kwargs: Optional[dict] = None, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList([
            SpatialMambaBlock(dim, mlp_ratio, drop_path[i], ssm_kwargs, **dd) for i in range(depth)
        ])
        self.downsample = Downsample(dim, out_dim, **dd) if out_dim else None

    def forward_blocks(self, x: Tensor) -> Tensor:
        """The stage's blocks (the pre-downsample map, as the official dense recipes tap it)."""
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_blocks(x)
        return x if self.downsample is None else self.downsample(x)


class SpatialMamba(nn.Module):
    """Spatial-Mamba: conv stem, four stages of Spatial-Mamba blocks with conv downsampling, LayerNorm, mean pool.

    Activations are channels-last (B, H, W, C) between stages (``output_fmt = "NHWC"``); the head normalises the
    tokens before pooling, as upstream. Any input size works (strides 4, 8, 16, 32).

    Args:
        in_chans: Input channels.
        num_classes: Classifier classes (0: no classifier).
        global_pool: ``"avg"`` (mean over tokens) or ``""`` (no pooling).
        dims: Stage widths.
        depths: Blocks per stage.
        mlp_ratio: MLP hidden width factor.
        drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic depth, rising linearly over all blocks from 0 to this rate.
        merged_fusion: Compute the state fusion with the merged 11×11 kernel (see :class:`StateFusion`).
        scan_backend: Backend of :func:`mambazoo.ops.state_scan` (``"auto"``: the fastest available).
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            dims: Sequence[int] = (64, 128, 256, 512),
            depths: Sequence[int] = (2, 4, 8, 4),
            mlp_ratio: float = 4.0,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            merged_fusion: bool = False,
            scan_backend: str = "auto",
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        _check_global_pool(global_pool)
        if len(dims) != len(depths):
            raise ValueError(f"dims and depths must have one entry per stage, got {dims} and {depths}")
        dd = {"device": device, "dtype": dtype}
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = dims[-1]
        self.output_fmt = "NHWC"
        self.patch_embed = Stem(in_chans, dims[0], **dd)
        rates = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        ssm_kwargs = dict(merged_fusion=merged_fusion, scan_backend=scan_backend)
        next_dims = list(dims[1:]) + [None]
        self.layers = nn.ModuleList([
            SpatialMambaStage(dims[i], depths[i], rates[i], next_dims[i], mlp_ratio, ssm_kwargs, **dd)
            for i in range(len(dims))
        ])
        self.feature_info = [dict(num_chs=dim, reduction=4 * 2 ** i, module=f"layers.{i}")
                             for i, dim in enumerate(dims)]
        self.norm = nn.LayerNorm(dims[-1], eps=1e-5, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Training-from-scratch initialisation (the official recipe's): truncated normal (std 0.02) Linear weights
        with zero biases, LayerNorms (1, 0), PyTorch defaults for convs, the SSM parameters as
        :meth:`StructureAwareSSM.reset_ssm_parameters`, state-fusion kernels and alpha all ones."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """No parameters beyond biases and 1-D ones (which timm already exempts): the official recipe decays every
        parameter of two or more dimensions, ``A_logs`` (D, 1) included."""
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay: stem, then per block (or per stage if ``coarse``)."""
        return dict(
            stem=r"^patch_embed",
            blocks=r"^layers\.(\d+)" if coarse else [
                (r"^layers\.(\d+)\.downsample", (99998,)),  # after the stage's blocks, which it follows
                (r"^layers\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head (``num_classes=0``: identity) and optionally the pooling (``"avg"`` or ``""``)."""
        if global_pool is not None:
            _check_global_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        parameter = next(self.parameters())
        self.head = nn.Linear(self.num_features, num_classes, device=parameter.device, dtype=parameter.dtype) \
            if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) to normalised features (B, H/32, W/32, C4)."""
        x = self.patch_embed(x)
        for stage in self.layers:
            x = stage(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool the features of :meth:`forward_features` (unless ``global_pool`` is ``""``) and classify."""
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: Tensor,
            indices: Optional[Union[int, Sequence[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Pre-downsample stage maps (strides 4, 8, 16, 32), as the official detection/segmentation backbone taps
        them (without its per-stage LayerNorms, which belong to the dense adapter: see ``docs/spatialmamba.md``).

        Args:
            x: Images (B, C, H, W).
            indices: Stages to tap: None (all), an int n (the last n) or a sequence of indices.
            norm: Apply the final norm to the last stage's map (only that one has its width).
            stop_early: Stop after the last tapped stage (the returned final features are then not meaningful).
            output_fmt: ``"NCHW"`` or ``"NHWC"``.
            intermediates_only: Return only the tapped maps.

        Returns:
            The tapped maps, or (the features of :meth:`forward_features`, the tapped maps).
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = resolve_indices(len(self.layers), indices)
        last = max_index if stop_early or intermediates_only else len(self.layers) - 1
        x = self.patch_embed(x)
        intermediates = []
        for i, stage in enumerate(self.layers[:last + 1]):
            x = stage.forward_blocks(x)
            if i in take_indices:
                tap = self.norm(x) if norm and i == len(self.layers) - 1 else x
                intermediates.append(tap.permute(0, 3, 1, 2) if output_fmt == "NCHW" else tap)
            if stage.downsample is not None and i < last:
                x = stage.downsample(x)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, Sequence[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last tapped one and its downsample (and optionally the norm and head)."""
        take_indices, max_index = resolve_indices(len(self.layers), indices)
        pruned_end = max_index < len(self.layers) - 1
        self.layers = self.layers[:max_index + 1]
        self.layers[-1].downsample = None
        if prune_norm or pruned_end:
            self.norm = nn.Identity()
        if pruned_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or pruned_end:
            self.reset_classifier(0, "")
        return take_indices


def _check_global_pool(global_pool: str) -> None:
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: SpatialMamba,
                         checkpoint_key: str = "model") -> Dict[str, Tensor]:
    """Adapt an official Spatial-Mamba checkpoint (or a plain state dict) to ``model`` and validate it strictly.

    Args:
        state_dict: A state dict, or an official training checkpoint ``{'model', 'model_ema'?, 'config', ...}``.
        model: The target model.
        checkpoint_key: Entry of a training checkpoint to load: ``"model"`` or ``"model_ema"``.

    Returns:
        A state dict with the model's keys and shapes (``module.`` prefixes stripped, any ``_merge_weight`` cache
        dropped; the head is left for timm to adapt).

    Raises:
        ValueError: The checkpoint lacks ``checkpoint_key``.
        CheckpointMismatchError: Its keys or shapes do not match the model.
    """
    if isinstance(state_dict.get("model"), dict):
        if not isinstance(state_dict.get(checkpoint_key), dict):
            raise ValueError(f"checkpoint_key {checkpoint_key!r} not in the checkpoint (entries: {sorted(state_dict)})")
        state_dict = state_dict[checkpoint_key]
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items() if not k.endswith("_merge_weight")}
    check_state_dict(state_dict, model)
    return state_dict


def _cfg(url: str = "", **kwargs) -> Dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.conv1.conv",
        "classifier": "head",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2410.15091",
        "paper_name": "Spatial-Mamba: Effective Visual State Space Models via Structure-Aware State Fusion",
        "origin_url": "https://github.com/EdwardChasel/Spatial-Mamba",
        **kwargs,
    }


# The official weights are on Google Drive (manual download, see docs/spatialmamba.md): load them with
# pretrained_cfg_overlay=dict(file=...).
default_cfgs = generate_default_cfgs({
    "spatialmamba_t.in1k": _cfg(),
    "spatialmamba_s.in1k": _cfg(),
    "spatialmamba_b.in1k": _cfg(),
    "test_spatialmamba.untrained": _cfg(input_size=(3, 64, 64), pool_size=(2, 2), crop_pct=1.0),
})


def _create_spatialmamba(variant: str, pretrained: bool = False, checkpoint_key: str = "model",
                         **kwargs) -> SpatialMamba:
    """Build a Spatial-Mamba model; official training checkpoints load strictly from a local file, safely: their
    pickled yacs config becomes an inert placeholder (see :func:`mambazoo.checkpoint.load_checkpoint_file`).

    ``checkpoint_key`` picks ``"model"`` or ``"model_ema"`` from a training checkpoint.
    """
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if pretrained and not (overlay.get("file") or overlay.get("state_dict")):
        raise ValueError(f"{variant}: the official weights are a manual download (Google Drive links in the "
                         "upstream README, see docs/spatialmamba.md); pass pretrained_cfg_overlay=dict(file=path)")
    return build_model_with_checkpoint(
        SpatialMamba, variant, pretrained,
        filter_fn=partial(checkpoint_filter_fn, checkpoint_key=checkpoint_key),
        unknown_objects="placeholder",
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


@register_model
def spatialmamba_t(pretrained: bool = False, **kwargs) -> SpatialMamba:
    """Spatial-Mamba-T (26.7M params, 83.5% ImageNet top-1)."""
    model_args = dict(dims=(64, 128, 256, 512), depths=(2, 4, 8, 4))
    return _create_spatialmamba("spatialmamba_t", pretrained, **dict(model_args, **kwargs))


@register_model
def spatialmamba_s(pretrained: bool = False, **kwargs) -> SpatialMamba:
    """Spatial-Mamba-S (43.1M params, 84.6% ImageNet top-1)."""
    model_args = dict(dims=(64, 128, 256, 512), depths=(2, 4, 21, 5))
    return _create_spatialmamba("spatialmamba_s", pretrained, **dict(model_args, **kwargs))


@register_model
def spatialmamba_b(pretrained: bool = False, **kwargs) -> SpatialMamba:
    """Spatial-Mamba-B (95.7M params, 85.3% ImageNet top-1)."""
    model_args = dict(dims=(96, 192, 384, 768), depths=(2, 4, 21, 5))
    return _create_spatialmamba("spatialmamba_b", pretrained, **dict(model_args, **kwargs))


@register_model
def test_spatialmamba(pretrained: bool = False, **kwargs) -> SpatialMamba:
    """Tiny Spatial-Mamba for tests: widths 16-128, one block per stage, 64 px."""
    model_args = dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1))
    return _create_spatialmamba("test_spatialmamba", pretrained, **dict(model_args, **kwargs))

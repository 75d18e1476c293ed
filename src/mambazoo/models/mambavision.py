"""MambaVision: a hierarchical hybrid of convolutions, Mamba mixers and window self-attention.

Paper: "MambaVision: A Hybrid Mamba-Transformer Vision Backbone", A. Hatamizadeh and J. Kautz, CVPR 2025
(arXiv 2407.08083). Official weights: Hugging Face ``nvidia/MambaVision-*`` under CC-BY-NC-SA-4.0 (non-commercial).

Written clean-room from a behavioural description of the official models (``docs/mambavision.md``); no upstream code
is used. The released checkpoints load unchanged (both the timm training checkpoint ``*.pth.tar`` and the Hugging Face
``model.safetensors``), and the behaviour the weights depend on is reproduced: the doubled step bias and the
[SSM, z] concatenation of the mixer, the symmetric depthwise convolutions, the BatchNorm head, and the unmasked zero
padding of the attention/mixer windows at input sizes that are not window multiples. Differences from the official
code: the scan runs on any device through :func:`mambazoo.ops.selective_scan`, attention uses
``F.scaled_dot_product_attention``, checkpoints load strictly with ``weights_only=True``, and the timm model contract
(``features_only``, ``forward_intermediates``, ``reset_classifier``, grad checkpointing) is implemented.
"""
import argparse
import math
import os
from functools import partial
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, calculate_drop_path_rates, register_notrace_function, trunc_normal_
from timm.models import checkpoint, generate_default_cfgs, register_model

from ..checkpoint import build_model_with_checkpoint, check_state_dict
from ..checkpoint import load_checkpoint_file as _load_checkpoint_file
from ..layers.intermediates import resolve_indices
from ..layers.tracing import at_least_fp32, check_image_batch
from ..ops import capabilities, selective_scan

__all__ = [
    "MambaVision",
    "MambaVisionMixer",
    "MambaVisionBlock",
    "MambaVisionLevel",
    "ConvBlock",
    "checkpoint_filter_fn",
    "load_checkpoint_file",
    "window_partition",
    "window_reverse",
]

NUM_LEVELS = 4
NUM_CONV_LEVELS = 2
# Objects pickled in the official timm training checkpoints (their ``args`` entry): allowed by ``weights_only=True``.
CHECKPOINT_SAFE_GLOBALS = (argparse.Namespace,)
# Prefixes of the official files: ``module.`` (DDP), ``encoder.`` (downstream wrappers), ``model.`` (the Hugging Face
# wrapper keeps the network as attribute ``model``).
CHECKPOINT_PREFIXES = ("module.", "encoder.", "model.")


# FX leaves (torch.fx wraps public names only): these functions check shapes, pick kernels by dtype or pad by amounts
# computed from shapes, which symbolic tracing cannot follow.
@register_notrace_function
def mixer_selective_scan(x: Tensor, delta: Tensor, A_log: Tensor, B: Tensor, C: Tensor, D: Tensor, delta_bias: Tensor,
                         backend: str) -> Tensor:
    """The scan with A = -exp(A_log); A, D and the step bias in float32 (float64 for float64 models)."""
    A, D, delta_bias = -torch.exp(at_least_fp32(A_log)), at_least_fp32(D), at_least_fp32(delta_bias)
    return selective_scan(x, delta, A, B, C, D=D, delta_bias=delta_bias, delta_softplus=True, backend=backend)


@register_notrace_function
def window_partition(x: Tensor, window_size: int) -> tuple[Tensor, tuple[int, int]]:
    """Zero-pad a (B, C, H, W) map at the bottom and right to window multiples and cut it into windows.

    Windows are ordered row-major over the window grid of each image, tokens row-major inside a window.

    Returns:
        The windows (B·nH·nW, ws·ws, C) and the padded size (Hp, Wp).
    """
    pad_h, pad_w = -x.shape[2] % window_size, -x.shape[3] % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    batch, channels, height, width = x.shape
    x = x.view(batch, channels, height // window_size, window_size, width // window_size, window_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(-1, window_size * window_size, channels), (height, width)


@register_notrace_function
def window_reverse(windows: Tensor, window_size: int, padded_size: tuple[int, int], size: Sequence[int]) -> Tensor:
    """Invert :func:`window_partition`: windows (B·nH·nW, ws·ws, C) to a (B, C, H, W) map cropped to ``size``."""
    padded_h, padded_w = padded_size
    rows, cols = padded_h // window_size, padded_w // window_size
    channels = windows.shape[-1]
    x = windows.view(-1, rows, cols, window_size, window_size, channels).permute(0, 5, 1, 3, 2, 4)
    x = x.reshape(-1, channels, padded_h, padded_w)
    height, width = size
    return x[:, :, :height, :width] if (height, width) != (padded_h, padded_w) else x


class MambaVisionMixer(nn.Module):
    """MambaVision's token mixer: a selective-scan branch and a convolution-only branch, concatenated.

    The input projection gives two halves x and z. Each goes through its own symmetric (non-causal) depthwise
    k-tap conv without bias and a SiLU; x is then scanned (one forward Mamba-1 scan, no gate), z is not; the scan
    output and z are concatenated in that order and projected back. As in the official code the step bias is added
    twice: Δ = softplus(W_dt·dt + 2·b_dt) (``dt_proj`` with its bias, plus the bias again inside the scan).

    Args:
        dim: Token width d (the inner width is expand·d, each branch half of it).
        d_state: SSM state size N.
        d_conv: Depthwise conv kernel size (odd: "same" padding on both sides).
        expand: Inner width factor.
        scan_backend: Selective-scan backend (see :func:`mambazoo.ops.selective_scan`).
    """

    def __init__(
            self,
            dim: int,
            d_state: int = 8,
            d_conv: int = 3,
            expand: int = 1,
            scan_backend: str = "auto",
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        if d_conv % 2 != 1:
            raise ValueError(f"d_conv must be odd (symmetric 'same' padding), got {d_conv}")
        dd = {"device": device, "dtype": dtype}
        self.d_inner = expand * dim
        if self.d_inner % 2:
            raise ValueError(f"expand·dim must be even (two equal branches), got {self.d_inner}")
        self.d_state = d_state
        self.dt_rank = math.ceil(dim / 16)
        self.scan_backend = scan_backend
        half = self.d_inner // 2
        self.A_log = nn.Parameter(torch.empty(half, d_state, **dd))
        self.D = nn.Parameter(torch.empty(half, **dd))
        self.in_proj = nn.Linear(dim, self.d_inner, bias=False, **dd)
        self.x_proj = nn.Linear(half, self.dt_rank + 2 * d_state, bias=False, **dd)
        self.dt_proj = nn.Linear(self.dt_rank, half, bias=True, **dd)
        self.out_proj = nn.Linear(self.d_inner, dim, bias=False, **dd)
        self.conv1d_x = nn.Conv1d(half, half, d_conv, padding=d_conv // 2, groups=half, bias=False, **dd)
        self.conv1d_z = nn.Conv1d(half, half, d_conv, padding=d_conv // 2, groups=half, bias=False, **dd)
        self.reset_ssm_parameters()
        capabilities.preload("selective_scan")  # now, not on the first call (which may be inside torch.compile)

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """A = -(1..N) per channel (A_log = log(1..N)) and D = 1; the Linear layers keep their own initialisation."""
        if self.A_log.device.type == "meta":
            return
        states = torch.arange(1, self.d_state + 1, dtype=self.A_log.dtype, device=self.A_log.device)
        self.A_log.copy_(states.log().expand_as(self.A_log))
        self.D.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        """Mix (B, L, d) token sequences; returns the same shape."""
        weight = torch.cat([self.conv1d_x.weight, self.conv1d_z.weight])  # both branches as one depthwise conv
        xz = F.conv1d(self.in_proj(x).transpose(1, 2), weight, padding=self.conv1d_x.padding, groups=self.d_inner)
        x, z = F.silu(xz).transpose(1, 2).chunk(2, dim=-1)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        # the step bias once inside dt_proj and once more inside the scan
        y = mixer_selective_scan(x, self.dt_proj(dt), self.A_log, B, C, self.D, self.dt_proj.bias, self.scan_backend)
        return self.out_proj(torch.cat([y, z], dim=-1))


class Attention(nn.Module):
    """Multi-head self-attention over each window sequence (no position bias), fused through SDPA."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, device=device, dtype=dtype)
        self.proj = nn.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        """Attend within (B, L, d) sequences; returns the same shape."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class MambaVisionBlock(nn.Module):
    """Pre-norm residual block of levels 2 and 3: a Mamba mixer or attention, then an MLP.

    ``x = x + DropPath(γ1·mixer(LN(x)))``, ``x = x + DropPath(γ2·MLP(LN(x)))``; γ are learned per-channel scales
    (``gamma_1``, ``gamma_2``) when ``layer_scale`` is set, absent otherwise.

    Args:
        dim: Token width.
        num_heads: Attention heads (attention blocks only).
        attention: Self-attention instead of the Mamba mixer.
        mlp_ratio: MLP hidden width factor.
        qkv_bias: Bias on the attention's qkv projection.
        drop_path: Stochastic-depth rate.
        layer_scale: Initial value of the per-channel scales, or None for none.
        mixer_kwargs: Extra arguments of :class:`MambaVisionMixer`.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            attention: bool,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            drop_path: float = 0.0,
            layer_scale: Optional[float] = None,
            mixer_kwargs: Optional[dict[str, Any]] = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = nn.LayerNorm(dim, eps=1e-5, **dd)
        if attention:
            self.mixer = Attention(dim, num_heads, qkv_bias=qkv_bias, **dd)
        else:
            self.mixer = MambaVisionMixer(dim, **(mixer_kwargs or {}), **dd)
        self.gamma_1 = nn.Parameter(torch.full((dim,), layer_scale, **dd)) if layer_scale else None
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-5, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, **dd)
        self.gamma_2 = nn.Parameter(torch.full((dim,), layer_scale, **dd)) if layer_scale else None
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Map (B, L, d) window sequences to the same shape."""
        y = self.mixer(self.norm1(x))
        x = x + self.drop_path1(y if self.gamma_1 is None else self.gamma_1 * y)
        y = self.mlp(self.norm2(x))
        return x + self.drop_path2(y if self.gamma_2 is None else self.gamma_2 * y)


class ConvBlock(nn.Module):
    """Residual block of levels 0 and 1: 3×3 conv, BN, GELU (tanh approximation), 3×3 conv, BN."""

    def __init__(self, dim: int, drop_path: float = 0.0, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1, **dd)
        self.norm1 = nn.BatchNorm2d(dim, eps=1e-5, **dd)
        self.act = nn.GELU(approximate="tanh")
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1, **dd)
        self.norm2 = nn.BatchNorm2d(dim, eps=1e-5, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Map a (B, C, H, W) map to the same shape."""
        return x + self.drop_path(self.norm2(self.conv2(self.act(self.norm1(self.conv1(x))))))


class Downsample(nn.Module):
    """Stride-2 3×3 conv doubling the width (no bias, no norm)."""

    def __init__(self, dim: int, device=None, dtype=None) -> None:
        super().__init__()
        self.reduction = nn.Sequential(nn.Conv2d(dim, 2 * dim, 3, stride=2, padding=1, bias=False, device=device,
                                                 dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.reduction(x)


class PatchEmbed(nn.Module):
    """Stem with stride 4: two stride-2 3×3 convs (no bias), each followed by BN (eps 1e-4) and ReLU."""

    def __init__(self, in_chans: int, in_dim: int, dim: int, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.proj = nn.Identity()
        self.conv_down = nn.Sequential(
            nn.Conv2d(in_chans, in_dim, 3, stride=2, padding=1, bias=False, **dd),
            nn.BatchNorm2d(in_dim, eps=1e-4, **dd),
            nn.ReLU(),
            nn.Conv2d(in_dim, dim, 3, stride=2, padding=1, bias=False, **dd),
            nn.BatchNorm2d(dim, eps=1e-4, **dd),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_down(self.proj(check_image_batch(x, self.conv_down[0].in_channels)))


def attention_pattern(depth: int) -> str:
    """Block types of a level of mixers and attention (``M``, ``A``): the last floor(depth/2) blocks attend."""
    return "M" * math.ceil(depth / 2) + "A" * (depth // 2)


class MambaVisionLevel(nn.Module):
    """One resolution level: its blocks, then (except for the last level) a stride-2 downsample.

    Convolutional levels run :class:`ConvBlock` on the map. The other levels cut the map once into windows (zero
    padding at the bottom and right when the size is not a window multiple, see :func:`window_partition`), run every
    block on the window sequences, and paste the windows back, cropping the padding. The padded tokens are not
    masked: they pass through every block of the level (and become non-zero after the first LayerNorm), as in the
    official models, whose outputs at such sizes depend on them.

    Args:
        dim: Width of the level.
        depth: Number of blocks.
        num_heads: Attention heads.
        window_size: Window side (ignored by convolutional levels).
        conv: Convolutional level.
        downsample: End with a stride-2 downsample.
        drop_path: Stochastic-depth rates, one per block.
        block_kwargs: Extra arguments of :class:`MambaVisionBlock`.
    """

    def __init__(
            self,
            dim: int,
            depth: int,
            num_heads: int,
            window_size: int,
            conv: bool,
            downsample: bool,
            drop_path: Sequence[float],
            block_kwargs: Optional[dict[str, Any]] = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.window_size = None if conv else window_size
        self.grad_checkpointing = False
        if conv:
            blocks = [ConvBlock(dim, drop_path[i], **dd) for i in range(depth)]
        else:
            pattern = attention_pattern(depth)
            blocks = [
                MambaVisionBlock(dim, num_heads, pattern[i] == "A", drop_path=drop_path[i], **(block_kwargs or {}),
                                 **dd)
                for i in range(depth)
            ]
        self.blocks = nn.ModuleList(blocks)
        self.downsample = Downsample(dim, **dd) if downsample else nn.Identity()

    def _run_blocks(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x)
            else:
                x = block(x)
        return x

    def forward_blocks(self, x: Tensor) -> Tensor:
        """The level's output before the downsample, (B, C, H, W) like its input."""
        if self.window_size is None:
            return self._run_blocks(x)
        windows, padded_size = window_partition(x, self.window_size)
        return window_reverse(self._run_blocks(windows), self.window_size, padded_size, x.shape[-2:])

    def forward(self, x: Tensor) -> Tensor:
        return self.downsample(self.forward_blocks(x))


def _check_global_pool(global_pool: str) -> None:
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")


class MambaVision(nn.Module):
    """MambaVision: conv stem, two convolutional levels, two levels of window Mamba-mixer and attention blocks.

    Level i (0-based, as in the state-dict keys) has width dim·2^i at stride 4·2^i; levels 0 and 1 are
    convolutional. In levels 2 and 3 the first ceil(depth/2) blocks are Mamba mixers and
    the rest self-attention, all run on windows (see :class:`MambaVisionLevel`). The head is a BatchNorm on the final
    map, average pooling and a Linear classifier. Any input size works.

    Args:
        in_chans: Input channels.
        num_classes: Classifier outputs (0 for no classifier).
        global_pool: ``"avg"`` or ``""`` (no pooling: ``forward_head`` returns the map).
        dim: Width of level 1.
        in_dim: Width of the first stem conv.
        depths: Blocks per level.
        num_heads: Attention heads per level (levels 2 and 3 use them).
        window_size: Window side per level (levels 2 and 3 use them); the official dense-prediction recipes enlarge
            them, e.g. ``(8, 8, 112, 56)``.
        mlp_ratio: MLP hidden width factor.
        qkv_bias: Bias on the attention's qkv projection.
        d_state: SSM state size of the mixers.
        layer_scale: Initial value of the per-channel residual scales of levels 2–3 (None or 0: no scales; timm's
            ``create_model`` drops None-valued arguments, so pass 0 to switch off a variant's default).
        drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic depth, rising linearly from 0 over all blocks.
        scan_backend: Selective-scan backend of the mixers.
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            dim: int = 80,
            in_dim: int = 32,
            depths: Sequence[int] = (1, 3, 8, 4),
            num_heads: Sequence[int] = (2, 4, 8, 16),
            window_size: Sequence[int] = (8, 8, 14, 7),
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            d_state: int = 8,
            layer_scale: Optional[float] = None,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            scan_backend: str = "auto",
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        _check_global_pool(global_pool)
        for name, values in (("depths", depths), ("num_heads", num_heads), ("window_size", window_size)):
            if len(values) != NUM_LEVELS or min(values) < 1:
                raise ValueError(f"{name} must be {NUM_LEVELS} positive integers (one per level), got {values}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = dim * 2 ** (NUM_LEVELS - 1)
        self.output_fmt = "NCHW"
        self.window_size = tuple(window_size)

        self.patch_embed = PatchEmbed(in_chans, in_dim, dim, **dd)
        rates = calculate_drop_path_rates(drop_path_rate, sum(depths))
        block_kwargs = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, layer_scale=layer_scale,
                            mixer_kwargs=dict(d_state=d_state, scan_backend=scan_backend))
        levels, self.feature_info = [], []
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            levels.append(MambaVisionLevel(
                dim * 2 ** i,
                depth,
                num_heads[i],
                window_size[i],
                conv=i < NUM_CONV_LEVELS,
                downsample=i < NUM_LEVELS - 1,
                drop_path=rates[start:start + depth],
                block_kwargs=block_kwargs,
                **dd,
            ))
            self.feature_info.append(dict(num_chs=dim * 2 ** i, reduction=4 * 2 ** i, module=f"levels.{i}"))
        self.levels = nn.ModuleList(levels)
        self.norm = nn.BatchNorm2d(self.num_features, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The official training-from-scratch initialisation: truncated-normal (std 0.02) Linear weights with zero
        biases — ``dt_proj`` included, which overrides Mamba's step initialisation as upstream does — default convs
        and norms, A_log = log(1..N), D = 1."""
        if self.norm.weight.device.type == "meta":
            return
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, MambaVisionMixer):
                module.reset_ssm_parameters()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters trained without weight decay besides biases and norms: the layer scales, A_log and D."""
        return {name for name, _ in self.named_parameters()
                if name.rsplit(".", 1)[-1] in ("gamma_1", "gamma_2", "A_log", "D")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay: the stem, then per level (coarse) or per block."""
        if coarse:
            blocks = [(r"^levels\.(\d+)", None), (r"^norm", (99999,))]
        else:
            blocks = [(r"^levels\.(\d+)\.blocks\.(\d+)", None), (r"^levels\.(\d+)\.downsample", (99999,)),
                      (r"^norm", (99999,))]
        return dict(stem=r"^patch_embed", blocks=blocks)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        for level in self.levels:
            level.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier layer."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier (``num_classes=0`` removes it) and optionally the pooling (``"avg"`` or ``""``)."""
        if global_pool is not None:
            _check_global_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        reference = self.patch_embed.conv_down[0].weight
        self.head = nn.Linear(self.num_features, num_classes, device=reference.device, dtype=reference.dtype) \
            if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) to the normalised final map (B, 8·dim, ⌈H/32⌉, ⌈W/32⌉)."""
        x = self.patch_embed(x)
        for level in self.levels:
            x = level(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool the map (unless ``global_pool`` is ``""``) and classify; ``pre_logits`` stops before the classifier."""
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) to logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: Tensor,
            indices: Optional[Union[int, Sequence[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[list[Tensor], tuple[Tensor, list[Tensor]]]:
        """The output of chosen levels before their downsample (strides 4, 8, 16, 32), without extra norms.

        The official detection/segmentation recipes put a channels-first LayerNorm (``outnorm{i}``) on each of these
        maps; those norms belong to the dense-prediction adapter, not to this model (``docs/mambavision.md``).

        Args:
            x: Images (B, C, H, W).
            indices: Levels to return: None (all four), an int n (the last n) or a sequence of level indices.
            norm: Apply the head's BatchNorm to the last level's map (the only one of matching width).
            stop_early: Stop after the last requested level (the returned final map is then not meaningful).
            output_fmt: Only ``"NCHW"``.
            intermediates_only: Return only the level maps.

        Returns:
            The level maps, or (the :meth:`forward_features` output, the level maps).
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = resolve_indices(len(self.levels), indices)
        last = len(self.levels) - 1
        stop = max_index if stop_early or intermediates_only else last
        intermediates = []
        x = self.patch_embed(x)
        for i, level in enumerate(self.levels[:stop + 1]):
            x = level.forward_blocks(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm and i == NUM_LEVELS - 1 else x)
            if i < stop:
                x = level.downsample(x)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if stop == last else x), intermediates

    def prune_intermediate_layers(
            self,
            indices: Optional[Union[int, Sequence[int]]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> list[int]:
        """Drop the levels after the last requested one, and its downsample (optionally the norm and head).

        When the last level is dropped the final BatchNorm goes too: it only fits the last level's width.
        """
        take_indices, max_index = resolve_indices(len(self.levels), indices)
        self.levels = self.levels[:max_index + 1]
        self.levels[-1].downsample = nn.Identity()
        if prune_norm or max_index < NUM_LEVELS - 1:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


def load_checkpoint_file(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``: a safetensors file or a ``torch.save`` file (the official
    ``*.pth.tar`` training checkpoints included: only ``argparse.Namespace`` is allowed beyond plain containers).

    See :func:`mambazoo.checkpoint.load_checkpoint_file`; errors name the file and the problem.
    """
    return _load_checkpoint_file(path, CHECKPOINT_SAFE_GLOBALS)


def _unwrap(checkpoint: dict[str, Any], checkpoint_key: Optional[str]) -> dict[str, Any]:
    if checkpoint_key is not None:
        if not isinstance(checkpoint.get(checkpoint_key), dict):
            raise ValueError(f"no state dict under checkpoint_key {checkpoint_key!r} "
                             f"(top-level entries: {sorted(checkpoint)[:10]})")
        return checkpoint[checkpoint_key]
    for key in ("state_dict", "model"):
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint


def _strip_prefixes(key: str) -> str:
    while key.startswith(CHECKPOINT_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def checkpoint_filter_fn(
        state_dict: dict[str, Any],
        model: MambaVision,
        checkpoint_key: Optional[str] = None,
) -> dict[str, Tensor]:
    """Adapt an official MambaVision checkpoint (or a plain state dict) to ``model`` and check it strictly.

    Accepts the timm training checkpoint (weights under ``state_dict``, plus ``args``, optimizer state, ...), a dict
    with the weights under ``model``, a bare state dict, and the Hugging Face safetensors layout; strips the
    ``module.``, ``encoder.`` and ``model.`` prefixes.

    Args:
        state_dict: The loaded checkpoint.
        model: The target model.
        checkpoint_key: Take the weights from this entry (e.g. ``"state_dict_ema"``) instead of ``state_dict`` or
            ``model``.

    Returns:
        A state dict with the model's keys and shapes (the classifier is left for timm to adapt).

    Raises:
        ValueError: ``checkpoint_key`` is absent.
        CheckpointMismatchError: The keys or shapes do not match the model (the ``gamma_*`` layer-scale keys exist
            only for the variants with layer scale: B, L, L2, L3).
    """
    weights = _unwrap(state_dict, checkpoint_key)
    weights = {_strip_prefixes(key): value for key, value in weights.items()}
    check_state_dict(weights, model, hint=_layer_scale_hint)
    return weights


def _layer_scale_hint(missing: list[str], unexpected: list[str]) -> Optional[str]:
    if any(".gamma_" in key for key in missing + unexpected):
        return ("gamma_* are the layer-scale weights of B, L, L2 and L3: the model's layer_scale option must match "
                "the checkpoint")
    return None


def _cfg(url: str = "", **kwargs) -> dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 1.0,
        "crop_mode": "center",
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.conv_down.0",
        "classifier": "head",
        "license": "cc-by-nc-sa-4.0",
        "paper_ids": "arXiv:2407.08083",
        "paper_name": "MambaVision: A Hybrid Mamba-Transformer Vision Backbone",
        "origin_url": "https://github.com/NVlabs/MambaVision",
        **kwargs,
    }


def _hub(name: str, **kwargs) -> dict[str, Any]:
    return _cfg(hf_hub_id=f"nvidia/MambaVision-{name}", **kwargs)


_SQUASH_512 = dict(input_size=(3, 512, 512), pool_size=(16, 16), crop_pct=0.93, crop_mode="squash")
default_cfgs = generate_default_cfgs({
    "mambavision_t.in1k": _hub("T-1K"),
    "mambavision_t2.in1k": _hub("T2-1K", crop_pct=0.98),
    "mambavision_s.in1k": _hub("S-1K", crop_pct=0.93),
    "mambavision_b.in1k": _hub("B-1K"),
    "mambavision_l.in1k": _hub("L-1K"),
    "mambavision_l2.in1k": _hub("L2-1K"),
    "mambavision_b_21k.in21k_ft_in1k": _hub("B-21K"),
    "mambavision_l_21k.in21k_ft_in1k": _hub("L-21K"),
    "mambavision_l2_512_21k.in21k_ft_in1k": _hub("L2-512-21K", **_SQUASH_512),
    "mambavision_l3_256_21k.in21k_ft_in1k": _hub("L3-256-21K", input_size=(3, 256, 256), pool_size=(8, 8)),
    "mambavision_l3_512_21k.in21k_ft_in1k": _hub("L3-512-21K", **_SQUASH_512),
    "test_mambavision.untrained": _cfg(input_size=(3, 64, 64), pool_size=(2, 2), license=None),
})


def _create_mambavision(variant: str, pretrained: bool = False, checkpoint_key: Optional[str] = None,
                        **kwargs) -> MambaVision:
    """Build a MambaVision model; pretrained weights come from the hub or ``pretrained_cfg_overlay=dict(file=...)``.

    Local files are read with ``weights_only=True`` (see :func:`load_checkpoint_file`) so that errors name them and the
    weights under ``state_dict`` are used (timm's own file loader would prefer an EMA copy when there is one);
    ``checkpoint_key`` picks another entry.
    """
    return build_model_with_checkpoint(
        MambaVision,
        variant,
        pretrained,
        filter_fn=partial(checkpoint_filter_fn, checkpoint_key=checkpoint_key),
        safe_globals=CHECKPOINT_SAFE_GLOBALS,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


def _mambavision(variant: str, pretrained: bool, model_args: dict[str, Any], kwargs: dict[str, Any]) -> MambaVision:
    return _create_mambavision(variant, pretrained=pretrained, **dict(model_args, **kwargs))


_T = dict(dim=80, in_dim=32, num_heads=(2, 4, 8, 16))
_B = dict(dim=128, in_dim=64, num_heads=(2, 4, 8, 16), layer_scale=1e-5)
_L = dict(dim=196, in_dim=64, num_heads=(4, 8, 16, 32), layer_scale=1e-5)
_L3 = dict(dim=256, in_dim=64, depths=(3, 3, 20, 10), num_heads=(4, 8, 16, 32), layer_scale=1e-5)
_WINDOWS_512 = (8, 8, 32, 16)


@register_model
def mambavision_t(pretrained: bool = False, **kwargs) -> MambaVision:
    """MambaVision-T (31.8M params, 82.3% ImageNet-1k top-1)."""
    return _mambavision("mambavision_t", pretrained, dict(_T, depths=(1, 3, 8, 4)), kwargs)


@register_model
def mambavision_t2(pretrained: bool = False, **kwargs) -> MambaVision:
    """MambaVision-T2 (35.1M params, 82.7% top-1)."""
    return _mambavision("mambavision_t2", pretrained, dict(_T, depths=(1, 3, 11, 4)), kwargs)


@register_model
def mambavision_s(pretrained: bool = False, **kwargs) -> MambaVision:
    """MambaVision-S (50.1M params, 83.3% top-1)."""
    model_args = dict(dim=96, in_dim=64, depths=(3, 3, 7, 5), num_heads=(2, 4, 8, 16))
    return _mambavision("mambavision_s", pretrained, model_args, kwargs)


@register_model
def mambavision_b(pretrained: bool = False, **kwargs) -> MambaVision:
    """MambaVision-B (97.7M params, 84.2% top-1)."""
    return _mambavision("mambavision_b", pretrained, dict(_B, depths=(3, 3, 10, 5)), kwargs)


@register_model
def mambavision_l(pretrained: bool = False, **kwargs) -> MambaVision:
    """MambaVision-L (228.0M params, 85.0% top-1)."""
    return _mambavision("mambavision_l", pretrained, dict(_L, depths=(3, 3, 10, 5)), kwargs)


@register_model
def mambavision_l2(pretrained: bool = False, **kwargs) -> MambaVision:
    """MambaVision-L2 (241.6M params, 85.3% top-1)."""
    return _mambavision("mambavision_l2", pretrained, dict(_L, depths=(3, 3, 12, 5)), kwargs)


@register_model
def mambavision_b_21k(pretrained: bool = False, **kwargs) -> MambaVision:
    """MambaVision-B pre-trained on ImageNet-21K, fine-tuned on ImageNet-1k (84.9% top-1)."""
    return _mambavision("mambavision_b_21k", pretrained, dict(_B, depths=(3, 3, 10, 5)), kwargs)


@register_model
def mambavision_l_21k(pretrained: bool = False, **kwargs) -> MambaVision:
    """MambaVision-L pre-trained on ImageNet-21K, fine-tuned on ImageNet-1k (86.1% top-1)."""
    return _mambavision("mambavision_l_21k", pretrained, dict(_L, depths=(3, 3, 10, 5)), kwargs)


@register_model
def mambavision_l2_512_21k(pretrained: bool = False, **kwargs) -> MambaVision:
    """MambaVision-L2 at 512 px with windows (8, 8, 32, 16), ImageNet-21K pre-trained (87.3% top-1)."""
    model_args = dict(_L, depths=(3, 3, 12, 5), window_size=_WINDOWS_512)
    return _mambavision("mambavision_l2_512_21k", pretrained, model_args, kwargs)


@register_model
def mambavision_l3_256_21k(pretrained: bool = False, **kwargs) -> MambaVision:
    """MambaVision-L3 at 256 px with windows (8, 8, 16, 8), ImageNet-21K pre-trained (739.6M params, 87.3% top-1)."""
    return _mambavision("mambavision_l3_256_21k", pretrained, dict(_L3, window_size=(8, 8, 16, 8)), kwargs)


@register_model
def mambavision_l3_512_21k(pretrained: bool = False, **kwargs) -> MambaVision:
    """MambaVision-L3 at 512 px with windows (8, 8, 32, 16), ImageNet-21K pre-trained (88.1% top-1)."""
    return _mambavision("mambavision_l3_512_21k", pretrained, dict(_L3, window_size=_WINDOWS_512), kwargs)


@register_model
def test_mambavision(pretrained: bool = False, **kwargs) -> MambaVision:
    """Tiny MambaVision for tests: dim 16, depths (1, 1, 3, 2), windows (8, 8, 4, 2), layer scale, 64 px."""
    model_args = dict(dim=16, in_dim=8, depths=(1, 1, 3, 2), num_heads=(1, 2, 2, 4), window_size=(8, 8, 4, 2),
                      layer_scale=1e-5)
    return _mambavision("test_mambavision", pretrained, model_args, kwargs)

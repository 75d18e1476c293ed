"""PlainMamba: a plain (non-hierarchical) visual Mamba that scans the image along continuous zig-zag paths.

Paper: "PlainMamba: Improving Non-Hierarchical Mamba in Visual Recognition", C. Yang et al., BMVC 2024
(arXiv 2403.17695). Official weights: Hugging Face ``ChenhongyiYang/PlainMamba`` (``l1.pth``, ``l2.pth``, ``l3.pth``).

Written clean-room from the paper and the observed behaviour (the official code carries no licence; see
``docs/plainmamba.md``). The default configuration reproduces the released checkpoints, including two quirks of the
official code that the weights depend on; see :class:`PlainMamba2D`.
"""
import math
import re
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, calculate_drop_path_rates, register_notrace_function, to_2tuple, trunc_normal_
from timm.models import checkpoint, generate_default_cfgs, register_model

from ..checkpoint import build_model_with_checkpoint, check_state_dict
from ..layers.intermediates import resolve_indices
from ..layers.ssm_init import init_step_projection_
from ..layers.tracing import check_image_batch
from ..ops import capabilities, selective_scan

__all__ = [
    "PlainMamba", "PlainMamba2D", "PlainMambaLayer", "ConvPatchEmbed", "ScanPaths", "pad_to_multiple", "scan_paths",
    "zigzag_scan_orders",
]

NUM_PATHS = 4
PATCH_STRIDE = 16
_PROJECTION_STRIDE = 8


def _row_snake(height: int, width: int, device: Optional[torch.device]) -> Tensor:
    grid = torch.arange(height * width, device=device).view(height, width)
    grid[1::2] = grid[1::2].flip(1)
    return grid.flatten()


def _column_snake(height: int, width: int, device: Optional[torch.device]) -> Tensor:
    grid = torch.arange(height * width, device=device).view(height, width).t().contiguous()
    grid[1::2] = grid[1::2].flip(1)
    return grid.flatten()


def _move_directions(order: Tensor, width: int) -> Tensor:
    """Direction id of every step: 0 start, 1 right (j+1), 2 left (j-1), 3 up (i-1), 4 down (i+1)."""
    d_row, d_col = (order // width).diff(), (order % width).diff()
    moves = (d_col == 1) * 1 + (d_col == -1) * 2 + (d_row == -1) * 3 + (d_row == 1) * 4
    return torch.cat([moves.new_zeros(1), moves])


def zigzag_scan_orders(height: int, width: int, device: Optional[torch.device] = None) -> tuple[Tensor, Tensor]:
    """The four continuous zig-zag scan paths of an H×W token grid (raster index i·W + j).

    Paths: row-wise boustrophedon from the top-left corner, its reverse, column-wise boustrophedon from the top-left
    corner, its reverse.

    Returns:
        ``orders`` (4, H·W): the raster index visited at each scan step, and ``directions`` (4, H·W): the id of the
        move that reached it (0 start, 1 right, 2 left, 3 up, 4 down).
    """
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive, got {(height, width)}")
    rows, columns = _row_snake(height, width, device), _column_snake(height, width, device)
    orders = torch.stack([rows, rows.flip(0), columns, columns.flip(0)])
    directions = torch.stack([_move_directions(order, width) for order in orders])
    return orders, directions


class ScanPaths(NamedTuple):
    """Index tables that run the four paths of an H×W grid as one batched scan.

    Built once per forward pass by the model and shared by its layers; never cached across calls, so tensors made
    under ``inference_mode``, on the meta device or while tracing cannot leak into a later call.

    Attributes:
        hw_shape: The token grid (H, W).
        gather: (4·L,) raster index of every (path, step), path after path.
        scatter: (4·L,) for every (path, raster token), the flat (path, step) position that produced it.
        directions: (4, L) move id of every scan step.
    """

    hw_shape: tuple[int, int]
    gather: Tensor
    scatter: Tensor
    directions: Tensor


@register_notrace_function  # builds tables for the concrete grid (see mambazoo.layers.tracing)
def scan_paths(hw_shape: tuple[int, int], device: Optional[torch.device] = None) -> ScanPaths:
    """The :class:`ScanPaths` of a token grid, on ``device``."""
    height, width = hw_shape
    orders, directions = zigzag_scan_orders(height, width, device)
    length = height * width
    inverse = orders.argsort(dim=1) + torch.arange(NUM_PATHS, device=device).unsqueeze(1) * length
    return ScanPaths((height, width), orders.flatten(), inverse.flatten(), directions)


class PlainMamba2D(nn.Module):
    """PlainMamba's token mixer: a depthwise 2-D conv and one selective scan along four zig-zag paths.

    One set of SSM parameters serves all four paths; a learned (5, N) table indexed by move direction is added to
    the input-dependent B; the path outputs are summed and gated once by SiLU(z). The four paths run as one scan
    call, stacked along the batch dimension.

    The released checkpoints were trained with two quirks of the official code, reproduced by default:

    * ``double_dt_bias``: the step bias is added twice, Δ = softplus(W_dt·dt + 2·b_dt).
    * ``raster_ssm_inputs``: only the scan input u is re-ordered along a path; Δ, B and C stay in raster order, so
      scan step t consumes token ``order[t]`` with the Δ, B, C of raster token t. The direction bias is added in
      scan order. Set it to False for the paper's formulation, where Δ, B and C follow their token.

    Keeping every path a forward scan lets the four paths share one scan call (the op's ``reverse`` flag is per call)
    and, with the quirk, share Δ and C outright; a ``reverse=True`` scan would replay u only, so it would need
    flipped copies of Δ, B and C and a second call.

    Args:
        dim: Model width D.
        d_state: SSM state size N.
        expand: Inner width factor (E = expand·D).
        dt_rank: Rank of the step projection; None gives ceil(D / 16).
        conv_size: Kernel size of the depthwise 2-D conv.
        double_dt_bias: Reproduce the doubled step bias of the official code.
        raster_ssm_inputs: Reproduce the official code's raster-ordered Δ, B, C.
        scan_backend: Selective-scan backend (see :func:`mambazoo.ops.selective_scan`).
    """

    def __init__(
            self,
            dim: int,
            d_state: int = 16,
            expand: int = 2,
            dt_rank: Optional[int] = None,
            conv_size: int = 7,
            double_dt_bias: bool = True,
            raster_ssm_inputs: bool = True,
            scan_backend: str = "auto",
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.d_inner = expand * dim
        self.d_state = d_state
        self.dt_rank = dt_rank or math.ceil(dim / 16)
        self.double_dt_bias = double_dt_bias
        self.raster_ssm_inputs = raster_ssm_inputs
        self.scan_backend = scan_backend
        inner = self.d_inner
        self.in_proj = nn.Linear(dim, 2 * inner, bias=True, **dd)
        self.conv2d = nn.Conv2d(inner, inner, conv_size, padding=conv_size // 2, groups=inner, bias=True, **dd)
        self.x_proj = nn.Linear(inner, self.dt_rank + 2 * d_state, bias=False, **dd)
        self.dt_proj = nn.Linear(self.dt_rank, inner, bias=True, **dd)
        self.A_log = nn.Parameter(torch.empty(inner, d_state, **dd))
        self.D = nn.Parameter(torch.empty(inner, **dd))
        self.direction_Bs = nn.Parameter(torch.empty(5, d_state, **dd))
        self.out_proj = nn.Linear(inner, dim, bias=True, **dd)
        self.reset_ssm_parameters()
        capabilities.preload("selective_scan")  # now, not on the first call (which may be inside torch.compile)

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4) -> None:
        """Mamba's initialisation of the step projection, A and D; truncated normal (std 0.02) direction table."""
        init_step_projection_(self.dt_proj.weight, self.dt_proj.bias, dt_min, dt_max, dt_floor)
        states = torch.arange(1, self.d_state + 1, dtype=self.A_log.dtype, device=self.A_log.device)
        self.A_log.copy_(states.log().expand_as(self.A_log))
        self.D.fill_(1.0)
        trunc_normal_(self.direction_Bs, std=0.02)

    def forward(self, x: Tensor, hw_shape: tuple[int, int], paths: Optional[ScanPaths] = None) -> Tensor:
        """Mix (B, H·W, D) raster-ordered tokens; returns the same shape.

        ``paths`` are the grid's :class:`ScanPaths` (built here when not given).
        """
        paths = scan_paths(hw_shape, x.device) if paths is None else paths
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = x.unflatten(1, hw_shape).permute(0, 3, 1, 2)
        x = F.silu(self.conv2d(x)).flatten(2).transpose(1, 2)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        y = self._scan_paths(x, self.dt_proj(dt), B, C, paths)
        return self.out_proj(y * F.silu(z))

    def _scan_paths(self, x: Tensor, delta: Tensor, B: Tensor, C: Tensor, paths: ScanPaths) -> Tensor:
        """Scan the four paths in one call (batch index = b·4 + path) and sum their outputs in raster order."""
        batch, length, inner = x.shape
        gather, scatter, directions = paths.gather, paths.scatter, paths.directions

        def along_paths(t: Tensor) -> Tensor:
            return t.index_select(1, gather).view(batch * NUM_PATHS, length, t.shape[-1])

        def in_raster_order(t: Tensor) -> Tensor:
            return t.unsqueeze(1).expand(-1, NUM_PATHS, -1, -1).reshape(batch * NUM_PATHS, length, t.shape[-1])

        direction_bias = self.direction_Bs.to(B.dtype)[directions]  # (4, L, N), scan order
        if self.raster_ssm_inputs:
            delta, C = in_raster_order(delta), in_raster_order(C)
            B = (B.unsqueeze(1) + direction_bias).flatten(0, 1)
        else:
            delta, C = along_paths(delta), along_paths(C)
            B = (along_paths(B).unflatten(0, (batch, NUM_PATHS)) + direction_bias).flatten(0, 1)
        y = selective_scan(
            along_paths(x),
            delta,
            -torch.exp(self.A_log.float()),
            B,
            C,
            D=self.D.float(),
            delta_bias=self.dt_proj.bias.float() if self.double_dt_bias else None,
            delta_softplus=True,
            backend=self.scan_backend,
        )
        y = y.view(batch, NUM_PATHS * length, inner).index_select(1, scatter)
        return y.view(batch, NUM_PATHS, length, inner).sum(1)


class PlainMambaLayer(nn.Module):
    """Pre-norm residual mixer layer, optionally followed by a non-residual depthwise 3×3 conv + BN + GELU block.

    Args:
        dim: Model width D.
        drop_path: Stochastic-depth rate of the residual branch.
        with_dwconv: Append the depthwise conv block (PlainMamba-L1 layer 0); its output replaces the tokens.
        mixer_kwargs: Extra arguments of :class:`PlainMamba2D`.
    """

    def __init__(
            self,
            dim: int,
            drop_path: float = 0.0,
            with_dwconv: bool = False,
            mixer_kwargs: Optional[dict] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm = nn.LayerNorm(dim, eps=1e-5, **dd)
        self.mamba = PlainMamba2D(dim, **(mixer_kwargs or {}), **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.dw = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False, **dd),
            nn.BatchNorm2d(dim, **dd),
            nn.GELU(),
        ) if with_dwconv else None

    def forward(self, x: Tensor, hw_shape: tuple[int, int], paths: Optional[ScanPaths] = None) -> Tensor:
        """Map (B, H·W, D) raster-ordered tokens to the same shape (``paths``: see :class:`PlainMamba2D`)."""
        x = x + self.drop_path(self.mamba(self.norm(x), hw_shape, paths))
        if self.dw is not None:
            x = self.dw(x.unflatten(1, hw_shape).permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
        return x


class ConvPatchEmbed(nn.Module):
    """Convolutional stem with stride 16: 7×7/2 conv, ``num_convs`` 3×3 convs, then an 8×8/8 projection.

    Inputs of any size are zero-padded at the bottom and right to a multiple of 8 before the projection.

    Args:
        in_chans: Input channels.
        embed_dim: Output width D.
        stem_chs: Width of the stem convs.
        num_convs: Number of 3×3 conv + BN + ReLU blocks after the first conv.
    """

    def __init__(self, in_chans: int, embed_dim: int, stem_chs: int = 64, num_convs: int = 1, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, stem_chs, 7, stride=2, padding=3, bias=False, **dd),
            nn.BatchNorm2d(stem_chs, **dd),
            nn.ReLU(inplace=True),
        )
        self.convs = nn.Sequential(*[
            module
            for _ in range(num_convs)
            for module in (
                nn.Conv2d(stem_chs, stem_chs, 3, padding=1, bias=False, **dd),
                nn.BatchNorm2d(stem_chs, **dd),
                nn.ReLU(inplace=True),
            )
        ])
        self.projection = nn.Conv2d(stem_chs, embed_dim, _PROJECTION_STRIDE, stride=_PROJECTION_STRIDE, **dd)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Returns (B, H·W, D) raster-ordered tokens and the token grid (H, W)."""
        x = self.projection(pad_to_multiple(self.convs(self.stem(x)), _PROJECTION_STRIDE))
        return x.flatten(2).transpose(1, 2), (x.shape[-2], x.shape[-1])


@register_notrace_function  # pads by concrete amounts (see mambazoo.layers.tracing)
def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Zero-pad a (B, C, H, W) map at the bottom and right so that H and W are multiples of ``multiple``."""
    pad_h, pad_w = -x.shape[-2] % multiple, -x.shape[-1] % multiple
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


def token_grid(img_size: tuple[int, int]) -> tuple[int, int]:
    """Token grid of an input size: ceil(ceil(side / 2) / 8) per side."""
    return tuple(math.ceil(math.ceil(side / 2) / _PROJECTION_STRIDE) for side in img_size)


@register_notrace_function  # compares concrete grids (see mambazoo.layers.tracing)
def resample_pos_embed(pos_embed: Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> Tensor:
    """Bicubically resize (1, H·W, D) position embeddings from ``src_grid`` to ``dst_grid`` (align_corners=False)."""
    if tuple(src_grid) == tuple(dst_grid):
        return pos_embed
    grid = pos_embed.unflatten(1, src_grid).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=dst_grid, mode="bicubic", align_corners=False)
    return grid.flatten(2).transpose(1, 2)


def _quarter_points(depth: int) -> tuple[int, ...]:
    """Layer indices ending each quarter of the network (the segmentation taps, e.g. 5/11/17/23 for depth 24)."""
    return tuple(depth * quarter // 4 - 1 for quarter in range(1, 5))


class PlainMamba(nn.Module):
    """PlainMamba: conv stem, learned position embeddings, a stack of zig-zag Mamba layers, mean-pooled head.

    Works at any input size (position embeddings are resized bicubically to the token grid). Features are
    (B, H·W, D) tokens at stride 16.

    Args:
        img_size: Input size the stored position embeddings correspond to.
        in_chans: Input channels.
        num_classes: Classifier outputs (0 for no classifier).
        global_pool: ``"avg"`` (mean over tokens) or ``""`` (no pooling).
        embed_dim: Model width D.
        depth: Number of layers.
        d_state: SSM state size N.
        expand: Mixer inner width factor.
        conv_size: Mixer depthwise conv kernel size.
        stem_chs: Width of the stem convs.
        num_stem_convs: 3×3 convs in the stem after the first conv.
        dwconv_layers: Layers followed by the non-residual depthwise conv block.
        drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic depth, rising linearly from 0 to this rate over the layers.
        double_dt_bias: See :class:`PlainMamba2D` (True reproduces the checkpoints).
        raster_ssm_inputs: See :class:`PlainMamba2D` (True reproduces the checkpoints).
        scan_backend: Selective-scan backend.
    """

    def __init__(
            self,
            img_size: Union[int, tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            embed_dim: int = 192,
            depth: int = 24,
            d_state: int = 16,
            expand: int = 2,
            conv_size: int = 7,
            stem_chs: int = 64,
            num_stem_convs: int = 1,
            dwconv_layers: tuple[int, ...] = (),
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            double_dt_bias: bool = True,
            raster_ssm_inputs: bool = True,
            scan_backend: str = "auto",
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        _check_global_pool(global_pool)
        if any(not 0 <= index < depth for index in dwconv_layers):
            raise ValueError(f"dwconv_layers must index layers 0..{depth - 1}, got {dwconv_layers}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 0
        self.output_fmt = "NLC"
        self.grad_checkpointing = False
        self.patch_grid = token_grid(to_2tuple(img_size))

        self.patch_embed = ConvPatchEmbed(in_chans, embed_dim, stem_chs, num_stem_convs, **dd)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_grid[0] * self.patch_grid[1], embed_dim, **dd))
        mixer_kwargs = dict(
            d_state=d_state,
            expand=expand,
            conv_size=conv_size,
            double_dt_bias=double_dt_bias,
            raster_ssm_inputs=raster_ssm_inputs,
            scan_backend=scan_backend,
        )
        drop_path_rates = calculate_drop_path_rates(drop_path_rate, depth)
        self.layers = nn.ModuleList([
            PlainMambaLayer(embed_dim, drop_path_rates[i], i in dwconv_layers, mixer_kwargs, **dd)
            for i in range(depth)
        ])
        self.feature_info = [
            dict(module=f"layers.{i}", num_chs=embed_dim, reduction=PATCH_STRIDE) for i in range(depth)
        ]
        self.ln1 = nn.LayerNorm(embed_dim, eps=1e-6, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """Training-from-scratch initialisation (the official recipe's): truncated normal (std 0.02) position
        embeddings and Linear weights with zero biases, Mamba's initialisation for the SSM parameters."""
        trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for layer in self.layers:
            layer.mamba.reset_ssm_parameters()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters trained without weight decay (besides biases and norms): embeddings and SSM parameters."""
        return {"pos_embed"} | {
            name for name, _ in self.named_parameters() if name.rsplit(".", 1)[-1] in ("A_log", "D", "direction_Bs")
        }

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise learning-rate decay: stem, then one group per layer."""
        return dict(stem=r"^pos_embed|^patch_embed", blocks=[(r"^layers\.(\d+)", None), (r"^ln1", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each layer's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enable

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
        device, dtype = self.pos_embed.device, self.pos_embed.dtype
        self.head = nn.Linear(self.embed_dim, num_classes, device=device, dtype=dtype) if num_classes > 0 \
            else nn.Identity()

    def _embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x, hw_shape = self.patch_embed(check_image_batch(x, self.patch_embed.stem[0].in_channels))
        return x + resample_pos_embed(self.pos_embed, self.patch_grid, hw_shape), hw_shape

    def _run_layer(self, layer: PlainMambaLayer, x: Tensor, paths: ScanPaths) -> Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(layer, x, paths.hw_shape, paths)
        return layer(x, paths.hw_shape, paths)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) to normalised tokens (B, H/16·W/16, D)."""
        x, hw_shape = self._embed(x)
        paths = scan_paths(hw_shape, x.device)
        for layer in self.layers:
            x = self._run_layer(layer, x, paths)
        return self.ln1(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool tokens (unless ``global_pool`` is ``""``) and classify; ``pre_logits`` stops before the classifier."""
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) to logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: Tensor,
            indices: Optional[Union[int, list[int], tuple[int, ...]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[list[Tensor], tuple[Tensor, list[Tensor]]]:
        """Residual-stream outputs of chosen layers, all at stride 16.

        Args:
            x: Images (B, C, H, W).
            indices: Layers to tap; None gives the quarter points (the segmentation recipe's taps, e.g. 5/11/17/23
                for 24 layers), an int n the last n layers, a sequence those layers.
            norm: Apply the final norm ``ln1`` to every tapped map.
            stop_early: Stop after the last tapped layer (the returned final features are then not meaningful).
            output_fmt: ``"NCHW"`` maps or ``"NLC"`` tokens.
            intermediates_only: Return only the tapped maps.

        Returns:
            The tapped maps, or (final normalised tokens, tapped maps).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, _ = resolve_indices(len(self.layers), indices, default=_quarter_points(len(self.layers)))
        x, (height, width) = self._embed(x)
        paths = scan_paths((height, width), x.device)
        layers = self.layers[:take_indices[-1] + 1] if stop_early or intermediates_only else self.layers
        intermediates = []
        for i, layer in enumerate(layers):
            x = self._run_layer(layer, x, paths)
            if i in take_indices:
                tap = self.ln1(x) if norm else x
                if output_fmt == "NCHW":
                    tap = tap.transpose(1, 2).reshape(x.shape[0], -1, height, width)
                intermediates.append(tap)
        if intermediates_only:
            return intermediates
        return self.ln1(x), intermediates

    def prune_intermediate_layers(
            self,
            indices: Optional[Union[int, list[int], tuple[int, ...]]] = None,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> list[int]:
        """Drop the layers after the last tapped one (and optionally ``ln1`` and the head); returns the taps."""
        take_indices, _ = resolve_indices(len(self.layers), indices, default=_quarter_points(len(self.layers)))
        self.layers = self.layers[:take_indices[-1] + 1]
        if prune_norm:
            self.ln1 = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


def _check_global_pool(global_pool: str) -> None:
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: PlainMamba) -> dict[str, Tensor]:
    """Convert an official (mmcls) PlainMamba state dict and check it strictly against ``model``.

    Accepts a bare state dict or one wrapped under ``state_dict``; strips ``backbone.``, maps ``head.fc.*`` to
    ``head.*`` and resizes ``pos_embed`` bicubically when the model stores another token grid (a no-op for state
    dicts already in this format).

    Raises:
        CheckpointMismatchError: The keys or shapes do not match the model (a listing of every difference).
    """
    state_dict = state_dict.get("state_dict", state_dict)
    converted = {}
    for key, value in state_dict.items():
        key = re.sub(r"^head\.fc\.", "head.", key.removeprefix("backbone."))
        if key == "pos_embed" and value.shape != model.pos_embed.shape:
            side = _square_grid_side(value, model.embed_dim)
            if side is not None:  # otherwise the key check lists it as mis-shaped
                value = resample_pos_embed(value, (side, side), model.patch_grid)
        converted[key] = value
    check_state_dict(converted, model)
    return converted


def _square_grid_side(pos_embed: Tensor, width: int) -> Optional[int]:
    """Side of the square token grid of a (1, side², width) position embedding, None if it is not one."""
    if pos_embed.dim() != 3 or pos_embed.shape[-1] != width:
        return None
    side = math.isqrt(pos_embed.shape[1])
    return side if side * side == pos_embed.shape[1] else None


def _cfg(url: str = "", **kwargs) -> dict:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.stem.0",
        "classifier": "head",
        "paper_ids": "arXiv:2403.17695",
        "paper_name": "PlainMamba: Improving Non-Hierarchical Mamba in Visual Recognition",
        "origin_url": "https://github.com/ChenhongyiYang/PlainMamba",
        "license": "unknown",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "plainmamba_l1.in1k": _cfg(hf_hub_id="ChenhongyiYang/PlainMamba", hf_hub_filename="l1.pth"),
    "plainmamba_l2.in1k": _cfg(hf_hub_id="ChenhongyiYang/PlainMamba", hf_hub_filename="l2.pth"),
    "plainmamba_l3.in1k": _cfg(hf_hub_id="ChenhongyiYang/PlainMamba", hf_hub_filename="l3.pth"),
    "test_plainmamba": _cfg(input_size=(3, 160, 160), license="apache-2.0"),
})


def _create_plainmamba(variant: str, pretrained: bool = False, **kwargs) -> PlainMamba:
    out_indices = kwargs.pop("out_indices", _quarter_points(kwargs.get("depth", 24)))
    return build_model_with_checkpoint(
        PlainMamba,
        variant,
        pretrained,
        filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


@register_model
def plainmamba_l1(pretrained: bool = False, **kwargs) -> PlainMamba:
    """PlainMamba-L1: D 192, 24 layers, one stem conv, depthwise conv block after layer 0 (7.55M params)."""
    model_args = dict(embed_dim=192, depth=24, num_stem_convs=1, dwconv_layers=(0,))
    return _create_plainmamba("plainmamba_l1", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def plainmamba_l2(pretrained: bool = False, **kwargs) -> PlainMamba:
    """PlainMamba-L2: D 384, 24 layers, two stem convs (26.1M params)."""
    model_args = dict(embed_dim=384, depth=24, num_stem_convs=2)
    return _create_plainmamba("plainmamba_l2", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def plainmamba_l3(pretrained: bool = False, **kwargs) -> PlainMamba:
    """PlainMamba-L3: D 448, 36 layers, two stem convs (51.0M params)."""
    model_args = dict(embed_dim=448, depth=36, num_stem_convs=2)
    return _create_plainmamba("plainmamba_l3", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_plainmamba(pretrained: bool = False, **kwargs) -> PlainMamba:
    """Tiny PlainMamba for tests: D 32, 4 layers, narrow stem, depthwise conv block after layer 0."""
    model_args = dict(embed_dim=32, depth=4, d_state=8, stem_chs=16, num_stem_convs=1, dwconv_layers=(0,))
    return _create_plainmamba("test_plainmamba", pretrained=pretrained, **dict(model_args, **kwargs))

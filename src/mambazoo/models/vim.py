"""Vision Mamba (Vim).

Paper: "Vision Mamba: Efficient Visual Representation Learning with Bidirectional State Space Model",
https://arxiv.org/abs/2401.09417 (ICML 2024). Official code and weights: https://github.com/hustvl/Vim (Apache-2.0).

Described in ``docs/vim.md``: the released mid-cls-token "bimamba v2" models with their
exact state-dict layout, so the official checkpoints load unchanged. Differences from the official code: any input
size (``img_size`` at creation, ``dynamic_img_size`` at forward time) with a position-embedding resize that respects
the middle cls token, a reverse-direction scan instead of flipped copies, and the timm model contract.
"""
import argparse
import math
from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    DropPath, lecun_normal_, register_notrace_function, resample_abs_pos_embed, to_2tuple, trunc_normal_,
)
from timm.models import generate_default_cfgs, register_model

from ..checkpoint import build_model_with_checkpoint, check_state_dict
from ..checkpoint import load_checkpoint_file as _load_checkpoint_file
from ..layers.bidirectional_mamba import BidirectionalMamba
from ..layers.rms_norm import RMSNorm
from ..layers.intermediates import resolve_indices
from ..layers.tracing import at_least_fp32, check_image_batch

__all__ = ["VisionMamba", "checkpoint_filter_fn", "load_checkpoint_file", "resize_pos_embed"]

POS_EMBED_RESIZE_MODES = ("mid_cls", "upstream")
# Objects pickled inside the official training checkpoints (the ``args`` entry) that ``weights_only=True`` must allow.
CHECKPOINT_SAFE_GLOBALS = (argparse.Namespace,)


def resize_pos_embed(
        pos_embed: Tensor,
        old_grid: Tuple[int, int],
        new_grid: Tuple[int, int],
        mode: str = "mid_cls",
        interpolation: str = "bicubic",
        antialias: bool = True,
) -> Tensor:
    """Resize a Vim position embedding, (1, M + 1, D) with the cls slot at M // 2, to a new patch grid.

    Args:
        pos_embed: Embedding for ``old_grid``.
        old_grid: Patch grid (rows, cols) it was trained for.
        new_grid: Target patch grid.
        mode: ``"mid_cls"`` moves the cls embedding from index M // 2 to M' // 2 and resamples the patch grid;
            ``"upstream"`` reproduces the official fine-tuning resize, which keeps index 0 as if it were the cls
            slot and resamples the remaining M tokens (cls embedding included) as the grid (bicubic, no antialias).
        interpolation: Interpolation mode of the ``mid_cls`` resize.
        antialias: Antialias when downsampling in the ``mid_cls`` resize.

    Returns:
        The embedding for ``new_grid``, (1, M' + 1, D).
    """
    if mode not in POS_EMBED_RESIZE_MODES:
        raise ValueError(f"mode must be one of {POS_EMBED_RESIZE_MODES}, got {mode!r}")
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    num_old = old_grid[0] * old_grid[1]
    if pos_embed.dim() != 3 or pos_embed.shape[1] != num_old + 1:
        raise ValueError(f"pos_embed must be (1, {num_old + 1}, dim) for grid {old_grid}, got {tuple(pos_embed.shape)}")
    if mode == "upstream":
        grid = resample_abs_pos_embed(pos_embed, list(new_grid), list(old_grid), num_prefix_tokens=1,
                                      interpolation="bicubic", antialias=False, align_corners=False)
        return grid
    cls_index = num_old // 2
    cls_embed = pos_embed[:, cls_index:cls_index + 1]
    patches = torch.cat([pos_embed[:, :cls_index], pos_embed[:, cls_index + 1:]], dim=1)
    patches = resample_abs_pos_embed(patches, list(new_grid), list(old_grid), num_prefix_tokens=0,
                                     interpolation=interpolation, antialias=antialias)
    new_index = new_grid[0] * new_grid[1] // 2
    return torch.cat([patches[:, :new_index], cls_embed, patches[:, new_index:]], dim=1)


def _insert_cls_token(tokens: Tensor, cls_token: Tensor) -> Tensor:
    middle = tokens.shape[1] // 2
    return torch.cat([tokens[:, :middle], cls_token.expand(tokens.shape[0], -1, -1), tokens[:, middle:]], dim=1)


def _split_cls_token(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Split (B, M + 1, D) tokens into the patch tokens (B, M, D) and the middle cls token (B, 1, D)."""
    middle = (x.shape[1] - 1) // 2
    return torch.cat([x[:, :middle], x[:, middle + 1:]], dim=1), x[:, middle:middle + 1]


class PatchEmbed(nn.Module):
    """Image to patch tokens with a (possibly overlapping, stride < patch) convolution, no norm."""

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            stride: int = 16,
            in_chans: int = 3,
            embed_dim: int = 192,
            dynamic_img_size: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        self.patch_size = to_2tuple(patch_size)
        self.stride = to_2tuple(stride)
        self.dynamic_img_size = dynamic_img_size
        self.proj = nn.Conv2d(in_chans, embed_dim, self.patch_size, self.stride, device=device, dtype=dtype)
        self.set_input_size(img_size)

    def set_input_size(self, img_size: Union[int, Tuple[int, int]]) -> None:
        """Set the nominal input size (and with it ``grid_size`` and ``num_patches``)."""
        self.img_size = to_2tuple(img_size)
        self.grid_size = self.feat_size(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def feat_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        """Patch grid (rows, cols) for an image size."""
        if min(img_size) < min(self.patch_size):
            raise ValueError(f"img_size {tuple(img_size)} is smaller than the patch size {self.patch_size}")
        sizes = zip(img_size, self.patch_size, self.stride)
        return tuple((size - patch) // stride + 1 for size, patch, stride in sizes)

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) to the patch-embedding map (B, D, rows, cols)."""
        check_img_size(x, self.img_size, self.dynamic_img_size)
        return self.proj(x)


@register_notrace_function  # compares concrete sizes (see mambazoo.layers.tracing)
def check_img_size(x: Tensor, img_size: Tuple[int, int], dynamic_img_size: bool) -> None:
    if not dynamic_img_size and tuple(x.shape[-2:]) != tuple(img_size):
        raise ValueError(f"input size {tuple(x.shape[-2:])} does not match img_size {tuple(img_size)}; create the "
                         f"model with img_size={tuple(x.shape[-2:])} or dynamic_img_size=True")


@register_notrace_function  # resizes for the concrete patch grid (see mambazoo.layers.tracing)
def tokens_with_cls_and_pos(patch_map: Tensor, cls_token: Tensor, pos_embed: Tensor,
                             pos_grid: Tuple[int, int]) -> Tensor:
    """(B, D, rows, cols) patch map to (B, M + 1, D) tokens with the middle cls token and position embeddings.

    ``pos_embed`` is for ``pos_grid``; it is resized (:func:`resize_pos_embed`) when the map has another grid.
    """
    grid = tuple(patch_map.shape[-2:])
    if grid != tuple(pos_grid):
        pos_embed = resize_pos_embed(pos_embed, pos_grid, grid)
    return _insert_cls_token(patch_map.flatten(2).transpose(1, 2), cls_token) + pos_embed


class VimBlock(nn.Module):
    """Pre-norm residual block with Mamba's deferred add: the residual add happens at the start of the next block."""

    def __init__(
            self,
            dim: int,
            num_layers: int,
            drop_path: float = 0.0,
            norm_eps: float = 1e-5,
            residual_in_fp32: bool = True,
            mixer_kwargs: Optional[Dict[str, Any]] = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.residual_in_fp32 = residual_in_fp32
        self.mixer = BidirectionalMamba(dim, num_layers=num_layers, **(mixer_kwargs or {}), **dd)
        self.norm = RMSNorm(dim, eps=norm_eps, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def add_residual(self, hidden: Tensor, residual: Optional[Tensor]) -> Tensor:
        """The residual stream entering this block: the previous mixer output added (with stochastic depth)."""
        residual = hidden if residual is None else residual + self.drop_path(hidden)
        return at_least_fp32(residual) if self.residual_in_fp32 else residual

    def forward(self, residual: Tensor) -> Tensor:
        """The mixer output for the residual stream from :meth:`add_residual`."""
        return self.mixer(self.norm(residual.to(self.norm.weight.dtype)))


class VisionMamba(nn.Module):
    """Vision Mamba: a plain stack of bidirectional Mamba blocks over patch tokens with a middle cls token.

    Args:
        img_size: Input size the position embedding is built for.
        patch_size: Patch conv kernel size.
        stride: Patch conv stride (8 for the "+" models: overlapping patches).
        in_chans: Input channels.
        num_classes: Classifier classes (0: no classifier).
        global_pool: ``"token"`` (the middle cls token, as upstream), ``"avg"`` (mean of the patch tokens) or ``""``.
        embed_dim: Model width D.
        depth: Number of blocks.
        d_state: SSM state size.
        expand: Mixer inner width factor.
        d_conv: Depthwise conv kernel size.
        norm_eps: RMSNorm epsilon.
        residual_in_fp32: Keep the residual stream in float32.
        drop_rate: Head dropout.
        pos_drop_rate: Dropout after the position embedding.
        drop_path_rate: Stochastic depth (upstream schedule, including its one-block shift).
        dynamic_img_size: Accept any input size, resizing the position embedding on the fly.
        scan_backend: Selective-scan backend (``"auto"``: the fastest available).
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            stride: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "token",
            embed_dim: int = 192,
            depth: int = 24,
            d_state: int = 16,
            expand: int = 2,
            d_conv: int = 4,
            norm_eps: float = 1e-5,
            residual_in_fp32: bool = True,
            drop_rate: float = 0.0,
            pos_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            dynamic_img_size: bool = False,
            scan_backend: str = "auto",
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        if global_pool not in ("token", "avg", ""):
            raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
        dd = {"device": device, "dtype": dtype}
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1  # one cls token, stored in the middle of the sequence (not as a prefix)
        self.output_fmt = "NLC"
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size, patch_size, stride, in_chans, embed_dim, dynamic_img_size, **dd)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim, **dd))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        # upstream's schedule linspace(0, rate, depth), shifted by one: block i drops block i-1's mixer output
        rates = [0.0] + [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        mixer_kwargs = dict(d_state=d_state, expand=expand, d_conv=d_conv, scan_backend=scan_backend)
        self.layers = nn.ModuleList([
            VimBlock(embed_dim, depth, rates[i], norm_eps, residual_in_fp32, mixer_kwargs, **dd) for i in range(depth)
        ])
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()
        self.norm_f = RMSNorm(embed_dim, eps=norm_eps, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

        reduction = self.patch_embed.stride[0]
        self.feature_info = [dict(num_chs=embed_dim, reduction=reduction, module=f"layers.{i}") for i in range(depth)]
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The official initialisation: lecun-normal patch conv, truncated-normal embeddings and head.

        The mixers initialise themselves (see :class:`~mambazoo.layers.bidirectional_mamba.BidirectionalMamba`).
        """
        if self.pos_embed.device.type == "meta":
            return
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Parameter names excluded from weight decay (as upstream; its A_log/D carry no such exclusion)."""
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay."""
        return dict(
            stem=r"^cls_token|^pos_embed|^patch_embed",
            blocks=[(r"^layers\.(\d+)", None), (r"^norm_f", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head (``num_classes=0``: identity) and optionally the pooling."""
        if global_pool is not None:
            if global_pool not in ("token", "avg", ""):
                raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        dd = {"device": self.cls_token.device, "dtype": self.cls_token.dtype}
        self.head = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

    def set_input_size(self, img_size: Union[int, Tuple[int, int]], pos_embed_resize: str = "mid_cls") -> None:
        """Change the nominal input size, resizing the position embedding (see :func:`resize_pos_embed`)."""
        old_grid = self.patch_embed.grid_size
        self.patch_embed.set_input_size(img_size)
        if self.patch_embed.grid_size != old_grid:
            with torch.no_grad():
                resized = resize_pos_embed(self.pos_embed, old_grid, self.patch_embed.grid_size, pos_embed_resize)
            self.pos_embed = nn.Parameter(resized)

    def _embed(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        patch_map = self.patch_embed(check_image_batch(x, self.patch_embed.proj.in_channels))
        tokens = tokens_with_cls_and_pos(patch_map, self.cls_token, self.pos_embed, self.patch_embed.grid_size)
        return self.pos_drop(tokens), patch_map.shape[-2:]

    def _run_block(self, block: VimBlock, residual: Tensor) -> Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(block, residual, use_reentrant=False)
        return block(residual)

    def _final_norm(self, hidden: Tensor, residual: Optional[Tensor]) -> Tensor:
        residual = hidden if residual is None else residual + self.drop_path(hidden)
        return self.norm_f(residual.to(self.cls_token.dtype))

    def forward_features(self, x: Tensor) -> Tensor:
        """Normalised tokens (B, M + 1, D), the cls token at index M // 2."""
        hidden, _ = self._embed(x)
        residual = None
        for block in self.layers:
            residual = block.add_residual(hidden, residual)
            del hidden  # free the previous mixer output before the block runs (peak memory at high resolution)
            hidden = self._run_block(block, residual)
        return self._final_norm(hidden, residual)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool the tokens of :meth:`forward_features` and classify."""
        if self.global_pool == "token":
            x = _split_cls_token(x)[1][:, 0]
        elif self.global_pool == "avg":
            x = _split_cls_token(x)[0].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
            mixer_output: bool = False,
    ) -> Union[List[Any], Tuple[Tensor, List[Any]]]:
        """Per-block features with the middle cls token removed, usable as dense features.

        Args:
            x: Images.
            indices: Blocks to return: None (all), an int n (the last n) or a sequence of indices.
            return_prefix_tokens: Return (patch features, cls token (B, 1, D)) pairs.
            norm: Apply the final norm to the intermediates.
            stop_early: Stop after the last requested block.
            output_fmt: ``"NCHW"`` (B, D, rows, cols at the patch stride) or ``"NLC"`` (B, M, D).
            intermediates_only: Return only the intermediates.
            mixer_output: Return the blocks' mixer outputs (the official segmentation taps) instead of the residual
                stream after each block.

        Returns:
            The intermediates, or (final features as :meth:`forward_features`, intermediates).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = resolve_indices(len(self.layers), indices)
        hidden, grid = self._embed(x)
        residual = None
        blocks = self.layers[:max_index + 1] if stop_early else self.layers
        intermediates = []
        for i, block in enumerate(blocks):
            residual = block.add_residual(hidden, residual)
            del hidden  # free the previous mixer output before the block runs (peak memory at high resolution)
            hidden = self._run_block(block, residual)
            if i in take_indices:
                feature = hidden if mixer_output else residual + hidden
                intermediates.append(self.norm_f(feature.to(self.cls_token.dtype)) if norm else feature)
        outputs = []
        for feature in intermediates:
            patches, cls_token = _split_cls_token(feature)
            if output_fmt == "NCHW":
                patches = patches.reshape(patches.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous()
            outputs.append((patches, cls_token) if return_prefix_tokens else patches)
        if intermediates_only:
            return outputs
        return self._final_norm(hidden, residual), outputs

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks after the last requested index (and optionally the final norm and head)."""
        take_indices, max_index = resolve_indices(len(self.layers), indices)
        self.layers = self.layers[:max_index + 1]
        if prune_norm:
            self.norm_f = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


def checkpoint_filter_fn(
        state_dict: Dict[str, Any],
        model: VisionMamba,
        checkpoint_key: str = "model",
        pos_embed_resize: str = "mid_cls",
) -> Dict[str, Tensor]:
    """Adapt an official Vim checkpoint (or a plain state dict) to ``model`` and validate it strictly.

    Args:
        state_dict: A state dict, or an official training checkpoint ``{'model', 'model_ema', 'args', ...}``.
        model: The target model.
        checkpoint_key: Entry of a training checkpoint to load: ``"model"`` or ``"model_ema"``.
        pos_embed_resize: How to resize ``pos_embed`` for another patch grid (see :func:`resize_pos_embed`).

    Returns:
        A state dict with the model's keys and shapes (the head is left for timm to adapt).

    Raises:
        ValueError: The checkpoint lacks ``checkpoint_key``.
        CheckpointMismatchError: Its keys or shapes do not match the model (a listing of every difference).
    """
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        if checkpoint_key not in state_dict or not isinstance(state_dict[checkpoint_key], dict):
            raise ValueError(f"checkpoint_key {checkpoint_key!r} not in the checkpoint (entries: {sorted(state_dict)})")
        state_dict = state_dict[checkpoint_key]
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    pos_embed = state_dict.get("pos_embed")
    if pos_embed is not None and pos_embed.shape != model.pos_embed.shape:
        side = _square_grid_side(pos_embed, model.pos_embed.shape[-1])
        if side is not None:  # otherwise the key check below lists it as mis-shaped
            state_dict["pos_embed"] = resize_pos_embed(
                pos_embed, (side, side), model.patch_embed.grid_size, pos_embed_resize)
    check_state_dict(state_dict, model)
    return state_dict


def _square_grid_side(pos_embed: Tensor, width: int) -> Optional[int]:
    """Side of the square patch grid of a (1, side² + 1, width) Vim position embedding, None if it is not one."""
    if pos_embed.dim() != 3 or pos_embed.shape[-1] != width:
        return None
    side = math.isqrt(pos_embed.shape[1] - 1)
    return side if side * side == pos_embed.shape[1] - 1 else None


def load_checkpoint_file(path: str) -> Dict[str, Any]:
    """Load a safetensors file or a ``torch.save`` checkpoint with ``weights_only=True`` (official files included).

    See :func:`mambazoo.checkpoint.load_checkpoint_file`; errors name the file and the problem.
    """
    return _load_checkpoint_file(path, CHECKPOINT_SAFE_GLOBALS)


def _cfg(url: str = "", **kwargs) -> Dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2401.09417",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "vim_tiny_patch16_224.in1k": _cfg(
        hf_hub_id="hustvl/Vim-tiny-midclstok", hf_hub_filename="vim_t_midclstok_76p1acc.pth"),
    "vim_tiny_patch16_stride8_224.in1k": _cfg(
        hf_hub_id="hustvl/Vim-tiny-midclstok", hf_hub_filename="vim_t_midclstok_ft_78p3acc.pth"),
    "vim_small_patch16_224.in1k": _cfg(
        hf_hub_id="hustvl/Vim-small-midclstok", hf_hub_filename="vim_s_midclstok_80p5acc.pth"),
    "vim_small_patch16_stride8_224.in1k": _cfg(
        hf_hub_id="hustvl/Vim-small-midclstok", hf_hub_filename="vim_s_midclstok_ft_81p6acc.pth"),
    # File name on the hub not verified (docs/vim.md).
    "vim_base_patch16_224.in1k": _cfg(
        hf_hub_id="hustvl/Vim-base-midclstok", hf_hub_filename="vim_b_midclstok_81p9acc.pth"),
    "test_vim.untrained": _cfg(input_size=(3, 64, 64), crop_pct=1.0, license=None),
})


def _create_vim(
        variant: str,
        pretrained: bool = False,
        checkpoint_key: str = "model",
        pos_embed_resize: str = "mid_cls",
        **kwargs,
) -> VisionMamba:
    """Build a Vim model; official training checkpoints load with ``weights_only=True`` from the hub or a file.

    ``checkpoint_key`` picks ``"model"`` or ``"model_ema"`` from a training checkpoint; ``pos_embed_resize`` picks
    the position-embedding resize when ``img_size`` differs from the checkpoint's (see :func:`resize_pos_embed`).
    """
    if pos_embed_resize not in POS_EMBED_RESIZE_MODES:
        raise ValueError(f"pos_embed_resize must be one of {POS_EMBED_RESIZE_MODES}, got {pos_embed_resize!r}")
    filter_fn = partial(checkpoint_filter_fn, checkpoint_key=checkpoint_key, pos_embed_resize=pos_embed_resize)
    return build_model_with_checkpoint(
        VisionMamba, variant, pretrained,
        filter_fn=filter_fn,
        safe_globals=CHECKPOINT_SAFE_GLOBALS,
        feature_cfg=dict(out_indices=3, feature_cls="getter"),
        **kwargs,
    )


def _vim(variant: str, pretrained: bool, model_args: Dict[str, Any], kwargs: Dict[str, Any]) -> VisionMamba:
    return _create_vim(variant, pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vim_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-Ti (7.1M params, 76.1% ImageNet top-1)."""
    return _vim("vim_tiny_patch16_224", pretrained, dict(embed_dim=192, depth=24), kwargs)


@register_model
def vim_tiny_patch16_stride8_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-Ti+ (stride-8 patches, 7.3M params, 78.3% top-1)."""
    return _vim("vim_tiny_patch16_stride8_224", pretrained, dict(stride=8, embed_dim=192, depth=24), kwargs)


@register_model
def vim_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-S (25.8M params, 80.5% top-1)."""
    return _vim("vim_small_patch16_224", pretrained, dict(embed_dim=384, depth=24), kwargs)


@register_model
def vim_small_patch16_stride8_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-S+ (stride-8 patches, 26.0M params, 81.6% top-1)."""
    return _vim("vim_small_patch16_stride8_224", pretrained, dict(stride=8, embed_dim=384, depth=24), kwargs)


@register_model
def vim_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-B (97.6M params, 81.9% top-1)."""
    return _vim("vim_base_patch16_224", pretrained, dict(embed_dim=768, depth=24), kwargs)


@register_model
def test_vim(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Tiny Vim for tests: width 32, 4 blocks, d_state 8, 64 px."""
    return _vim("test_vim", pretrained, dict(img_size=64, embed_dim=32, depth=4, d_state=8), kwargs)

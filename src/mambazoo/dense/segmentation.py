"""Semantic segmentation: UperNet (PPM + FPN fusion) with the auxiliary FCN head, and sliding-window inference.

The heads follow the layout of mmsegmentation's ``UPerHead`` and ``FCNHead`` as used by every paper's ADE20K recipe
(UperNet: Xiao et al., "Unified Perceptual Parsing for Scene Understanding", https://arxiv.org/abs/1807.10221), in
plain PyTorch: conv + BatchNorm + ReLU blocks, bilinear resizing (``align_corners=False``), dropout 0.1 before the
1×1 classifier, cross-entropy with an ignore index, auxiliary loss weight 0.4. For multi-GPU training convert the
BatchNorms with ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` (the papers use SyncBN).
"""
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import DenseBackbone, create_backbone

__all__ = ["ConvBNReLU", "FCNHead", "PyramidPoolingModule", "UperNet", "UperNetHead", "slide_inference"]

IGNORE_INDEX = 255


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvBNReLU(nn.Sequential):
    """Conv (no bias) → BatchNorm → ReLU, mmseg's ``ConvModule`` default."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, device=None, dtype=None) -> None:
        dd = {"device": device, "dtype": dtype}
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False, **dd),
            nn.BatchNorm2d(out_channels, **dd),
            nn.ReLU(inplace=True),
        )


class PyramidPoolingModule(nn.ModuleList):
    """PSPNet's pyramid pooling: average-pool to each scale, 1×1 conv, upsample back; returns the list of maps."""

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int, device=None, dtype=None) -> None:
        super().__init__([
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvBNReLU(in_channels, channels, 1, device, dtype))
            for scale in pool_scales
        ])

    def forward(self, x: Tensor) -> list[Tensor]:
        return [_resize(branch(x), x.shape[-2:]) for branch in self]


class UperNetHead(nn.Module):
    """UperNet decode head: PPM on the coarsest map, FPN top-down fusion, concatenation, 3×3 fusion conv.

    Args:
        in_channels: Channels of the four input maps (finest first).
        num_classes: Output classes.
        channels: Width of the head.
        pool_scales: PPM output sizes.
        dropout: Dropout before the classifier.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.ppm = PyramidPoolingModule(pool_scales, in_channels[-1], channels, **dd)
        self.bottleneck = ConvBNReLU(in_channels[-1] + len(pool_scales) * channels, channels, 3, **dd)
        self.lateral_convs = nn.ModuleList([ConvBNReLU(width, channels, 1, **dd) for width in in_channels[:-1]])
        self.fpn_convs = nn.ModuleList([ConvBNReLU(channels, channels, 3, **dd) for _ in in_channels[:-1]])
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3, **dd)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1, **dd)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """Logits at the resolution of the finest map."""
        coarsest = features[-1]
        laterals = [conv(feature) for conv, feature in zip(self.lateral_convs, features)]
        laterals.append(self.bottleneck(torch.cat([coarsest, *self.ppm(coarsest)], dim=1)))
        for level in range(len(laterals) - 1, 0, -1):
            laterals[level - 1] = laterals[level - 1] + _resize(laterals[level], laterals[level - 1].shape[-2:])
        outputs = [conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outputs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([outputs[0]] + [_resize(out, size) for out in outputs[1:]], dim=1))
        return self.conv_seg(self.dropout(fused))


class FCNHead(nn.Sequential):
    """Auxiliary FCN head on one map: 3×3 conv block, dropout, 1×1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, dropout: float = 0.1,
                 device=None, dtype=None) -> None:
        super().__init__(
            ConvBNReLU(in_channels, channels, 3, device, dtype),
            nn.Dropout2d(dropout),
            nn.Conv2d(channels, num_classes, 1, device=device, dtype=dtype),
        )


class UperNet(nn.Module):
    """Backbone + UperNet head (+ auxiliary FCN head while training); images in [0, 1], any size.

    Inputs are normalised with the backbone's mean/std and zero-padded (bottom/right) to a multiple of 32; logits
    come back cropped to the input size.

    Args:
        backbone: A registered model name or a :class:`DenseBackbone`.
        num_classes: Classes (label values 0..num_classes-1; ``ignore_index`` is ignored).
        channels: UperNet head width (512 in most papers); None: the backbone's finest width (Vim's embedding width).
        aux_channels: Auxiliary head width (256); 0 disables the auxiliary head.
        aux_index: Level the auxiliary head reads (2 in most recipes; PlainMamba 3).
        aux_weight: Auxiliary loss weight (0.4).
        pool_scales: PPM scales.
        dropout: Dropout before both classifiers.
        ignore_index: Label value excluded from the loss and the metrics.
        pretrained: Load the backbone's ImageNet weights (a name only).
        model_kwargs: Creation arguments of the backbone model (a name only).
    """

    def __init__(
            self,
            backbone: Union[str, DenseBackbone],
            num_classes: int,
            channels: Optional[int] = 512,
            aux_channels: int = 256,
            aux_index: int = 2,
            aux_weight: float = 0.4,
            pool_scales: Sequence[int] = (1, 2, 3, 6),
            dropout: float = 0.1,
            ignore_index: int = IGNORE_INDEX,
            pretrained: bool = False,
            model_kwargs: Optional[dict[str, Any]] = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not 0 <= aux_index < 4:
            raise ValueError(f"aux_index must be a level 0..3, got {aux_index}")
        dd = {"device": device, "dtype": dtype}
        if isinstance(backbone, str):
            backbone = create_backbone(backbone, pretrained=pretrained, **{**dd, **(model_kwargs or {})})
        elif pretrained or model_kwargs:
            raise ValueError("pretrained and model_kwargs apply to a model name, not to a built DenseBackbone")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.aux_index = aux_index
        self.aux_weight = aux_weight
        self.backbone = backbone
        channels = backbone.out_channels[0] if channels is None else channels
        self.decode_head = UperNetHead(backbone.out_channels, num_classes, channels, pool_scales, dropout, **dd)
        self.auxiliary_head = FCNHead(backbone.out_channels[aux_index], num_classes, aux_channels, dropout, **dd) \
            if aux_channels else None
        self.register_buffer("mean", torch.tensor(backbone.mean, **dd).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(backbone.std, **dd).view(1, -1, 1, 1), persistent=False)

    def _features(self, images: Tensor) -> list[Tensor]:
        if images.dim() != 4 or images.shape[1] != self.mean.shape[1]:
            raise ValueError(f"images must be (B, {self.mean.shape[1]}, H, W), got {tuple(images.shape)}")
        x = (images - self.mean) / self.std
        height, width = x.shape[-2:]
        x = F.pad(x, (0, -width % 32, 0, -height % 32))
        return list(self.backbone(x).values())

    @staticmethod
    def _to_input_size(logits: Tensor, features: list[Tensor], size: Sequence[int]) -> Tensor:
        padded = [side * 4 for side in features[0].shape[-2:]]
        return _resize(logits, padded)[..., :size[0], :size[1]]

    def forward(self, images: Tensor, targets: Optional[Tensor] = None) -> Union[Tensor, dict[str, Tensor]]:
        """Decode-head logits (B, num_classes, H, W) at the input size; with ``targets``, the losses of
        :meth:`losses` (so that wrappers such as DistributedDataParallel see the training computation)."""
        if targets is not None:
            return self.losses(images, targets)
        features = self._features(images)
        return self._to_input_size(self.decode_head(features), features, images.shape[-2:])

    def losses(self, images: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """Cross-entropy of the decode head and (weighted) of the auxiliary head; ``loss`` is their sum.

        Args:
            images: (B, 3, H, W) in [0, 1].
            targets: (B, H, W) integer labels (``ignore_index`` ignored).
        """
        if targets.shape[-2:] != images.shape[-2:] or targets.dim() != 3:
            raise ValueError(f"targets must be (B, H, W) matching images {tuple(images.shape)}, "
                             f"got {tuple(targets.shape)}")
        features = self._features(images)
        size = images.shape[-2:]
        targets = targets.long()
        losses = dict(loss_decode=F.cross_entropy(self._to_input_size(self.decode_head(features), features, size),
                                                  targets, ignore_index=self.ignore_index))
        if self.auxiliary_head is not None:
            aux = self._to_input_size(self.auxiliary_head(features[self.aux_index]), features, size)
            losses["loss_aux"] = self.aux_weight * F.cross_entropy(aux, targets, ignore_index=self.ignore_index)
        losses["loss"] = sum(losses.values())
        return losses

    @torch.no_grad()
    def predict(self, images: Tensor, mode: str = "whole", crop_size: Optional[Sequence[int]] = None,
                stride: Optional[Sequence[int]] = None) -> Tensor:
        """Logits at the input size: ``"whole"`` image at once, or ``"slide"`` (see :func:`slide_inference`)."""
        if mode == "whole":
            return self(images)
        if mode == "slide":
            if crop_size is None or stride is None:
                raise ValueError("slide mode needs crop_size and stride")
            return slide_inference(self, images, crop_size, stride)
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")


def _pair(value: Union[int, Sequence[int]], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or (height, width), got {value!r}")
    return pair


def slide_inference(predict: Callable[[Tensor], Tensor], images: Tensor, crop_size: Union[int, Sequence[int]],
                    stride: Union[int, Sequence[int]]) -> Tensor:
    """Average the logits of overlapping crops (mmseg's ``slide`` test mode).

    Windows start every ``stride`` pixels; the last window of a row or column is shifted back to end at the image
    border, and windows are clipped to the image when it is smaller than ``crop_size``. Every pixel's logits are
    the mean over the windows covering it. A crop at least as large as the image gives exactly ``predict(images)``.

    Args:
        predict: Images (B, C, h, w) to logits (B, K, h, w).
        images: (B, C, H, W).
        crop_size: Window (height, width).
        stride: Step (height, width); at most ``crop_size`` so that every pixel is covered.
    """
    (crop_h, crop_w), (stride_h, stride_w) = _pair(crop_size, "crop_size"), _pair(stride, "stride")
    if stride_h > crop_h or stride_w > crop_w:
        raise ValueError(f"stride {(stride_h, stride_w)} must not exceed crop_size {(crop_h, crop_w)}")
    height, width = images.shape[-2:]
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    total, count = None, images.new_zeros((1, 1, height, width))
    for row in range(rows):
        for col in range(cols):
            y2, x2 = min(row * stride_h + crop_h, height), min(col * stride_w + crop_w, width)
            y1, x1 = max(y2 - crop_h, 0), max(x2 - crop_w, 0)
            logits = predict(images[..., y1:y2, x1:x2])
            if total is None:
                total = logits.new_zeros(logits.shape[:2] + (height, width))
            total[..., y1:y2, x1:x2] += logits
            count[..., y1:y2, x1:x2] += 1
    return total / count

"""Detection and instance segmentation: torchvision's Mask R-CNN with FPN on a :class:`DenseBackbone`.

Images go in as float tensors in [0, 1] of any size; torchvision's ``GeneralizedRCNNTransform`` normalises them
with the backbone's mean/std, resizes them (shorter side ``min_size``, longer side at most ``max_size``; a tuple
``min_size`` picks a random scale per training batch) and pads the batch to a multiple of 32. Boxes and masks are
mapped back to each input's original size. Larger images are therefore resized to the training scale, not tiled.
"""
from collections import OrderedDict
from typing import Any, Optional, Union

from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .backbone import DenseBackbone, create_backbone

__all__ = ["DetectionBackbone", "build_mask_rcnn"]

ROI_SIZE = 7


class DetectionBackbone(nn.Module):
    """A :class:`DenseBackbone` followed by torchvision's FPN (plus the max-pooled P6 level for the RPN).

    Args:
        body: The multi-scale backbone.
        out_channels: FPN width.

    Attributes:
        out_channels: FPN width (what torchvision's detectors read).
    """

    def __init__(self, body: DenseBackbone, out_channels: int = 256) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(list(body.out_channels), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        """Maps ``"0"``-``"3"`` (strides 4-32) and ``"pool"`` (stride 64), all ``out_channels`` wide."""
        return self.fpn(self.body(x))


def build_mask_rcnn(
        backbone: Union[str, DenseBackbone],
        num_classes: int,
        min_size: Union[int, tuple[int, ...]] = 800,
        max_size: int = 1333,
        fpn_channels: int = 256,
        box_representation: int = 1024,
        mask_head_channels: int = 256,
        pretrained: bool = False,
        model_kwargs: Optional[dict[str, Any]] = None,
        **rcnn_kwargs: Any,
) -> MaskRCNN:
    """Mask R-CNN + FPN (torchvision) on any registered family.

    torchvision's heads take no ``device`` argument: build on the meta device with ``with torch.device("meta"):``.

    Args:
        backbone: A registered model name or a :class:`DenseBackbone`.
        num_classes: Object classes, background excluded (labels 1..num_classes; 0 is background).
        min_size: Shorter image side after resizing (a tuple: random choice per training batch).
        max_size: Longer image side limit after resizing.
        fpn_channels: FPN width (256 in the papers).
        box_representation: Width of the two-layer box head (1024 in the papers).
        mask_head_channels: Width of the four-conv mask head (256 in the papers).
        pretrained: Load the backbone's ImageNet weights (a name only).
        model_kwargs: Creation arguments of the backbone model (a name only), e.g. ``drop_path_rate``.
        rcnn_kwargs: Further :class:`~torchvision.models.detection.MaskRCNN` arguments (RPN/RoI sampling, NMS, ...).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int (background excluded), got {num_classes!r}")
    if isinstance(backbone, str):
        backbone = create_backbone(backbone, pretrained=pretrained, **(model_kwargs or {}))
    elif pretrained or model_kwargs:
        raise ValueError("pretrained and model_kwargs apply to a model name, not to a built DenseBackbone")
    body = DetectionBackbone(backbone, fpn_channels)
    return MaskRCNN(
        body,
        num_classes=None,
        min_size=min_size,
        max_size=max_size,
        image_mean=list(backbone.mean),
        image_std=list(backbone.std),
        box_head=TwoMLPHead(fpn_channels * ROI_SIZE ** 2, box_representation),
        box_predictor=FastRCNNPredictor(box_representation, num_classes + 1),
        mask_head=MaskRCNNHeads(fpn_channels, (mask_head_channels,) * 4, 1),
        mask_predictor=MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes + 1),
        **rcnn_kwargs,
    )

"""What FX tracing must not trace into, and the input check every model runs first.

``torch.fx`` symbolic tracing (timm's FX feature extraction, torchvision's ``create_feature_extractor``) replaces
tensors by proxies without shapes or dtypes, so code that branches on them cannot be traced. As in timm, such
functions are registered with ``timm.layers.register_notrace_function`` and appear in the traced graph as one call
each, run with real tensors (the tracer only wraps module-level functions with public names, so these have no
leading underscore): the scan, conv and pointwise ops (they check their arguments and pick a backend from the concrete
device, dtype and sizes) and the helpers the model files register next to their definitions (position-embedding
resizing, scan-path tables, padding). Trace with timm's tools, which pass that registry to the tracer::

    from timm.layers import create_feature_extractor
    extractor = create_feature_extractor(model, return_nodes=["layers.3"])
"""
from timm.layers import register_notrace_function
from torch import Tensor

from ..ops import bidirectional_scan, causal_conv1d, gated_sum, rms_norm, selective_scan
from ..ops.bidirectional_scan import at_least_fp32

__all__ = ["at_least_fp32", "check_image_batch"]

for _op in (selective_scan, bidirectional_scan, causal_conv1d, rms_norm, gated_sum, at_least_fp32):
    register_notrace_function(_op)


@register_notrace_function
def check_image_batch(x: Tensor, in_chans: int) -> Tensor:
    """Return ``x`` if it is a (B, in_chans, H, W) batch of images, else raise a ValueError saying what it got.

    timm's models take batched input only; an unbatched (C, H, W) image gets an error telling how to add the batch
    dimension instead of a shape error deep inside the network.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a (B, {in_chans}, H, W) image tensor, got {type(x).__name__}")
    if x.dim() == 3 and x.shape[0] == in_chans:
        raise ValueError(f"expected a batch of images shaped (B, {in_chans}, H, W), got one unbatched image of shape "
                         f"{tuple(x.shape)}; add the batch dimension with x.unsqueeze(0)")
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f"expected a batch of images shaped (B, {in_chans}, H, W), got a tensor of shape "
                         f"{tuple(x.shape)}")
    return x

"""MAC counting the way the SSM papers report it: conv and linear MACs plus 9·B·L·D·N per selective-scan call.

Built on :class:`torch.utils.flop_counter.FlopCounterMode`, which counts matmuls, convolutions and attention
(``scaled_dot_product_attention``) at 2 FLOPs per multiply-accumulate and ignores elementwise ops. While counting,
every selective scan is routed through the custom op ``mambazoo::selective_scan_fused`` (see
:func:`mambazoo.ops.selective_scan.route_through_custom_op`), which is mapped to 9·B·L·D·N MACs
(``docs/scan_operation.md``, the convention of state-spaces/mamba#110 that reproduces PlainMamba's published
3.0/8.1/14.4 G), whatever backend would have run it. The all-states scan (:func:`mambazoo.ops.state_scan`,
Spatial-Mamba) is routed the same way through ``mambazoo::state_scan_fused`` and charged 9·B·L·D·N with N = 1
(``docs/spatialmamba.md`` relates this to the paper's fvcore count). The native depthwise causal conv1d custom op is
mapped to B·L·D·K MACs, like the convolution it replaces. The counter divides FLOPs by 2 to report MACs; timm's
benchmark (fvcore) reports the same quantity as "GMACs".

Papers differ in what they count: besides the total, a count reports the MACs of the scans and of the attention
matmuls inside ``F.scaled_dot_product_attention`` (B·H·Lq·Lk·(E + Ev), the softmax not counted), so that conventions
which leave them out can be reproduced: MambaVision's published numbers (ptflops) count neither the scan nor the
attention matmuls (``docs/mambavision.md``).

By default the model is built and run on the ``meta`` device: shapes only, no memory, no arithmetic, so even large
resolutions count in a fraction of a second.
"""
import math
from dataclasses import dataclass
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from .ops.selective_scan import route_through_custom_op

__all__ = ["SCAN_MACS_PER_ELEMENT", "MacCount", "attention_macs", "count_macs", "count_model_macs", "scan_macs"]

SCAN_MACS_PER_ELEMENT = 9
_SCAN_OP = torch.ops.mambazoo.selective_scan_fused  # FlopCounterMode keys formulas by overload packet
_STATE_SCAN_OP = torch.ops.mambazoo.state_scan_fused


def scan_macs(batch: int, length: int, dim: int, d_state: int) -> int:
    """MACs charged for one selective-scan call: 9·B·L·D·N (``docs/scan_operation.md``)."""
    return SCAN_MACS_PER_ELEMENT * batch * length * dim * d_state


def attention_macs(query_shape: tuple[int, ...], key_shape: tuple[int, ...], value_shape: tuple[int, ...]) -> int:
    """MACs of one attention call softmax(Q·Kᵀ)·V: B·H·Lq·Lk·(E + Ev) (the softmax is not counted)."""
    *batch, query_length, width = query_shape
    return math.prod(batch) * query_length * key_shape[-2] * (width + value_shape[-1])


def _scan_flops(u_shape, delta_shape, A_shape, *args, **kwargs) -> int:
    batch, length, dim = u_shape
    return 2 * scan_macs(batch, length, dim, A_shape[1])


def _state_scan_flops(u_shape, *args, **kwargs) -> int:
    batch, length, dim = u_shape
    return 2 * scan_macs(batch, length, dim, 1)


def _causal_conv1d_flops(x_shape, weight_shape, *args, **kwargs) -> int:
    batch, length, dim = x_shape
    return 2 * batch * length * dim * weight_shape[1]  # one MAC per kernel tap and output element


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return 2 * attention_macs(query_shape, key_shape, value_shape)


# torch's counter has no formula for the CPU attention kernel (it would count 0); meta tensors take the math path.
_CUSTOM_FLOPS: dict = {
    _SCAN_OP: _scan_flops,
    _STATE_SCAN_OP: _state_scan_flops,
    torch.ops.mambazoo.causal_conv1d_native: _causal_conv1d_flops,
    torch.ops.mambazoo.causal_conv1d_triton: _causal_conv1d_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
}


class _AttentionTally(TorchFunctionMode):
    """Adds up :func:`attention_macs` of every ``F.scaled_dot_product_attention`` call (before any decomposition)."""

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            query, key, value = (args[i] if i < len(args) else kwargs[name]
                                 for i, name in enumerate(("query", "key", "value")))
            self.macs += attention_macs(query.shape, key.shape, value.shape)
        return func(*args, **kwargs)


@dataclass(frozen=True)
class MacCount:
    """Result of a count: total MACs, the share of each counted operator (e.g. ``mm``, ``convolution``) and the
    MACs of the attention matmuls (part of ``total``)."""

    total: int
    by_operator: dict[str, int]
    attention: int = 0

    @property
    def gmacs(self) -> float:
        """Total in units of 10^9 MACs, the "GMACs"/"FLOPs" unit of the papers."""
        return self.total / 1e9

    @property
    def scan(self) -> int:
        """MACs charged to selective-scan calls (all-states scans included)."""
        return sum(self.by_operator.get(str(op), 0) for op in (_SCAN_OP, _STATE_SCAN_OP))

    @property
    def excl_scan(self) -> int:
        """MACs without the selective scans."""
        return self.total - self.scan

    @property
    def excl_scan_attention(self) -> int:
        """MACs of the conv and linear layers only (no scans, no attention matmuls): MambaVision's convention."""
        return self.total - self.scan - self.attention


def count_macs(fn: Callable[[], object]) -> MacCount:
    """Count the MACs of ``fn()`` (conv/linear/attention matmuls plus 9·B·L·D·N per scan call)."""
    counter = FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS)
    attention = _AttentionTally()
    with route_through_custom_op(), counter, attention:
        fn()
    by_operator = {str(op): flops // 2 for op, flops in counter.get_flop_counts().get("Global", {}).items()}
    return MacCount(total=counter.get_total_flops() // 2, by_operator=by_operator, attention=attention.macs)


def count_model_macs(
        model: Union[str, nn.Module],
        img_size: Union[int, tuple[int, int]] = 224,
        batch_size: int = 1,
        in_chans: int = 3,
        device: Union[str, torch.device] = "meta",
        **model_kwargs,
) -> MacCount:
    """Count the inference MACs of a model on a ``batch_size`` × ``in_chans`` × H × W input.

    Args:
        model: A module (counted where its parameters are), or a model name, built with
            :func:`mambazoo.zoo.create_model_for_size` on ``device``. A model that cannot be built on the ``meta``
            device (its constructor reads tensor values) is built on the CPU and then moved to ``meta``.
        img_size: Input resolution, an int or (H, W).
        batch_size: Images per forward.
        in_chans: Input channels.
        device: Where a named model is built and run; ``"meta"`` needs no memory or arithmetic.
        **model_kwargs: Passed to :func:`mambazoo.zoo.create_model_for_size` when ``model`` is a name.
    """
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    if batch_size <= 0 or height <= 0 or width <= 0:
        raise ValueError(f"batch_size and img_size must be positive, got {batch_size} and {img_size}")
    shape = (batch_size, in_chans, height, width)
    if isinstance(model, nn.Module):
        return _count_module(model, shape)
    if not isinstance(model, str):
        raise TypeError(f"model must be a model name or an nn.Module, got {type(model).__name__}")
    from .zoo import create_model_for_size  # imports every model family: keep this module light to import

    if torch.device(device).type != "meta":
        with torch.device(device):
            return _count_module(create_model_for_size(model, img_size, in_chans=in_chans, **model_kwargs), shape)
    try:
        with torch.device("meta"):
            module = create_model_for_size(model, img_size, in_chans=in_chans, **model_kwargs)
    except (NotImplementedError, RuntimeError):  # the constructor reads tensor values: build on CPU, then drop data
        module = create_model_for_size(model, img_size, in_chans=in_chans, **model_kwargs).to("meta")
    return _count_module(module, shape)


def _count_module(model: nn.Module, input_shape: tuple[int, ...]) -> MacCount:
    parameter = next(model.parameters(), None)
    images = torch.ones(input_shape, device=parameter.device if parameter is not None else "cpu")
    model.eval()
    with torch.inference_mode():
        return count_macs(lambda: model(images))

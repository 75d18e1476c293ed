"""ONNX translations of mambazoo's custom ops, for ``torch.onnx.export(..., dynamo=True)``.

The exporter does not know ``mambazoo::*`` ops; :func:`register_onnx_translation` maps each to a function that builds
its ONNX subgraph with ONNX Script (``custom_translation_table``). Adding an op is one decorated function here::

    @register_onnx_translation("mambazoo::my_new_op")
    def my_new_op(x, weight, flag: bool = False):
        return op.Mul(x, weight)

A translation receives the op's arguments in schema order (tensors as graph values, absent optional tensors as None,
bool/str/int arguments as Python values) and returns its outputs. Imported only when exporting: it needs the
``onnxscript`` package.

* ``selective_scan_fused``: an ONNX ``Scan`` over the sequence axis carrying the (batch, dim, d_state) state, with
  Δ' = softplus(Δ + bias) (torch's threshold of 20), D and the SiLU(z) gate applied outside the loop, all in float32;
  ``reverse`` scans flipped inputs and flips the output back. The third output (chunk-boundary states, used only by
  the backward pass) is replaced by the final state with a chunk axis of 1.
* ``state_scan_fused`` (the all-states scan, N = 1): an ONNX ``Scan`` carrying the (batch, dim) state whose scan
  output is every state, in float32; ``reverse`` as above.
* ``causal_conv1d_native`` and ``causal_conv1d_triton``: a grouped ``Conv`` with K - 1 leading zeros of padding
  (flipped for ``reverse``) and SiLU.
"""
from typing import Callable

from onnxscript import FLOAT, graph, script
from onnxscript import opset18 as op

__all__ = ["ONNX_OPSET", "register_onnx_translation", "translations"]

ONNX_OPSET = 18  # the opset of the ONNX Script ops used here (and the exporter's own default)
_FLOAT32 = 1  # onnx.TensorProto.FLOAT
_SOFTPLUS_THRESHOLD = 20.0
_TRANSLATIONS: dict[str, Callable] = {}


def register_onnx_translation(qualified_name: str) -> Callable[[Callable], Callable]:
    """Register the decorated function as the ONNX translation of the custom op ``namespace::name``."""
    def register(function: Callable) -> Callable:
        _TRANSLATIONS[qualified_name] = function
        return function
    return register


def translations() -> dict[str, Callable]:
    """Custom op name -> ONNX translation, for every registered op."""
    return dict(_TRANSLATIONS)


@script()
def _scan_steps(h0: FLOAT, A: FLOAT, delta: FLOAT, du: FLOAT, B: FLOAT, C: FLOAT) -> tuple[FLOAT, FLOAT]:
    """h_t = exp(Δ'_t A) h_{t-1} + Δ'_t u_t B_t and y_t = C_t·h_t along axis 1: returns (h_last, y)."""
    @graph()
    def step(h: FLOAT[...], a: FLOAT[...], delta_t: FLOAT[...], du_t: FLOAT[...], b_t: FLOAT[...],
             c_t: FLOAT[...]):
        decay = op.Exp(op.Mul(op.Unsqueeze(delta_t, [-1]), a))
        h_next = op.Add(op.Mul(decay, h), op.Mul(op.Unsqueeze(du_t, [-1]), op.Unsqueeze(b_t, [1])))
        y_t = op.ReduceSum(op.Mul(h_next, op.Unsqueeze(c_t, [1])), [-1], keepdims=0)
        a_next = op.Identity(a)
        return h_next, a_next, y_t

    h_last, a_last, y = op.Scan(h0, A, delta, du, B, C, body=step, num_scan_inputs=4,
                                scan_input_axes=[1, 1, 1, 1], scan_output_axes=[1])
    return h_last, y


@script()
def _state_steps(h0: FLOAT, A: FLOAT, delta: FLOAT, dbu: FLOAT) -> FLOAT:
    """h_t = exp(Δ'_t A) h_{t-1} + Δ'_t B_t u_t along axis 1 with a (batch, dim) state: returns every h_t."""
    @graph()
    def step(h: FLOAT[...], a: FLOAT[...], delta_t: FLOAT[...], dbu_t: FLOAT[...]):
        h_next = op.Add(op.Mul(op.Exp(op.Mul(delta_t, a)), h), dbu_t)
        a_next = op.Identity(a)
        state_t = op.Identity(h_next)
        return h_next, a_next, state_t

    h_last, a_last, states = op.Scan(h0, A, delta, dbu, body=step, num_scan_inputs=2, scan_input_axes=[1, 1],
                                     scan_output_axes=[1])
    return states


def _flip(x, axis: int):
    """Reverse ``x`` along ``axis`` (a Slice with step -1 from the last element past the first)."""
    return op.Slice(x, op.Constant(value_ints=[-1]), op.Constant(value_ints=[-(2 ** 62)]),
                    op.Constant(value_ints=[axis]), op.Constant(value_ints=[-1]))


def _float32(x):
    return op.Cast(x, to=_FLOAT32)


def _silu(x):
    return op.Mul(x, op.Sigmoid(x))


@register_onnx_translation("mambazoo::selective_scan_fused")
def selective_scan_fused(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus: bool = True,
                         reverse: bool = False, kernel: str = "torch"):
    u32, A, B, C = (_float32(t) for t in (u, A, B, C))
    delta = _step_size(delta, delta_bias, delta_softplus)
    du = op.Mul(delta, u32)
    if reverse:
        delta, du, B, C = (_flip(t, 1) for t in (delta, du, B, C))
    state_shape = op.Concat(op.Shape(u, start=0, end=1), op.Shape(A), axis=0)
    h_last, y = _scan_steps(op.Expand(op.Constant(value_float=0.0), state_shape), A, delta, du, B, C)
    if reverse:
        y = _flip(y, 1)
    if D is not None:
        y = op.Add(y, op.Mul(u32, _float32(D)))
    if z is not None:
        y = op.Mul(y, _silu(_float32(z)))
    chunk_states = op.Unsqueeze(h_last, op.Constant(value_ints=[1]))
    return op.CastLike(y, u), h_last, chunk_states


def _step_size(delta, delta_bias, delta_softplus: bool):
    """Δ' = softplus(Δ + bias) in float32 (each part optional; torch's linear branch above 20)."""
    delta = _float32(delta)
    if delta_bias is not None:
        delta = op.Add(delta, _float32(delta_bias))
    if delta_softplus:
        delta = op.Where(op.Greater(delta, op.Constant(value_float=_SOFTPLUS_THRESHOLD)), delta, op.Softplus(delta))
    return delta


@register_onnx_translation("mambazoo::state_scan_fused")
def state_scan_fused(u, delta, A, B, delta_bias=None, delta_softplus: bool = True, reverse: bool = False,
                     kernel: str = "torch"):
    delta = _step_size(delta, delta_bias, delta_softplus)
    dbu = op.Mul(op.Mul(delta, _float32(B)), _float32(u))
    if reverse:
        delta, dbu = _flip(delta, 1), _flip(dbu, 1)
    A = op.Reshape(_float32(A), op.Constant(value_ints=[-1]))
    state_shape = op.Concat(op.Shape(u, start=0, end=1), op.Shape(A), axis=0)  # (batch, dim)
    states = _state_steps(op.Expand(op.Constant(value_float=0.0), state_shape), A, delta, dbu)
    return _flip(states, 1) if reverse else states


@register_onnx_translation("mambazoo::causal_conv1d_native")
@register_onnx_translation("mambazoo::causal_conv1d_triton")
def causal_conv1d(x, weight, bias=None, silu: bool = True, reverse: bool = False):
    channels, kernel_size = int(weight.shape[0]), int(weight.shape[1])
    y = op.Transpose(_float32(x), perm=[0, 2, 1])  # (batch, dim, length)
    if reverse:
        y = _flip(y, 2)
    weight = op.Unsqueeze(_float32(weight), op.Constant(value_ints=[1]))
    inputs = (y, weight) if bias is None else (y, weight, _float32(bias))
    y = op.Conv(*inputs, group=channels, kernel_shape=[kernel_size], pads=[kernel_size - 1, 0])
    if reverse:
        y = _flip(y, 2)
    if silu:
        y = _silu(y)
    return op.CastLike(op.Transpose(y, perm=[0, 2, 1]), x)

"""Export models to ONNX (``.onnx``) and to ``torch.export`` programs (``.pt2``).

ONNX goes through PyTorch's dynamo-based exporter (``torch.onnx.export(..., dynamo=True)``) with opset 18. While
exporting, every selective scan runs as the custom op ``mambazoo::selective_scan_fused`` whatever backend would run
it, and the custom ops are translated to ONNX by :mod:`mambazoo.ops.onnx_translations` (an ONNX ``Scan`` loop for the
scan). The batch dimension is dynamic by default; the image size is fixed at export time. The exported file is
checked with ONNX Runtime on the CPU against the eager model (see :func:`export_onnx`). TorchScript is not supported
(it is deprecated upstream); the legacy ONNX exporter (``dynamo=False``) is not supported either.

``.pt2`` files are ``torch.export`` programs (``torch.export.load(path).module()``); they call mambazoo's custom ops
with the scan kernel chosen at export time, so loading one needs ``import mambazoo.ops`` and that kernel (pass
``scan_backend="torch"`` when creating the model for a program that runs wherever PyTorch does).
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from .checkpoint import atomic_write
from .ops.selective_scan import route_through_custom_op

__all__ = ["ExportResult", "export_onnx", "export_program", "example_input", "onnx_translation_table"]

ONNX_RTOL = 1e-4  # verification: max |onnx - eager| <= ONNX_RTOL * max(1, max |eager|)


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote and how well it reproduces the eager model.

    Attributes:
        path: The written file.
        input_shape: Shape of the example input it was traced with.
        dynamic_batch: Whether the batch dimension is dynamic.
        max_abs_error: Largest |exported - eager| over the checked inputs (None if not checked).
        max_abs_output: Largest |eager| output, the scale of the error.
    """

    path: Path
    input_shape: tuple[int, ...]
    dynamic_batch: bool
    max_abs_error: Optional[float] = None
    max_abs_output: Optional[float] = None


def example_input(model: nn.Module, batch_size: int = 2, img_size: Optional[int] = None) -> Tensor:
    """A random input for ``model``: its configured input size (or ``img_size`` square), on its device and dtype."""
    channels, height, width = model.pretrained_cfg["input_size"] if hasattr(model, "pretrained_cfg") else (3, 224, 224)
    if img_size is not None:
        height = width = img_size
    parameter = next(model.parameters())
    return torch.randn(batch_size, channels, height, width, device=parameter.device, dtype=parameter.dtype)


def onnx_translation_table() -> dict[torch._ops.OpOverload, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export``: every custom op with a registered translation."""
    from .ops.onnx_translations import translations

    table = {}
    for qualified_name, function in translations().items():
        namespace, name = qualified_name.split("::")
        table[getattr(getattr(torch.ops, namespace), name).default] = function
    return table


def _dynamic_shapes(dynamic_batch: bool) -> Optional[tuple[dict[int, object]]]:
    return ({0: torch.export.Dim("batch")},) if dynamic_batch else None


def _check_example(example: Tensor, dynamic_batch: bool) -> None:
    if dynamic_batch and example.shape[0] < 2:
        raise ValueError("a dynamic batch needs an example batch of at least 2 (torch.export specialises size 1); "
                         f"got input shape {tuple(example.shape)}")


def export_program(
        model: nn.Module,
        path: Union[str, Path],
        example: Optional[Tensor] = None,
        dynamic_batch: bool = True,
) -> ExportResult:
    """Export ``model`` with ``torch.export`` and save the program to ``path`` (``.pt2``), atomically.

    Args:
        model: The model (put in eval mode).
        path: Output file.
        example: Example input; default :func:`example_input` (batch 2, the model's input size).
        dynamic_batch: Make the batch dimension dynamic.
    """
    model.eval()
    example = example_input(model) if example is None else example
    _check_example(example, dynamic_batch)
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes(dynamic_batch))
        error, scale = _max_error(lambda x: program.module()(x), model, example, dynamic_batch)
    with atomic_write(path) as temporary:
        torch.export.save(program, temporary)
    return ExportResult(Path(path), tuple(example.shape), dynamic_batch, error, scale)


def export_onnx(
        model: nn.Module,
        path: Union[str, Path],
        example: Optional[Tensor] = None,
        dynamic_batch: bool = True,
        opset: int = 18,
        verify: bool = True,
) -> ExportResult:
    """Export ``model`` to ONNX at ``path`` (atomically) and check it with ONNX Runtime against eager.

    Args:
        model: The model (put in eval mode).
        path: Output ``.onnx`` file.
        example: Example input; default :func:`example_input` (batch 2, the model's input size). The image size is
            fixed to its size.
        dynamic_batch: Make the batch dimension dynamic (checked at the example's batch and one more).
        opset: ONNX opset (the translations use opset 18 operators).
        verify: Run the file with ONNX Runtime (CPU) and raise (writing nothing) if max |onnx - eager| exceeds
            ``ONNX_RTOL * max(1, max |eager|)``; needs ``onnxruntime``.

    Returns:
        The path, input shape and the measured error.
    """
    model.eval()
    example = example_input(model) if example is None else example
    _check_example(example, dynamic_batch)
    with torch.no_grad(), route_through_custom_op():
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset,
                                    dynamic_shapes=_dynamic_shapes(dynamic_batch), input_names=["images"],
                                    output_names=["output"], custom_translation_table=onnx_translation_table(),
                                    verbose=False)
    error = scale = None
    with atomic_write(path) as temporary:  # a file that fails the check is not left behind
        program.save(str(temporary))
        if verify:
            error, scale = _max_error(_onnxruntime_runner(temporary), model, example, dynamic_batch)
            if error > ONNX_RTOL * max(1.0, scale):
                raise RuntimeError(f"the ONNX export of {type(model).__name__} does not reproduce the model: max abs "
                                   f"error {error:.3g} (outputs up to {scale:.3g}); {path} was not written")
    return ExportResult(Path(path), tuple(example.shape), dynamic_batch, error, scale)


def _onnxruntime_runner(path: Union[str, Path]) -> Callable[[Tensor], Tensor]:
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError("verifying an ONNX export needs onnxruntime (the 'export' extra of mambazoo), or pass "
                          "verify=False") from error
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: Tensor) -> Tensor:
        return torch.from_numpy(session.run(None, {name: x.detach().cpu().float().numpy()})[0])
    return run


def _max_error(run: Callable[[Tensor], Tensor], model: nn.Module, example: Tensor,
               dynamic_batch: bool) -> tuple[float, float]:
    """Largest |run(x) - model(x)| and largest |model(x)| over the example (and a batch one larger if dynamic)."""
    inputs = [example]
    if dynamic_batch:
        inputs.append(torch.randn((example.shape[0] + 1,) + tuple(example.shape[1:]), dtype=example.dtype,
                                  device=example.device))
    error = scale = 0.0
    with torch.no_grad():
        for x in inputs:
            expected = model(x).float().cpu()
            got = run(x).float().cpu()
            if got.shape != expected.shape:
                raise RuntimeError(f"exported output shape {tuple(got.shape)} != eager {tuple(expected.shape)}")
            error = max(error, (got - expected).abs().max().item())
            scale = max(scale, expected.abs().max().item())
    return error, scale

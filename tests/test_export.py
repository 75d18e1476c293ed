"""ONNX export: the custom ops' translations against the float64 reference, and every family's model run by ONNX
Runtime against eager PyTorch (dynamic batch)."""
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

import mambazoo
from mambazoo.export import ONNX_RTOL, export_onnx
from mambazoo.ops import causal_conv1d, selective_scan, state_scan
from mambazoo.ops.causal_conv1d import causal_conv1d_torch

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

MODELS = mambazoo.list_models("test_*")


class ScanVariants(nn.Module):
    """The scan with and without its optional inputs, forward and reverse: four calls in one exported graph."""

    def __init__(self, dim: int, d_state: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        self.A = nn.Parameter(-torch.rand(dim, d_state, generator=generator) * 4 - 0.5)
        self.D = nn.Parameter(torch.randn(dim, generator=generator))
        self.bias = nn.Parameter(torch.randn(dim, generator=generator) - 2)

    def forward(self, u, delta, B, C, z):
        return torch.stack([
            selective_scan(u, delta, self.A, B, C, D=self.D, z=z, delta_bias=self.bias, reverse=reverse)
            if with_options else selective_scan(u, delta, self.A, B, C, reverse=reverse)
            for with_options in (True, False) for reverse in (False, True)
        ])

    def reference(self, u, delta, B, C, z) -> torch.Tensor:
        """The same four scans by the float64 reference backend."""
        u, delta, A, B, C, z, D, bias = (t.double() for t in (u, delta, self.A, B, C, z, self.D, self.bias))
        return torch.stack([
            selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, reverse=reverse, backend="reference")
            if with_options else selective_scan(u, delta, A, B, C, reverse=reverse, backend="reference")
            for with_options in (True, False) for reverse in (False, True)
        ])


def _ort_run(path: Path, *inputs: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {name: x.numpy() for name, x in zip(names, inputs)})[0]


def _export(module: nn.Module, inputs: tuple, path: Path) -> None:
    from mambazoo.ops.selective_scan import route_through_custom_op

    with torch.no_grad(), route_through_custom_op():
        program = torch.onnx.export(module.eval(), inputs, dynamo=True, verbose=False,
                                    custom_translation_table=mambazoo.export.onnx_translation_table())
    program.save(str(path))


def test_scan_translation_matches_the_float64_reference(tmp_path: Path) -> None:
    module = ScanVariants(dim=6, d_state=4)
    generator = torch.Generator().manual_seed(2)
    u, delta, z = (torch.randn(2, 9, 6, generator=generator) for _ in range(3))
    delta = 3 * delta
    delta[0, 0, 0] = 25.0  # one step in softplus' linear branch (x > 20, as torch's threshold)
    B, C = (torch.randn(2, 9, 4, generator=generator) for _ in range(2))
    _export(module, (u, delta, B, C, z), tmp_path / "scan.onnx")
    assert sum(node.op_type == "Scan" for node in _all_nodes(onnx.load(str(tmp_path / "scan.onnx")))) >= 1
    got = torch.from_numpy(_ort_run(tmp_path / "scan.onnx", u, delta, B, C, z))
    with torch.no_grad():
        torch.testing.assert_close(got.double(), module.reference(u, delta, B, C, z), rtol=1e-5, atol=1e-5)


class ConvBothDirections(nn.Module):
    def __init__(self, dim: int, kernel_size: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(3)
        self.weight = nn.Parameter(torch.randn(dim, kernel_size, generator=generator))
        self.bias = nn.Parameter(torch.randn(dim, generator=generator))

    def forward(self, x):
        return torch.stack([causal_conv1d(x, self.weight, self.bias, activation="silu", reverse=reverse,
                                          backend="native") for reverse in (False, True)])


def test_native_conv_translation_matches_the_float64_torch_conv(tmp_path: Path) -> None:
    from mambazoo.ops import native

    if not native.AVAILABLE:
        pytest.skip(native.UNAVAILABLE_REASON)
    module = ConvBothDirections(dim=5, kernel_size=4)
    x = torch.randn(2, 11, 5, generator=torch.Generator().manual_seed(4))
    _export(module, (x,), tmp_path / "conv.onnx")
    assert any(node.op_type == "Conv" for node in _all_nodes(onnx.load(str(tmp_path / "conv.onnx"))))
    got = torch.from_numpy(_ort_run(tmp_path / "conv.onnx", x))
    weight, bias = module.weight.detach().double(), module.bias.detach().double()
    expected = torch.stack([causal_conv1d_torch(x.double(), weight, bias, reverse=reverse)
                            for reverse in (False, True)])
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def _all_nodes(model):
    """Every node of the graph, its functions and subgraphs (e.g. a Scan body)."""
    graphs = [model.graph] + [function for function in model.functions]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            yield node
            graphs.extend(attribute.g for attribute in node.attribute if attribute.type == onnx.AttributeProto.GRAPH)


@pytest.mark.parametrize("name", MODELS)
def test_every_family_exports_to_onnx_and_matches_eager(tmp_path: Path, name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    size = min(model.pretrained_cfg["input_size"][-1], 64)
    example = torch.randn(2, 3, size, size)
    path = tmp_path / f"{name}.onnx"
    result = export_onnx(model, path, example)  # raises if ONNX Runtime disagrees with eager beyond tolerance
    assert result.max_abs_error <= ONNX_RTOL * max(1.0, result.max_abs_output)
    assert result.max_abs_output > 0.01  # a non-degenerate output was compared
    exported = onnx.load(str(path))
    batch = exported.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value  # dynamic batch
    assert not any(node.domain.startswith("mambazoo") for node in _all_nodes(exported))
    if name != "test_mambaout":
        assert any(node.op_type == "Scan" for node in _all_nodes(exported))
    images = torch.randn(3, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(_ort_run(path, images)), model(images), rtol=1e-4, atol=1e-5)


def test_dynamic_batch_needs_an_example_batch_of_two(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="example batch of at least 2"):
        export_onnx(timm.create_model("test_mambaout"), tmp_path / "m.onnx", torch.randn(1, 3, 32, 32))


class StateScanVariants(nn.Module):
    """The all-states scan with and without a step bias, forward and reverse."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(4)
        self.A = nn.Parameter(-torch.rand(dim, 1, generator=generator) * 4 - 0.5)
        self.bias = nn.Parameter(torch.randn(dim, generator=generator) - 2)

    def forward(self, u, delta, B):
        return torch.stack([state_scan(u, delta, self.A, B, delta_bias=self.bias if with_bias else None,
                                       reverse=reverse)
                            for with_bias in (True, False) for reverse in (False, True)])

    def reference(self, u, delta, B) -> torch.Tensor:
        """The same scans by the float64 reference backend."""
        u, delta, A, B, bias = (t.double() for t in (u, delta, self.A, B, self.bias))
        return torch.stack([state_scan(u, delta, A, B, delta_bias=bias if with_bias else None, reverse=reverse,
                                       backend="reference")
                            for with_bias in (True, False) for reverse in (False, True)])


def test_state_scan_translation_matches_the_float64_reference(tmp_path: Path) -> None:
    module = StateScanVariants(dim=5)
    generator = torch.Generator().manual_seed(5)
    u, delta = (torch.randn(2, 11, 5, generator=generator) for _ in range(2))
    delta = 3 * delta
    delta[1, 3, 2] = 25.0  # softplus' linear branch
    B = torch.randn(2, 11, 1, generator=generator)
    _export(module, (u, delta, B), tmp_path / "state_scan.onnx")
    assert sum(node.op_type == "Scan" for node in _all_nodes(onnx.load(str(tmp_path / "state_scan.onnx")))) >= 1
    got = torch.from_numpy(_ort_run(tmp_path / "state_scan.onnx", u, delta, B))
    with torch.no_grad():
        torch.testing.assert_close(got.double(), module.reference(u, delta, B), rtol=1e-5, atol=1e-5)

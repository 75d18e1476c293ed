"""The declared requirements: a CPU-only PyTorch build satisfies them and no CUDA package is required directly."""
import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _requirements() -> list[Requirement]:
    block = re.search(r"^dependencies = \[(.*?)^\]", PYPROJECT.read_text(), re.S | re.M).group(1)
    return [Requirement(text) for text in re.findall(r'"([^"]+)"', block)]


def test_cpu_only_torch_builds_satisfy_the_requirements() -> None:
    torch = next(r for r in _requirements() if r.name == "torch")
    assert torch.specifier.contains(Version("2.14.1+cpu"))  # the PyTorch CPU index's local version label
    assert not torch.specifier.contains(Version("2.13.0+cpu"))  # too old: pairs with a CUDA-linked torchvision


def test_no_cuda_or_triton_package_is_a_direct_requirement() -> None:
    names = {r.name.lower() for r in _requirements()}
    assert not {name for name in names if name.startswith(("nvidia", "triton", "cuda"))}

"""Smoke test of benchmarks/native_cpu.py (quick sizes, one round): every section, the allocator line and the
page-fault column come out, and the result is written where asked."""
import importlib.util
import sys
from pathlib import Path

import pytest

from mambazoo.ops import native

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not native.AVAILABLE,
                                 reason=f"native kernels unavailable: {native.UNAVAILABLE_REASON}")]


def test_quick_native_benchmark_writes_every_table(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports its sibling modules ...
    for sibling in ("scan", "vim_cpu"):
        monkeypatch.delitem(sys.modules, sibling, raising=False)  # ... which leave sys.modules afterwards
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")  # only reported: glibc read it at process start
    spec = importlib.util.spec_from_file_location("native_cpu", BENCHMARKS / "native_cpu.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "native_cpu", script)
    spec.loader.exec_module(script)
    script.main(["--quick", "--rounds", "1", "--output", str(tmp_path / "native.md")])
    text = (tmp_path / "native.md").read_text()
    for title in ("Selective scan per ISA vs GEMM", "Causal conv1d vs a copy of the same bytes",
                  "Inference kernels vs their composites", "Vim-Ti vs DeiT-Ti (SDPA), batch 1"):
        assert f"## {title}" in text
    assert "* allocator: MALLOC_MMAP_THRESHOLD_=1048576" in text
    kernel_rows = [line for line in text.splitlines()
                   if line.startswith(("| `rms_norm`", "| `gated_sum`", "| `bidirectional_scan`"))]
    assert len(kernel_rows) == 3 and all("1×197×" in row for row in kernel_rows)
    model_rows = [line for line in text.splitlines() if line.startswith("| 224 |")]
    assert [row.split("|")[2].strip() for row in model_rows] == ["this process, interleaved", "one process per model"]
    for row in model_rows:
        faults = row.rstrip(" |").rsplit("|", 1)[1].split("/")
        assert len(faults) == 2 and all(int(count) >= 0 for count in faults)  # DeiT / Vim page faults per image

"""The native library must exist wherever it can be built: a missing backend fails the suite instead of skipping it.

Without this check a broken ``csrc/`` (or a compiler that silently cannot build it, e.g. clang without OpenMP
headers before the probe was fixed) ships green, because every native test skips when the library is missing.
"""
import os
import shlex
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

from mambazoo.ops import native


def build_compiler() -> str:
    """The C compiler setuptools uses for extensions: $CC, else the one Python was built with."""
    return os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"


def test_native_backend_is_built_when_a_c_compiler_is_present():
    compiler = shlex.split(build_compiler())[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}): the native backend cannot be built here")
    if native.UNAVAILABLE_REASON.startswith("disabled by"):
        pytest.skip(native.UNAVAILABLE_REASON)
    assert native.AVAILABLE, (f"{compiler} is installed but the native backend is unavailable: "
                              f"{native.UNAVAILABLE_REASON}")


def test_portable_kernels_match_the_scalar_c_check(tmp_path):
    """``tests/aarch64/check_portable.c`` (run under QEMU by ``.ci/aarch64-check``) also runs here, on the host build's
    portable variant: the scalar double-precision references of the scan, the all-states scan, the conv, the RMSNorm
    and the gate agree."""
    compiler = shlex.split(build_compiler())[0]
    if shutil.which(compiler) is None or not native.AVAILABLE:
        pytest.skip("needs a C compiler and the native library")
    root = Path(__file__).resolve().parents[1]
    program = tmp_path / "check_portable"
    subprocess.run([compiler, "-O2", f"-I{root / 'csrc'}", str(root / "tests/aarch64/check_portable.c"), "-o",
                    str(program), "-ldl", "-lm"], check=True, capture_output=True)
    result = subprocess.run([str(program), str(native.LIBRARY_PATH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all-states scan forward" in result.stdout and "gated sum" in result.stdout

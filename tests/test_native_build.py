"""The native library must exist wherever it can be built: a missing backend fails the suite instead of skipping it.

Without this check a broken ``csrc/`` (or a compiler that silently cannot build it, e.g. clang without OpenMP
headers before the probe was fixed) ships green, because every native test skips when the library is missing.
"""
import os
import shlex
import shutil
import sysconfig

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

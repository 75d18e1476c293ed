"""Build the optional native CPU kernels (csrc/) next to the pure-Python package described in pyproject.toml.

The extension is a plain C shared library loaded with ctypes by ``mambazoo.ops.native`` (no Python or PyTorch
headers, so it is not tied to a Python or torch version). It is optional: without a working C compiler the install
still succeeds and the library falls back to its PyTorch implementations.
"""
import os
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

PREFERRED_FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c11")
FALLBACK_FLAGS = {"-march=native": "-mavx2", "-O3": "-O2"}


class OptionalNativeBuild(build_ext):
    """Compile with the preferred flags the compiler accepts (each replaced by a fallback or dropped if not)."""

    def _accepts(self, flag: str) -> bool:
        with tempfile.TemporaryDirectory() as tmp:
            source = os.path.join(tmp, "probe.c")
            with open(source, "w") as file:
                file.write("int probe(void) { return 0; }\n")
            try:
                self.compiler.compile([source], output_dir=tmp, extra_postargs=[flag])
            except Exception:  # any compiler error means the flag is unusable
                return False
        return True

    def build_extension(self, ext: Extension) -> None:
        flags = []
        for flag in PREFERRED_FLAGS:
            for candidate in (flag, FALLBACK_FLAGS.get(flag)):
                if candidate and self._accepts(candidate):
                    flags.append(candidate)
                    break
        ext.extra_compile_args = flags
        ext.extra_link_args = ["-fopenmp"] if "-fopenmp" in flags else []
        super().build_extension(ext)

    def get_export_symbols(self, ext: Extension) -> list[str]:
        return []  # a ctypes library, not a Python module: no PyInit_* symbol


native = Extension(
    "mambazoo._native",
    sources=["csrc/selective_scan.c", "csrc/state_scan.c", "csrc/causal_conv1d.c"],
    depends=["csrc/simd.h"],
    optional=True,
)

setup(ext_modules=[native], cmdclass={"build_ext": OptionalNativeBuild})

"""Build the optional native CPU kernels (csrc/) next to the pure-Python package described in pyproject.toml.

The kernels become one plain C shared library, ``mambazoo/libmambazoo_native.so``, loaded with ctypes by
``mambazoo.ops.native``: no Python or PyTorch headers or symbols, so it does not depend on the Python or torch
version (the wheel is tagged ``py3-none-<platform>``). Every kernel source (each ``csrc/*.c`` except the dispatcher)
is compiled once per instruction set the target supports -- on x86-64 ``avx512``, ``avx2`` (with FMA) and
``portable`` (the x86-64 baseline), elsewhere ``portable`` only -- with ``-DMZ_ISA=<isa>``, which suffixes its
exported entry points; Python picks the best variant the running CPU supports at load time (docs/native.md). No
``-march=native``: the library runs on any CPU of the target architecture.

Works with GCC and clang (``CC=clang``; OpenMP then needs the LLVM runtime, e.g. Debian's ``libomp-dev``). Without
OpenMP the kernels build single-threaded; without a working C compiler the install still succeeds and the library
falls back to its PyTorch implementations (``make test`` fails in that case, see the README).
``MAMBAZOO_NATIVE_ISAS`` (e.g. ``"avx2 portable"``) restricts which variants are compiled.
"""
import contextlib
import os
import sys
import tempfile
from glob import glob
from typing import Iterator

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    try:
        from wheel.bdist_wheel import bdist_wheel
    except ImportError:  # building in place without the wheel package: no wheel to tag
        bdist_wheel = None

LIBRARY_NAME = "libmambazoo_native.so"
DISPATCH_SOURCE = "csrc/dispatch.c"
KERNEL_SOURCES = sorted(path for path in glob("csrc/*.c") if path != DISPATCH_SOURCE)
HEADERS = sorted(glob("csrc/*.h"))
COMMON_FLAGS = ("-O3", "-std=gnu11", "-fvisibility=hidden", "-ffp-contract=fast", "-fno-math-errno", "-Wno-psabi")
ISA_FLAGS = {  # best first; each list is what the kernels need, checked at run time by csrc/dispatch.c
    "avx512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma"],
    "avx2": ["-mavx2", "-mfma"],
    "portable": [],
}
X86_ONLY = ("avx512", "avx2")
OPENMP_PROBE = "#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
X86_PROBE = "#if !defined(__x86_64__) && !defined(__i386__)\n#error not x86\n#endif\nint probe(void) { return 0; }\n"


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """Send the compiler's output to /dev/null (probes that fail on purpose would print errors)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for descriptor in saved:
                os.close(descriptor)


class NativeBuild(build_ext):
    """Compile the kernel sources once per ISA and link them, with the dispatcher, into one shared library."""

    def _compiles(self, code: str, flags: list[str], link: bool = False) -> bool:
        with tempfile.TemporaryDirectory() as tmp, _silenced():
            source = os.path.join(tmp, "probe.c")
            with open(source, "w") as file:
                file.write(code)
            try:
                objects = self.compiler.compile([source], output_dir=tmp, extra_postargs=flags)
                if link:
                    self.compiler.link_executable(objects, "probe", output_dir=tmp, extra_postargs=flags)
            except Exception:  # any compiler or linker error means "not usable"
                return False
        return True

    def _isas(self) -> list[str]:
        requested = os.environ.get("MAMBAZOO_NATIVE_ISAS", "").split() or list(ISA_FLAGS)
        unknown = set(requested) - set(ISA_FLAGS)
        if unknown:
            raise ValueError(f"MAMBAZOO_NATIVE_ISAS: unknown ISA(s) {sorted(unknown)}; choose from {list(ISA_FLAGS)}")
        x86 = self._compiles(X86_PROBE, [])
        isas = [isa for isa in ISA_FLAGS if isa in requested and (x86 or isa not in X86_ONLY)]
        return [isa for isa in isas if self._compiles(X86_PROBE if isa in X86_ONLY else "int p;\n", ISA_FLAGS[isa])]

    def _openmp_flags(self) -> list[str]:
        """-fopenmp if the compiler has a working OpenMP (header and runtime: clang needs libomp), else none."""
        if self._compiles(OPENMP_PROBE, ["-fopenmp"], link=True):
            return ["-fopenmp"]
        print("warning: no working OpenMP (omp.h / runtime library); the native kernels will run single-threaded",
              file=sys.stderr)
        return []

    def build_extension(self, ext: Extension) -> None:
        common = [flag for flag in COMMON_FLAGS if self._compiles("int p;\n", [flag])]
        openmp = self._openmp_flags()
        isas = self._isas()
        if not isas:
            raise RuntimeError("no instruction-set variant of the native kernels compiles with this compiler")
        objects = []
        for isa in isas:
            objects += self.compiler.compile(KERNEL_SOURCES, output_dir=os.path.join(self.build_temp, isa),
                                             macros=[("MZ_ISA", isa)], extra_postargs=common + openmp +
                                             ISA_FLAGS[isa], depends=HEADERS)
        objects += self.compiler.compile([DISPATCH_SOURCE], output_dir=self.build_temp,
                                         macros=[("MZ_COMPILED_ISAS", '"' + " ".join(isas) + '"')],
                                         extra_postargs=common + openmp, depends=HEADERS)
        output = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
        self.compiler.link_shared_object(objects, output, extra_postargs=openmp, target_lang="c")

    def get_ext_filename(self, fullname: str) -> str:
        return os.path.join(*fullname.split(".")[:-1], LIBRARY_NAME)  # a plain library: no Python ABI suffix

    def get_export_symbols(self, ext: Extension) -> list[str]:
        return []  # a ctypes library, not a Python module: no PyInit_* symbol


commands = {"build_ext": NativeBuild}
if bdist_wheel is not None:
    class PlatformWheel(bdist_wheel):
        """Tag wheels py3-none-<platform>: the library has no Python ABI."""

        def get_tag(self) -> tuple[str, str, str]:
            return ("py3", "none", super().get_tag()[2])

    commands["bdist_wheel"] = PlatformWheel

native = Extension("mambazoo._native", sources=KERNEL_SOURCES + [DISPATCH_SOURCE], depends=HEADERS, optional=True)

setup(ext_modules=[native], cmdclass=commands)

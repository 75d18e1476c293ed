"""Compile the Triton kernels for an sm_90 GPU without one: registers, spills and the per-step instruction mix.

Each configuration is compiled with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (the kernel module imports
only triton, so this runs on any machine with triton, even without torch). For every kernel the script reports the
registers per thread, spill memory (local memory per thread: must be 0), shared memory, and, for each innermost loop
of the SASS (the per-step loops), the number of instructions and of the ones that bound the step time: MUFU (special
function unit: exp2, reciprocal), SHFL (warp shuffles), LDG/STG (global loads/stores), LDGSTS (asynchronous copies of
the software pipeline), BAR (barriers). docs/triton.md turns these counts into the roofline.

Usage (the second form checks an older triton, e.g. the GPU machine's 3.6, from a separate environment)::

    PYTHONPATH=src python benchmarks/triton_compile_check.py
    /path/to/python-with-triton-3.6 benchmarks/triton_compile_check.py --out benchmarks/results/triton_sm90_3.6.md

Results: ``benchmarks/results/triton_sm90_compile.md`` (written atomically) unless ``--out`` says otherwise.
"""
import argparse
import collections
import importlib.util
import inspect
import os
import platform
import re
import subprocess
import tempfile
import time
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "src" / "mambazoo" / "ops" / "triton_kernels.py"
RESULTS = ROOT / "benchmarks" / "results"
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
TYPES = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
# Tensors that take the input dtype; every other pointer is float32.
SEQUENCE_POINTERS = {"u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "y_ptr", "grad_y_ptr", "du_ptr", "ddelta_ptr",
                     "dz_ptr", "x_ptr", "dx_ptr"}
# Integer arguments that are multiples of 16 for Vim-Ti shapes (dim 384, d_state 16); the launcher specialises on it.
DIVISIBLE_INTS = {"dim", "d_state", "seg_len", "stride_u_b", "stride_u_l", "stride_delta_b", "stride_delta_l",
                  "stride_z_b", "stride_z_l", "stride_x_b", "stride_x_l", "stride_y_b", "stride_y_l"}
SASS_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
REPORTED = ("MUFU", "SHFL", "LDG", "STG", "LDGSTS", "BAR", "LDS", "STS")


def load_kernels():
    spec = importlib.util.spec_from_file_location("mambazoo_triton_kernels", KERNELS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_kernel(kernel, dtype: str, constants: dict, num_warps: int):
    """Compile for sm_90 with the launchers' options; returns the compiled kernel (ptx, cubin, metadata)."""
    names = list(inspect.signature(kernel.fn).parameters)
    signature, attrs = {}, {}
    for index, name in enumerate(names):
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = TYPES[dtype] if name in SEQUENCE_POINTERS else "*fp32"
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name in DIVISIBLE_INTS:
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=dict(constants), attrs=attrs)
    options = dict(num_warps=num_warps)
    if kernel.fn.__name__.startswith("_scan"):
        options["maxnreg"] = 255  # mambazoo.ops.triton_scan.MAX_REGISTERS
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run([str(TOOLS / "cuobjdump"), "-res-usage", handle.name], capture_output=True,
                              text=True, check=True).stdout
        sass = subprocess.run([str(TOOLS / "nvdisasm"), "-c", handle.name], capture_output=True, text=True,
                              check=True).stdout
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return dict(registers=int(usage["REG"]), local=int(usage["LOCAL"]) + int(usage["STACK"]),
                shared=int(usage["SHARED"]), sass=sass)


def innermost_loops(sass: str) -> list[collections.Counter]:
    """Opcode counts of every loop (backward branch) that contains no other loop, in program order."""
    lines, labels = [], {}
    for line in sass.splitlines():
        label = re.match(r"^(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(lines)
            continue
        match = SASS_LINE.match(line)
        if match:
            lines.append((match.group(2), line))
    loops = []
    for end, (opcode, line) in enumerate(lines):
        target = re.search(r"BRA\s+`\((\.L_x_\d+)\)", line) if opcode == "BRA" else None
        if target and labels.get(target.group(1), end + 1) <= end:
            loops.append((labels[target.group(1)], end))
    inner = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    return [collections.Counter(opcode for opcode, _ in lines[a:b + 1]) for a, b in sorted(inner)]


def scan_configs(module) -> list[tuple[str, object, str, dict, int]]:
    """(label, kernel, dtype, constexprs, num_warps) of the configurations that matter (the launcher's defaults:
    1 warp, 32 channels per program, forward loads pipelined in 3 stages, backward prefetching one step ahead)."""
    common = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, CHUNK=64, BLOCK_D=32, PAD_N=False,
                  FAST=True)
    backward = dict(LOCAL=False, HAS_GRAD_LAST=False, PAD_D=False, NUM_STAGES=1)
    configs = []
    for dtype in ("fp32", "bf16"):
        for d_state, vec in ((16, 4), (8, 4), (1, 1)):
            for reverse in (False, True):
                constants = dict(common, REVERSE=reverse, BLOCK_N=d_state, VEC_B=vec, VEC_C=vec)
                label = f"N={d_state} {dtype}{' reverse' if reverse else ''}"
                configs.append((f"fwd {label}", module._scan_fwd_kernel, dtype,
                                dict(constants, LOCAL=False, NUM_STAGES=3), 1))
                configs.append((f"bwd {label}", module._scan_bwd_kernel, dtype, dict(constants, **backward), 1))
    vim = dict(common, REVERSE=False, BLOCK_N=16, VEC_B=4, VEC_C=4)
    configs += [
        ("fwd split pass N=16 fp32", module._scan_fwd_kernel, "fp32", dict(vim, LOCAL=True, NUM_STAGES=3), 1),
        ("bwd split pass N=16 fp32", module._scan_bwd_kernel, "fp32", dict(vim, **dict(backward, LOCAL=True)), 1),
        ("fwd N=16 fp32, no pipelining", module._scan_fwd_kernel, "fp32", dict(vim, LOCAL=False, NUM_STAGES=1), 1),
        ("bwd N=16 fp32, 2-stage pipelining", module._scan_bwd_kernel, "fp32",
         dict(vim, **dict(backward, NUM_STAGES=2)), 1),
        ("fwd N=16 fp32, BLOCK_D=64", module._scan_fwd_kernel, "fp32",
         dict(vim, LOCAL=False, NUM_STAGES=3, BLOCK_D=64), 1),
        ("bwd N=16 fp32, BLOCK_D=16", module._scan_bwd_kernel, "fp32", dict(vim, **backward, BLOCK_D=16), 1),
    ]
    return configs


def conv_configs(module) -> list[tuple[str, object, str, dict, int]]:
    configs = []
    if hasattr(module, "_conv_fwd_kernel"):
        for dtype in ("fp32", "bf16"):
            constants = dict(KERNEL_SIZE=4, HAS_BIAS=True, SILU=True, REVERSE=False, BLOCK_D=64, FAST=True)
            configs.append((f"conv fwd k=4 {dtype}", module._conv_fwd_kernel, dtype, dict(constants, BLOCK_L=64), 4))
            configs.append((f"conv bwd k=4 {dtype}", module._conv_bwd_kernel, dtype, dict(constants, BLOCK_L=32), 4))
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "triton_sm90_compile.md")
    parser.add_argument("--only", default="", help="substring filter on the configuration labels")
    parser.add_argument("--dump", type=Path, default=None, help="also write each kernel's TTGIR, PTX and SASS here")
    args = parser.parse_args()
    module = load_kernels()
    rows = []
    for label, kernel, dtype, constants, warps in scan_configs(module) + conv_configs(module):
        if args.only not in label:
            continue
        started = time.perf_counter()
        compiled = compile_kernel(kernel, dtype, constants, warps)
        usage = resource_usage(compiled.asm["cubin"])
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            stem = re.sub(r"[^A-Za-z0-9]+", "_", label)
            for suffix, text in ((".ttgir", compiled.asm["ttgir"]), (".ptx", compiled.asm["ptx"]),
                                 (".sass", usage["sass"])):
                (args.dump / (stem + suffix)).write_text(text)
        loops = innermost_loops(usage["sass"])
        mixes = "; ".join(f"{sum(loop.values())} instr (" + ", ".join(f"{op} {loop[op]}" for op in REPORTED
                                                                        if loop[op]) + ")" for loop in loops)
        rows.append(f"| {label} | {warps} | {usage['registers']} | {usage['local']} | {usage['shared']} | {mixes} |")
        print(rows[-1], f"({time.perf_counter() - started:.1f} s)", flush=True)
    header = ["# Triton kernels compiled for sm_90 (no GPU needed)", "",
              f"triton {triton.__version__}, target GPUTarget('cuda', 90, 32), host {platform.node()}, "
              f"{time.strftime('%Y-%m-%d')}. Command: `python benchmarks/triton_compile_check.py`.", "",
              "Registers per thread; spills = local memory per thread in bytes (0 = no spills); shared memory per "
              "program in bytes; per innermost SASS loop (the per-step loops, in program order): instructions per "
              "iteration and the ones that bound a step (MUFU = exp2/reciprocal on the special function units).", "",
              "| kernel | warps | registers | spills (B) | shared (B) | innermost loops: per-iteration mix |",
              "|---|---|---|---|---|---|"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=args.out.parent, delete=False, suffix=".tmp") as handle:
        handle.write("\n".join(header + rows) + "\n")
    os.replace(handle.name, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

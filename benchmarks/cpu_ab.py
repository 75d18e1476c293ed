"""A/B timing of a model on CPU: an earlier git revision of the package against the working tree.

Two versions of the package cannot share one process (same module and custom-op names), so the script alternates
fresh processes, A then B, for several rounds; each process builds the model, warms up and times its forward passes
(``inference_mode``, fp32, the median of ``--iterations``). The reported speed ratio is the median over rounds of
(A time / B time) within a round, so machine drift hits both alike (>1: the working tree is faster).

The revision's ``src/`` is exported with ``git archive``; its native library is the working tree's build when
``csrc/`` and ``setup.py`` are unchanged between the two (otherwise it is built in the export).

Usage: ``python benchmarks/cpu_ab.py --baseline cd136ec [--model vim_tiny_patch16_224] [--rounds 7]``.
Results: ``benchmarks/results/cpu_ab_<model>.md`` (written atomically).
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

CHILD = """
import json, statistics, sys, time
import torch, timm
import mambazoo
model_name, img_size, batch, warmup, iterations = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \\
    int(sys.argv[5])
torch.manual_seed(0)
model = timm.create_model(model_name, img_size=img_size).eval()
images = torch.randn(batch, 3, img_size, img_size)
with torch.inference_mode():
    for _ in range(warmup):
        model(images)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        model(images)
        times.append(time.perf_counter() - start)
print(json.dumps(dict(ms=1000 * statistics.median(times), backends=mambazoo.ops.available_backends())))
"""


def export_revision(revision: str, target: Path) -> Path:
    """``src/`` of ``revision`` under ``target``, with a native extension; returns the source directory."""
    archive = subprocess.run(["git", "archive", revision, "src", "csrc", "setup.py", "pyproject.toml"], cwd=ROOT,
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    same_build = subprocess.run(["git", "diff", "--quiet", revision, "--", "csrc", "setup.py"],
                                cwd=ROOT).returncode == 0
    built = sorted((ROOT / "src" / "mambazoo").glob("*native*.so"))  # libmambazoo_native.so (earlier: _native.*.so)
    if same_build and built:
        shutil.copy(built[0], target / "src" / "mambazoo")
    else:
        subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=target, check=True,
                       capture_output=True, env=dict(os.environ, PYTHONPATH=str(target / "src")))
    return target / "src"


def run_once(source: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-c", CHILD, args.model, str(args.img_size), str(args.batch_size), str(args.warmup),
               str(args.iterations)]
    result = subprocess.run(command, capture_output=True, text=True, check=True,
                            env=dict(os.environ, PYTHONPATH=str(source)))
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="git revision A (B is the working tree)")
    parser.add_argument("--model", default="vim_tiny_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        sources = dict(A=export_revision(args.baseline, Path(directory)), B=ROOT / "src")
        times = {"A": [], "B": []}
        backends = {}
        for round_index in range(args.rounds):
            for label in ("A", "B") if round_index % 2 == 0 else ("B", "A"):
                result = run_once(sources[label], args)
                times[label].append(result["ms"])
                backends[label] = result["backends"]
            print(f"round {round_index + 1}: A {times['A'][-1]:.1f} ms, B {times['B'][-1]:.1f} ms", flush=True)
    ratios = [a / b for a, b in zip(times["A"], times["B"])]
    head = git_describe()
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    lines = [f"# CPU A/B: {args.model} at {args.img_size} px, batch {args.batch_size}", "",
             f"A = `{args.baseline}`, B = working tree at `{head}`; {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs, load average {load} at the end, {time.strftime('%Y-%m-%d')}.", "",
             f"Command: `python benchmarks/cpu_ab.py --baseline {args.baseline} --model {args.model} --img-size "
             f"{args.img_size} --batch-size {args.batch_size} --rounds {args.rounds}`; each process: "
             f"{args.warmup} warm-up + {args.iterations} timed forwards (fp32, inference_mode), median; processes "
             "alternate A/B (order flipped every round).", "",
             "| version | median ms [min-max] over rounds | scan backends available |", "|---|---|---|"]
    for label in ("A", "B"):
        values = times[label]
        chosen = ", ".join(backends[label])
        lines.append(f"| {label} | {statistics.median(values):.1f} [{min(values):.1f}-{max(values):.1f}] | {chosen} |")
    lines += ["", f"Speed ratio B vs A (median of per-round A/B time ratios): **x{statistics.median(ratios):.3f}** "
                  f"[{min(ratios):.3f}-{max(ratios):.3f}] (>1: B faster)."]
    out = args.out or RESULTS / f"cpu_ab_{args.model}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as handle:
        handle.write("\n".join(lines) + "\n")
    os.replace(handle.name, out)
    print("\n".join(lines[-1:]))
    print(f"wrote {out}")


def git_describe() -> str:
    result = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    return result.stdout.strip()


if __name__ == "__main__":
    main()
